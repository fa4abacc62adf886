"""Decode and prefill speed of two checkouts' ONNX Runtime decoders, interleaved A/B.

    git worktree add /tmp/before 5508cd6      # e.g. the commit before a decoder change
    python benchmarks/decoder_ab.py --a /tmp/before BUNDLE_EXPORTED_THERE --b . BUNDLE_EXPORTED_HERE \\
        [--env-b FUSAR_ORT_SPIN=0] [--threads-b 1] [--sets 4] [--rounds 8]

Each set runs A, then B, in a fresh process (`--worker`): a 141-token prompt through the
bundle's `onnx-int4/` embed + decoder (`OnnxStages.prefill`), then 31 greedy decode steps,
`--rounds` times after one warm-up; per set the medians. The printed result is the median over
sets of each side and the B / A ratio. Only the decoder path is timed (no vision, no fusion),
so a change to the decoder graph or its runtime shows alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(tree: str, bundle: str, rounds: int, threads: int) -> None:
    sys.path.insert(0, tree)
    import numpy as np

    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.model.rope import text_positions

    st = OnnxStages(Path(bundle) / "onnx-int4", device="cpu", threads=threads)
    prompt = (np.arange(141) * 7) % 500
    prefill, decode = [], []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        logits, state = st.prefill(st.embed(prompt), text_positions(0, 141))
        p = time.perf_counter() - t0
        tok, steps = int(np.argmax(logits)), []
        for k in range(31):
            t0 = time.perf_counter()
            logits, state = st.step(tok, 141 + k, state)
            tok = int(np.argmax(logits))
            steps.append(time.perf_counter() - t0)
        if r:
            prefill.append(p)
            decode.append(statistics.median(steps))
    print(json.dumps({"prefill_ms": 1e3 * statistics.median(prefill), "decode_tok_s": 1 / statistics.median(decode)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", nargs=2, metavar=("TREE", "BUNDLE"))
    p.add_argument("--b", nargs=2, metavar=("TREE", "BUNDLE"))
    p.add_argument("--env-a", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--env-b", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--sets", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threads-b", type=int, help="B's threads, when they differ from A's")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.rounds, a.threads)
    if not (a.a and a.b):
        p.error("--a TREE BUNDLE and --b TREE BUNDLE are required")
    sides = {"A": (a.a, a.env_a), "B": (a.b, a.env_b)}
    threads = {"A": a.threads, "B": a.threads_b or a.threads}
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(a.sets):
        for name, ((tree, bundle), env) in sides.items():
            extra = dict(e.split("=", 1) for e in env)
            out = subprocess.run([sys.executable, __file__, "--worker", str(Path(tree).resolve()), bundle,
                                  "--rounds", str(a.rounds), "--threads", str(threads[name])],
                                 env={**os.environ, **extra}, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {}
    for name, rs in runs.items():
        result[name] = {"tree": sides[name][0][0], "bundle": sides[name][0][1], "env": sides[name][1],
                        "threads": threads[name],
                        "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rs), 1),
                        "prefill_ms": round(statistics.median(r["prefill_ms"] for r in rs), 1),
                        "sets": [{k: round(v, 1) for k, v in r.items()} for r in rs]}
    result["b_over_a_decode"] = round(result["B"]["decode_tok_s"] / result["A"]["decode_tok_s"], 2)
    result["command"] = "python benchmarks/decoder_ab.py " + " ".join(sys.argv[1:])
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
