"""Do a bundle's visual tokens say where they lie? A linear probe of each token's row and column.

    python benchmarks/position_probe.py                                # the built-in demo
    python benchmarks/position_probe.py --bundle runs/pos5/bundle --data data/synth2k

Runs the bundle's vision tower (+TLM) on the first 300 training scenes, fits one linear
classifier for the token's row and one for its column on the tokens of 200 scenes (standardised
features, Adam, 500 full-batch steps) and prints the accuracy on the tokens of the other 100
(chance: one over the grid's side). A language model can read a box's cell from the token
itself only when this is high; otherwise it must infer it from M-RoPE
(benchmarks/results/eval-demo-recipes-vm.md, "Tokens that know where they are").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusar_edge.config import resolve_model  # noqa: E402
from fusar_edge.model.bundle import load_bundle  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   classes: int, steps: int = 500) -> float:
    """Held-out accuracy of a linear classifier on standardised ``[N, C]`` features."""
    torch.manual_seed(0)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    lin = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin((train_x - mu) / sd), train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((lin((test_x - mu) / sd).argmax(-1) == test_y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="default: the built-in demo")
    p.add_argument("--data", type=Path, default=Path("data/synth2k"), help="a `data synth` dataset")
    p.add_argument("--no-anchors", action="store_true", help="run the vision without anchors (a no-AEF bundle)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_bundle(resolve_model(a.bundle))
    model.eval()
    cfg = model.config
    builder = SampleBuilder(cfg, tok, use_anchors=cfg.tlm.enabled and not a.no_anchors)
    rows = list(read_manifest(a.data / "stage1-train.jsonl"))[:300]  # one row per scene
    if len(rows) < 300:
        raise SystemExit(f"{a.data}: expected at least 300 training scenes, found {len(rows)}")
    with torch.no_grad():
        tokens = torch.stack([model.vision_many([builder.image_inputs(r)])[0].float() for r in rows])
    gh, gw = cfg.token_grid
    idx = torch.arange(gh * gw)
    report = {"bundle": str(a.bundle or "built-in demo"), "scenes": {"fit": 200, "held_out": 100},
              "chance": {"row": round(1 / gh, 3), "column": round(1 / gw, 3)}}
    for name, target, classes in (("row", idx // gw, gh), ("column", idx % gw, gw)):
        y = target.repeat(len(rows), 1)
        report[name] = round(probe_accuracy(tokens[:200].flatten(0, 1), y[:200].flatten(),
                                            tokens[200:].flatten(0, 1), y[200:].flatten(), classes), 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
