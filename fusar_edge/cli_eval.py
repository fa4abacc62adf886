"""``fusar-edge eval``: a manifest's rows through one model, then the paper's metrics."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import add_device_args, positive_int

EPILOG = """examples:
  fusar-edge eval bundles/demo --data data/synth/stage2-test.jsonl --out runs/eval-demo
  fusar-edge eval bundles/demo --data data/synth/stage2-test.jsonl --out runs/eval-noaef --no-anchors
  fusar-edge eval bundles/demo --data data/synth/stage2-val.jsonl --out runs/eval-count --tasks count
  fusar-edge eval bundles/demo-int4 --data data/synth/stage2-test.jsonl --out runs/eval-int4 --backend onnxruntime

Writes predictions.jsonl (the reference infer_val.py rows + task, group, token_ids),
metrics.json, metrics.md and metrics.png into OUT. Metric definitions:
fusar_edge/evaluate/metrics.py.
"""


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a bundle on a manifest with the paper's metrics",
                       description="Answer every row of a reference-format manifest with one model load, write the "
                                   "rows as infer_val.py does, and score them: counting exact match and MAE, "
                                   "classification exact match, 3x3 localisation top-1, detection P/R/F1 at IoU "
                                   "0.25 and 0.5.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("bundle", nargs="?", help="bundle directory or preset name (default: the built-in demo)")
    e.add_argument("--data", required=True, metavar="MANIFEST", help="JSONL/JSON rows (image, aef, question, answer)")
    e.add_argument("--out", required=True, metavar="DIR", help="directory for predictions and metrics")
    e.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (default) or onnxruntime (BUNDLE must hold an onnx/ export)")
    add_device_args(e)
    e.add_argument("--no-anchors", action="store_true", help="answer without the rows' AEF anchors (TLM skipped)")
    e.add_argument("--tasks", type=lambda text: [t.strip() for t in text.split(",") if t.strip()], metavar="T[,T]",
                   help="only the rows of these tasks, e.g. count or count,classify (default: every row)")
    e.add_argument("--limit", type=int, metavar="N", help="only the first N rows (of --tasks' rows, if given)")
    e.add_argument("--threads", type=positive_int, help="intra-op threads, torch or ONNX Runtime (default: the physical "
                                               "cores this process may use, within any container CPU quota)")
    e.add_argument("--json", action="store_true", help="print metrics.json instead of the table")


def run(args) -> int:
    from .evaluate.report import count_answers_table, count_labels_table, markdown_table
    from .evaluate.runner import evaluate

    from .threads import resolve_threads, set_torch_threads

    args.threads = resolve_threads(args.threads)
    if args.backend == "torch":  # ONNX Runtime takes threads= itself; no torch on the edge
        set_torch_threads(args.threads)
    bar = {}

    def progress(done: int, total: int) -> None:
        if args.json:
            return
        if "bar" not in bar:
            from tqdm import tqdm

            bar["bar"] = tqdm(total=total, desc="eval", unit="row", file=sys.stderr, dynamic_ncols=True)
        bar["bar"].update(done - bar["bar"].n)

    try:
        report = evaluate(args.bundle, args.data, args.out, backend=args.backend, no_anchors=args.no_anchors,
                          limit=args.limit, threads=args.threads, progress=progress, device=args.device,
                          dtype=args.dtype, tasks=args.tasks)
    finally:
        if "bar" in bar:
            bar["bar"].close()
    if args.json:
        print(json.dumps(report))
    else:
        print(markdown_table([report]), end="")
        answers = count_answers_table(report)
        if answers:
            print(f"\ncounting, by true count:\n{answers}", end="")
        labels = count_labels_table(report)
        if labels:
            print(f"\ncounting, by counted class:\n{labels}", end="")
        print(f"wrote {args.out} ({report['rows']} rows in {report['seconds']} s)")
        if report.get("note"):
            print(f"note: {report['note']}", file=sys.stderr)
    return 0
