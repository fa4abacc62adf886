"""Load test of `fusar-edge serve`: N concurrent clients against the built-in demo on loopback.

The server runs in this process (uvicorn in a thread, the same app `fusar-edge serve` builds)
on 127.0.0.1 and a free port; clients are threads with their own HTTP connection. Every
client sends its share of a fixed number of requests (questions about a few synthetic scenes,
uploaded as GeoTIFFs with their anchors.npz); each answer's token ids are
compared with the same question asked sequentially through `Runtime.ask` beforehand.

Reported: throughput (requests/s), latency p50/p99 (client side, upload to JSON), errors,
wrong answers, and the server process's RSS before, in the middle and after the run (flat
RSS: nothing accumulates per request).

    python benchmarks/serve.py                           # 4 clients, 120 requests, 2 workers
    python benchmarks/serve.py --clients 8 --requests 400 --workers 2 --threads 1

Writes ``benchmarks/results/serve-<host>.json`` and prints a table. Loopback only; bounded in
count (--requests) and time (--deadline seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How many ships are there in this image?", "Where is the ship in this image?",
             "How many oil tanks are there in this image?"]


def rss_mb() -> float:
    """Current resident set size (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--workers", type=int, default=2, help="server worker threads (questions at once)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per question")
    p.add_argument("--batch", type=int, default=1, help="up to N questions' images per ViT call and decodes together (serve --batch)")
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--deadline", type=float, default=600, help="stop sending after this many seconds")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"serve-{socket.gethostname()}.json")
    a = p.parse_args()

    import httpx
    import torch
    import uvicorn

    from fusar_edge.data.synth import sample_scene
    from fusar_edge.runtime import Runtime
    from fusar_edge.serve.app import ServeSettings, build_app

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    scenes = [sample_scene(tmp / f"s{i}", seed=100 + i) for i in range(a.scenes)]
    # each sample scene has its own tile store: the request carries the scene's anchors.npz
    rt = Runtime.open(threads=a.threads)
    jobs = [(i, q) for i in range(a.scenes) for q in QUESTIONS]
    images = {i: Path(s["scene_tif"]).read_bytes() for i, s in enumerate(scenes)}
    anchors = {i: Path(s["anchors"]).read_bytes() for i, s in enumerate(scenes)}
    expected = {(i, q): rt.ask(scenes[i]["scene_tif"], q, anchors=scenes[i]["anchors"]).token_ids for i, q in jobs}
    if a.batch > 1:  # a second runtime: the expected answers above came from the unbatched one
        rt = Runtime.open(threads=a.threads).enable_batching(max_batch=a.batch)
    app = build_app(rt, ServeSettings(workers=a.workers, max_queue=max(16, a.clients)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    with httpx.Client(base_url=url, timeout=120) as warm:  # first request pays one-time costs
        i, q = jobs[0]
        warm.post("/v1/ask", files={"image": ("scene.tif", images[i]), "anchors": ("anchors.npz", anchors[i])},
                  data={"question": q}).raise_for_status()
    rss = {"before": rss_mb()}
    latencies, errors, wrong = [], [], 0
    lock = threading.Lock()
    deadline = time.monotonic() + a.deadline
    plan = [jobs[k % len(jobs)] for k in range(a.requests)]
    shares = [plan[c::a.clients] for c in range(a.clients)]

    def client(share):
        nonlocal wrong
        with httpx.Client(base_url=url, timeout=300) as c:
            for n, (i, q) in enumerate(share):
                if time.monotonic() > deadline:
                    return
                t0 = time.perf_counter()
                r = c.post("/v1/ask", files={"image": ("scene.tif", images[i]), "anchors": ("anchors.npz", anchors[i])},
                           data={"question": q})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                    latencies.append(dt)
                    if r.json()["token_ids"] != expected[(i, q)]:
                        wrong += 1
                    if len(latencies) == a.requests // 2:
                        rss["middle"] = rss_mb()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        list(pool.map(client, shares))
    wall = time.perf_counter() - t0
    rss["after"] = rss_mb()
    server.should_exit = True
    thread.join(timeout=60)
    shutil.rmtree(tmp, ignore_errors=True)

    done = len(latencies)
    result = {
        "host": socket.gethostname(), "cpu_count": os.cpu_count(), "model": rt.source, "weights": rt.weights,
        "clients": a.clients, "workers": a.workers, "threads_per_question": a.threads, "batch": a.batch,
        "largest_decode_batch": rt.batcher.largest_batch if rt.batcher else 1,
        "largest_vision_batch": rt.vision_batcher.largest_batch if rt.vision_batcher else 1,
        "requests_planned": a.requests, "answered": done, "errors": len(errors), "error_samples": errors[:5],
        "wrong_answers": wrong, "wall_s": round(wall, 2), "throughput_rps": round(done / wall, 2) if wall else None,
        "latency_ms": {"p50": round(1e3 * percentile(latencies, 50), 1) if latencies else None,
                       "p99": round(1e3 * percentile(latencies, 99), 1) if latencies else None,
                       "mean": round(1e3 * statistics.fmean(latencies), 1) if latencies else None},
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{done}/{a.requests} answered by {a.workers} workers for {a.clients} clients in {wall:.1f} s: "
          f"{result['throughput_rps']} req/s, p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms; "
          f"errors {len(errors)}, wrong answers {wrong}; RSS MB {result['rss_mb']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
