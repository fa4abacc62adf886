"""Tensor names and shapes in safetensors files against what a config implies, before allocating.

Only the files' headers are read (``safe_open``: names and shapes, no tensor data), and the
expected tensors come from the model built on torch's meta device (shapes without storage).
So a config that claims a far larger model than its weights (hidden 8192 beside a few MB of
tensors) is refused in one line naming the file, the tensor, the expected and the found
shape, in well under a second, instead of after transformers has allocated the model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import BundleError

# Checkpoints saved with transformers < 4.52 (and save_pretrained today) use the old Qwen2.5-VL
# module layout: ``model.layers.*``, top-level ``visual.*``. Patterns in order, first match wins;
# keys already in the current layout match none. (PEFT adapter keys follow the same rules.)
LEGACY_CHECKPOINT_KEYS = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}


def current_key(name: str) -> str:
    """A tensor or module name of the old layout in the current one; other names unchanged."""
    for pattern, repl in LEGACY_CHECKPOINT_KEYS.items():
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None


def meta_model(build: Callable[[], torch.nn.Module], config_path: Path) -> torch.nn.Module:
    """``build()`` on the meta device: every parameter's shape, no memory."""
    try:
        with torch.device("meta"):
            return build()
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as exc:
        raise BundleError(f"{config_path}: the model it describes cannot be built "
                          f"({' '.join(str(exc).split())[:200]})") from None


def expected_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {key: list(t.shape) for key, t in module.state_dict().items()}


def tied_keys(backbone: torch.nn.Module) -> set[str]:
    """Tensors a checkpoint may leave out because they share another's weights (lm_head when tied)."""
    if not getattr(backbone.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(type(backbone), "_tied_weights_keys", None) or ())


def check_backbone_shapes(directory: Path, backbone: torch.nn.Module) -> None:
    """The backbone's ``model*.safetensors`` headers against the (meta) backbone its config.json builds."""
    directory = Path(directory)
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise BundleError(f"{directory / 'model*.safetensors'}: missing (no backbone weights)")
    found = {}
    for path in files:
        for key, shape in read_shapes(path).items():
            found[current_key(key)] = (path, key, shape)
    weights = files[0] if len(files) == 1 else directory / f"model*.safetensors ({len(files)} shards)"
    compare_shapes(found, expected_shapes(backbone), weights, directory / "config.json", tied_keys(backbone))


def check_file_shapes(path: Path, expected: dict[str, list[int]], source: str | Path) -> None:
    """One safetensors file holding exactly ``expected`` (e.g. fusar_modules.safetensors)."""
    found = {key: (path, key, shape) for key, shape in read_shapes(path).items()}
    compare_shapes(found, expected, path, source)


def compare_shapes(found: dict[str, tuple[Path, str, list[int]]], expected: dict[str, list[int]],
                   weights: Path, source: str | Path, optional: set[str] = frozenset()) -> None:
    """``found``: model key -> (file, key as written in it, shape). The first wrong shape, else
    the first missing tensor, else the first unexpected one, is one BundleError line."""
    wrong = sorted(k for k in found.keys() & expected.keys() if found[k][2] != expected[k])
    missing = sorted(expected.keys() - found.keys() - optional)
    unexpected = sorted(found.keys() - expected.keys())
    if wrong:
        path, key, shape = found[wrong[0]]
        raise BundleError(f"{path}: {key}: shape {shape} in the file, {expected[wrong[0]]} expected from {source} "
                          f"(mismatched{_more(wrong)})")
    if missing:
        raise BundleError(f"{weights}: {missing[0]} (shape {expected[missing[0]]}) is missing, and {source} "
                          f"needs it{_more(missing)}")
    if unexpected:
        path, key, shape = found[unexpected[0]]
        raise BundleError(f"{path}: {key} {shape}: unexpected, not a tensor of the model {source} "
                          f"describes{_more(unexpected)}")


def _more(keys: list) -> str:
    return f"; {len(keys) - 1} more like it" if len(keys) > 1 else ""
