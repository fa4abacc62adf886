"""``fusar-edge train``: the seeds' two-stage SFT (and the demo's stage 0)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import nonnegative_int, positive_float, positive_int
from .errors import InputError


def oversample_factor(text: str) -> tuple[str, int]:
    """``CLASS=K`` of ``--oversample`` -> (class, K): the class as tasks.extract_label names it, K >= 1."""
    label, sep, k = text.rpartition("=")
    label = " ".join(label.lower().split())
    if not sep or not label or not k.strip().isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"expected CLASS=K with K a whole number >= 1 (e.g. aircraft=8), got {text!r}")
    return label, int(k)


EPILOG = """the demo recipe (2 CPU cores; see README "Data, training and evaluation"):
  fusar-edge data synth --out data/synth --n 2000 --seed 0 --chip 224 --per-region 10
  fusar-edge train --stage 0 --preset demo --data data/synth/stage1-train.jsonl data/synth/stage2-train.jsonl \\
      --out runs/s0 --epochs 2 --grad-accum 1 --group-by-image \\
      --dense-truth data/synth/scenes.jsonl --dense-warmup-epochs 12 --seed 0
  fusar-edge train --stage 1 --base runs/s0/base --init-tlm runs/s0 --data data/synth/stage1-train.jsonl \\
      --out runs/s1 --epochs 0.5 --lr 1e-4 --seed 0
  fusar-edge train --stage 2 --base runs/s0/base --init-adapter runs/s1 --data data/synth/stage2-train.jsonl \\
      --out runs/s2 --epochs 1 --lr 1e-4 --seed 0
  fusar-edge import-fusar-gpt runs/s0/base runs/s2 runs/s2 --out bundles/demo

Stages 1 and 2 write the reference checkpoint layout (PEFT adapter, vec64_film.pt,
tlm_config.json), which import-fusar-gpt reads. A run killed mid-way resumes from
OUT/checkpoint when started again with the same arguments.
"""


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="two-stage SFT (LoRA + TLM), and a stage 0 for models trained from scratch",
                       description="Train on reference-format manifests. Stage 0: full training of a preset (ours, "
                                   "for a base trained from scratch). Stage 1: LoRA r 8 / alpha 32 on the language "
                                   "model + the TLM MLP. Stage 2: the same LoRA continued, TLM frozen.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--stage", type=int, choices=[0, 1, 2], required=True,
                   help="0: full training from scratch (demo); 1: LoRA + TLM on captions; 2: LoRA (+ GRASP) on tasks")
    t.add_argument("--data", nargs="+", required=True, metavar="MANIFEST", help="JSONL/JSON manifests (reference rows)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints live here while training)")
    t.add_argument("--preset", help="stage 0: the architecture to train from scratch (default demo)")
    t.add_argument("--base", metavar="DIR", help="stages 1-2: the base model folder (stage 0's OUT/base)")
    t.add_argument("--init-tlm", metavar="DIR", help="stage 1: start the TLM MLP from this folder's vec64_film.pt")
    t.add_argument("--init-adapter", metavar="DIR", help="stage 2: stage 1's OUT (LoRA and TLM to continue)")
    t.add_argument("--grasp", action="store_true",
                   help="stage 2: add GRASP (region prompts + question-guided top-k fusion) and train it with the "
                        "LoRA; import-fusar-gpt then turns it on in the bundle")
    t.add_argument("--grasp-grid", default="2x2", metavar="RxC", help="GRASP spatial blocks (default 2x2)")
    t.add_argument("--grasp-k", type=int, default=2, help="GRASP: blocks fused per question (default 2)")
    t.add_argument("--grasp-prompt-len", type=int, default=1, help="GRASP: global prompt tokens (default 1)")
    t.add_argument("--grasp-proj-dim", type=int, default=512, help="GRASP: query/key width (default 512)")
    t.add_argument("--dense-truth", metavar="SCENES_JSONL",
                   help="stage 0: the dataset's scenes.jsonl (from `data synth`); adds a training-only head that "
                        "tells each visual token which objects lie under it (ours, for a ViT trained from "
                        "scratch; see fusar_edge/train/dense.py)")
    t.add_argument("--dense-weight", type=float, default=1.0,
                   help="stage 0: weight of the dense term beside the answer loss (default 1; 0: warm-up only)")
    t.add_argument("--dense-warmup-epochs", type=float, default=0.0,
                   help="stage 0: passes over the images training the vision tower (+TLM) on the dense loss "
                        "alone before the main loop (default 0; cheap: no language model)")
    t.add_argument("--dense-warmup-lr", type=float, default=2e-3, help="stage 0: warm-up learning rate (default 2e-3)")
    t.add_argument("--dense-pos-weight", type=float, default=1.0,
                   help="stage 0: weight of the cells that hold an object in the dense count loss (default 1: "
                        "plain cross-entropy; empty cells are ~97 %% of them)")
    t.add_argument("--dense-position", action="store_true",
                   help="stage 0: the dense head also predicts each visual token's row and column, so the tokens "
                        "carry where they lie (default off: within the demo's budget the language model did not learn to "
                        "read it; with many more unique scenes it does, slowly: benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--dense-density", type=float, default=0.0, metavar="WEIGHT",
                   help="stage 0: weight of a per-token density term: each visual token also learns the share of "
                        "every object's box that lies in its cell, so the tokens' sum is the count and an object "
                        "across a cell border is not counted twice (default 0: off; measured: the sum counts worse than a "
                        "warm-up without the term, and the ship boxes suffer: benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--dense-image-count", type=float, default=0.0, metavar="WEIGHT",
                   help="stage 0: weight of a whole-image count term: every visual token also learns how many "
                        "objects of each label the image holds, so the language model can read a count from any "
                        "one token rather than sum 64 of them (default 0: off; measured: the demo's ViT does not learn to gather "
                        "a count in its warm-up, even supervised: benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--dense-digits", type=float, default=0.0, metavar="WEIGHT",
                   help="stage 0: weight of a box-digit term: the visual token holding one object's centre also "
                        "learns each digit of that object's box corners as a detection answer writes them, so the "
                        "language model can copy a coordinate rather than compute it (default 0: off; measured at weight 1: the copying starts, the counts lose 14 "
                        "points: benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--dense-digit-labels", type=label_list,
                   metavar="LABEL[,LABEL]",
                   help="stage 0: the box-digit term learns the boxes of these labels only (comma-separated; "
                        "default: every label). Detection asks for ships alone; measured: limiting the term to them "
                        "costs the counts no less (benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--dense-augment", action="store_true",
                   help="stage 0: flip each warm-up image at random (left-right, up-down), with its anchors and "
                        "truth (default off; the main loop's answers are never flipped)")
    t.add_argument("--freeze-vision", action="store_true",
                   help="stage 0: after the dense warm-up, keep the vision tower frozen in the main loop (the "
                        "language model, TLM and dense head still train); default off: it trains with the rest")
    t.add_argument("--no-aef", action="store_true", help="train without anchors or TLM (the paper's ablation)")
    t.add_argument("--epochs", type=positive_float, help="default: stage 0 10, stage 1 30, stage 2 5 (the reference's)")
    t.add_argument("--lr", type=positive_float, help="default: stage 0 1e-3, stage 1 1e-4, stage 2 1e-5 (the reference's)")
    t.add_argument("--grad-accum", type=positive_int, default=4, help="samples per optimizer step (default 4, as the reference)")
    t.add_argument("--group-by-image", action="store_true",
                   help="one sample = every row of one image, sharing one vision forward (ours; about twice as "
                        "fast when the ViT trains, as in stage 0; the reference trains row by row)")
    t.add_argument("--oversample", action="append", type=oversample_factor, metavar="CLASS=K",
                   help="draw every sample whose question names CLASS (singular: aircraft, oil tank) K times per "
                        "epoch (ours; repeatable; an epoch grows by the repeats). The demo's data asks about "
                        "aircraft in one scene of ten: stage 0 with aircraft=8 counts them far better, ships "
                        "a little worse (benchmarks/results/eval-demo-recipes-vm.md)")
    t.add_argument("--seed", type=nonnegative_int, default=42, help="initialisation and data order (default 42)")
    t.add_argument("--sigma", type=positive_float, default=2.0, help="TLM Gaussian width for a new TLM (default 2.0)")
    t.add_argument("--max-length", type=positive_int, default=2048, help="longest sequence; longer rows are an error")
    t.add_argument("--save-every", type=positive_int, default=200, metavar="STEPS", help="checkpoint interval (default 200)")
    t.add_argument("--device", default="auto", help="auto (the GPU when torch sees one), cpu, cuda or cuda:N; "
                                                    "training is fp32 on every device (default auto)")
    t.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    t.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    DEFAULT_VALUES.update({name: t.get_default(name) for name in [*STAGE_FLAGS, *DEPENDENT_FLAGS]})


def label_list(text: str) -> tuple[str, ...]:
    """``"ship, oil tank"`` -> ``("ship", "oil tank")`` (checked against the known labels by ``DenseSettings``)."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


STAGE_FLAGS = {  # flags that mean something in some stages only: elsewhere they are refused, not ignored
    "preset": (0,), "dense_truth": (0,), "base": (1, 2), "init_tlm": (1,), "init_adapter": (2,), "grasp": (2,),
}
DEPENDENT_FLAGS = {  # flag -> the flag it tunes; given without it, it would do nothing
    "grasp_grid": "grasp", "grasp_k": "grasp", "grasp_prompt_len": "grasp", "grasp_proj_dim": "grasp",
    "dense_weight": "dense_truth", "dense_warmup_epochs": "dense_truth", "dense_warmup_lr": "dense_truth",
    "dense_pos_weight": "dense_truth", "dense_position": "dense_truth", "dense_density": "dense_truth",
    "dense_image_count": "dense_truth", "dense_augment": "dense_truth", "dense_digits": "dense_truth",
    "dense_digit_labels": "dense_digits", "freeze_vision": "dense_truth",
}


DEFAULT_VALUES: dict = {}  # the parser's defaults of those flags (a flag left at its default was not given)


def check_flags(args, defaults: dict) -> None:
    """Refuse a flag the chosen stage would silently ignore (one line, before torch is imported)."""
    def given(name: str) -> bool:
        return getattr(args, name) not in (None, False, defaults.get(name))

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name, stages in STAGE_FLAGS.items():
        if given(name) and args.stage not in stages:
            where = ("stage " if len(stages) == 1 else "stages ") + " and ".join(str(s) for s in stages)
            raise InputError(f"{flag(name)}: applies to {where} only, not --stage {args.stage}")
    for name, needs in DEPENDENT_FLAGS.items():
        if given(name) and not getattr(args, needs):
            raise InputError(f"{flag(name)}: only with {flag(needs)}")


def run(args) -> int:
    check_flags(args, DEFAULT_VALUES)
    import torch

    from .train.loop import TrainSettings
    from .train.recipe import DEFAULTS, StageArgs, run_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    d = DEFAULTS[args.stage]
    grasp = _grasp_config(args) if args.grasp else None
    dense = None
    if args.dense_truth:
        from .train.dense import DenseSettings

        dense = DenseSettings(Path(args.dense_truth), args.dense_weight, args.dense_warmup_epochs, args.dense_warmup_lr,
                              augment=args.dense_augment, pos_weight=args.dense_pos_weight,
                              position=args.dense_position, density=args.dense_density,
                              image_count=args.dense_image_count, digits=args.dense_digits,
                              digit_labels=args.dense_digit_labels or ())
    settings = TrainSettings(epochs=args.epochs if args.epochs is not None else d["epochs"],
                             lr=args.lr if args.lr is not None else d["lr"], grad_accum=args.grad_accum,
                             seed=args.seed, save_every=args.save_every,
                             group_by_image=args.group_by_image, oversample=dict(args.oversample or []) or None)
    stage_args = StageArgs(stage=args.stage, data=args.data, out=Path(args.out), preset=args.preset or "demo",
                           base=Path(args.base) if args.base else None,
                           init_adapter=Path(args.init_adapter) if args.init_adapter else None,
                           init_tlm=Path(args.init_tlm) if args.init_tlm else None, no_aef=args.no_aef,
                           grasp=grasp, dense=dense, freeze_vision=args.freeze_vision, sigma=args.sigma,
                           max_length=args.max_length, settings=settings, device=args.device)
    try:
        summary = run_stage(stage_args, show_progress=not args.json)
    except KeyboardInterrupt:
        from .train.loop import CHECKPOINT

        if (Path(args.out) / CHECKPOINT / "state.pt").is_file():  # say what is kept and how to go on
            print(f"fusar-edge: {Path(args.out) / CHECKPOINT} holds the last checkpoint: the same command resumes "
                  "from it", file=sys.stderr)
        raise
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"stage {args.stage}: {summary['steps']} steps over {summary['samples']} samples in "
              f"{summary['seconds']} s, final loss {summary['final_loss']}; wrote {args.out}")
    return 0


def _grasp_config(args):
    from .config import GRASPConfig
    from .errors import BundleError, InputError

    try:
        rows, cols = (int(v) for v in args.grasp_grid.lower().split("x"))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        raise InputError(f"--grasp-grid: expected ROWSxCOLS such as 2x2, got {args.grasp_grid!r}") from None
    for flag, value in (("--grasp-prompt-len", args.grasp_prompt_len), ("--grasp-proj-dim", args.grasp_proj_dim)):
        if value < 1:
            raise InputError(f"{flag}: expected a positive integer, got {value}")
    try:
        return GRASPConfig(enabled=True, grid=(rows, cols), proj_dim=args.grasp_proj_dim,
                           prompt_len=args.grasp_prompt_len, k=args.grasp_k)
    except BundleError as exc:
        raise InputError(f"--grasp-k: {exc}") from None
