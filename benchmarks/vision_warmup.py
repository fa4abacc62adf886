"""How far does the vision tower alone get? Stage 0's dense warm-up with chosen terms, then the probe.

    python benchmarks/vision_warmup.py --data data/synth2k --steps 1200 --density 1 --out runs/exp-density/s0
    python benchmarks/dense_probe.py --run runs/exp-density/s0 --data data/synth2k --split val --threads 1

Runs only the warm-up of ``train --stage 0 --dense-truth ... --dense-warmup-epochs`` (the same
``train.dense.warmup``, the same images in the same order, occupied cells weighted ``--pos-weight``
as the `pw5` recipe) for a number of steps rather than epochs, with any of the dense head's
optional terms (``--density``, ``--image-count``, ``--digits``), and writes ``OUT/dense-warmup.pt`` in the form
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

from fusar_edge.cli_train import label_list  # noqa: E402
from fusar_edge.config import preset  # noqa: E402
from fusar_edge.errors import InputError  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.dense import DenseHead, DenseSettings, DenseTargets, load_truth, warmup  # noqa: E402
from fusar_edge.train.recipe import _WarmupImages, first_row_per_image  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402


def widen_vision(cfg, width: int | None, patch: int | None = None, window: int | None = None,
                 full_blocks: list[int] | None = None):
    """``cfg`` with its ViT widened to ``width`` and cut into ``patch``-px patches (None: as the
    preset has it). A patch of P px is merged P' = 28 / P to a side, so a visual token still covers
    28 px and the token grid, the anchors and the language model's input stay as they are."""
    if width:
        cfg.backbone["vision_config"].update({"hidden_size": width, "intermediate_size": 2 * width,
                                              "num_heads": max(4, width // 32)})
    if patch:
        if 28 % patch:
            raise SystemExit(f"--patch-size: expected a divisor of 28 (7 or 14), got {patch}")
        cfg.backbone["vision_config"].update({"patch_size": patch, "spatial_merge_size": 28 // patch})
    if window:
        if window % 28:  # a window holds whole 28-px tokens, or the merger's windows do not line up
            raise SystemExit(f"--window-size: expected a multiple of 28 px, got {window}")
        cfg.backbone["vision_config"]["window_size"] = window
    if full_blocks is not None:
        cfg.backbone["vision_config"]["fullatt_block_indexes"] = full_blocks
    return cfg


def add_vision_args(p: argparse.ArgumentParser) -> None:
    """The ViT variants both this script and dense_probe.py build (give the probe the same ones)."""
    p.add_argument("--vision-width", type=int, help="widen the ViT to this hidden size (default: the preset's)")
    p.add_argument("--patch-size", type=int, help="ViT patch side in px, 7 or 14 (default: the preset's 14); "
                   "the merge grows so that a token still covers 28 px")
    p.add_argument("--window-size", type=int, help="windowed blocks' window side in px (default: the preset's 112)")
    p.add_argument("--full-blocks", type=lambda s: [int(v) for v in s.split(",") if v],
                   help="comma-separated ViT blocks with full attention (default: the preset's 1,3)")


def vision_variant(cfg, a: argparse.Namespace):
    return widen_vision(cfg, a.vision_width, a.patch_size, a.window_size, a.full_blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a `data synth` dataset (its training scenes)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT/dense-warmup.pt")
    p.add_argument("--steps", type=int, default=1200, help="warm-up steps of 16 images (default 1200, the recipe's)")
    p.add_argument("--pos-weight", type=float, default=5.0, help="occupied cells' weight (default 5, the pw5 recipe)")
    p.add_argument("--density", type=float, default=0.0, help="weight of the density term (default 0: off)")
    p.add_argument("--image-count", type=float, default=0.0, help="weight of the image-count term (default 0: off)")
    p.add_argument("--digits", type=float, default=0.0, help="weight of the box-digit term (default 0: off)")
    p.add_argument("--digit-labels", type=label_list, default=(),
                   help="the digit term's labels, comma-separated (default: all)")
    add_vision_args(p)
    p.add_argument("--preset", default="demo")
    p.add_argument("--lr", type=float, default=2e-3, help="default 2e-3, the recipe's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="initialisation and image order (default 0); two seeds of one "
                                                        "setting say how far a single run's probe can be trusted")
    a = p.parse_args()
    try:  # the flags `train` checks, checked the same way
        DenseSettings(a.data / "scenes.jsonl", digits=a.digits, digit_labels=a.digit_labels).check()
    except InputError as exc:
        raise SystemExit(f"vision_warmup.py: {exc}") from None
    torch.set_num_threads(a.threads)
    cfg = vision_variant(preset(a.preset), a)
    if a.seed:  # the dense head's initialisation; seed 0 keeps torch's default generator, as the earlier runs
        torch.manual_seed(a.seed)
    model = build_random(cfg, seed=a.seed)
    builder = SampleBuilder(cfg, TextTokenizer.demo(), use_anchors=True)
    first_rows = first_row_per_image(read_manifest(a.data / "stage1-train.jsonl"))  # as stage 0's warm-up
    head = DenseHead(cfg.hidden_size, a.pos_weight, density_weight=a.density, image_count_weight=a.image_count,
                     digits_weight=a.digits)
    images = _WarmupImages(first_rows, builder, DenseTargets(load_truth(a.data / "scenes.jsonl"), cfg.chip_size,
                                                             cfg.token_grid, a.digit_labels))
    t0 = time.perf_counter()
    losses = warmup(model, head, images, a.steps * 16 / len(images), a.lr, 16, seed=a.seed)
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
