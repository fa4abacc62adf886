"""``fusar-edge scan``: whole SAR scenes, chip by chip, to GeoJSON; resumable."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import positive_int

EPILOG = """examples:
  fusar-edge sample demo --size 1024 && \\
  fusar-edge scan demo/scene.tif --out scans --tiles demo/tiles           # ships, with the built-in demo
  fusar-edge scan S1A_*.tif --out scans --tiles aef/ --bundle bundles/fusar-7b --task detect --label ship
  fusar-edge scan scene.tif --out scans --no-anchors --task count --overlap 0
  fusar-edge scan scene.tif --out scans --tiles aef/ --bundle DIR --backend onnxruntime

Per scene, OUT/<scene name>/ gets detections.geojson (RFC 7946, EPSG:4326; overlapping chips
merged by IoU, keeping the box farthest from a chip border), chips.jsonl (every chip's raw
answer), summary.json and journal.jsonl. Kill it at any point and run the same command again:
it continues where it stopped, and the outputs are byte-identical to an uninterrupted run's.
A folder holding another scene's, model's or setting's scan is refused, never merged.
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
    anchors = s.add_mutually_exclusive_group()
    anchors.add_argument("--tiles", metavar="DIR", help="AEF tile store: one lookup per chip footprint")
    anchors.add_argument("--no-anchors", action="store_true", help="answer without AEF anchors (TLM skipped)")
    s.add_argument("--allow-no-coverage", action="store_true",
                   help="answer chips the tile store does not cover without anchors instead of stopping")
    s.add_argument("--chip", type=positive_int, metavar="PX", help="chip side in scene pixels (default: the model's chip)")
    s.add_argument("--overlap", type=int, default=64, metavar="PX",
                   help="overlap of neighbouring chips in scene pixels (default 64: a target cut by one chip's "
                        "border is whole in the next)")
    s.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: the physical cores we may use)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from .errors import InputError
    from .runtime import Runtime
    from .scan.run import scan_scene
    from .threads import resolve_threads, set_torch_threads

    scenes = [Path(p) for p in args.scenes]
    for p in scenes:
        if not p.is_file():
            raise InputError(f"scene {p}: no such file")
    names = [p.stem for p in scenes]
    if len(set(names)) != len(names):
        raise InputError("scenes: two scenes share a file name; their outputs would share OUT/<name>/ "
                         "(scan them into different --out folders)")
    threads = resolve_threads(args.threads)
    if args.backend == "torch":
        set_torch_threads(threads)
    rt = Runtime.open(args.bundle, tiles=args.tiles, backend=args.backend, threads=threads,
                      allow_empty_anchors=args.allow_no_coverage)
    out = Path(args.out)
    results, failed = {}, {}
    for scene in scenes:
        bar = None if args.quiet else _Bar(scene.name)
        try:
            results[scene.name] = scan_scene(rt, scene, out, task=args.task, label=args.label, chip=args.chip,
                                             overlap=args.overlap, no_anchors=args.no_anchors,
                                             progress=bar.update if bar else None)
        except InputError as exc:
            if len(scenes) == 1:
                raise
            failed[scene.name] = str(exc)  # one bad scene in a batch: reported, the others finish
            print(f"fusar-edge: error: {exc} (skipped; the other scenes go on)", file=sys.stderr)
        finally:
            if bar:
                bar.close()
    for name, s in results.items():
        what = (f"{s['detections']} {args.label} detections" if args.task == "detect"
                else f"count sum {s.get('count_sum')}" if args.task == "count" else "captions")
        print(f"{name}: {s['chips_answered']} of {s['chips']} chips answered ({s['chips_nodata']} without data), "
              f"{what} -> {out / Path(name).stem}/")
    if failed:
        print(json.dumps({"failed": failed}), file=sys.stderr)
        return 2
    return 0


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
