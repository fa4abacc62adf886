"""A bounded pool of threads that answer questions on one shared ``Runtime``.

The runtime is safe to share (each ``ask`` keeps its own KV cache), so the server runs up to
``workers`` questions at once in threads and lets ``max_queue`` more wait. A request beyond
that is refused at once (the HTTP layer answers 503 + Retry-After) rather than queued without
bound. A request that outlives ``timeout_s`` gets its answer abandoned (504); its thread still
runs to the end (a forward pass cannot be interrupted) and keeps its slot until then, so a
slow model cannot be buried under retries.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Busy(Exception):
    """Every worker is busy and the queue is full."""


class TimedOut(Exception):
    """The answer took longer than the per-request timeout."""


class AskPool:
    def __init__(self, workers: int, max_queue: int, timeout_s: float):
        if workers < 1 or max_queue < 0 or not timeout_s > 0:
            raise ValueError("AskPool: workers >= 1, max_queue >= 0, timeout_s > 0")
        self.workers, self.max_queue, self.timeout_s = workers, max_queue, timeout_s
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fusar-ask")
        self._lock = threading.Lock()
        self._pending = 0  # admitted and not finished: queued + running
        self._running = 0

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return max(0, self._pending - self._running)

    def _admit(self) -> bool:
        with self._lock:
            if self._pending >= self.workers + self.max_queue:
                return False
            self._pending += 1
            return True

    def _release(self, _future: Future | None = None) -> None:
        with self._lock:
            self._pending -= 1

    def _call(self, fn: Callable, *args, **kwargs):
        with self._lock:
            self._running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1

    async def run(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` in a worker thread; raises ``Busy`` (nothing admitted) or ``TimedOut``."""
        if not self._admit():
            raise Busy()
        try:
            future = self._executor.submit(self._call, fn, *args, **kwargs)
        except RuntimeError:  # shutting down
            self._release()
            raise Busy() from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            raise TimedOut() from None

    def shutdown(self) -> None:
        """Wait for the questions already admitted, then stop the threads."""
        self._executor.shutdown(wait=True)
