"""Bundles: a directory holding one deployable FUSAR model.

Layout (Hugging Face style, safetensors only, no pickle, no remote code)::

    config.json                  transformers Qwen2_5_VLConfig of the backbone
    model*.safetensors           backbone weights, transformers key names (sharded + index when large)
    fusar_modules.safetensors    TLM / GRASP weights: keys "tlm.film_mlp.0.weight", "grasp.prompts", ...
    fusar.json                   chip size, token grid, TLM/GRASP settings, AEF years (FusarConfig)
    tokenizer.json, tokenizer_config.json
    manifest.json                sha256 and size of every file above

``save_bundle`` writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written bundle under the target name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import FUSAR_JSON, PRESETS, QWEN_SPECIAL_TOKENS, FusarConfig, load_backbone_json, preset, resolve_model
from ..errors import BundleError
from ..fsutil import publish_dir
from ..hashing import file_record
from ..hashing import sha256_file as sha256  # noqa: F401  (the name callers import)
from .fusar import FusarModel

FUSAR_WEIGHTS = "fusar_modules.safetensors"
MANIFEST = "manifest.json"
TINY_SEED = 0


def build_random(config: FusarConfig, seed: int = TINY_SEED, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> FusarModel:
    """A model with seeded random weights (presets; benchmarks at true size).

    Built directly in ``dtype`` on ``device``: a 7B model never exists in fp32 on the host
    (33 GB), and its initialisation runs on the GPU when there is one.
    """
    device = torch.device(device)
    previous = torch.get_default_dtype()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = FusarModel(config)
        finally:
            torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def count_parameters(config: FusarConfig) -> int:
    """Parameters of the model ``config`` describes, without allocating them (meta device)."""
    with torch.device("meta"):
        model = FusarModel(config)
    return sum(p.numel() for p in model.parameters())


def write_manifest(bundle: Path) -> Path:
    """sha256 and size of every file under ``bundle`` (relative '/'-paths), manifest.json excluded."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {p.relative_to(bundle).as_posix(): file_record(p) for p in files}
    path = bundle / MANIFEST
    path.write_text(json.dumps({"files": manifest}, indent=2) + "\n", encoding="utf-8")
    return path


def save_bundle(model: FusarModel, tokenizer, out_dir: str | Path, overwrite: bool = False,
                manifest: bool = True, copy_files: dict[str, Path] | None = None) -> Path:
    """``manifest=False``: leave manifest.json to the caller (export adds files, then hashes once).

    ``copy_files``: bundle file name -> source file copied byte for byte, e.g. the checkpoint's
    own ``generation_config.json`` in place of the one transformers derives from the config.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.backbone.save_pretrained(tmp, safe_serialization=True)
        state = {k: v.detach().contiguous().cpu() for k, v in model.fusar_state_dict().items()}
        save_file(state, str(tmp / FUSAR_WEIGHTS), metadata={"format": "pt"})
        (tmp / FUSAR_JSON).write_text(json.dumps(model.config.to_fusar_json(), indent=2), encoding="utf-8")
        tokenizer.save(tmp)
        for name, src in (copy_files or {}).items():
            shutil.copyfile(src, tmp / name)
        if manifest:
            write_manifest(tmp)
        publish_dir(tmp, out)  # an old bundle is swapped out, not deleted first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(bundle: Path) -> FusarConfig:
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a directory (expected a bundle directory or one of: {', '.join(PRESETS)})")
    path = bundle / FUSAR_JSON
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a fusar-edge bundle; import a checkpoint with `fusar-edge import-fusar-gpt`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
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


def load_bundle(bundle: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """-> ``(FusarModel, TextTokenizer)`` from a bundle directory, with strict weight checks."""
    from ..tokenizer import TextTokenizer

    bundle = Path(bundle)
    config = read_config(bundle)
    tokenizer = TextTokenizer.from_file(bundle / "tokenizer.json")  # cheap checks before the weights
    backbone = load_backbone(bundle, config.backbone_config(), dtype)
    model = FusarModel(config, backbone=backbone)
    _load_fusar_weights(model, bundle / FUSAR_WEIGHTS)
    model = model.to(device=device, dtype=backbone.dtype).eval()
    return model, tokenizer


def load_backbone(directory: Path, config=None, dtype: torch.dtype | None = None):
    """``Qwen2_5_VLForConditionalGeneration`` from a Hugging Face folder (a bundle or a base checkpoint).

    Strict: a missing, unexpected or wrongly shaped tensor is a ``BundleError`` naming the weight
    file(s) and config.json (transformers would silently random-initialise missing weights).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    directory = Path(directory)
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise BundleError(f"{directory / 'model*.safetensors'}: missing (no backbone weights)")
    weights = files[0] if len(files) == 1 else directory / f"model*.safetensors ({len(files)} shards)"
    for path in files:  # a truncated or corrupt shard is named here, before transformers sees it
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise BundleError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if config is not None:
        kwargs["config"] = config
    try:
        # ignore_mismatched_sizes only makes transformers *report* wrong shapes in `info`
        # (otherwise it raises "look at the above report", a log the CLI hides); we refuse them below.
        backbone, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BundleError(f"{weights}: backbone weights do not load ({str(exc).splitlines()[0]})") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys", "unexpected_keys") and v}
    if problems:
        detail = "; ".join(f"{k}: {sorted(map(_key_str, v))[:3]}{' ...' if len(v) > 3 else ''}"
                           for k, v in problems.items())
        raise BundleError(f"{weights}: backbone weights do not match {directory / 'config.json'} ({detail})")
    return backbone.eval()


def _key_str(item) -> str:
    """A loading-info entry: a key, or ``(key, checkpoint shape, model shape)`` for mismatches."""
    if isinstance(item, tuple) and len(item) == 3:
        key, ckpt, want = item
        return f"{key} {list(ckpt)} in file, {list(want)} expected"
    return str(item)


def _load_fusar_weights(model: FusarModel, path: Path) -> None:
    expected = model.fusar_state_dict()
    if not expected:
        return
    if not path.is_file():
        raise BundleError(f"{path}: missing (fusar.json enables TLM/GRASP, whose weights live here)")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path}: unreadable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{path}: keys do not match fusar.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise BundleError(f"{path}: {key}: expected shape {list(ref.shape)}, got {list(state[key].shape)}")
    for name in ("tlm", "grasp"):
        module = getattr(model, name)
        if module is not None:
            module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def open_model(bundle: str | Path | None, dtype: torch.dtype | None = None, device="cpu"):
    """A bundle directory, or a preset name (random weights) -> ``(model, tokenizer, weights_id)``.

    ``weights_id`` is ``"random"`` for presets, else the sha256 of the bundle's manifest.
    """
    from ..tokenizer import TextTokenizer

    name = resolve_model(bundle)
    if name in PRESETS and not Path(name).is_dir():
        cfg = preset(name)
        cfg.untrained = True
        model = build_random(cfg, dtype=dtype or torch.float32, device=device)
        if name in ("tiny", "small"):  # both use the tiny vocabulary
            tok = TextTokenizer.tiny()
        elif name == "demo":
            tok = TextTokenizer.demo()
        else:  # the true-size presets: real special ids and vocabulary width, for benchmarks
            tok = TextTokenizer.stand_in(QWEN_SPECIAL_TOKENS)
        return model, tok, "random"
    model, tok = load_bundle(name, dtype=dtype, device=device)
    manifest = Path(name) / MANIFEST
    return model, tok, sha256(manifest) if manifest.is_file() else "unhashed"


def _generation_record(bundle: str) -> dict:
    from ..generation import GenerationSettings

    return GenerationSettings.from_bundle(bundle if Path(bundle).is_dir() else None).record()


def describe(bundle: str | Path) -> dict:
    """Summary of a bundle or preset for ``fusar-edge info`` (reads configs, not weights)."""
    name = str(bundle)
    if name in PRESETS and not Path(name).is_dir():
        cfg, files, weights = preset(name), {}, "random (preset)"
    else:
        cfg = read_config(Path(name))
        manifest = Path(name) / MANIFEST
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"] if manifest.is_file() else {}
        weights = sha256(manifest) if manifest.is_file() else "unhashed"
    text, vision = cfg.text, cfg.vision
    return {
        "name": cfg.name,
        "weights": weights,
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
        "files": {k: v["bytes"] for k, v in files.items()},
        "size_mb": round(sum(v["bytes"] for v in files.values()) / 2**20, 2) if files else None,
    }
