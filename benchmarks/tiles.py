"""AEF tile store benchmark: anchored lookup vs reading the source COG with rasterio.

Measures, in one run on this machine:
  * ingest throughput (a synthetic official-layout COG -> store),
  * warm lookup latency p50/p99 from Python (16 x 16 grid) for a 504-px chip at 10 m and at 1 m
    ground sampling, through the default path and the pure-numpy reference,
  * what a user would do instead: a rasterio windowed read of the same area from the COG
    (504 x 504 x 64 at 10 m, dataset kept open, GDAL block cache warm), as a ratio,
  * the C reader's latency through ctypes and from its own C loop (example_lookup).
Writes benchmarks/results/tiles-<host>.json with machine info.

    python benchmarks/tiles.py [--runs 2000] [--cog-size 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

ROOT = Path(__file__).resolve().parents[1]
CHIP_PX = 504
ZONE_EPSG = 32631
X0, Y0 = 440000.0, 6020000.0  # north-west corner of the synthetic COG, UTM 31N (about 2 E, 54.3 N)


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "mean_ms": round(float(ms.mean()), 4),
            "runs": len(ms)}


def timed(fn, args_list, warmup: int = 50) -> list[float]:
    for a in args_list[:warmup]:
        fn(a)
    out = []
    for a in args_list:
        t0 = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t0)
    return out


def write_cog(path: Path, size: int, seed: int = 0) -> str:
    """An official-layout AEF COG: 64 int8 bands, 10 m, bottom-up like the published files."""
    rng = np.random.default_rng(seed)
    for compress in ("ZSTD", "DEFLATE"):  # the published files are zstd; some GDAL builds lack it
        try:
            _write(path, size, rng, dict(driver="COG", compress=compress, blocksize=512))
            return f"COG {compress.lower()}, blocks 512"
        except rasterio.errors.RasterioError:
            path.unlink(missing_ok=True)
    raise RuntimeError("cannot write a COG with zstd or deflate")


def _write(path: Path, size: int, rng, profile: dict) -> None:
    # bottom-up: origin at the south-west corner, positive y resolution (as the published files)
    transform = Affine(10.0, 0.0, X0, 0.0, 10.0, Y0 - size * 10.0)
    with rasterio.open(path, "w", width=size, height=size, count=64, dtype="int8", crs=f"EPSG:{ZONE_EPSG}",
                       transform=transform, nodata=-128, **profile) as ds:
        for row in range(0, size, 512):
            h = min(512, size - row)
            block = rng.integers(-127, 128, (64, h, size), dtype=np.int8)
            ds.write(block, window=Window(0, row, size, h))


def machine() -> dict:
    import rasterio as rio

    from fusar_edge.bench.machine import machine_info

    return {**machine_info(), "rasterio": rio.__version__, "gdal": rio.__gdal_version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--cog-size", type=int, default=2048, help="side of the synthetic COG in pixels")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"tiles-{platform.node()}.json")
    args = ap.parse_args(argv)

    from fusar_edge.geo.anchors import Anchor
    from fusar_edge.tiles.ingest import ingest
    from fusar_edge.tiles.store import TileStore
    from rasterio.warp import transform as warp

    results: dict = {"machine": machine(), "grid": [16, 16], "chip_px": CHIP_PX}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "aef" / "2023" / "31N" / "synthetic-0000000000-0000000000.tiff"
        src.parent.mkdir(parents=True)
        print(f"writing a {args.cog_size}x{args.cog_size}x64 COG ...", file=sys.stderr)
        kind = write_cog(src, args.cog_size)
        src_bytes = args.cog_size * args.cog_size * 64
        t0 = time.perf_counter()
        ingest([src], tmp / "store")
        dt_ingest = time.perf_counter() - t0
        results["ingest"] = {"source": kind, "pixels": args.cog_size ** 2, "bytes_int8": src_bytes,
                             "seconds": round(dt_ingest, 3), "MB_per_s": round(src_bytes / dt_ingest / 1e6, 1)}
        print(f"ingest: {results['ingest']}", file=sys.stderr)

        store = TileStore.open(tmp / "store")
        extent_m = args.cog_size * 10.0
        for gsd in (10.0, 1.0):
            side = CHIP_PX * gsd
            # random chip footprints inside the COG, as lon/lat boxes (what --bbox gives)
            xs = rng.uniform(X0, X0 + extent_m - side, args.runs)
            ys = rng.uniform(Y0 - extent_m + side, Y0, args.runs)
            lon0, lat1 = warp(f"EPSG:{ZONE_EPSG}", "EPSG:4326", xs, ys)
            lon1, lat0 = warp(f"EPSG:{ZONE_EPSG}", "EPSG:4326", xs + side, ys - side)
            anchors = [Anchor((a, b, c, d), "2023-06-01") for a, b, c, d in zip(lon0, lat0, lon1, lat1)]
            key = f"lookup_{int(gsd)}m"
            results[key] = {"path": store.backend, **percentiles(timed(lambda a: store.lookup(a), anchors))}
            if store.backend != "numpy":
                store_np = TileStore.open(tmp / "store", backend="numpy")
                results[key + "_numpy"] = percentiles(timed(lambda a: store_np.lookup(a), anchors))
            print(f"{key}: {results[key]}", file=sys.stderr)
            if gsd == 10.0:
                # the alternative: read the same 504 x 504 window of the COG (GDAL cache warm)
                with rasterio.open(src) as ds:
                    windows = []
                    for x, y in zip(xs, ys):
                        col, row = ~ds.transform @ (x, y)  # bottom-up file: row counts from the south
                        row = min(max(int(row) - CHIP_PX, 0), ds.height - CHIP_PX)
                        col = min(max(int(col), 0), ds.width - CHIP_PX)
                        windows.append(Window(col, row, CHIP_PX, CHIP_PX))
                    rio = percentiles(timed(lambda w: ds.read(window=w), windows[: max(200, args.runs // 10)], 20))
                results["rasterio_window_504px"] = rio
                results["speedup_vs_rasterio_p50"] = round(rio["p50_ms"] / results[key]["p50_ms"], 1)
                chip10 = anchors[0].bbox
                print(f"rasterio: {rio}", file=sys.stderr)
        results["c_reader"] = c_reader(tmp / "store", chip10, args.runs)
        print(f"c_reader: {results['c_reader']}", file=sys.stderr)
        results["goals"] = {
            "python_p99_below_0.3ms": results["lookup_10m"]["p99_ms"] < 0.3,
            "python_20x_rasterio": results["speedup_vs_rasterio_p50"] >= 20,
            "c_below_20us": bool(results["c_reader"].get("c_loop_p50_us", 1e9) < 20),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def c_reader(store_dir: Path, bbox, runs: int) -> dict:
    """libfusar_tiles' latency: per call through ctypes, and in its own C loop (example_lookup)."""
    import re

    from fusar_edge.tiles.native import NativeTileStore, build_native_tiles

    build = Path(tempfile.mkdtemp(prefix="fusar-tiles-build-"))
    try:
        lib = build_native_tiles(build)
    except Exception as exc:  # noqa: BLE001 - report it, keep the other numbers
        return {"error": f"build failed: {exc}"}
    out: dict = {}
    with NativeTileStore(store_dir, lib_path=lib) as native:
        samples = timed(lambda _: native.lookup_bbox(bbox, 2023, (16, 16)), list(range(runs)))
    out["ctypes_call"] = percentiles(samples)
    proc = subprocess.run([str(build / "example_lookup"), str(store_dir), "2023", *map(str, bbox), "16", "16",
                           str(max(runs, 20000))], capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()
    out["example_lookup"] = last
    found = re.search(r"p50 ([0-9.]+) us, p99 ([0-9.]+) us", last)
    if found:
        out["c_loop_p50_us"], out["c_loop_p99_us"] = float(found.group(1)), float(found.group(2))
    return out


if __name__ == "__main__":
    sys.exit(main())
