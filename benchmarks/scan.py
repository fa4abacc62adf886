"""`fusar-edge scan`: peak memory on a huge scene, chips/s per backend, and where the time goes.

    python benchmarks/scan.py [--side 20000] [--onnx DIR] [--rounds 3] [--threads 2]

1. **Memory**: scenes of ``--sizes`` px a side (default 5000 and 20000) are generated on the fly
   (written band by band: the generator never holds a scene either), each a tiled, compressed
   uint16 GeoTIFF whose zero fill (like the fill around a SAR swath) surrounds one strip of
   speckled sea with ships, one chip row tall, so every chip window is read but only the strip's
   chips are answered. Each is scanned by the built-in demo in a fresh process; its peak RSS
   (``VmHWM``) is what must stay flat with the scene's size, under 2 GB. No tile store this
   large can be made here (AEF at 10 m over 200 km is 25 GB), so these runs use ``--no-anchors``.
2. **Speed**: the ``fusar-edge sample --size 1024`` scene (36 chips, with its tile store) scanned
   by each case (torch one by one, torch ``--batch 4``, ONNX Runtime from ``--onnx DIR`` or an
   export made here), interleaved over ``--rounds`` rounds; chips/s medians, and the per-stage
   breakdown (read, anchors, preprocess, vision, fusion, prefill, decode, parse, write) of the
   median round.

Every scan runs the CLI's own code (``cli_scan._answerer`` + ``scan_scene``) in a child process.
Writes ``benchmarks/results/scan-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The child: parse the scan command as the CLI does, run it, report its run record and peak RSS.
CHILD = """
import json, sys
from pathlib import Path
from fusar_edge.cli import _parser
from fusar_edge import cli_scan
from fusar_edge.scan.run import scan_scene
args = _parser().parse_args(sys.argv[1:])
answerer = cli_scan._answerer(args)
s = scan_scene(answerer, Path(args.scenes[0]), Path(args.out), task=args.task, chip=args.chip,
               overlap=args.overlap, no_anchors=args.no_anchors)
answerer.close()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent's size
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"run": s["run"], "chips": s["chips"], "answered": s["chips_answered"],
                  "detections": s.get("detections"), "peak_rss_mb": hwm / 1024}))
"""


def scan(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, "scan", *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"scan {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def strip_scene(path: Path, side: int, chip: int = 224, seed: int = 0) -> int:
    """A ``side`` x ``side`` scene, zero except one strip of sea (``chip`` px tall, across the whole
    width, at the top of a chip row) with a bright ship every 300 px; -> pixels of data."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(seed)
    stride = chip - 32  # the grid of --overlap 32
    y_strip = (side // 2 // stride) * stride
    profile = {"driver": "GTiff", "width": side, "height": side, "count": 1, "dtype": "uint16",
               "crs": "EPSG:32631", "transform": from_origin(300000.0, 6000000.0, 10.0, 10.0), "tiled": True,
               "blockxsize": 512, "blockysize": 512, "compress": "deflate", "nodata": 0}
    band = 2048
    with rasterio.open(path, "w", **profile) as ds:
        ds.update_tags(ACQUISITION_DATE="2021-06-01")
        for x0 in range(0, side, band):  # the strip, written block column by block column
            w = min(band, side - x0)
            # sea: amplitude of 3-look gamma intensity, DN ~ 300
            sea = (300.0 * np.sqrt(rng.gamma(3.0, 1.0 / 3.0, size=(chip, w)))).astype(np.float32)
            for sx in range(150 - x0 % 300, w, 300):
                if sx >= 0:
                    sy = int(rng.integers(20, chip - 30))
                    sea[sy:sy + 6, sx:sx + 18] *= 12.0  # a ship: 6 x 18 px, 20 dB above the sea
            ds.write(np.clip(sea, 1, 65535).astype(np.uint16)[None], window=Window(x0, y_strip, w, chip))
    return side * chip


def memory_runs(sizes: list[int], work: Path, threads: int) -> list[dict]:
    rows = []
    for side in sizes:
        path = work / f"strip{side}.tif"
        t0 = time.perf_counter()
        data_px = strip_scene(path, side)
        made_s = time.perf_counter() - t0
        r = scan([str(path), "--out", str(work / f"mem{side}"), "--no-anchors", "--overlap", "32",
                  "--threads", str(threads), "--quiet"])
        rows.append({"side": side, "file_mb": round(path.stat().st_size / 2**20, 1), "data_px": data_px,
                     "generate_s": round(made_s, 1), "chips": r["chips"], "answered": r["answered"],
                     "peak_rss_mb": round(r["peak_rss_mb"], 1), "seconds": r["run"]["seconds"],
                     "profile_ms": r["run"]["profile_ms"]})
        print(f"memory: {side} x {side} px ({r['chips']} chips, {r['answered']} answered): peak RSS "
              f"{r['peak_rss_mb']:.0f} MB, {r['run']['seconds']} s", flush=True)
        path.unlink()
    return rows


def speed_runs(cases: dict[str, list[str]], scene: Path, tiles: Path, work: Path, rounds: int) -> list[dict]:
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, extra in cases.items():  # interleaved: a load spike hits every case alike
            out = work / f"speed-{name}-{r}"
            runs[name].append(scan([str(scene), "--out", str(out), "--tiles", str(tiles), "--overlap", "32",
                                    "--quiet", *extra]))
            shutil.rmtree(out)
    rows = []
    for name, rs in runs.items():
        rates = [x["run"]["chips_per_s"] for x in rs]
        median = sorted(rs, key=lambda x: x["run"]["chips_per_s"])[len(rs) // 2]
        rows.append({"case": name, "flags": cases[name], "chips": median["answered"],
                     "chips_per_s_median": round(statistics.median(rates), 3), "chips_per_s_all": rates,
                     "peak_rss_mb": round(max(x["peak_rss_mb"] for x in rs), 1),
                     "breakdown_ms_median_round": median["run"]["profile_ms"]})
        print(f"speed: {name}: {statistics.median(rates):.2f} chips/s ({rates})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="memory runs: scene sides in px")
    p.add_argument("--onnx", metavar="DIR", help="the demo exported with --onnx (default: exported here)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    a = p.parse_args()

    from fusar_edge.bench.machine import cpu_name
    from fusar_edge.data.synth import sample_scene

    work = Path(tempfile.mkdtemp(prefix="fusar-scan-bench-"))
    out = ROOT / "benchmarks" / "results" / f"scan-{socket.gethostname().split('.')[0]}.json"
    # a run of one part (--skip-memory) keeps the other part's last results, each with its command
    result = json.loads(out.read_text()) if out.exists() else {}
    command = "python benchmarks/scan.py " + " ".join(sys.argv[1:])
    result.update(cpu=cpu_name(), host=socket.gethostname())
    if not a.skip_memory:
        result["memory"] = memory_runs(a.sizes, work, a.threads)
        result["memory_command"] = command
    sample = work / "sample"
    sample_scene(sample, seed=3, size=1024)
    onnx = a.onnx
    if onnx is None:
        onnx = str(work / "demo-onnx")
        subprocess.run([sys.executable, "-m", "fusar_edge.cli", "export", "--out", onnx, "--onnx"], check=True,
                       capture_output=True)
    t = ["--threads", str(a.threads)]
    cases = {"torch": t, "torch-batch4": [*t, "--batch", "4"],
             "onnxruntime": [*t, "--bundle", onnx, "--backend", "onnxruntime"]}
    result["speed"] = speed_runs(cases, sample / "scene.tif", sample / "tiles", work, a.rounds)
    result.update(speed_command=command, speed_threads=a.threads, speed_rounds=a.rounds,
                  load_avg_1m_at_end=os.getloadavg()[0])
    result.pop("command", None)
    result.pop("threads", None)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
