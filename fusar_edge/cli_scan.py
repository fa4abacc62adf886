"""``fusar-edge scan``: whole SAR scenes, chip by chip, to GeoJSON; resumable."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .cli import add_device_args, positive_int

EPILOG = """examples:
  fusar-edge sample demo --size 1024 && \\
  fusar-edge scan demo/scene.tif --out scans --tiles demo/tiles           # ships, with the built-in demo
  fusar-edge scan S1A_*.tif --out scans --tiles aef/ --bundle bundles/fusar-7b --task detect --label ship
  fusar-edge scan scene.tif --out scans --no-anchors --task count --overlap 0
  fusar-edge scan scene.tif --out scans --tiles aef/ --bundle DIR --backend onnxruntime --batch 8
  ray start --head && fusar-edge scan scenes/*.tif --out scans --tiles aef/ --ray auto   # a Ray cluster

Per scene, OUT/<scene name>/ gets detections.geojson (RFC 7946, EPSG:4326 whatever the scene's
CRS; overlapping chips merged by IoU, keeping the box farthest from a chip border), chips.jsonl
(every chip's raw answer), quicklook.png (the scene with the boxes or counts drawn), summary.json
and journal.jsonl. Kill it at any point, or let the disk fill, and run the same command again:
it continues where it stopped, and the outputs are byte-identical to an uninterrupted run's. A
folder holding another scene's, model's or setting's scan is refused, never merged. A scene that
cannot be read is reported and skipped; the other scenes finish (exit code 2 at the end).

With --ray the driver (this process) reads chips and keeps the journal; Ray workers, one model
load each, answer them. The bundle and the tile store must be at the same path on every node;
the scenes need only be here.
"""


def add_parser(sub) -> None:
    s = sub.add_parser("scan", help="scan whole scenes chip by chip into GeoJSON detections (resumable)",
                       description="Cut each scene into overlapping chips (windowed reads: memory follows the chip, "
                                   "not the scene), look each chip's AEF anchors up in the tile store, answer per chip, "
                                   "map boxes to the scene's CRS and to EPSG:4326, and merge them across overlaps.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("scenes", nargs="+", metavar="SCENE", help="GeoTIFF scenes (any size)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (one folder per scene)")
    s.add_argument("--task", choices=["detect", "count", "caption"], default="detect", help="default: detect")
    s.add_argument("--label", default="ship", help="object class for detect/count (default: ship)")
    s.add_argument("--bundle", help="bundle directory or preset (default: the built-in demo)")
    s.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (default) or onnxruntime (a bundle from `fusar-edge export`; no torch needed)")
    add_device_args(s)
    anchors = s.add_mutually_exclusive_group()
    anchors.add_argument("--tiles", metavar="DIR", help="AEF tile store: one lookup per chip footprint")
    anchors.add_argument("--no-anchors", action="store_true", help="answer without AEF anchors (TLM skipped)")
    s.add_argument("--allow-no-coverage", action="store_true",
                   help="answer chips the tile store does not cover without anchors instead of stopping")
    s.add_argument("--chip", type=positive_int, metavar="PX",
                   help="chip side in scene pixels, at least 28 (default: the model's chip)")
    s.add_argument("--date", metavar="YYYY-MM-DD",
                   help="acquisition date for the anchors of every scene (default: each scene's own date tag)")
    s.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="bound on each chip's answer (default: the bundle's; a model that rambles on a chip "
                        "otherwise decodes to that bound on every chip)")
    s.add_argument("--band", type=positive_int, default=1, metavar="N",
                   help="the GeoTIFF band to scan (default 1; e.g. 2 for VH in a VV/VH scene)")
    s.add_argument("--overlap", type=int, default=64, metavar="PX",
                   help="overlap of neighbouring chips in scene pixels (default 64: a target cut by one chip's "
                        "border is whole in the next)")
    s.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="answer N chips together: one ViT call and one decode batch for all (default 1: one by one, "
                        "exactly as `ask`; on a GPU try 8-16; on a 2-core CPU it gains little)")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="answer chips on Ray workers (pip install 'fusar-edge[ray]'): ADDRESS of the cluster, 'auto' "
                        "for the one `ray start` runs here, or nothing to start a local one")
    s.add_argument("--ray-workers", type=positive_int, metavar="N",
                   help="Ray workers (default: the cluster's CPUs / --threads)")
    s.add_argument("--ray-gpus", type=float, metavar="G",
                   help="share of a GPU per Ray worker, 0 to 1 (default: 1 when --device is cuda, or auto on a "
                        "cluster with GPUs, else 0; 0.5 puts two workers on each GPU)")
    s.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads (default: the physical cores we may use, less those busy at start; "
                        "with --ray: per worker, default 1)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .errors import InputError
    from .scan.run import check_grid_settings, scan_scene

    scenes = [Path(p) for p in args.scenes]
    for p in scenes:
        if p.is_dir():
            raise InputError(f"scene {p}: a directory; give the scene files (e.g. {p}/*.tif)")
        if not p.is_file():
            raise InputError(f"scene {p}: no such file")
        if p.suffix.lower() in NOT_RASTERS:
            raise InputError(f"scene {p}: scan reads raster files GDAL opens (GeoTIFF, COG, VRT, ...); a "
                             f"{p.suffix} image goes to `fusar-edge ask`")
    seen: dict[str, Path] = {}
    for p in scenes:
        if p.stem in seen:
            raise InputError(f"scenes {seen[p.stem]} and {p}: both would write OUT/{p.stem}/; scan them into "
                             "different --out folders")
        seen[p.stem] = p
    if args.date is not None:
        from .geo.sar import parse_date

        parse_date(args.date)  # a bad date is one line now, not at the first chip
    _check_out(Path(args.out))
    if args.ray and Path(args.ray).is_file():  # `--ray scene.tif ...`: the optional ADDRESS took a scene
        raise InputError(f"--ray {args.ray}: that is a file, not a Ray address; put --ray after the scenes, or "
                         "write --ray=ADDRESS")
    if args.ray_workers and args.ray is None:
        raise InputError("--ray-workers: only with --ray")
    if args.ray_gpus is not None and (args.ray is None or not math.isfinite(args.ray_gpus)
                                      or not 0 <= args.ray_gpus <= 1):
        raise InputError("--ray-gpus: only with --ray" if args.ray is None else  # a worker runs on one GPU
                         f"--ray-gpus: expected a share of one GPU, 0 to 1, got {args.ray_gpus}")
    check_grid_settings(args.chip, args.overlap)  # before a model loads: a typo costs a second
    if args.task != "caption" and not args.label.strip():
        raise InputError(f"--label: expected an object class such as 'ship', got {args.label!r}")
    if args.ray is not None and args.batch > 1:
        raise InputError("--batch applies to this process; with --ray each worker answers one chip at a time "
                         "(give the cluster more workers instead)")
    answerer = _answerer(args)
    out = Path(args.out)
    results, failed = {}, {}
    try:
        for scene in scenes:
            bar = None if args.quiet else _Bar(scene.name)
            try:
                results[scene.name] = s = scan_scene(
                    answerer, scene, out, task=args.task, label=args.label, chip=args.chip, overlap=args.overlap,
                    no_anchors=args.no_anchors, band=args.band, max_new_tokens=args.max_new_tokens, date=args.date,
                    progress=bar.update if bar else None)
                if bar:
                    bar.close()
                    bar = None
                _print_scene(scene.name, s, args, out)  # as each scene ends: a long batch shows what is done
            except InputError as exc:
                if len(scenes) == 1:
                    raise
                failed[scene.name] = str(exc)  # one bad scene in a batch: reported, the others finish
                print(f"fusar-edge: error: {exc} (skipped; the other scenes go on)", file=sys.stderr)
            finally:
                if bar:
                    bar.close()
    finally:
        answerer.close()
    if failed:
        print(json.dumps({"failed": failed}), file=sys.stderr)
        return 2
    return 0


NOT_RASTERS = (".npy", ".npz")  # ask reads them; GDAL does not


def _check_out(out: Path) -> None:
    """--out must be a folder we can write, said before a model loads (not at the journal's
    temporary file, after it)."""
    import os

    from .errors import InputError

    probe = out
    while not probe.exists():  # the nearest existing ancestor is where the folder will be made
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {probe} is not writable")


def _print_scene(name: str, s: dict, args, out: Path) -> None:
    what = (f"{s['detections']} {args.label} detections" if args.task == "detect"
            else f"count sum {s.get('count_sum')}" if args.task == "count" else "captions")
    flags = f", {len(s['chips_without_anchors'])} without AEF anchors" if s["chips_without_anchors"] else ""
    crs = s["georef"]["crs"]
    where = f"{s['coordinates']} from {crs}" if crs else s["coordinates"]
    print(f"{name}: {s['chips_answered']} of {s['chips']} chips answered ({s['chips_nodata']} without data"
          f"{flags}), {what}, {where} -> {out / Path(name).stem}/", flush=True)
    if not args.quiet and s["run"]["chips"]:
        print(f"  this run: {_breakdown(s['run'])}", file=sys.stderr)


def _answerer(args):
    """Who answers the chips: this process (one by one, or --batch N together), or Ray workers."""
    from .runtime import Runtime
    from .scan.answerers import BatchedAnswerer, LocalAnswerer
    from .threads import resolve_threads, set_torch_threads

    open_kwargs = {"bundle": args.bundle, "tiles": args.tiles, "backend": args.backend, "device": args.device,
                   "dtype": args.dtype, "allow_empty_anchors": args.allow_no_coverage}
    if args.ray is not None:
        from .scan.ray_pool import RayAnswerer

        return RayAnswerer(open_kwargs, address=args.ray, workers=args.ray_workers, threads=args.threads or 1,
                           gpus_per_worker=args.ray_gpus)
    threads = resolve_threads(args.threads)
    if args.backend == "torch":
        set_torch_threads(threads)
    rt = Runtime.open(**open_kwargs, threads=threads)
    return BatchedAnswerer(rt, args.batch) if args.batch > 1 else LocalAnswerer(rt)


def _breakdown(run: dict) -> str:
    """`36 chips in 7.3 s (4.9 chips/s); read 2%, anchors 5%, vision 40%, ...` (shares of the
    chips' summed stage times; with --batch or --ray chips overlap, so the sum exceeds the wall time)."""
    ms = run["profile_ms"]
    stages = [k for k in ("read", "anchors", "preprocess", "vision", "fusion", "prefill", "decode", "parse", "write")
              if ms.get(k)]
    total = sum(ms[k] for k in stages) or 1.0
    parts = ", ".join(f"{k} {100 * ms[k] / total:.0f}%" for k in stages)
    return f"{run['chips']} chips in {run['seconds']} s ({run['chips_per_s']} chips/s); {parts}"


class _Bar:
    """tqdm with chips/s and ETA, fed (done, total)."""

    def __init__(self, name: str):
        from tqdm import tqdm

        self._tqdm = tqdm(desc=f"scan {name}", unit="chip", file=sys.stderr, dynamic_ncols=True)

    def update(self, done: int, total: int) -> None:
        if self._tqdm.total != total:
            self._tqdm.total = total
        self._tqdm.update(done - self._tqdm.n)

    def close(self) -> None:
        self._tqdm.close()
