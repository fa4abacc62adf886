"""How far does the vision tower alone get? Stage 0's dense warm-up with chosen terms, then the probe.

    python benchmarks/vision_warmup.py --data data/synth2k --steps 1200 --density 1 --out runs/exp-density/s0
    python benchmarks/dense_probe.py --run runs/exp-density/s0 --data data/synth2k --split val --threads 1

Runs only the warm-up of ``train --stage 0 --dense-truth ... --dense-warmup-epochs`` (the same
``train.dense.warmup``, the same images in the same order, occupied cells weighted ``--pos-weight``
as the `pw5` recipe) for a number of steps rather than epochs, with any of the dense head's
optional terms (``--density``, ``--image-count``), and writes ``OUT/dense-warmup.pt`` in the form
``benchmarks/dense_probe.py`` reads. No language model is built or trained: a quarter of an hour
per 1,200 steps on one thread, where a whole demo recipe takes 40 minutes. ``--vision-width``
widens the ViT (hidden size W, MLP 2W, max(4, W / 32) heads) to ask whether its capacity is the
limit; give dense_probe the same ``--vision-width``. Results: benchmarks/results/eval-demo-recipes-vm.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusar_edge.config import preset  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.dense import DenseHead, DenseTargets, load_truth, warmup  # noqa: E402
from fusar_edge.train.recipe import _WarmupImages, first_row_per_image  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402


def widen_vision(cfg, width: int | None):
    """``cfg`` with its ViT widened to ``width`` (None: as the preset has it)."""
    if width:
        cfg.backbone["vision_config"].update({"hidden_size": width, "intermediate_size": 2 * width,
                                              "num_heads": max(4, width // 32)})
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a `data synth` dataset (its training scenes)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/dense-warmup.pt")
    p.add_argument("--steps", type=int, default=1200, help="warm-up steps of 16 images (default 1200, the recipe's)")
    p.add_argument("--pos-weight", type=float, default=5.0, help="occupied cells' weight (default 5, the pw5 recipe)")
    p.add_argument("--density", type=float, default=0.0, help="weight of the density term (default 0: off)")
    p.add_argument("--image-count", type=float, default=0.0, help="weight of the image-count term (default 0: off)")
    p.add_argument("--vision-width", type=int, help="widen the ViT to this hidden size (default: the preset's)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--lr", type=float, default=2e-3, help="default 2e-3, the recipe's")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = widen_vision(preset(a.preset), a.vision_width)
    model = build_random(cfg, seed=0)
    builder = SampleBuilder(cfg, TextTokenizer.demo(), use_anchors=True)
    first_rows = first_row_per_image(read_manifest(a.data / "stage1-train.jsonl"))  # as stage 0's warm-up
    head = DenseHead(cfg.hidden_size, a.pos_weight, density_weight=a.density, image_count_weight=a.image_count)
    images = _WarmupImages(first_rows, builder, DenseTargets(load_truth(a.data / "scenes.jsonl"), cfg.chip_size,
                                                             cfg.token_grid))
    t0 = time.perf_counter()
    losses = warmup(model, head, images, a.steps * 16 / len(images), a.lr, 16, seed=0)
    seconds = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    tmp = a.out / "dense-warmup.pt.tmp"
    torch.save({"visual": model.visual.state_dict(), "head": head.state_dict(), "tlm": model.tlm.state_dict(),
                "losses": torch.tensor(losses), "seconds": torch.tensor(seconds)}, tmp)
    tmp.replace(a.out / "dense-warmup.pt")
    tail = losses[-50:]
    print(f"{len(losses)} steps over {len(images)} images in {seconds:.0f} s; mean loss of the last "
          f"{len(tail)} steps {sum(tail) / len(tail):.4f}; wrote {a.out / 'dense-warmup.pt'}")


if __name__ == "__main__":
    main()
