"""The paper's metrics over prediction rows, each definition written down here.

Rows are the reference's ``infer_val.py`` rows (``id, coordinate_size, question, gt,
prediction_text, detections, parse_error``) plus ``task`` (count / locate / classify / detect
/ caption) and, optionally, ``group`` (a subset name such as ``distractors``, reported
separately). Predictions are parsed from ``prediction_text`` with ``fusar_edge.tasks``.

- **count**: ``exact`` = share of rows whose parsed count equals the ground truth (a parse
  error is a wrong answer); ``mae`` = mean absolute error over the rows that parsed
  (``unparsed`` says how many did not; null when none did). ``by_truth``: for each true count,
  its rows, the share answered exactly and what was answered (a row of the confusion matrix;
  ``unparsed`` for parse errors): where a model collapses onto favourite answers, it shows.
  ``by_label``: ``n``, ``exact``, ``mae`` and ``unparsed`` per object class the question names
  (``tasks.extract_label``; ``other`` when it names none), present when any question names one:
  a model that counts ships and guesses aircraft shows it (the overall number hides a class
  that is a fifth of the rows).
- **classify**: ``exact`` = share of rows whose parsed class, lower-cased and trimmed, equals
  the ground truth lower-cased and trimmed.
- **locate**: ``top1`` = share of rows whose 3x3 grid cell (``top-left`` ... ``bottom-right``)
  equals the ground-truth cell; a parse error or a "no target" answer is wrong.
- **detect**: precision / recall / F1 at IoU 0.25 and 0.5. Per row, predicted and ground-truth
  boxes of the same label (case-insensitive) are matched one to one, greedily by decreasing
  IoU, counting a pair only at IoU >= the threshold; true positives, false positives and false
  negatives are summed over all rows (micro average). Boxes are compared in the raw chip
  coordinates on both sides (``coordinate_size``, e.g. 504; no clipping), so a box the model
  printed partly outside the chip is judged as printed. A parse error counts as no
  predictions. With no predicted box precision is 0, with no ground-truth box recall is 1, and
  F1 is 0 when precision + recall is 0; with neither (nothing to find and nothing found over
  all rows) the three are null: there is nothing to measure, and a model whose every answer
  failed to parse must not score 1.
- **caption**: not scored (free text); rows are counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterable

from .. import tasks

IOU_THRESHOLDS = (0.25, 0.5)


def gt_count(gt: Any) -> int:
    if isinstance(gt, bool):
        raise ValueError(f"count ground truth: expected an integer, got {gt!r}")
    if isinstance(gt, int):
        return gt
    if isinstance(gt, str) and gt.strip().lstrip("-").isdigit():
        return int(gt.strip())
    raise ValueError(f"count ground truth: expected an integer, got {gt!r}")


def check_ground_truth(task: str, gt: Any) -> None:
    """Raise ``ValueError`` when the metrics cannot read ``gt`` for ``task``."""
    if task == "count":
        gt_count(gt)
    elif task == "detect":
        gt_boxes(gt)


def gt_boxes(gt: Any) -> list[dict[str, Any]]:
    """The reference's detection ground truth: a list of ``{"bbox_2d", "label"}``, or "None"."""
    if gt is None or (isinstance(gt, str) and gt.strip().lower() in ("none", "null", "")):
        return []
    if isinstance(gt, str):
        gt = json.loads(gt)
    if not isinstance(gt, list) or not all(isinstance(d, dict) and len(d.get("bbox_2d", ())) == 4 for d in gt):
        raise ValueError(f"detect ground truth: expected a list of {{bbox_2d, label}} or 'None', got {str(gt)[:80]}")
    return gt


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0 for boxes with no area."""
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def match(preds: list[dict[str, Any]], gts: list[dict[str, Any]], threshold: float) -> int:
    """True positives: one-to-one greedy matching by decreasing IoU, same label only."""
    pairs = []
    for i, p in enumerate(preds):
        for j, g in enumerate(gts):
            if str(p.get("label", "")).strip().lower() != str(g.get("label", "")).strip().lower():
                continue
            v = iou([float(x) for x in p["bbox_2d"]], [float(x) for x in g["bbox_2d"]])
            if v >= threshold and v > 0:
                pairs.append((v, i, j))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_g, tp = set(), set(), 0
    for _, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            tp += 1
    return tp


def prf(tp: int, n_pred: int, n_gt: int) -> dict[str, float | None]:
    if n_pred == 0 and n_gt == 0:
        return {"precision": None, "recall": None, "f1": None}
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def predicted_boxes(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A row's predicted boxes in raw chip coordinates (``detections``, else parsed from the text)."""
    dets = row.get("detections")
    if dets is None:
        size = int(row.get("coordinate_size", 504))
        parsed = tasks.parse_answer("detect", row.get("prediction_text") or "", chip_size=size,
                                    image_size=(size, size), label=None)
        dets = [{"bbox_2d": d["bbox_chip"], "label": d["label"]} for d in parsed.value or []]
    return dets


def _parsed(task: str, row: dict[str, Any]):
    size = int(row.get("coordinate_size", 504))
    return tasks.parse_answer(task, row.get("prediction_text") or "", chip_size=size, image_size=(size, size))


def row_task(row: dict[str, Any]) -> str:
    return row.get("task") or tasks.infer_task(row["question"])


def counted_label(row: dict[str, Any]) -> str:
    """The object class a count question names (``by_label``'s key), ``other`` when it names none."""
    return tasks.extract_label(str(row.get("question") or "")) or "other"


def row_right(task: str, row: dict[str, Any]) -> bool | None:
    """Whether one row's answer is right, as the task's headline score counts it (count and
    classify exact, locate top-1); None for tasks scored only over all rows (detect, caption)."""
    if task == "count":
        return _parsed("count", row).value == gt_count(row["gt"])
    if task == "classify":
        return (_parsed("classify", row).value or "").strip().lower() == str(row["gt"]).strip().lower()
    if task == "locate":
        value = _parsed("locate", row).value
        return bool(value) and value["cell"] == str(row["gt"]).strip().lower()
    return None


def score(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics per task over ``rows``, and per ``group`` within each task."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[row_task(row)].append(row)
    out: dict[str, Any] = {}
    for task, task_rows in sorted(by_task.items()):
        out[task] = _score_task(task, task_rows)
        groups = sorted({r["group"] for r in task_rows if r.get("group")})
        if groups:
            out[task]["groups"] = {g: _score_task(task, [r for r in task_rows if r.get("group") == g])
                                   for g in groups}
    return out


def _score_task(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    res: dict[str, Any] = {"n": n}
    if task == "count":
        pairs = [(_parsed("count", r).value, gt_count(r["gt"])) for r in rows]
        answers: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        labels: dict[str, list[tuple[int | None, int]]] = defaultdict(list)
        for r, (value, truth) in zip(rows, pairs):
            answers[truth]["unparsed" if value is None else str(value)] += 1
            labels[counted_label(r)].append((value, truth))
        res.update(_count_scores(pairs),
                   by_truth={str(t): {"n": sum(a.values()), "exact": a.get(str(t), 0) / sum(a.values()),
                                      "answers": dict(sorted(a.items(), key=lambda kv: answer_order(kv[0])))}
                             for t, a in sorted(answers.items())})
        if set(labels) != {"other"}:
            res["by_label"] = {label: {"n": len(p), **_count_scores(p)} for label, p in sorted(labels.items())}
    elif task == "classify":
        res.update(exact=sum(row_right(task, r) for r in rows) / n)
    elif task == "locate":
        res.update(top1=sum(row_right(task, r) for r in rows) / n)
    elif task == "detect":
        pairs = [(predicted_boxes(r), gt_boxes(r["gt"])) for r in rows]  # parsed once, matched per threshold
        n_pred = sum(len(p) for p, _ in pairs)
        n_gt = sum(len(g) for _, g in pairs)
        for t in IOU_THRESHOLDS:
            tp = sum(match(p, g, t) for p, g in pairs)
            res[f"iou{t:g}"] = {"tp": tp, **prf(tp, n_pred, n_gt)}
        res.update(predicted=n_pred, ground_truth=n_gt,
                   parse_errors=sum(1 for r in rows if r.get("parse_error")))
    return res


def _count_scores(pairs: list[tuple[int | None, int]]) -> dict[str, Any]:
    """exact / mae / unparsed of (parsed answer or None, truth) pairs, as defined above."""
    errors = [abs(value - truth) for value, truth in pairs if value is not None]
    return {"exact": sum(1 for value, truth in pairs if value == truth) / len(pairs),
            "mae": sum(errors) / len(errors) if errors else None, "unparsed": len(pairs) - len(errors)}


def answer_order(key: str) -> tuple[int, int]:
    """Sort key of a count answer: the counts in order, then ``unparsed``."""
    return (1, 0) if key == "unparsed" else (0, int(key))


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """One number per task for tables and plots (count exact, classify exact, locate top-1, detect F1@0.5);
    a task whose number is undefined (null) is left out."""
    keys = {"count": ("exact",), "classify": ("exact",), "locate": ("top1",), "detect": ("iou0.5", "f1")}
    out = {}
    for task, path in keys.items():
        if task in metrics:
            value: Any = metrics[task]
            for k in path:
                value = value[k]
            if value is not None:
                out[task] = float(value)
    return out
