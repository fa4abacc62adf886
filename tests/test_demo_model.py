"""The shipped demo answers held-out scenes as well as when it was trained.

The held-out set is made here from the generator with a seed training never used
(``data synth --seed 2027``), so no scene, target or speckle draw was seen in training.
The bound is the accuracy measured on this exact set when the shipped weights were made
(``fusar-edge data synth --out /tmp/heldout --n 40 --seed 2027 --chip 224 --per-region 4`` then
``fusar-edge eval --data <its count rows>``: see MEASURED), minus a margin for greedy decoding that
can break a near-tie differently on another CPU.
"""

import json

import pytest

from fusar_edge.data.synth import synth
from fusar_edge.evaluate.metrics import score
from fusar_edge.evaluate.runner import eval_rows
from fusar_edge.train.samples import read_manifest

# measured on 2026-12-05 on the 2-core Intel Xeon VM with the shipped weights (manifest sha256 in
# benchmarks/results/eval-demo-vm.json): 39 of 54 counts exact (the demos before it: 41, 41, 27 and 14
# of 54; the twice-longer warm-up gained on the 759 test rows, +2.6 points, and on validation, +5.7;
# on these 54 rows two fewer are right, within their noise of ~3 rows)
MEASURED = {"count_exact": 0.722, "rows": 54}
MARGIN = 0.1


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "ds"
    synth(out, 40, seed=2027, chip=224, per_region=4)
    rows = []
    for split in ("train", "val", "test"):
        rows += [r for r in read_manifest(out / f"stage2-{split}.jsonl") if r["task"] == "count"]
    return rows


def test_demo_counts_held_out_scenes(heldout):
    from fusar_edge.runtime import Runtime

    rt = Runtime.open()  # the built-in default is the shipped demo
    assert rt.source == "built-in demo" and not rt.config.untrained
    preds = eval_rows(rt, heldout)
    m = score(preds)["count"]
    assert m["n"] == MEASURED["rows"]
    assert m["exact"] >= MEASURED["count_exact"] - MARGIN, json.dumps(m)
