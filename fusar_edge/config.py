"""Model configuration: the Qwen2.5-VL backbone plus the FUSAR modules (TLM, GRASP).

A ``FusarConfig`` is what a bundle's ``fusar.json`` holds; the backbone part is a plain
transformers ``Qwen2_5_VLConfig`` (the bundle's ``config.json``), so real checkpoints load
unchanged. Presets:

- ``tiny``: built in code, a few MB of random weights, a 224-px chip; runs in seconds on
  two CPU cores. Untrained: its answers are not meaningful, it exercises every code path.
- ``small``: the tiny vision tower and tokenizer in front of a mid-size language model
  (hidden 1024, 8 layers, ~110M decoder parameters, ~0.45 GB fp32) whose decode is bound by
  reading weights, as a real model's is; for decode benchmarks (random weights).
- ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b``: the real architectures' dimensions (as in the
  official ``config.json`` files), so a real checkpoint loads into them and benchmarks can
  build random weights at true size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config_checks as checks
from .errors import BundleError
from .fsutil import read_json

FUSAR_JSON = "fusar.json"
FUSAR_FORMAT = "fusar-edge-bundle-v1"
PROMPT_STYLES = ("reference", "templates")


@dataclass
class TLMConfig:
    """Token-wise linear modulation at the vision tower's output (after the patch merger)."""

    enabled: bool = True
    vec_dim: int = 64  # AEF embedding width
    hidden_mult: int = 4  # MLP hidden = max(128, hidden_mult * C)
    sigma: float = 2.0  # Gaussian width in pre-merge patches
    eps: float = 1e-6  # normalisation epsilon (reference value)


@dataclass
class GRASPConfig:
    """Region-aware soft prompts fused by question-guided sparse selection."""

    enabled: bool = False
    grid: tuple[int, int] = (2, 2)  # spatial blocks (rows, cols) over the merged token grid
    proj_dim: int = 512  # h: width of the projected query/key space
    prompt_len: int = 1  # L: tokens in the global prompt
    selector: str = "topk"  # "topk" (softmax over the k best) or "entmax15"
    k: int = 2

    def __post_init__(self) -> None:
        self.grid = tuple(int(g) for g in self.grid)  # JSON gives lists
        if self.selector not in ("topk", "entmax15"):
            raise BundleError(f"grasp.selector: expected 'topk' or 'entmax15', got {self.selector!r}")
        blocks = self.grid[0] * self.grid[1]
        if not 1 <= self.k <= blocks:
            raise BundleError(f"grasp.k: expected 1..{blocks} (number of blocks), got {self.k}")


@dataclass
class FusarConfig:
    """Everything the runtime needs besides weights and tokenizer."""

    name: str
    backbone: dict[str, Any]  # kwargs of transformers.Qwen2_5_VLConfig
    chip_size: int = 504  # model input is chip_size x chip_size (the reference uses 504)
    tlm: TLMConfig = field(default_factory=TLMConfig)
    grasp: GRASPConfig = field(default_factory=GRASPConfig)
    aef_years: list[int] = field(default_factory=lambda: list(range(2017, 2025)))
    max_new_tokens: int = 512
    system_prompt: str = "You are a helpful assistant."
    # How a question becomes the model's prompt (tasks.build_prompt): "reference" sends it as
    # given, like FUSAR-GPT's inference (imported checkpoints); "templates" wraps it in
    # fusar-edge's per-task templates, for bundles that were trained with them.
    prompt_style: str = "reference"
    # True for random-weight presets and every bundle saved or exported from one: whatever
    # runs them says the answers are not meaningful.
    untrained: bool = False

    # --- derived geometry -------------------------------------------------------------
    @property
    def vision(self) -> dict[str, Any]:
        return self.backbone["vision_config"]

    @property
    def text(self) -> dict[str, Any]:
        return self.backbone["text_config"]

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Pre-merge ViT patch grid (hp, wp) of one chip."""
        n = self.chip_size // int(self.vision.get("patch_size", 14))
        return (n, n)

    @property
    def token_grid(self) -> tuple[int, int]:
        """Merged visual token grid (h, w) that reaches the language model."""
        merge = int(self.vision.get("spatial_merge_size", 2))
        hp, wp = self.patch_grid
        return (hp // merge, wp // merge)

    @property
    def num_visual_tokens(self) -> int:
        h, w = self.token_grid
        return h * w

    @property
    def context_length(self) -> int | None:
        """The language model's context (``text_config.max_position_embeddings``), when the config says."""
        value = self.text.get("max_position_embeddings")
        return int(value) if value else None

    def validate(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise BundleError(f"prompt_style: expected one of {', '.join(PROMPT_STYLES)}, got {self.prompt_style!r}")
        checks.check_int(self.chip_size, "chip_size", *checks.CHIP_SIZE)
        checks.check_int(self.max_new_tokens, "max_new_tokens", *checks.MAX_NEW_TOKENS)
        if self.context_length and self.max_new_tokens > self.context_length:
            raise BundleError(f"max_new_tokens: expected at most {self.context_length} (config.json's "
                              f"text_config.max_position_embeddings, the model's context), got {self.max_new_tokens}")
        patch = int(self.vision.get("patch_size", 14))
        merge = int(self.vision.get("spatial_merge_size", 2))
        if self.chip_size <= 0 or self.chip_size % (patch * merge):
            raise BundleError(
                f"chip_size: expected a positive multiple of {patch * merge} (patch {patch} x merge {merge}), "
                f"got {self.chip_size}"
            )
        if int(self.vision.get("out_hidden_size", -1)) != self.hidden_size:
            raise BundleError(
                "vision_config.out_hidden_size must equal text_config.hidden_size "
                f"({self.vision.get('out_hidden_size')} != {self.hidden_size})"
            )

    # --- transformers bridge ----------------------------------------------------------
    def backbone_config(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(**json.loads(json.dumps(self.backbone)))

    # --- fusar.json ---------------------------------------------------------------------
    def to_fusar_json(self) -> dict[str, Any]:
        """The FUSAR part of a bundle (the backbone lives in config.json)."""
        return {
            "format": FUSAR_FORMAT,
            "name": self.name,
            "chip_size": self.chip_size,
            "patch_grid": list(self.patch_grid),
            "token_grid": list(self.token_grid),
            "tlm": {"placement": "after_merger", **dataclasses.asdict(self.tlm)},
            "grasp": {"placement": "after_vision_end", **dataclasses.asdict(self.grasp)},
            "aef_years": list(self.aef_years),
            "max_new_tokens": self.max_new_tokens,
            "system_prompt": self.system_prompt,
            "prompt_style": self.prompt_style,
            **({"untrained": True} if self.untrained else {}),
        }

    @classmethod
    def from_fusar_json(cls, data: dict[str, Any], backbone: dict[str, Any], where: str = FUSAR_JSON) -> "FusarConfig":
        """Every field type- and range-checked (``config_checks``) before anything is built from it."""
        if not isinstance(data, dict):
            raise BundleError(f"{where}: expected a JSON object with format {FUSAR_FORMAT!r}, got {checks.show(data)}")
        if data.get("format") != FUSAR_FORMAT:
            raise BundleError(f"{where}: format: expected {FUSAR_FORMAT!r}, got {checks.show(data.get('format'))}")
        try:
            cfg = cls(backbone=backbone, **_fusar_fields(data))
        except BundleError as exc:
            raise BundleError(f"{where}: {exc}") from None
        cfg.validate()  # its messages say which file (read_config adds it)
        if tuple(data.get("token_grid", cfg.token_grid)) != cfg.token_grid:
            raise BundleError(f"{where}: token_grid {checks.show(data['token_grid'])} does not match chip_size "
                              f"{cfg.chip_size}")
        return cfg


def _fusar_fields(data: dict[str, Any]) -> dict[str, Any]:
    """fusar.json's fields as FusarConfig arguments; a wrong type or range is a BundleError naming the key."""
    c = checks
    tlm_keys = tuple(f.name for f in dataclasses.fields(TLMConfig))
    grasp_keys = tuple(f.name for f in dataclasses.fields(GRASPConfig))
    tlm = c.check_module(data.get("tlm", {}), "tlm", c.TLM_INTS, c.TLM_FLOATS, ("placement", *tlm_keys))
    grasp = c.check_module(data.get("grasp", {}), "grasp", c.GRASP_INTS, {}, ("placement", *grasp_keys))
    if "grid" in grasp:
        c.check_pair(grasp["grid"], "grasp.grid", *c.GRASP_GRID)
    if "selector" in grasp:
        c.check_str(grasp["selector"], "grasp.selector", 40)
    for key in ("patch_grid", "token_grid"):
        if key in data:
            c.check_pair(data[key], key, *c.CHIP_SIZE)
    if "chip_size" not in data:
        raise BundleError(f"chip_size: missing (expected an integer in {c.CHIP_SIZE[0]}..{c.CHIP_SIZE[1]})")
    return {
        "name": c.check_str(data.get("name", "bundle"), "name", 200),
        "chip_size": c.check_int(data["chip_size"], "chip_size", *c.CHIP_SIZE),
        "tlm": TLMConfig(**{k: v for k, v in tlm.items() if k != "placement"}),
        "grasp": GRASPConfig(**{k: v for k, v in grasp.items() if k != "placement"}),
        "aef_years": c.check_years(data.get("aef_years", [])),
        "max_new_tokens": c.check_int(data.get("max_new_tokens", 512), "max_new_tokens", *c.MAX_NEW_TOKENS),
        "system_prompt": c.check_str(data.get("system_prompt", "You are a helpful assistant."), "system_prompt"),
        "prompt_style": c.check_str(data.get("prompt_style", "reference"), "prompt_style", 40),
        "untrained": c.check_bool(data.get("untrained", False), "untrained"),
    }


# --- presets ---------------------------------------------------------------------------

# Special-token ids of the shipped tiny tokenizer (fusar_edge/assets/tiny_tokenizer.json,
# built by scripts/build_tiny_tokenizer.py); tests check the two agree.
TINY_SPECIAL_TOKENS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|vision_start|>": 3,
    "<|vision_end|>": 4,
    "<|vision_pad|>": 5,
    "<|image_pad|>": 6,
    "<|video_pad|>": 7,
}
TINY_VOCAB_SIZE = 1024
DEMO_VOCAB_SIZE = 640  # the demo tokenizer's 580 ids, padded to a multiple of 64 (as Qwen pads its embedding)


def _tiny() -> FusarConfig:
    hidden = 64
    sp = TINY_SPECIAL_TOKENS
    backbone = {
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "out_hidden_size": hidden,
            "tokens_per_second": 2,
        },
        "text_config": {
            "vocab_size": TINY_VOCAB_SIZE,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": sp["<|endoftext|>"],
            "eos_token_id": sp["<|im_end|>"],
        },
        "image_token_id": sp["<|image_pad|>"],
        "video_token_id": sp["<|video_pad|>"],
        "vision_start_token_id": sp["<|vision_start|>"],
        "vision_end_token_id": sp["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    return FusarConfig(
        name="tiny",
        backbone=backbone,
        chip_size=224,
        tlm=TLMConfig(),
        grasp=GRASPConfig(enabled=True, grid=(2, 2), proj_dim=32, prompt_len=1, selector="topk", k=2),
        max_new_tokens=32,
        prompt_style="templates",
    )


def _small() -> FusarConfig:
    """``tiny`` with a mid-size language model (same vision tower, tokenizer, TLM and GRASP)."""
    cfg = _tiny()
    hidden = 1024
    cfg.name = "small"
    cfg.backbone["vision_config"]["out_hidden_size"] = hidden
    cfg.backbone["text_config"].update({
        "hidden_size": hidden,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        # head_dim 64: the sections sum to head_dim / 2
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
    })
    return cfg


def _demo() -> FusarConfig:
    """The trained demo's architecture: sized to learn the synthetic SAR tasks on 2 CPU cores.

    224-px chips (64 visual tokens), a 4-block ViT and a 4-layer language model of width 192
    (~2.5M parameters, ~10 MB in fp32), the demo tokenizer (digits one token each, as Qwen's),
    TLM on, GRASP off (FUSAR-GPT has none); prompts as the reference sends them.
    """
    cfg = _tiny()
    hidden = 192
    cfg.name = "demo"
    cfg.backbone["vision_config"].update({"depth": 4, "hidden_size": 96, "intermediate_size": 192, "num_heads": 4,
                                          "fullatt_block_indexes": [1, 3], "out_hidden_size": hidden})
    cfg.backbone["text_config"].update({
        "vocab_size": DEMO_VOCAB_SIZE, "hidden_size": hidden, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 2,
        # head_dim 32: the sections sum to head_dim / 2
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    })
    cfg.grasp = GRASPConfig(enabled=False)
    cfg.max_new_tokens = 256
    cfg.prompt_style = "reference"
    return cfg


def _demo_wide() -> FusarConfig:
    """``demo`` with a wider, deeper language model: width 256, 6 layers (8 query heads, 2 kv heads,
    head_dim 32, the same M-RoPE sections and theta). An experiment on the language side's reading
    of the visual tokens (benchmarks/results/eval-demo-recipes-vm.md), not the shipped demo."""
    cfg = _demo()
    hidden = 256
    cfg.name = "demo-wide"
    cfg.backbone["vision_config"]["out_hidden_size"] = hidden
    cfg.backbone["text_config"].update({"hidden_size": hidden, "intermediate_size": 688, "num_hidden_layers": 6,
                                        "num_attention_heads": 8, "num_key_value_heads": 2})
    return cfg


def _demo_deep() -> FusarConfig:
    """``demo`` with a deeper language model at the same width: 6 layers instead of 4 (everything
    else, the vision tower's output width included, as the demo's, so a demo run's saved dense
    warm-up serves it). An experiment on the language model's counting readout
    (benchmarks/results/eval-demo-recipes-vm.md), not the shipped demo."""
    cfg = _demo()
    cfg.name = "demo-deep"
    cfg.backbone["text_config"]["num_hidden_layers"] = 6
    return cfg


def _demo_vit192() -> FusarConfig:
    """``demo`` with a vision tower twice as wide: hidden 192, MLP 384, 6 heads (the language model
    as the demo's). Its dense warm-up head counts 0.80 and 0.82 on validation in two seeds against
    the demo's 0.745 / 0.763, at twice the time per step (benchmarks/vision_warmup.py --vision-width
    192; eval-demo-recipes-vm.md, "a ViT twice as wide"). Through the whole recipe it counts
    worse than the demo (0.641 against 0.686 on validation): an experiment, not the shipped demo."""
    cfg = _demo()
    cfg.name = "demo-vit192"
    cfg.backbone["vision_config"].update({"hidden_size": 192, "intermediate_size": 384, "num_heads": 6})
    return cfg


def _qwen_vision(out_hidden: int) -> dict[str, Any]:
    # Identical in the official 3B and 7B checkpoints except for out_hidden_size.
    return {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": out_hidden,
        "tokens_per_second": 2,
        "hidden_act": "silu",
    }


# The Qwen2.5 tokenizer's ids of the same special tokens (its tokenizer.json's added_tokens).
QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def _qwen_ids() -> dict[str, Any]:
    sp = QWEN_SPECIAL_TOKENS
    return {
        "image_token_id": sp["<|image_pad|>"],
        "video_token_id": sp["<|video_pad|>"],
        "vision_start_token_id": sp["<|vision_start|>"],
        "vision_end_token_id": sp["<|vision_end|>"],
    }


def _qwen_text(**dims: Any) -> dict[str, Any]:
    return {
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        **dims,
    }


def _qwen(name: str, *, out_hidden: int, tie: bool, **text_dims: Any) -> FusarConfig:
    backbone = {
        "vision_config": _qwen_vision(out_hidden),
        "text_config": _qwen_text(hidden_size=out_hidden, **text_dims),
        "tie_word_embeddings": tie,
        **_qwen_ids(),
    }
    return FusarConfig(name=name, backbone=backbone, grasp=GRASPConfig(enabled=True, grid=(2, 2), proj_dim=512, k=2),
                       prompt_style="templates")


def _qwen_3b() -> FusarConfig:
    return _qwen("qwen2.5-vl-3b", out_hidden=2048, tie=True, vocab_size=151936, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2)


def _qwen_7b() -> FusarConfig:
    return _qwen("qwen2.5-vl-7b", out_hidden=3584, tie=False, vocab_size=152064, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)


PRESETS = {"tiny": _tiny, "small": _small, "demo": _demo, "demo-wide": _demo_wide, "demo-deep": _demo_deep,
           "demo-vit192": _demo_vit192, "qwen2.5-vl-3b": _qwen_3b, "qwen2.5-vl-7b": _qwen_7b}


BUILTIN_BUNDLE = "demo-bundle"  # fusar_edge/assets/<this>: the trained demo, the built-in default model


def builtin_bundle() -> Path:
    """The trained demo bundle shipped inside the package: what runs when no model is named."""
    from importlib import resources

    return Path(str(resources.files("fusar_edge") / "assets" / BUILTIN_BUNDLE))


def resolve_model(bundle: str | Path | None) -> str:
    """``None`` -> the built-in demo bundle; anything else (a directory or a preset name) as given."""
    return str(builtin_bundle()) if bundle is None else str(bundle)


def preset(name: str) -> FusarConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise BundleError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.validate()
    return cfg


def model_config(name: str | Path) -> FusarConfig:
    """The config of a bundle directory or a preset name, read without loading any weight
    (checks that must come before a model load)."""
    return read_config(Path(name)) if Path(name).is_dir() else preset(str(name))


def load_backbone_json(path: Path) -> dict[str, Any]:
    """Read a Hugging Face ``config.json`` into plain kwargs for Qwen2_5_VLConfig."""
    data = read_json(path, "a bundle needs the backbone's config.json")
    try:
        checks.check_raw_backbone(data)  # what the file says, before transformers fills in defaults
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if data.get("model_type") not in ("qwen2_5_vl", None):
        raise BundleError(f"{path}: model_type: expected 'qwen2_5_vl', got {data.get('model_type')!r}")
    saved = _as_saved(data)
    if saved is not None:
        return saved
    # Normalise through transformers so flat legacy configs get their sub-configs.
    from transformers import Qwen2_5_VLConfig

    try:
        cfg = Qwen2_5_VLConfig(**{k: v for k, v in data.items() if k not in ("architectures", "transformers_version")})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleError(f"{path}: not a usable Qwen2.5-VL config ({' '.join(str(exc).split())[:200]})") from None
    d = cfg.to_dict()
    backbone = {
        "vision_config": _strip(d["vision_config"]),
        "text_config": _strip(d["text_config"]),
        **{k: d[k] for k in _TOP_KEYS if k in d},
    }
    try:
        checks.check_backbone(backbone)  # transformers' defaults included, and what attention needs
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    return backbone


_TOP_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings")


def _as_saved(data: dict[str, Any]) -> dict[str, Any] | None:
    """A config.json that transformers wrote itself (what every bundle we save holds: nested
    sub-configs with every default filled in) is already normalised, so it is read as it
    is: the ONNX Runtime backend opens bundles without importing transformers. None when the
    file is not complete that way (a flat legacy config, missing keys): transformers then
    fills it in. A test checks both ways give the same dict on our bundles."""
    vision, text = data.get("vision_config"), data.get("text_config")
    if not (isinstance(vision, dict) and isinstance(text, dict) and "transformers_version" in data):
        return None
    backbone = {"vision_config": _strip(vision), "text_config": _strip(text),
                **{k: data[k] for k in _TOP_KEYS if k in data}}
    try:
        checks.check_backbone(backbone)
    except BundleError:
        return None
    return backbone


def _strip(sub: dict[str, Any]) -> dict[str, Any]:
    drop = {"transformers_version", "architectures", "model_type", "dtype", "torch_dtype",
            "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
            "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
            "tie_word_embeddings", "layer_types", "base_config_key"}
    return {k: v for k, v in sub.items() if k not in drop}


def read_config(bundle: Path) -> FusarConfig:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a directory (expected a bundle directory or one of: {', '.join(PRESETS)})")
    path = bundle / FUSAR_JSON
    missing = "not a fusar-edge bundle; import a checkpoint with `fusar-edge import-fusar-gpt`"
    if not path.is_file():
        if bundle.name in PRESETS and not bundle.is_absolute() and len(bundle.parts) == 1:
            # `info demo` beside a folder named demo (the quick start's): the folder wins
            missing += (f"; a folder named {bundle.name} is here, so `{bundle.name}` means it, not the preset "
                        "of that name: run from another folder to use the preset")
        raise BundleError(f"{path}: missing ({missing})")
    data = read_json(path, missing)
    backbone = load_backbone_json(bundle / "config.json")
    try:
        return FusarConfig.from_fusar_json(data, backbone, where=str(path))
    except BundleError as exc:
        # FusarConfig.validate() / GRASPConfig name the field but not the file: add it (only the
        # vision_config/text_config checks come from config.json, the rest from fusar.json).
        msg = str(exc)
        if msg.startswith(str(path)):
            raise
        where = bundle / "config.json" if msg.startswith(("vision_config", "text_config")) else path
        raise BundleError(f"{where}: {msg}") from None
