"""Every metric of the demo on the held-out test split: with anchors, without AEF, fp32 ONNX, GPTQ 4-bit.

    python benchmarks/eval_demo.py --demo runs/demo --noaef runs/demo-noaef --data data/synth2k

``--demo`` / ``--noaef``: the output folders of ``scripts/train_demo.py`` (and of
``scripts/train_demo.py --no-aef``), each holding ``bundle/``. Exports the demo bundle to
fp32 ONNX and GPTQ 4-bit (``fusar-edge export``), evaluates the five runs below with
``fusar-edge eval`` on ``stage2-test.jsonl``, and writes ``benchmarks/results/eval-demo-vm.json``
(every metric, the commands, seeds and machine), ``.md`` (the table) and ``.png`` (the bars):

1. demo, torch, with anchors                (the shipped model)
2. demo, torch, anchors withheld at inference (TLM skipped: how much the model leans on AEF)
3. no-AEF model (same data and budget, trained without anchors): the paper's ablation
4. demo, fp32 ONNX export, onnxruntime
5. demo, GPTQ 4-bit export (MatMulNBits), onnxruntime
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusar_edge.bench.machine import machine_info  # noqa: E402
from fusar_edge.evaluate.report import markdown_table, plot  # noqa: E402


def cli(*argv: str) -> None:
    print("$ fusar-edge " + shlex.join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "fusar_edge.cli", *argv], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--noaef", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dataset whose stage2-test.jsonl is scored")
    p.add_argument("--train-data", type=Path,
                   help="the dataset the runs were trained on, for the recorded commands (default: --data)")
    p.add_argument("--work", type=Path, default=Path("runs/eval-demo"))
    p.add_argument("--threads", default="2")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval-demo-vm")
    a = p.parse_args()
    test = str(a.data / "stage2-test.jsonl")
    bundle = a.demo / "bundle"
    onnx, int4 = a.work / "demo-onnx", a.work / "demo-int4"
    if not onnx.exists():
        cli("export", str(bundle), "--out", str(onnx), "--onnx")
    if not int4.exists():
        cli("export", str(bundle), "--out", str(int4), "--gptq4", "--calib", "32", "--group-size", "64")
    runs = [
        ("demo, torch, anchors", [str(bundle)], []),
        ("demo, torch, anchors withheld", [str(bundle)], ["--no-anchors"]),
        ("trained without AEF", [str(a.noaef / "bundle")], ["--no-anchors"]),
        ("demo, ONNX fp32", [str(onnx)], ["--backend", "onnxruntime"]),
        ("demo, ONNX GPTQ 4-bit", [str(int4)], ["--backend", "onnxruntime"]),
    ]
    reports, commands = [], []
    for label, target, flags in runs:
        out = a.work / label.replace(", ", "-").replace(" ", "_")
        argv = ["eval", *target, "--data", test, "--out", str(out), "--threads", a.threads, *flags]
        if not (out / "metrics.json").is_file():
            cli(*argv)
        report = json.loads((out / "metrics.json").read_text())
        report["label"] = label
        reports.append(report)
        commands.append("fusar-edge " + shlex.join(argv))
    if (int4 / "onnx").is_dir():  # the int4 export also holds the fp32 graphs; make sure 4-bit ran
        assert reports[-1]["metrics"], "no metrics for the 4-bit run"
    train = {name: json.loads((a.demo / name / "train.json").read_text()) for name in ("s0", "s1", "s2")}
    result = {"what": "demo model, held-out test split, every metric", "data": str(a.data),
              "dataset": json.loads((a.data / "dataset.json").read_text()),
              "commands": [f"python scripts/train_demo.py --out {a.demo} --data {a.train_data or a.data}",
                           f"python scripts/train_demo.py --out {a.noaef} --no-aef --data {a.train_data or a.data}",
                           f"python benchmarks/eval_demo.py --demo {a.demo} --noaef {a.noaef} --data {a.data} "
                           f"--work {a.work}" + (f" --train-data {a.train_data}" if a.train_data else ""), *commands],
              "shipped_bundle": "fusar_edge/assets/demo-bundle = " + str(bundle),
              "bundle_weights": reports[0]["weights"],
              "training": {k: {kk: v[kk] for kk in ("steps", "samples", "seconds", "final_loss", "settings", "dense")
                               if kk in v} for k, v in train.items()},
              "machine": machine_info(), "runs": reports}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    a.out.with_suffix(".md").write_text(markdown_table(reports))
    plot(reports, a.out.with_suffix(".png"))
    print(markdown_table(reports))


if __name__ == "__main__":
    main()
