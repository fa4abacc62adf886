"""Time to first token: the transformers baseline, a question never seen, a repeated question.

    python benchmarks/ttft.py --bundle EXPORTED_SMALL [--rounds 20] [--threads 2]

EXPORTED_SMALL: `fusar-edge export small --out DIR --gptq4` (random weights; GRASP on, so
the question pass exists). Every round runs, interleaved (load on a shared box falls on all
three alike), one request with one new token through:

- `baseline`: transformers `Qwen2_5_VLForConditionalGeneration.generate` on the bundle's torch
  weights (`fusar_edge.bench.runner.run_baseline_request`, as `fusar-edge bench` runs it);
- `new question`: fusar-edge on ONNX Runtime (the bundle's 4-bit graphs), GRASP's question
  cache emptied first, so the question pass over the language model runs;
- `repeated question`: the same with the question's encoding cached (`fusar_edge.question_cache`).

In both fusar-edge cases the prompt's head before the image (system prompt) has its KV rows
cached after the first round (`OnnxStages.prefill_batch(prefix_len=)`), as in any running
`serve` or `scan`: every request shares that head; the image and the question run every time.

TTFT = preprocess + anchors + vision + fusion + prefill (to the first token's argmax), the
same sum `fusar-edge bench` reports. Medians over rounds (the first two dropped as warm-up),
with each stage's median. Writes `benchmarks/results/ttft-<preset>-<host>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusar_edge.bench.clock import StageClock  # noqa: E402
from fusar_edge.bench.machine import machine_info  # noqa: E402
from fusar_edge.bench.runner import BenchSettings, run_baseline_request, run_request  # noqa: E402
from fusar_edge.geo.synthetic import write_demo_scene  # noqa: E402
from fusar_edge.runtime import Runtime  # noqa: E402
from fusar_edge.threads import set_torch_threads  # noqa: E402

TTFT_STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, type=Path, help="an exported bundle (onnx-int4/ inside)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    set_torch_threads(a.threads)  # the baseline's torch, as `fusar-edge bench --threads` sets it
    scene = write_demo_scene(Path(tempfile.mkdtemp(prefix="ttft-")) / "scene")  # bench's built-in scene
    settings = BenchSettings(model=str(a.bundle), image=scene["scene_tif"], tiles=scene["tiles"], new_tokens=1,
                             threads=a.threads)
    torch_rt = Runtime.open(a.bundle, backend="torch", device="cpu", threads=a.threads, tiles=scene["tiles"])
    ort_rt = Runtime.open(a.bundle, backend="onnxruntime", device="cpu", threads=a.threads, tiles=scene["tiles"])
    cases = {
        "baseline (transformers generate)": lambda clock: run_baseline_request(torch_rt, settings, clock),
        "fusar-edge onnxruntime, new question": lambda clock: run_request(ort_rt, settings, clock),
        "fusar-edge onnxruntime, repeated question": lambda clock: run_request(ort_rt, settings, clock,
                                                                                cold_question=False),
    }
    runs: dict[str, list[dict]] = {k: [] for k in cases}
    for r in range(a.rounds + 2):
        for name, request in cases.items():
            clock = StageClock()
            request(clock)
            totals = clock.totals()
            if r >= 2:
                runs[name].append({"ttft": sum(totals.get(s, 0.0) for s in TTFT_STAGES), **totals})
        print(f"\rround {r + 1}/{a.rounds + 2}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    rows = []
    base = statistics.median(x["ttft"] for x in runs[next(iter(cases))])
    for name, rs in runs.items():
        ttft = statistics.median(x["ttft"] for x in rs)
        stages = {s: round(statistics.median(x.get(s, 0.0) for x in rs), 1) for s in TTFT_STAGES if s in rs[0]}
        rows.append({"case": name, "ttft_ms": round(ttft, 1), "x_faster_than_baseline": round(base / ttft, 2),
                     "stages_ms": stages})
    preset = torch_rt.model.config.name
    result = {"bundle": str(a.bundle), "preset": preset, "threads": a.threads, "rounds": a.rounds,
              "machine": machine_info(), "load_avg_1m_at_end": os.getloadavg()[0],
              "cases": rows, "command": "python benchmarks/ttft.py " + " ".join(sys.argv[1:])}
    out = a.out or ROOT / "benchmarks" / "results" / f"ttft-{preset}-{socket.gethostname().split('.')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| case | TTFT ms | x faster than baseline | " + " | ".join(TTFT_STAGES) + " |")
    print("| --- | --- | --- |" + " --- |" * len(TTFT_STAGES))
    for row in rows:
        print(f"| {row['case']} | {row['ttft_ms']} | {row['x_faster_than_baseline']} | "
              + " | ".join(str(row["stages_ms"].get(s, "")) for s in TTFT_STAGES) + " |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
