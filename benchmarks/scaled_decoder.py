"""A random bundle whose language-model layers have a real model's shapes, but only a few of them.

    python benchmarks/scaled_decoder.py --out DIR [--like qwen2.5-vl-3b] [--layers 4]
    fusar-edge export DIR --out DIR-x --gptq4
    python benchmarks/decode_profile.py --bundle DIR-x --rounds 20

Why: the decode goal (read bandwidth >= 60 % of the machine's ceiling at batch 1) is measured on
`small`, whose 4-bit matrices are 0.5-1.5 MB each: a step there is as much per-op overhead as
reading. A 3B's or 7B's matrices are 10-100x larger. Exporting a whole 3B on a 2-core CPU takes
long (GPTQ over 36 layers, 12 GB of fp32 graph), so this keeps its layer shapes (hidden,
intermediate, heads, head_dim, M-RoPE sections) and takes ``--layers`` of them: a step's matmuls
are then the size of the real model's, and the step's bandwidth is what the real model's would
be, minus its LM head (this bundle keeps `small`'s tokenizer, vision tower, TLM and GRASP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusar_edge.config import preset  # noqa: E402
from fusar_edge.model.bundle import build_random, save_bundle  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402

LAYER_SHAPE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rope_parameters")


def scaled_config(like: str, layers: int):
    """`small` with the layer shapes of preset ``like`` and ``layers`` layers."""
    cfg, real = preset("small"), preset(like)
    text = cfg.backbone["text_config"]
    text.update({k: real.backbone["text_config"][k] for k in LAYER_SHAPE})
    text["num_hidden_layers"] = layers
    cfg.backbone["vision_config"]["out_hidden_size"] = text["hidden_size"]
    cfg.name = f"{like}-layers-x{layers}"
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the bundle directory to write")
    p.add_argument("--like", default="qwen2.5-vl-3b", help="the preset whose layer shapes to copy")
    p.add_argument("--layers", type=int, default=4, help="how many such layers (default 4)")
    a = p.parse_args()
    cfg = scaled_config(a.like, a.layers)
    save_bundle(build_random(cfg, seed=0), TextTokenizer.tiny(), a.out)
    t = cfg.backbone["text_config"]
    print(f"wrote {a.out}: {cfg.name}, {a.layers} layers of hidden {t['hidden_size']}, intermediate "
          f"{t['intermediate_size']}, {t['num_attention_heads']}/{t['num_key_value_heads']} heads")


if __name__ == "__main__":
    main()
