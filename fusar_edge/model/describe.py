"""``fusar-edge info``: what a bundle or preset is, from its configs and manifest alone.

Torch-free (configs, manifest, generation settings are JSON), so a field machine with only the
edge install can inspect a bundle it was given, as it can ``verify`` one.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PRESETS, preset, read_config
from .manifest import check_bundle, read_manifest


def _generation_record(bundle: str) -> dict:
    from ..generation import GenerationSettings

    return GenerationSettings.from_bundle(bundle if Path(bundle).is_dir() else None).record()


def describe(bundle: str | Path) -> dict:
    """Summary of a bundle or preset for ``fusar-edge info`` (reads configs, not weights; the
    manifest's sizes are checked as at every open)."""
    name = str(bundle)
    if name in PRESETS and not Path(name).is_dir():
        cfg, files, weights = preset(name), {}, "random (preset)"
        cfg.untrained = True  # a preset is its architecture with random weights
    else:
        weights = check_bundle(Path(name)) if Path(name).is_dir() else None
        cfg = read_config(Path(name))
        files = read_manifest(Path(name)) or {}
    text, vision = cfg.text, cfg.vision
    root = Path(name)
    return {
        "name": cfg.name,
        "kind": "preset (random weights, no files)" if not files and not root.is_dir() else "bundle",
        "weights": weights,
        **({"untrained": True} if cfg.untrained else {}),
        "backends": _backends(root, files),
        "chip_size": cfg.chip_size,
        "token_grid": list(cfg.token_grid),
        "visual_tokens": cfg.num_visual_tokens,
        "llm": f"{text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
               f"{text['num_attention_heads']} heads / {text.get('num_key_value_heads')} kv, vocab {text['vocab_size']}",
        "vit": f"{vision['depth']} blocks, hidden {vision['hidden_size']}, patch {vision.get('patch_size', 14)}",
        "tlm": cfg.to_fusar_json()["tlm"],
        "grasp": cfg.to_fusar_json()["grasp"],
        "aef_years": cfg.aef_years,
        "prompt_style": cfg.prompt_style,
        "max_new_tokens": cfg.max_new_tokens,
        "generation": _generation_record(name),
        **({"files": {k: v["bytes"] for k, v in files.items()},
            "size_mib": round(sum(v["bytes"] for v in files.values()) / 2**20, 2)} if files else {}),
    }


# Export artifacts (fusar-edge export) and the backend each one serves.
ARTIFACTS = {"onnx": "onnxruntime (fp32 stages)", "onnx-int4": "onnxruntime (GPTQ 4-bit, MatMulNBits)",
             "gptq": "transformers GPTQ checkpoint",
             "edgellm": "TensorRT Edge-LLM on a Jetson (docs/jetson.md)"}


def _backends(root: Path, files: dict) -> dict[str, str]:
    """What can run this bundle: torch always; each export artifact the manifest lists."""
    found = {"torch": "safetensors weights" if files or root.is_dir() else "random weights built in memory"}
    folders = {k.split("/", 1)[0] for k in files if "/" in k}
    for folder, what in ARTIFACTS.items():
        if folder in folders:
            found[folder] = what
    return found
