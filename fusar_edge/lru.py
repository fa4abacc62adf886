"""A bounded, thread-safe LRU: ``lookup(key, compute)`` returns the kept value or computes and keeps it.

Shared by GRASP's question cache (``question_cache``) and the decoder's prompt-prefix cache
(``OnnxStages.prefixes`` in ``backends.onnxruntime``). ``maxsize`` bounds the entries; 0 turns
caching off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


class BoundedCache:
    def __init__(self, maxsize: int):
        if maxsize < 0:
            raise ValueError(f"{type(self).__name__}: maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def lookup(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value kept under ``key``, or ``compute()`` (then kept, the oldest entry dropped)."""
        if self.maxsize == 0:
            return compute()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()  # outside the lock: two threads may both compute a new key once
        with self._lock:
            self.misses += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value
