"""GRASP's trained weights beside a FUSAR-GPT checkpoint: ``grasp.safetensors`` + ``grasp_config.json``.

FUSAR-GPT's reference has no GRASP, so its checkpoint layout has no place for it; ours adds
two files next to the PEFT adapter that stage 2 writes (the way the reference puts
``vec64_film.pt`` + ``tlm_config.json`` beside it for TLM):

- ``grasp_config.json``: ``{"format": "fusar-edge-grasp-v1", "grid": [rows, cols],
  "proj_dim", "prompt_len", "selector", "k", "hidden_size"}``;
- ``grasp.safetensors``: the module's tensors (``prompts [N, L, C]``, ``w_q.*``, ``w_k.*``).

``import-fusar-gpt`` turns GRASP on in the bundle when the adapter folder has both files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import GRASPConfig
from ..errors import BundleError

GRASP_FORMAT = "fusar-edge-grasp-v1"
GRASP_CONFIG = "grasp_config.json"
GRASP_WEIGHTS = "grasp.safetensors"


def has_grasp(folder: Path) -> bool:
    return (Path(folder) / GRASP_CONFIG).is_file()


def save_grasp(module, config: GRASPConfig, hidden_size: int, folder: Path) -> None:
    folder = Path(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(folder / GRASP_WEIGHTS))
    (folder / GRASP_CONFIG).write_text(json.dumps(
        {"format": GRASP_FORMAT, "grid": list(config.grid), "proj_dim": config.proj_dim,
         "prompt_len": config.prompt_len, "selector": config.selector, "k": config.k, "hidden_size": hidden_size},
        indent=2) + "\n", encoding="utf-8")


def read_grasp(folder: Path, hidden_size: int) -> tuple[GRASPConfig, dict[str, torch.Tensor]]:
    """-> (the enabled GRASPConfig, the module's state dict); errors name the file and field."""
    folder = Path(folder)
    path = folder / GRASP_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot be read as JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != GRASP_FORMAT:
        raise BundleError(f"{path}: format: expected {GRASP_FORMAT!r}, got {raw.get('format') if isinstance(raw, dict) else raw!r}")
    if raw.get("hidden_size") != hidden_size:
        raise BundleError(f"{path}: hidden_size: trained for width {raw.get('hidden_size')}, the base model has "
                          f"{hidden_size}")
    try:
        cfg = GRASPConfig(enabled=True, grid=tuple(raw["grid"]), proj_dim=int(raw["proj_dim"]),
                          prompt_len=int(raw["prompt_len"]), selector=str(raw["selector"]), k=int(raw["k"]))
    except KeyError as exc:
        raise BundleError(f"{path}: missing {exc.args[0]!r}") from None
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    weights = folder / GRASP_WEIGHTS
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{weights}: cannot be read ({exc})") from None
    return cfg, state
