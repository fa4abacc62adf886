r"""Bundles: a directory holding one deployable FUSAR model.

Layout (Hugging Face style, safetensors only, no pickle, no remote code)::

    config.json                  transformers Qwen2_5_VLConfig of the backbone
    model*.safetensors           backbone weights, transformers key names (sharded + index when large)
    fusar_modules.safetensors    TLM / GRASP weights: keys "tlm.film_mlp.0.weight", "grasp.prompts", ...
    fusar.json                   chip size, token grid, TLM/GRASP settings, AEF years (FusarConfig)
    tokenizer.json, tokenizer_config.json
    manifest.json                sha256 and size of every file above

``save_bundle`` writes into a temporary sibling directory and renames it into place, so an
interrupted save never leaves a half-written bundle under the target name.

Every open checks the bundle before reading a weight (``model.manifest``, ``model.shapes``):
every file manifest.json lists exists at its recorded size and no weight file is unlisted;
config.json and fusar.json are type- and range-checked (``config_checks``); every tensor's
name and shape in the safetensors headers matches the model the configs describe, built on
the meta device. ``verify=True`` (``ask --verify``, ``fusar-edge verify``) also recomputes
every sha256. Each problem is one ``BundleError`` line naming the file.

**Weights id** (``open_model``, ``describe``, the answers' ``model.weights``): a content hash,
the sha256 of the manifest's records as ``sha256sum`` prints them, sorted by path::

    sha256( "".join(f"{sha256}  {path}\n" for path, sha256 in sorted(records)) )

(``path``: relative, '/'-separated; every file but manifest.json, configs and tokenizer
included, as they change the answers too); in a shell, ``cd BUNDLE && find . -type f ! -name
manifest.json -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum``. Any change
of content changes it; it does not depend on the manifest's formatting. With ``verify=True``
it is computed from the recomputed hashes, so a damaged file gives an error, never the good
id. Presets say ``"random"``; a bundle without manifest.json opens unchecked and says
``"unhashed (no manifest.json)"``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import (DEMO_VOCAB_SIZE, FUSAR_JSON, PRESETS, QWEN_SPECIAL_TOKENS, FusarConfig,  # noqa: F401
                      load_backbone_json, preset, read_config, resolve_model)
from ..errors import BundleError
from ..fsutil import publish_dir, remove_stale_work_dirs, work_dir
from ..hashing import file_record
from ..hashing import sha256_file as sha256  # noqa: F401  (the name callers import)
from .fusar import FusarModel
from .describe import describe  # noqa: F401  (torch-free, for `info` on the edge install; callers import it here)
from .manifest import MANIFEST, check_bundle, read_manifest  # noqa: F401  (MANIFEST: callers import it)
from .shapes import check_backbone_shapes, check_file_shapes, meta_model

FUSAR_WEIGHTS = "fusar_modules.safetensors"
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
    remove_stale_work_dirs(out.parent, "tmp")  # a killed (even SIGKILLed) import's half-written bundle
    tmp = work_dir(out.parent, out.name, "tmp")
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


def load_bundle(bundle: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                verify: bool = False):
    """-> ``(FusarModel, TextTokenizer)`` from a bundle directory, with strict checks (see the module
    docstring); ``verify``: recompute every file's sha256 first."""
    model, tokenizer, _ = _open_bundle(Path(bundle), dtype, device, verify)
    return model, tokenizer


def _open_bundle(bundle: Path, dtype, device, verify: bool):
    """-> ``(model, tokenizer, weights id)``: every check that needs no tensor data comes first."""
    from ..tokenizer import TextTokenizer

    weights_id = check_bundle(bundle, verify_hashes=verify) if bundle.is_dir() else None
    config = read_config(bundle)  # also names a path that is not a directory
    tokenizer = TextTokenizer.from_file(bundle / "tokenizer.json")
    check_weight_shapes(bundle, config)
    backbone = load_backbone(bundle, config.backbone_config(), dtype, check_shapes=False)
    model = FusarModel(config, backbone=backbone)
    _load_fusar_weights(model, bundle / FUSAR_WEIGHTS)
    model = model.to(device=device, dtype=backbone.dtype).eval()
    return model, tokenizer, weights_id


def check_weight_shapes(bundle: Path, config: FusarConfig) -> None:
    """Every tensor in the bundle's safetensors headers against the model ``config`` describes,
    built on the meta device: a config claiming a bigger model fails here, before allocation."""
    meta = meta_model(lambda: FusarModel(config), bundle / "config.json")
    check_backbone_shapes(bundle, meta.backbone)
    expected = {key: list(t.shape) for key, t in meta.fusar_state_dict().items()}
    if expected and (bundle / FUSAR_WEIGHTS).is_file():  # a missing file is named by _load_fusar_weights
        check_file_shapes(bundle / FUSAR_WEIGHTS, expected, bundle / FUSAR_JSON)


def load_backbone(directory: Path, config=None, dtype: torch.dtype | None = None, check_shapes: bool = True):
    """``Qwen2_5_VLForConditionalGeneration`` from a Hugging Face folder (a bundle or a base checkpoint).

    Strict: a missing, unexpected or wrongly shaped tensor is a ``BundleError`` naming the weight
    file(s) and config.json (transformers would silently random-initialise missing weights);
    ``check_shapes`` finds them in the files' headers before anything is allocated (callers
    that already did, like ``load_bundle``, pass False).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    directory = Path(directory)
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise BundleError(f"{directory / 'model*.safetensors'}: missing (no backbone weights)")
    weights = files[0] if len(files) == 1 else directory / f"model*.safetensors ({len(files)} shards)"
    if check_shapes:
        cfg = config if config is not None else Qwen2_5_VLConfig(**load_backbone_json(directory / "config.json"))
        check_backbone_shapes(directory, meta_model(lambda: Qwen2_5_VLForConditionalGeneration(cfg),
                                                    directory / "config.json"))
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if config is not None:
        kwargs["config"] = config
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise in a service's log
    try:
        # ignore_mismatched_sizes only makes transformers *report* wrong shapes in `info`
        # (otherwise it raises "look at the above report", a log the CLI hides); we refuse them below.
        backbone, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            directory, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise BundleError(f"{weights}: backbone weights do not load ({str(exc).splitlines()[0]})") from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
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


def open_model(bundle: str | Path | None, dtype: torch.dtype | None = None, device="cpu", verify: bool = False):
    """A bundle directory, or a preset name (random weights) -> ``(model, tokenizer, weights_id)``.

    ``weights_id``: ``"random"`` for presets, else the bundle's content hash (module docstring).
    ``verify``: recompute every file's sha256 before loading (a preset has none: refused).
    """
    from ..tokenizer import TextTokenizer

    name = resolve_model(bundle)
    if name in PRESETS and not Path(name).is_dir():
        if verify:
            raise BundleError(f"verify: {name!r} is a preset (random weights, no files), not a bundle directory; "
                              "there is nothing to verify")
        cfg = preset(name)
        cfg.untrained = True
        model = build_random(cfg, dtype=dtype or torch.float32, device=device)
        if name in ("tiny", "small"):  # both use the tiny vocabulary
            tok = TextTokenizer.tiny()
        elif cfg.text["vocab_size"] == DEMO_VOCAB_SIZE:  # demo, demo-wide
            tok = TextTokenizer.demo()
        else:  # the true-size presets: real special ids and vocabulary width, for benchmarks
            tok = TextTokenizer.stand_in(QWEN_SPECIAL_TOKENS)
        return model, tok, "random"
    return _open_bundle(Path(name), dtype, device, verify)


