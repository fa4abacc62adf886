"""A bounded, thread-safe LRU of GRASP's question encodings, keyed by the question's token ids.

GRASP's query vector is the language model's view of the question alone: a whole text-only pass
over the LLM before the first token (on a 7B model the largest part of time-to-first-token after
the vision tower). Operators ask the same few questions of many scenes, so the encoding is kept
by token ids; a hit skips the pass and gives the very tensor the miss computed, so answers are
unchanged. ``maxsize`` bounds memory (one ``[C]`` or ``[1, n, C]`` tensor per entry); 0 turns it off.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np


class QuestionCache:
    def __init__(self, maxsize: int = 256):
        if maxsize < 0:
            raise ValueError(f"QuestionCache: maxsize must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get(self, question_ids, compute: Callable[[], Any]) -> Any:
        """The cached encoding of ``question_ids``, or ``compute()`` (then kept)."""
        if self.maxsize == 0:
            return compute()
        key = tuple(np.asarray(question_ids).reshape(-1).tolist())  # a tensor, array or list of ids
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()  # outside the lock: two threads may both compute a new question once
        with self._lock:
            self.misses += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)
        return value

