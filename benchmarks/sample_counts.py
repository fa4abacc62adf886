"""The README quick start's question on the `fusar-edge sample` scenes of many seeds.

    python benchmarks/sample_counts.py [--bundle DIR] [--seeds 20] [--threads 2] [--question TEXT]

For seeds 0..N-1: `fusar-edge sample` (the quick start's scene is seed 0), then
"How many ships are there in this image?" (or ``--question``) with its tile store, as the quick start asks it (the runtime opened
on each scene's own tile store, as `ask --tiles` does).
Prints each seed's true count and answer and how many were right (the README quotes it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "How many ships are there in this image?"  # the README quick start's


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle directory (default: the built-in demo)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--question", default=QUESTION, help=f"a ship-count question (default: {QUESTION!r})")
    a = ap.parse_args()

    from fusar_edge.data.synth import sample_scene
    from fusar_edge.runtime import Runtime

    right, source = 0, None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.seeds):
            paths = sample_scene(Path(tmp) / f"seed{seed}", seed=seed)
            truth = int(paths["counts"]["ship"])
            rt = Runtime.open(a.bundle, tiles=paths["tiles"], device="cpu", threads=a.threads)
            answer, source = rt.ask(paths["scene_tif"], a.question).answer, rt.source
            right += answer == truth
            print(f"seed {seed}: {truth} ships, answered {answer}")
    print(f"right on {right} of {a.seeds} sample scenes ({source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
