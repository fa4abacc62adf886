"""``fusar-edge data ...``: make training and evaluation data."""

from __future__ import annotations

import argparse
import json
import sys

from .cli import nonnegative_int

EPILOG = """examples:
  fusar-edge data synth --out data/sar-synth --n 1200 --seed 0 --chip 224
  fusar-edge data synth --out /tmp/tiny-set --n 12 --chip 224 --per-region 3

Writes scenes (GeoTIFF + PNG), an AEF tile store of the same ground (official COG layout,
ingested with `tiles ingest`), per-scene anchors (reference NPZ), and JSONL manifests in
the FUSAR-GPT reference format: stage1-{train,val,test}.jsonl (captions) and
stage2-{train,val,test}.jsonl (count / locate / classify / detect), plus
stage0-grid-{train,val,test}.jsonl (what lies in each 3x3 cell; ours, for a stage 0 from
scratch, not a reference task). Splits never share a scene or an area. See fusar_edge/data/synth.py for every choice.
"""


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="synthetic SAR data with ground truth (for training and evaluation)",
                       description="Make datasets in the FUSAR-GPT reference manifest format.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ds = d.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    s = ds.add_parser("synth", help="synthetic SAR scenes, AEF tile store and task manifests",
                      description="Generate a deterministic synthetic SAR dataset: speckled sea, land, urban and "
                                  "runway backgrounds; ships, aircraft, oil tanks and ship-like land distractors; "
                                  "AEF embeddings that encode the land cover.",
                      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory to write (must not exist)")
    s.add_argument("--n", type=int, required=True, metavar="N", help="number of scenes (at least 3)")
    s.add_argument("--seed", type=nonnegative_int, default=0, help="random seed: the same seed gives the same bytes (default 0)")
    s.add_argument("--chip", type=int, default=504, metavar="PX",
                   help="scene side in pixels = the model's chip and the manifests' coordinate_size "
                        "(a multiple of 28 from 56 to 1008; default 504, the reference's)")
    s.add_argument("--per-region", type=int, default=8, metavar="K",
                   help="scenes cut from each region of ground (default 8); more = a smaller AEF store")
    s.add_argument("--force", action="store_true", help="replace DIR if it exists")
    s.add_argument("--json", action="store_true", help="print the dataset summary as JSON")


def run(args) -> int:
    from .data.synth import synth

    bars: dict = {}

    def progress(phase: str, done: int, total: int) -> None:
        if args.json:
            return
        if phase not in bars:  # created on first use: a bad argument prints no bar
            from tqdm import tqdm

            bars[phase] = tqdm(total=total, desc=f"{phase:>8s}", unit=phase.rstrip("s"), file=sys.stderr,
                               dynamic_ncols=True)
        bars[phase].n = done
        bars[phase].refresh()

    try:
        info = synth(args.out, args.n, seed=args.seed, chip=args.chip, per_region=args.per_region,
                     force=args.force, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.out}: {info['n']} scenes in {info['regions']} regions "
              f"(train {info['splits']['train']}, val {info['splits']['val']}, test {info['splits']['test']}); "
              f"rows: " + ", ".join(f"{k} {v}" for k, v in info["rows"].items()))
    return 0
