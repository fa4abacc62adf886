"""How well do stage 0's warmed-up visual tokens alone count? A linear-probe reading of the dense head.

    python benchmarks/dense_probe.py --run runs/demo/s0 --data data/synth2k
    python benchmarks/dense_probe.py --run runs/demo-noaef/s0 --data data/synth2k --no-aef

Loads the vision tower, TLM and training-only dense head saved by ``train --stage 0
--dense-warmup-epochs`` (``OUT/dense-warmup.pt``), runs every test scene of the dataset, and
counts each label as the sum over the 64 tokens of the head's per-cell class (0, 1, 2-or-more:
a cell with three centres counts two, so this slightly under-counts crowded scenes). Prints the
exact-count rate per label and scene group: what the language model could read at best from a
linear view of the tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusar_edge.config import preset  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.dense import COUNT_CLASSES, LABELS, DenseHead, load_truth  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a stage-0 OUT holding dense-warmup.pt")
    p.add_argument("--data", type=Path, required=True, help="the dataset (stage1-test.jsonl, scenes.jsonl)")
    p.add_argument("--no-aef", action="store_true", help="the run was trained with --no-aef")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = preset("demo")
    cfg.tlm.enabled = not a.no_aef
    model = build_random(cfg, seed=0).eval()
    head = DenseHead(cfg.hidden_size)
    saved = torch.load(a.run / "dense-warmup.pt", weights_only=True)
    model.visual.load_state_dict(saved["visual"])
    head.load_state_dict(saved["head"])
    if model.tlm is not None:
        model.tlm.load_state_dict(saved["tlm"])
    builder = SampleBuilder(cfg, TextTokenizer.demo(), use_anchors=not a.no_aef)
    truth = load_truth(a.data / "scenes.jsonl")
    hits: dict[str, list[int]] = {}
    with torch.no_grad():
        for row in read_manifest(a.data / "stage1-test.jsonl"):  # one row per test scene
            tokens = model.vision_many([builder.image_inputs(row)])[0]
            n = len(LABELS) * COUNT_CLASSES
            cls = head.proj(tokens)[:, :n].reshape(-1, len(LABELS), COUNT_CLASSES).argmax(-1)
            for i, label in enumerate(LABELS[:3]):
                got = int(cls[:, i].sum())
                want = sum(t["label"] == label for t in truth[row["scene"]])
                hits.setdefault(f"{label} / {row['group']}", []).append(int(got == want))
    print(json.dumps({k: {"scenes": len(v), "exact": round(sum(v) / len(v), 3)} for k, v in sorted(hits.items())},
                     indent=2))


if __name__ == "__main__":
    main()
