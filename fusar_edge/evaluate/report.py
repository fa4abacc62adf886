"""Evaluation reports for people: a Markdown table and a PNG of metric bars, over one or more runs."""

from __future__ import annotations

import math
from pathlib import Path

from ..fsutil import atomic_writer
from .metrics import answer_order

TASK_METRIC = {"count": "count exact", "locate": "locate top-1", "classify": "classify exact",
               "detect": "detect F1@0.5"}


def run_label(report: dict) -> str:
    return report.get("label") or f"{report['backend']}{'' if report['anchors'] else ', no anchors'}"


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown_table(reports: list[dict]) -> str:
    """Rows: runs; columns: every metric the paper reports, plus the distractor subset for counting."""
    cols = [("count exact", ("count", "exact")), ("count MAE", ("count", "mae")),
            ("count exact (distractors)", ("count", "groups", "distractors", "exact")),
            ("locate top-1", ("locate", "top1")), ("classify exact", ("classify", "exact")),
            ("detect P@0.5", ("detect", "iou0.5", "precision")), ("detect R@0.5", ("detect", "iou0.5", "recall")),
            ("detect F1@0.5", ("detect", "iou0.5", "f1")), ("detect F1@0.25", ("detect", "iou0.25", "f1"))]
    lines = ["| run | rows | " + " | ".join(c for c, _ in cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for r in reports:
        cells = []
        for _, path in cols:
            v = r["metrics"]
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            cells.append(_fmt(v))
        lines.append(f"| {run_label(r)} | {r['rows']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def count_answers_table(report: dict) -> str:
    """Counting's confusion matrix: a row per true count, how often each count was answered
    (empty when the run has no counting rows)."""
    by_truth = (report["metrics"].get("count") or {}).get("by_truth")
    if not by_truth:
        return ""
    keys = sorted({k for row in by_truth.values() for k in row["answers"]}, key=answer_order)
    lines = ["| true count | rows | exact | " + " | ".join(f"answered {k}" for k in keys) + " |",
             "|" + " --- |" * (len(keys) + 3)]
    for truth, row in by_truth.items():
        lines.append(f"| {truth} | {row['n']} | {_fmt(row['exact'])} | "
                     + " | ".join(str(row["answers"].get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def count_labels_table(report: dict) -> str:
    """Counting per object class the questions name (empty without counting rows or named classes)."""
    by_label = (report["metrics"].get("count") or {}).get("by_label")
    if not by_label:
        return ""
    lines = ["| counted class | rows | exact | MAE |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {m['n']} | {_fmt(m['exact'])} | {_fmt(m['mae'])} |" for label, m in by_label.items()]
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: str | Path) -> Path | None:
    """Grouped bars: one group per task's headline metric, one bar per run. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = [t for t in TASK_METRIC if any(t in r["headline"] for r in reports)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(reports)) ** 0.5), 3.6))
    width = 0.8 / max(1, len(reports))
    for i, r in enumerate(reports):
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [r["headline"].get(t, 0.0) for t in tasks], width, label=run_label(r))
    ax.set_xticks(range(len(tasks)), [TASK_METRIC[t] for t in tasks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_writer(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
