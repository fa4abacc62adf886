"""``fusar-edge eval``: every row of a manifest through one runtime, then the metrics.

One model load for the whole manifest. Each row is answered as the reference's
``infer_val.py`` answers it (the question as given, the row's AEF anchors, greedy decoding
with the bundle's generation settings) and written as an ``infer_val.py`` row (``id,
coordinate_size, question, gt, prediction_text, detections, parse_error``) plus ``task``,
``group``, ``scene`` and the answer's ``token_ids``. ``detections`` holds the raw chip boxes
(``bbox_chip``) for detection rows, as the reference's parser returns them.

Outputs in ``OUT`` (each written to a temporary name and renamed): ``predictions.jsonl``,
``metrics.json`` (``metrics.score`` per task and group, with the run's settings), ``metrics.md``
(a table) and ``metrics.png`` (bars).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..fsutil import write_text_atomic
from ..data.task_rows import read_manifest
from . import metrics as M


def eval_rows(runtime, rows: list[dict], no_anchors: bool = False,
              progress: Callable[[int, int], None] | None = None) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        root = Path(row["_root"])
        task = row.get("task")
        ans = runtime.ask(root / row["image"], row["question"], anchors=None if no_anchors else root / row["aef"],
                          task=task, no_anchors=no_anchors)
        detections = None
        if ans.task == "detect" and isinstance(ans.answer, list):
            detections = [{"bbox_2d": d["bbox_chip"], "label": d["label"]} for d in ans.answer]
        out.append({"id": row.get("id", i), "coordinate_size": row.get("coordinate_size", runtime.config.chip_size),
                    "question": row["question"], "gt": row.get("answer"), "prediction_text": ans.text,
                    "detections": detections, "parse_error": ans.parse_error, "task": ans.task,
                    "group": row.get("group"), "scene": row.get("scene"), "token_ids": ans.token_ids})
        if progress:
            progress(i + 1, len(rows))
    return out


def check_scoreable(data, rows: list[dict]) -> None:
    """Every row has a task the metrics score and a ground truth they can read."""
    from ..tasks import TASKS

    for i, row in enumerate(rows):
        task = M.row_task(row)
        where = f"{data}: row {i + 1}"
        if task not in TASKS:
            raise InputError(f"{where}: task: expected one of {', '.join(TASKS)} (eval scores these), got {task!r}")
        try:
            M.check_ground_truth(task, row["answer"])
        except ValueError as exc:
            raise InputError(f"{where}: answer: {exc}") from None


def only_tasks(data, rows: list[dict], tasks: list[str]) -> list[dict]:
    """The rows of ``tasks`` (``eval --tasks``), in manifest order."""
    from ..tasks import TASKS

    for task in tasks:
        if task not in TASKS:
            raise InputError(f"--tasks: expected tasks among {', '.join(TASKS)}, got {task!r}")
    kept = [r for r in rows if M.row_task(r) in tasks]
    if not kept:
        raise InputError(f"{data}: no row of task {', '.join(tasks)} (--tasks)")
    return kept


def evaluate(bundle, data: str | Path, out: str | Path, backend: str = "torch", no_anchors: bool = False,
             limit: int | None = None, threads: int | None = None,
             progress: Callable[[int, int], None] | None = None, device: str = "auto", dtype=None,
             tasks: list[str] | None = None) -> dict:
    from ..runtime import Runtime

    rows = read_manifest(data, need_aef=not no_anchors)
    if tasks:  # before --limit: "the first N count rows", not "the count rows among the first N"
        rows = only_tasks(data, rows, tasks)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit: expected a positive number of rows, got {limit}")
        rows = rows[:limit]
    for row in rows:  # a missing file is named now, not after an hour of inference
        for key in ("image",) + (() if no_anchors else ("aef",)):
            if not (Path(row["_root"]) / row[key]).is_file():
                raise InputError(f"{data}: row {row.get('id', '?')}: {key} {row[key]!r} not found")
    check_scoreable(data, rows)  # a bad ground truth is named now, not after every row is answered
    rt = Runtime.open(bundle, backend=backend, threads=threads, device=device, dtype=dtype)
    sizes = {int(r["coordinate_size"]) for r in rows if r.get("coordinate_size") is not None}
    if sizes - {rt.config.chip_size}:
        raise InputError(f"{data}: coordinate_size {sorted(sizes)} but the model's chip is {rt.config.chip_size} px: "
                         "its boxes and the ground truth would be in different coordinates")
    t0 = time.perf_counter()
    preds = eval_rows(rt, rows, no_anchors, progress)
    seconds = time.perf_counter() - t0
    scores = M.score(preds)
    # where the numbers came from: bf16 on a GPU can answer a near-tie differently from fp32
    report = {"bundle": rt.source, "weights": rt.weights, "backend": backend, **rt.placement(), "anchors": not no_anchors,
              "data": str(data), **({"tasks": list(tasks)} if tasks else {}), "rows": len(rows),
              "seconds": round(seconds, 1),
              "rows_per_s": round(len(rows) / seconds, 2) if seconds else None,
              "metrics": scores, "headline": M.headline(scores)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / "predictions.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    _atomic_text(out / "metrics.json", json.dumps(report, indent=2, allow_nan=False) + "\n")  # strict JSON
    from .report import count_answers_table, count_labels_table, markdown_table, plot

    answers, labels = count_answers_table(report), count_labels_table(report)
    _atomic_text(out / "metrics.md", markdown_table([report]) + (f"\nCounting, by true count:\n\n{answers}" if answers else "")
                 + (f"\nCounting, by counted class:\n\n{labels}" if labels else ""))
    if plot([report], out / "metrics.png") is None:  # matplotlib is not on the edge install
        report["note"] = "metrics.png not written: matplotlib is not installed (pip install matplotlib)"
    return report


def _atomic_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)
