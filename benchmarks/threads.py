"""`ask` latency against thread count, per model and backend, interleaved: what default to pick.

    python benchmarks/threads.py --case demo:torch --case DIR:onnxruntime ... [--rounds 8]

A case is BUNDLE:BACKEND (``demo`` = the built-in demo bundle). Each round asks every
(case, threads) once about the `fusar-edge sample` scene (32 new tokens, a caption question so
that all 32 are generated); medians are reported. Writes
``benchmarks/results/threads-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", required=True, metavar="BUNDLE:BACKEND")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--max-threads", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args()

    import torch

    from fusar_edge.data.synth import sample_scene
    from fusar_edge.runtime import Runtime

    tmp = Path(tempfile.mkdtemp())
    sample_scene(tmp, seed=0)
    counts = list(range(1, a.max_threads + 1))
    runtimes = {}
    for case in a.case:
        bundle, backend = case.rsplit(":", 1)
        for n in counts:
            runtimes[(case, n)] = Runtime.open(None if bundle == "demo" else bundle, tiles=tmp / "tiles",
                                               backend=backend, threads=n)
    times = {k: [] for k in runtimes}
    for r in range(a.rounds):
        for (case, n), rt in runtimes.items():
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            rt.ask(tmp / "scene.tif", "Describe the scene.", max_new_tokens=32)
            times[(case, n)].append(time.perf_counter() - t0)
    rows = [{"case": case, "threads": n, "ask_ms": round(statistics.median(v) * 1e3, 1)}
            for (case, n), v in times.items()]
    out = ROOT / "benchmarks" / "results" / f"threads-{socket.gethostname().split('.')[0]}.json"
    out.write_text(json.dumps({"rows": rows, "rounds": a.rounds, "load_avg_1m_at_end": os.getloadavg()[0],
                               "command": "python benchmarks/threads.py " + " ".join(sys.argv[1:])}, indent=2) + "\n")
    for row in rows:
        print(f"{row['case']:40s} threads {row['threads']}: {row['ask_ms']} ms")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
