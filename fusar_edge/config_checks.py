"""Type and range checks for a bundle's config.json and fusar.json, before anything is built.

A config decides how much memory the model takes, so a wrong type or an absurd size
(``"hidden_size": "big"``, ``num_hidden_layers: 10**6``) is refused here, in one line naming the
file, the key and the accepted range, instead of surfacing later as a transformers
traceback or a multi-GB allocation. The ranges are generous: every real Qwen2.5-VL config
(3B, 7B, 32B, 72B) fits with room to spare.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import BundleError

# (lowest, highest) accepted integer, per key of config.json's text_config (or its top level,
# where legacy flat configs keep the language model's keys) ...
TEXT_LIMITS = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 131072),
    "num_hidden_layers": (1, 256),
    "num_attention_heads": (1, 256),
    "num_key_value_heads": (1, 256),
    "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1_048_576),
}
# ... and of its vision_config.
VISION_LIMITS = {
    "depth": (1, 256),
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 131072),
    "num_heads": (1, 256),
    "out_hidden_size": (1, 16384),
    "patch_size": (1, 1024),
    "spatial_merge_size": (1, 64),
    "temporal_patch_size": (1, 64),
    "in_channels": (1, 64),
    "window_size": (1, 1_048_576),
}
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

# fusar.json
CHIP_SIZE = (1, 8192)  # pixels per side; further restricted to multiples of patch x merge
MAX_NEW_TOKENS = (1, TEXT_LIMITS["max_position_embeddings"][1])  # and at most the text context
AEF_YEARS = (1900, 2200)
MAX_AEF_YEARS = 1000
TLM_INTS = {"vec_dim": (1, 4096), "hidden_mult": (1, 64)}
TLM_FLOATS = {"sigma": (0.0, 1e6), "eps": (0.0, 1.0)}  # exclusive low, inclusive high
GRASP_INTS = {"proj_dim": (1, 16384), "prompt_len": (1, 1024), "k": (1, 4096)}
GRASP_GRID = (1, 64)
MAX_TEXT = 100_000  # characters of a name or system prompt


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to one short piece of a line (a 1 MB list must not become the message)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_int(value: Any, key: str, lo: int, hi: int) -> int:
    """An integer in ``lo..hi``; bools (JSON true/false) and floats such as 64.0 are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BundleError(f"{key}: expected an integer in {lo}..{hi}, got {show(value)}")
    return value


def check_float(value: Any, key: str, lo: float, hi: float) -> float:
    """A finite number in ``(lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo < value <= hi:
        raise BundleError(f"{key}: expected a number above {lo:g} and at most {hi:g}, got {show(value)}")
    return float(value)


def check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise BundleError(f"{key}: expected true or false, got {show(value)}")
    return value


def check_str(value: Any, key: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BundleError(f"{key}: expected a string of at most {limit} characters, got {show(value)}")
    return value


def check_dict(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"{key}: expected a JSON object, got {show(value)}")
    return value


def check_pair(value: Any, key: str, lo: int, hi: int) -> tuple[int, int]:
    """Two integers in ``lo..hi`` (a grid's rows and columns)."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise BundleError(f"{key}: expected [rows, cols], two integers in {lo}..{hi}, got {show(value)}")
    return tuple(check_int(v, key, lo, hi) for v in value)


def check_limits(section: dict, limits: dict[str, tuple[int, int]], prefix: str = "") -> None:
    """Every key of ``limits`` present in ``section`` (a null leaves transformers' default)."""
    for key, (lo, hi) in limits.items():
        if section.get(key) is not None:
            check_int(section[key], prefix + key, lo, hi)


# --- config.json ----------------------------------------------------------------------------

def check_raw_backbone(data: Any) -> None:
    """config.json as read, before transformers fills in defaults: types and ranges of what it says."""
    check_dict(data, "top level")
    check_limits(data, TEXT_LIMITS)  # legacy flat configs keep the language model's keys here
    for name, limits in (("text_config", TEXT_LIMITS), ("vision_config", VISION_LIMITS)):
        if data.get(name) is not None:
            check_limits(check_dict(data[name], name), limits, f"{name}.")


def check_backbone(backbone: dict[str, Any]) -> None:
    """The normalised backbone (``load_backbone_json``): ranges again (defaults included), and the
    divisibility that attention needs, so nothing is built that cannot run."""
    text, vision = backbone["text_config"], backbone["vision_config"]
    check_limits(text, TEXT_LIMITS, "text_config.")
    check_limits(vision, VISION_LIMITS, "vision_config.")
    heads, kv = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise BundleError(f"text_config.num_key_value_heads: expected a divisor of num_attention_heads ({heads}), "
                          f"got {kv}")
    if text.get("head_dim") is None and heads and text.get("hidden_size") and text["hidden_size"] % heads:
        raise BundleError(f"text_config.hidden_size: expected a multiple of num_attention_heads ({heads}), "
                          f"got {text['hidden_size']}")
    vheads = vision.get("num_heads")
    if vheads and vision.get("hidden_size") and vision["hidden_size"] % vheads:
        raise BundleError(f"vision_config.hidden_size: expected a multiple of num_heads ({vheads}), "
                          f"got {vision['hidden_size']}")
    vocab = text.get("vocab_size")
    for key in TOKEN_ID_KEYS:
        if backbone.get(key) is not None and vocab:
            check_int(backbone[key], key, 0, vocab - 1)


# --- fusar.json -----------------------------------------------------------------------------

def check_module(data: Any, key: str, ints: dict, floats: dict, known: tuple[str, ...]) -> dict:
    """fusar.json's ``tlm`` / ``grasp`` object: known keys only, each of its type and range."""
    section = check_dict(data, key)
    for name, value in section.items():
        if name not in known:
            raise BundleError(f"{key}.{name}: unknown field (expected: {', '.join(known)})")
        if name == "enabled":
            check_bool(value, f"{key}.enabled")
        elif name in ints:
            check_int(value, f"{key}.{name}", *ints[name])
        elif name in floats:
            check_float(value, f"{key}.{name}", *floats[name])
    return section


def check_years(value: Any, key: str = "aef_years") -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_AEF_YEARS:
        raise BundleError(f"{key}: expected a list of at most {MAX_AEF_YEARS} years, got {show(value)}")
    return [check_int(y, key, *AEF_YEARS) for y in value]
