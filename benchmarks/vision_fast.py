"""Stage 0's vision warm-up steps with the fast vision forwards against transformers' own.

    python benchmarks/vision_fast.py --data data/synth16k --threads 2

Runs ``train.dense.warmup`` (batches of 16 of the dataset's training images, read as training
reads them) with ``model/vision_fast.py``'s forwards and with transformers' (``use_fast_vision(...,
False)``), alternately, ``--rounds`` times each, and prints the steps per second of every run and
the ratio of the medians. Interleaving keeps a busy neighbour from favouring one side; the machine
should be otherwise idle. The two compute the same thing (tests/test_vision_fast.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusar_edge.config import preset  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.model.vision_fast import use_fast_vision  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.dense import DenseHead, DenseTargets, load_truth, warmup  # noqa: E402
from fusar_edge.train.recipe import _WarmupImages, first_row_per_image  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/synth16k"), help="a `data synth` dataset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="warm-up steps of 16 images per run (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating (default 3)")
    a = p.parse_args()
    manifest, truth = a.data / "stage1-train.jsonl", a.data / "scenes.jsonl"
    for path in (manifest, truth):
        if not path.is_file():
            print(f"vision_fast.py: {path}: not found (make the data with `fusar-edge data synth --out {a.data}`)",
                  file=sys.stderr)
            raise SystemExit(2)
    torch.set_num_threads(a.threads)
    cfg = preset("demo")
    model = build_random(cfg, seed=0)
    images = _WarmupImages(first_row_per_image(read_manifest(manifest)),
                           SampleBuilder(cfg, TextTokenizer.demo(), use_anchors=True),
                           DenseTargets(load_truth(truth), cfg.chip_size, cfg.token_grid))
    head = DenseHead(cfg.hidden_size, 5.0)
    rates: dict[str, list[float]] = {"transformers": [], "fast": []}
    for r in range(a.rounds):
        for name in rates:
            use_fast_vision(model.visual, name == "fast")
            t0 = time.perf_counter()
            # a new seed per run: other images each time, none of them cached by the builder yet
            warmup(model, head, images, a.steps * 16 / len(images), 2e-3, 16, seed=2 * r + (name == "fast"),
                   show_progress=False)
            rates[name].append(a.steps / (time.perf_counter() - t0))
            print(f"{name:>12}: {rates[name][-1]:.2f} steps/s", flush=True)
    ref, fast = statistics.median(rates["transformers"]), statistics.median(rates["fast"])
    print(f"median steps/s at {a.threads} thread(s): transformers {ref:.2f}, fast {fast:.2f} ({fast / ref:.2f}x)")


if __name__ == "__main__":
    main()
