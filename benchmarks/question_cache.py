"""Time to first token for a repeated question, with and without GRASP's question cache.

    python benchmarks/question_cache.py --bundle small --rounds 12
    python benchmarks/question_cache.py --bundle EXPORTED_SMALL --backend onnxruntime --rounds 12

Asks one question of one scene with ``max_new_tokens=1`` (so the total is vision + anchors +
fusion + prefill: the time to first token), alternating cache on (filled by a first ask) and
off, and prints the medians (first two rounds dropped as warm-up) and their ratio. The random
``small`` preset has GRASP on; the demo has it off, so the cache does nothing there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fusar_edge.bench.machine import machine_info  # noqa: E402
from fusar_edge.data.synth import sample_scene  # noqa: E402
from fusar_edge.question_cache import QuestionCache  # noqa: E402
from fusar_edge.runtime import Runtime  # noqa: E402

QUESTION = "How many ships are there in this image?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="small")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="torch", help="torch, or onnxruntime for an exported bundle")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    scene = sample_scene(Path(tempfile.mkdtemp(prefix="qcache-")) / "s", seed=5)
    rt = Runtime.open(a.bundle, threads=a.threads, backend=a.backend)
    if getattr(rt.stages, "has_grasp", False) is False:
        print(f"{a.bundle}: GRASP is off, the question cache has nothing to do", file=sys.stderr)
    totals: dict[str, list[float]] = {"cached": [], "uncached": []}
    stages: dict[str, dict] = {}
    for _ in range(a.rounds):
        for mode in totals:  # interleaved: load on the shared box hits both alike
            rt.stages.questions = QuestionCache(256 if mode == "cached" else 0)
            if mode == "cached":
                rt.ask(scene["scene_tif"], QUESTION, anchors=scene["anchors"], max_new_tokens=1)
            t = rt.ask(scene["scene_tif"], QUESTION, anchors=scene["anchors"], max_new_tokens=1).timings_ms
            totals[mode].append(t["total"])
            stages[mode] = {k: t[k] for k in ("vision", "fusion", "prefill", "total")}
    median = {k: round(statistics.median(v[2:]), 1) for k, v in totals.items()}
    result = {"bundle": a.bundle, "backend": a.backend, "threads": a.threads, "rounds": a.rounds, "ttft_ms_median": median,
              "speedup": round(median["uncached"] / median["cached"], 2), "last_round_stages_ms": stages,
              "command": "python benchmarks/question_cache.py " + " ".join(sys.argv[1:]), "machine": machine_info()}
    print(json.dumps({k: result[k] for k in ("bundle", "ttft_ms_median", "speedup", "last_round_stages_ms")}, indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
