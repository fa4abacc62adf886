"""Can a bundle say what lies in each cell of a 3x3 grid? Scores the grid rows of a split.

    python benchmarks/grid_readout.py --bundle runs/grid/bundle --data data/synth2k [--split val]

Asks each scene's grid question ("What lies in each cell of a 3x3 grid?", the rows of
``stage0-grid-SPLIT.jsonl``, which only stage 0 trains on) as free text and scores the answer
cell by cell against the generator's truth: exact content per cell, and per cell that holds
something (the prior "nothing" scores ~0.9 on all cells and 0 on the occupied ones). A model
that has learned to read places from its visual tokens scores well above the prior here
before locate or detection can improve (benchmarks/results/eval-demo-recipes-vm.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusar_edge.data.questions import GRID_ORDER, grid_cells  # noqa: E402
from fusar_edge.data.task_rows import read_manifest  # noqa: E402


def score(pairs: list[tuple[str, str]]) -> dict:
    """``pairs`` of (truth, prediction) grid answers -> cell accuracy, overall and on occupied cells."""
    right = total = occ_right = occ_total = prior = 0
    for truth, pred in pairs:
        t, p = grid_cells(truth), grid_cells(pred)
        for cell in GRID_ORDER:
            total += 1
            right += p.get(cell) == t[cell]
            prior += t[cell] == "nothing"
            if t[cell] != "nothing":
                occ_total += 1
                occ_right += p.get(cell) == t[cell]
    return {"scenes": len(pairs), "cell_exact": right / total, "occupied_exact": occ_right / max(occ_total, 1),
            "occupied_cells": occ_total, "prior_nothing": prior / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", type=Path, default=Path("data/synth2k"), help="a `data synth` dataset")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=200, help="scenes asked (default 200)")
    p.add_argument("--no-anchors", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from fusar_edge.runtime import Runtime

    rows = read_manifest(a.data / f"stage0-grid-{a.split}.jsonl")[:a.limit]
    rt = Runtime.open(a.bundle, threads=a.threads)
    pairs = []
    for row in rows:
        root = Path(row["_root"])
        ans = rt.ask(root / row["image"], row["question"], task="caption", max_new_tokens=160,
                     anchors=None if a.no_anchors else root / row["aef"], no_anchors=a.no_anchors)
        pairs.append((row["answer"], ans.text))
    report = score(pairs) | {"bundle": a.bundle, "split": a.split, "example": pairs[0][1]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
