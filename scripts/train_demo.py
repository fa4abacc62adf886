"""Train the demo model end to end: data, stage 0, stage 1, stage 2, import, evaluation.

    python scripts/train_demo.py --out runs/demo            # with AEF anchors (the shipped demo)
    python scripts/train_demo.py --out runs/demo-noaef --no-aef   # the same budget without AEF
    python scripts/train_demo.py --out runs/demo-wide --preset demo-wide   # another architecture, same recipe

Every step is a `fusar-edge` command (printed before it runs), so the recipe can be read and
rerun by hand; a step whose output exists is skipped, and training steps resume from their
checkpoints, so the script can be restarted after an interruption.
"""

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

# The recipe of the shipped demo (2 CPU cores). Stage 0 first warms the vision tower up on a
# dense per-token loss from the generator's ground truth (--dense-truth: what lies under each
# visual token; fusar_edge/train/dense.py), then trains the whole model on the answers with that
# term kept. Without it a ViT trained from scratch barely sees 5-20 px targets (the previous
# demo, commit c4e05ee: 42 % counting, detection F1 0): benchmarks/results/eval-demo-recipes-vm.md.
# The reference's defaults (stage 1: 30 epochs at 1e-4; stage 2: 5 epochs at 1e-5) are for a real
# Qwen2.5-VL base.
# 16,000 scenes (12,800 for training), each seen about 6 times in the warm-up (4,800 steps of 16
# images) and once in stage 0's main loop (6,400 images): the vision tower generalises with unseen
# scenes and more steps, not with more passes over few scenes (eval-demo-recipes-vm.md, "Twice the
# steps over unique scenes": 0.480 -> 0.616 validation counting against the 2,000-scene recipe;
# "Twice the warm-up again": 2,400 -> 4,800 steps, 0.646 -> 0.703, 37 min of warm-up at one thread).
# 8 epochs (6,400 steps) gave no better warm-up head (0.742 and 0.787 in two runs against 0.754) and a
# worse model (0.682 validation counting): not adopted ("Faster vision forwards, and 8 warm-up epochs").
# Occupied cells weigh 5x in the dense loss (97 % of cell/label pairs are empty).
# Stage 2 runs half an epoch of synth16k's task rows (24,000) at 3e-4: four times the earlier
# 0.125 epoch at 1e-4, +3.0 points of counting on validation, +4.1 on test (eval-demo-recipes-vm.md,
# "A longer stage 2"), 20-23 min at one thread.
SYNTH = ["--n", "16000", "--seed", "0", "--chip", "224", "--per-region", "80"]
STAGE0 = ["--epochs", "0.5", "--lr", "1e-3", "--grad-accum", "1", "--group-by-image", "--dense-warmup-epochs", "6",
          "--dense-pos-weight", "5"]
STAGE1 = ["--epochs", "0.0625", "--lr", "1e-4"]
STAGE2 = ["--epochs", "0.5", "--lr", "3e-4"]


def step(argv: list[str], done: Path | None = None) -> None:
    if done is not None and done.exists():
        print(f"# skipped (done): fusar-edge {shlex.join(argv)}", flush=True)
        return
    print(f"$ fusar-edge {shlex.join(argv)}", flush=True)
    code = subprocess.run([sys.executable, "-m", "fusar_edge.cli", *argv]).returncode
    if code != 0:  # the step printed its own error; stop here with its exit code, no traceback of ours
        print(f"train_demo: step `fusar-edge {argv[0]}` failed (exit {code}); fix it and rerun: finished steps "
              "are skipped", file=sys.stderr)
        raise SystemExit(code)


def override(argv: list[str], values: dict[str, str | None]) -> list[str]:
    """``argv`` with the value after each flag in ``values`` replaced (None: kept)."""
    out = list(argv)
    for flag, value in values.items():
        if value is not None:
            out[out.index(flag) + 1] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", type=Path, default=Path("data/synth16k"), help="dataset (made if missing)")
    p.add_argument("--no-aef", action="store_true")
    p.add_argument("--preset", default="demo", help="architecture preset of stage 0 (default: demo, the shipped one)")
    p.add_argument("--threads", default="2")
    p.add_argument("--dense-warmup-epochs", help="stage 0's dense warm-up epochs (default: the recipe's 6)")
    p.add_argument("--dense-weight", help="stage 0's dense term beside the answers (default: the recipe's 1)")
    p.add_argument("--dense-augment", action="store_true", help="stage 0: random flips in the dense warm-up")
    p.add_argument("--dense-pos-weight", help="stage 0: weight of occupied cells in the dense loss (default: the recipe's 5)")
    p.add_argument("--dense-position", action="store_true", help="stage 0: tokens also learn their row and column")
    p.add_argument("--dense-density", help="stage 0: weight of the per-token density term (default: off)")
    p.add_argument("--dense-digits", help="stage 0: weight of the box-digit term (default: off)")
    p.add_argument("--dense-digit-labels", help="stage 0: the digit term's labels, comma-separated (default: all)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="stage 0: keep the warmed-up vision tower frozen in the main loop (default: it trains)")
    p.add_argument("--dense-image-count", help="stage 0: weight of the whole-image count term (default: off)")
    p.add_argument("--grid", action="store_true",
                   help="stage 0 also trains on the grid rows (what lies in each 3x3 cell; stage0-grid-train.jsonl)")
    p.add_argument("--stage0-epochs", help="stage 0's answer epochs (default: the recipe's 0.5)")
    p.add_argument("--oversample", action="append", metavar="CLASS=K",
                   help="stage 0: draw the scenes whose questions name CLASS K times per epoch (train --oversample; "
                        "default: none)")
    p.add_argument("--stage1-epochs", help="stage 1's epochs (default: the recipe's)")
    p.add_argument("--stage2-epochs", help="stage 2's epochs (default: the recipe's)")
    p.add_argument("--n", help="scenes of the dataset made when --data is missing (default: the recipe's)")
    p.add_argument("--per-region", help="scenes per region of that dataset (default: the recipe's)")
    return p


def training_steps(a: argparse.Namespace) -> dict[str, tuple[list[str], Path]]:
    """The three training commands of ``parser()``'s arguments ``a``, by stage ("s0", "s1", "s2"),
    each with the file that says it is done (benchmarks/train_threads.py times these same commands)."""
    d, o = a.data, a.out
    aef = ["--no-aef"] if a.no_aef else []
    common = ["--threads", a.threads, "--seed", "0"]
    stage0 = override(STAGE0, {"--dense-warmup-epochs": a.dense_warmup_epochs, "--epochs": a.stage0_epochs,
                               "--dense-pos-weight": a.dense_pos_weight})
    stage0 += ["--dense-weight", a.dense_weight] if a.dense_weight else []
    stage0 += ["--dense-augment"] if a.dense_augment else []
    stage0 += ["--dense-position"] if a.dense_position else []
    stage0 += ["--dense-density", a.dense_density] if a.dense_density else []
    stage0 += ["--dense-image-count", a.dense_image_count] if a.dense_image_count else []
    stage0 += ["--dense-digits", a.dense_digits] if a.dense_digits else []
    stage0 += ["--dense-digit-labels", a.dense_digit_labels] if a.dense_digit_labels else []
    stage0 += ["--freeze-vision"] if a.freeze_vision else []
    stage0 += [arg for o in a.oversample or [] for arg in ("--oversample", o)]
    grid = [str(d / "stage0-grid-train.jsonl")] if a.grid else []
    return {
        "s0": (["train", "--stage", "0", "--preset", a.preset, "--data", str(d / "stage1-train.jsonl"),
                str(d / "stage2-train.jsonl"), *grid, "--out", str(o / "s0"), *stage0, "--dense-truth",
                str(d / "scenes.jsonl"), *aef, *common], o / "s0" / "train.json"),
        "s1": (["train", "--stage", "1", "--base", str(o / "s0" / "base"),
                *([] if a.no_aef else ["--init-tlm", str(o / "s0")]), "--data", str(d / "stage1-train.jsonl"),
                "--out", str(o / "s1"), *override(STAGE1, {"--epochs": a.stage1_epochs}), *aef, *common],
               o / "s1" / "train.json"),
        "s2": (["train", "--stage", "2", "--base", str(o / "s0" / "base"), "--init-adapter", str(o / "s1"),
                "--data", str(d / "stage2-train.jsonl"), "--out", str(o / "s2"),
                *override(STAGE2, {"--epochs": a.stage2_epochs}), *aef, *common], o / "s2" / "train.json"),
    }


def main() -> None:
    a = parser().parse_args()
    d, o = a.data, a.out
    if (d / "dataset.json").exists():  # say what the existing dataset is, not the command that was not run
        made = json.loads((d / "dataset.json").read_text())
        print(f"# skipped: {d} exists (n {made.get('n')}, seed {made.get('seed')}, chip {made.get('chip')}, "
              f"per region {made.get('per_region')})", flush=True)
    else:
        step(["data", "synth", "--out", str(d), *override(SYNTH, {"--n": a.n, "--per-region": a.per_region})])
    for argv, done in training_steps(a).values():
        step(argv, done=done)
    tlm = ["--no-tlm", "--chip", "224"] if a.no_aef else [str(o / "s2")]
    step(["import-fusar-gpt", str(o / "s0" / "base"), str(o / "s2"), *tlm, "--out", str(o / "bundle")],
         done=o / "bundle")
    step(["eval", str(o / "bundle"), "--data", str(d / "stage2-test.jsonl"), "--out", str(o / "eval-test"),
          *(["--no-anchors"] if a.no_aef else []), "--threads", a.threads], done=o / "eval-test" / "metrics.json")


if __name__ == "__main__":
    main()
