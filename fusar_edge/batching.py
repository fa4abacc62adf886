"""Micro-batching of concurrent requests: one thread runs the vision stage of several images
together, another the prefill and decode steps of several sequences.

Requests still read, anchor and fuse in their own threads. Each batcher takes the first
waiting job, waits up to ``window_s`` for more (at most ``max_batch``) and runs them as one:

- ``VisionBatcher``: the images' patches in one ViT call (``stages.vision_batch``; the ViT
  attends within each image, TLM then runs per image). Backends whose vision graph has a fixed
  single-image shape (ONNX) run the images one by one in that thread: correct, no gain.
- ``DecodeBatcher``: sequences that share a length and M-RoPE positions decode as one batch:
  one ``prefill_batch``, then one ``step_batch`` per token for all of them. A finished sequence
  keeps being fed (its tokens are dropped) until the longest one stops, so a batch costs its
  longest answer.

Exactness: with one request in a batch the path is ``ask``'s own. With several, the batched
matrix products may round differently in the last bits than single ones, so a greedy
near-tie can break the other way; that is why batching is opt-in (``Runtime.enable_batching``,
``serve --batch``) and ``ask`` without it stays exactly sequential.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np


_STOP = object()  # close(): the batch thread serves what it holds, then ends


class _Batcher:
    """A daemon thread serving jobs from a bounded queue in gathered batches."""

    name = "fusar-batch"

    def __init__(self, stages, max_batch: int = 8, window_s: float = 0.005, max_waiting: int = 256):
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"{type(self).__name__}: max_batch >= 1 and window_s >= 0")
        self.stages, self.max_batch, self.window_s = stages, max_batch, window_s
        self._queue: queue.Queue = queue.Queue(max_waiting)
        self.largest_batch = 0  # for tests and metrics: did batches form?
        self.batches = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _submit(self, job):
        """Queue ``job`` and block until the batch thread has served it."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__}: closed")
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def close(self, timeout: float = 30.0) -> None:
        """End the batch thread once the jobs queued before this call are served."""
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        while True:  # a job queued by a caller racing this close(): refused, not left waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.error = RuntimeError(f"{type(self).__name__}: closed")
                job.done.set()

    def _gather(self) -> tuple[list, bool]:
        """-> (jobs to serve now, whether close() asked the thread to end after them)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        jobs = [first]
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _groups(self, jobs: list) -> list[list]:
        return [jobs]

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._gather()
            for group in self._groups(jobs) if jobs else []:
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(group))
                try:
                    self._serve(group)
                except BaseException as exc:  # the callers raise it; this thread lives on
                    for job in group:
                        job.error = exc
                finally:
                    for job in group:
                        job.done.set()

    def _serve(self, group: list) -> None:
        raise NotImplementedError


@dataclass
class VisionJob:
    pixels: np.ndarray
    grid_thw: np.ndarray
    anchors: object
    done: threading.Event = field(default_factory=threading.Event)
    tokens: object = None
    batch_size: int = 0
    error: BaseException | None = None


class VisionBatcher(_Batcher):
    name = "fusar-vision"

    def vision(self, pixels, grid_thw, anchors) -> VisionJob:
        """The visual tokens of one image, computed with whatever other images are waiting."""
        return self._submit(VisionJob(pixels, grid_thw, anchors))

    def _serve(self, group: list[VisionJob]) -> None:
        tokens = self.stages.vision_batch([(j.pixels, j.grid_thw, j.anchors) for j in group])
        for job, t in zip(group, tokens):
            job.tokens, job.batch_size = t, len(group)


@dataclass
class DecodeJob:
    embeds: object  # [1, L, C], the stages' own type (torch tensor or OrtValue)
    positions: np.ndarray  # int64 [3, 1, L]
    next_position: int
    limit: int
    picker: object  # GreedyPicker
    prefix_len: int = 0  # the shared text head (layout.image_start): its KV rows may be reused
    done: threading.Event = field(default_factory=threading.Event)
    ids: list = field(default_factory=list)
    decode_ms: list = field(default_factory=list)
    prefill_ms: float = 0.0
    batch_size: int = 0
    error: BaseException | None = None


class DecodeBatcher(_Batcher):
    name = "fusar-decode"

    def generate(self, embeds, positions, next_position: int, limit: int, picker, prefix_len: int = 0) -> DecodeJob:
        """Decode one sequence with whatever else is waiting; blocks until it is done."""
        return self._submit(DecodeJob(embeds, positions, next_position, limit, picker, prefix_len))

    def _groups(self, jobs: list[DecodeJob]) -> list[list[DecodeJob]]:
        groups: list[list[DecodeJob]] = []
        for job in jobs:  # same length and positions decode together
            for g in groups:
                if g[0].next_position == job.next_position and np.array_equal(g[0].positions, job.positions):
                    g.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def _serve(self, group: list[DecodeJob]) -> None:
        stages = self.stages
        for job in group:
            job.batch_size = len(group)
        t0 = time.perf_counter()
        logits, state = stages.prefill_batch(stages.stack([j.embeds for j in group]), group[0].positions,
                                             min(j.prefix_len for j in group))
        prefill_ms = (time.perf_counter() - t0) * 1e3
        tokens = [job.picker(logits[i]) for i, job in enumerate(group)]
        active = [True] * len(group)
        for job in group:
            job.prefill_ms = prefill_ms
        position = group[0].next_position
        while True:
            for i, job in enumerate(group):
                if active[i] and (job.picker.is_stop(tokens[i]) or len(job.ids) >= job.limit):
                    active[i] = False
                elif active[i]:
                    job.ids.append(tokens[i])
                    if len(job.ids) >= job.limit:
                        active[i] = False
            if not any(active):
                return
            t0 = time.perf_counter()
            logits, state = stages.step_batch(tokens, position, state)
            position += 1
            step_ms = (time.perf_counter() - t0) * 1e3
            for i, job in enumerate(group):
                if active[i]:
                    tokens[i] = job.picker(logits[i])
                    job.decode_ms.append(step_ms)
