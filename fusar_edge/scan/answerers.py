"""Who answers a scan's chips: this process one chip at a time, this process in batches, or a
pool of Ray workers (``scan.ray_pool``).

Every answerer takes ``(chip, image)`` pairs from the scan's reader, one at a time and only as
it has room (memory follows the chips in flight, never the scene), and yields one journal
record per chip in the order they finish; the scan sorts them by chip, so who answered and in
what order never shows in the outputs. A chip with no valid pixel (``image is None``) gets its
"nodata" record without troubling a model.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import AnchorError, CoverageError, InputError
from .grid import Chip


# the answer's stage timings a scan adds up (``total`` and ``decode_per_token`` would count twice)
STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill", "decode", "parse")


@dataclass(frozen=True)
class ChipQuestion:
    """What every chip of one scan is asked (the same text for all: their prompts then share a
    length, which lets batched decoding run them together)."""

    task: str
    label: str
    question: str
    no_anchors: bool
    max_new_tokens: int | None = None  # None: the bundle's own bound
    date: str | None = None  # YYYY-MM-DD for the anchors; None: each scene's own date tag


def anchor_setting(tiles, allow_no_coverage: bool) -> dict | None:
    """Where a scan's anchors come from, for its journal header: a resumed scan with another tile
    store (or coverage rule) would mix two runs' answers, so it is refused like another model."""
    if tiles is None:
        return None
    root = getattr(tiles, "root", tiles)
    return {"tiles": str(Path(root).resolve()), "allow_no_coverage": bool(allow_no_coverage)}


def nodata_record(chip: Chip) -> dict:
    return {"chip": chip.index, "window": [chip.x0, chip.y0, chip.width, chip.height], "status": "nodata"}


def answer_chip(rt, chip: Chip, img, q: ChipQuestion) -> dict:
    """One chip's journal record: the model's raw text, the parsed answer, the anchors it had.
    ``timings`` (ms per stage) stay in the journal only: they differ run to run."""
    if img is None:
        return nodata_record(chip)
    try:
        ans = rt.ask(img, q.question, task=q.task, label=q.label if q.task == "detect" else None,
                     no_anchors=q.no_anchors, max_new_tokens=q.max_new_tokens, date=q.date)
    except AnchorError as exc:
        remedy = ("scan's --allow-no-coverage answers chips the store does not cover without anchors, flagged in its "
                  "outputs" if isinstance(exc, CoverageError) else "scan --no-anchors answers without anchors (TLM "
                  "skipped), into another --out")
        raise InputError(f"chip {chip.index} (window at x {chip.x0}, y {chip.y0}): {exc}; {remedy}") from None
    return {**nodata_record(chip), "status": "done", "text": ans.text, "answer": ans.answer,
            "parse_error": ans.parse_error,
            "anchor": {k: ans.anchor.get(k) for k in ("source", "coverage", "tlm", "year", "notes") if k in ans.anchor},
            "timings": {k: v for k, v in ans.timings_ms.items() if k in STAGES}}


class LocalAnswerer:
    """This process, one chip at a time: ``rt.ask`` exactly as ``fusar-edge ask`` runs it."""

    def __init__(self, rt):
        self.rt = rt
        self.weights, self.preset, self.chip_size = rt.weights, rt.config.name, int(rt.config.chip_size)
        self.anchors = anchor_setting(getattr(rt, "tiles", None), getattr(rt, "allow_empty_anchors", False))

    def answer(self, jobs: Iterable[tuple[Chip, object]], q: ChipQuestion) -> Iterator[dict]:
        for chip, img in jobs:
            yield answer_chip(self.rt, chip, img, q)

    def close(self) -> None:
        pass


class BatchedAnswerer(LocalAnswerer):
    """This process, ``batch`` chips at a time: their ViT forwards run as one call and their
    prefill and decode steps as one batch (``Runtime.enable_batching``), each chip asked from its
    own thread. Reading stays in the caller's thread (a rasterio dataset is not shared between
    threads), at most ``2 * batch`` chips ahead of the answers.

    A batched matrix product may round differently in the last bits from a single one, so at a
    greedy near-tie a chip's answer can differ from ``LocalAnswerer``'s (``batching``'s note); a
    test compares the two on the demo.
    """

    def __init__(self, rt, batch: int):
        super().__init__(rt)
        self.batch = int(batch)
        rt.enable_batching(max_batch=self.batch, window_ms=20.0)
        self._pool = ThreadPoolExecutor(self.batch, thread_name_prefix="fusar-scan")

    def answer(self, jobs: Iterable[tuple[Chip, object]], q: ChipQuestion) -> Iterator[dict]:
        pending: dict = {}
        ready: collections.deque = collections.deque()
        for chip, img in jobs:
            if img is None:
                ready.append(nodata_record(chip))
            else:
                pending[self._pool.submit(answer_chip, self.rt, chip, img, q)] = chip
            while ready:
                yield ready.popleft()
            while len(pending) >= 2 * self.batch:
                yield from self._finished(pending)
        while pending:
            yield from self._finished(pending)

    @staticmethod
    def _finished(pending: dict) -> Iterator[dict]:
        """The chips answered by now (at least one), in chip order."""
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: pending[f].index):
            pending.pop(fut)
            yield fut.result()  # a chip's error stops the scan; the chips journaled so far are kept

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def timed(jobs: Iterable[tuple[Chip, object]], read_ms: dict) -> Iterator[tuple[Chip, object]]:
    """Pass ``jobs`` through, recording how long producing each one (the windowed read) took."""
    it = iter(jobs)
    while True:
        t0 = time.perf_counter()
        try:
            chip, img = next(it)
        except StopIteration:
            return
        read_ms[chip.index] = (time.perf_counter() - t0) * 1e3
        yield chip, img
