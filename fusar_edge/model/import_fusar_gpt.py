"""Import a FUSAR-GPT checkpoint, as its public reference code writes it, into a bundle.

Inputs (kklvyyhadr/FUSAR-GPT, MIT):

- ``BASE``: a Hugging Face Qwen2.5-VL folder (``config.json``, ``*.safetensors``, ``tokenizer.json``).
- ``LORA``: a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``;
  the reference trains r=8, alpha=32 on the LLM, and legacy stage-1 weights also on the ViT).
- ``TLM``: ``vec64_film.pt`` (``{"film_mlp": state_dict}``, read with ``weights_only=True``) and
  ``tlm_config.json`` (``format == "tlm_original_train_patch_resize_v1"``, ``sigma``,
  ``hidden_mult``, ``image_size``, ``vec_dim == 64``). Legacy checkpoints without the JSON
  need the training sigma given explicitly (the reference demands the same).

The LoRA is merged into the base weights (PEFT ``merge_and_unload``), the TLM MLP is
converted to safetensors, GRASP stays off (FUSAR-GPT has none) unless the LORA folder holds
``grasp_config.json`` + ``grasp.safetensors`` (``fusar-edge train --stage 2 --grasp`` writes
them; ``model.grasp_checkpoint``), and a bundle is written with
what the reference inference does around the forward: the base folder's
``generation_config.json`` copied unchanged (``generate(do_sample=False)`` applies it, e.g.
Qwen2.5-VL-Instruct's ``repetition_penalty: 1.05``), up to 2048 new tokens (the reference's
``max_new_tokens``), and the question sent as given (``prompt_style: reference``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..config import FusarConfig, GRASPConfig, TLMConfig, load_backbone_json
from ..config_checks import TLM_FLOATS
from ..errors import BundleError, InputError
from ..generation import GENERATION_CONFIG, GenerationSettings
from .bundle import load_backbone, save_bundle
from .fusar import FusarModel
from .grasp_checkpoint import GRASP_CONFIG, GRASP_WEIGHTS, has_grasp, read_grasp
from .shapes import LEGACY_CHECKPOINT_KEYS, current_key
from .weights_only import load_weights_only

TLM_FORMAT = "tlm_original_train_patch_resize_v1"
# Adapters saved with transformers < 4.52 use the old Qwen2.5-VL module layout (``model.layers``,
# top-level ``visual``); transformers maps base weights the same way, PEFT needs to be told.
# Keys as PEFT's key_mapping sees them: without "base_model.model.", first match wins.
LEGACY_ADAPTER_KEYS = LEGACY_CHECKPOINT_KEYS
# The reference's max_new_tokens (infer_val.py): Qwen writes one token per digit, so 512 cuts
# off answers with more than ~17 boxes.
REFERENCE_MAX_NEW_TOKENS = 2048


def remap_legacy_module_name(name: str) -> str:
    """A module name of the old layout (``model.layers.0.self_attn.q_proj``) in the current one,
    by the same rules as the adapter's keys; suffixes such as ``q_proj`` are unchanged."""
    return current_key(name)


MAX_SIGMA = TLM_FLOATS["sigma"][1]  # what fusar.json accepts: a bundle we write must open


def read_tlm_config(tlm_dir: Path, legacy_sigma: float | None) -> dict:
    path = tlm_dir / "tlm_config.json"
    if not path.is_file():
        if legacy_sigma is None:
            raise BundleError(f"{path}: missing; a legacy checkpoint needs its TRAINING sigma (--legacy-sigma, "
                              "the reference script trained with 2)")
        if isinstance(legacy_sigma, bool) or not (0 < float(legacy_sigma) <= MAX_SIGMA):  # NaN fails both
            raise InputError(f"--legacy-sigma: expected a number above 0 and at most {MAX_SIGMA:g}, got {legacy_sigma!r}")
        return {"format": TLM_FORMAT, "sigma": float(legacy_sigma), "hidden_mult": 4, "image_size": 504, "vec_dim": 64}
    if legacy_sigma is not None:
        raise InputError(f"--legacy-sigma: {path} exists and states the sigma; the flag is for checkpoints without it")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != TLM_FORMAT:
        raise BundleError(f"{path}: format: expected {TLM_FORMAT!r}, got {cfg.get('format')!r}")
    if cfg.get("vec_dim") != 64:
        raise BundleError(f"{path}: vec_dim: expected 64, got {cfg.get('vec_dim')!r}")
    sigma = cfg.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= MAX_SIGMA:  # NaN fails
        raise BundleError(f"{path}: sigma: expected a number above 0 and at most {MAX_SIGMA:g}, got {sigma!r}")
    for key in ("hidden_mult", "image_size"):  # integers: 4.7 is not a width multiple, 224.9 not a chip
        if isinstance(cfg.get(key), bool) or not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise BundleError(f"{path}: {key}: expected a positive integer, got {cfg.get(key)!r}")
    return cfg


def read_film_state(tlm_dir: Path) -> dict[str, torch.Tensor]:
    path = tlm_dir / "vec64_film.pt"
    if not path.is_file():
        raise BundleError(f"{path}: missing (the TLM MLP weights)")
    state = load_weights_only(path)  # never unpickles code; a refusal is one line in our words
    if not isinstance(state, dict) or not isinstance(state.get("film_mlp"), dict):
        raise BundleError(f"{path}: expected a dict with key 'film_mlp' holding the MLP state_dict")
    return state["film_mlp"]


def _check_pickled_state_dict(path: Path) -> None:
    """A pickled adapter must be a plain state dict (name -> tensor), read weights-only."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise BundleError(f"{path}: expected a state dict (tensor names -> tensors), got {type(state).__name__}")


def merge_lora(base_dir: Path, lora_dir: Path):
    from peft import LoraConfig, PeftModel
    from safetensors import SafetensorError

    config_path = lora_dir / "adapter_config.json"
    if not config_path.is_file():
        raise BundleError(f"{config_path}: missing (LORA must be a PEFT adapter folder)")
    weights = lora_dir / "adapter_model.safetensors"
    if not weights.is_file() and (lora_dir / "adapter_model.bin").is_file():
        weights = lora_dir / "adapter_model.bin"  # old PEFT default: a pickle
    if not weights.is_file():
        raise BundleError(f"{lora_dir / 'adapter_model.safetensors'}: missing (the LoRA adapter weights)")
    if weights.suffix == ".bin":
        _check_pickled_state_dict(weights)  # ourselves, before PEFT sees it
    try:
        peft_type = json.loads(config_path.read_text(encoding="utf-8")).get("peft_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise BundleError(f"{config_path}: not a JSON object ({exc})") from None
    if peft_type != "LORA":  # LoraConfig would silently overwrite another adapter type's peft_type
        raise BundleError(f"{config_path}: peft_type: expected 'LORA', got {peft_type!r}")
    try:
        lora_config = LoraConfig.from_pretrained(str(lora_dir))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"{config_path}: not a readable PEFT LoRA config ({str(exc).splitlines()[0]})") from None
    base = load_backbone(base_dir)
    lora_config.inference_mode = True
    targets = lora_config.target_modules
    if isinstance(targets, (set, list, tuple)):  # a string is a regex: PEFT matches it as written
        # The reference saves full module names (train_tlm.py lists every LLM linear); a legacy
        # adapter lists them in the old layout, which no module of the current one matches.
        lora_config.target_modules = {remap_legacy_module_name(t) for t in targets}
    try:
        # What PeftModel.from_pretrained does, but keeping the load result: PEFT only *warns*
        # about adapter tensors it could not place, which would silently drop the fine-tune.
        peft_model = PeftModel(base, lora_config)
        result = peft_model.load_adapter(str(lora_dir), "default", is_trainable=False,
                                         key_mapping=LEGACY_ADAPTER_KEYS)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise BundleError(f"{weights}: LoRA adapter does not apply to the base model "
                          f"({' '.join(str(exc).split())[:300]})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise BundleError(f"{weights}: LoRA tensors do not match the base model {base_dir} "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return peft_model.merge_and_unload()


def import_fusar_gpt(base: str | Path, lora: str | Path, tlm: str | Path | None, out: str | Path,
                     legacy_sigma: float | None = None, overwrite: bool = False,
                     progress: Callable[[str], None] = lambda msg: None, chip_size: int = 504) -> Path:
    """Merge the checkpoint and write a bundle; ``progress`` receives one line per step.

    ``tlm=None``: a checkpoint trained without AEF (the reference's ``train_no_aef.py``, or
    ``fusar-edge train --no-aef``): the bundle has no TLM and its chip is ``chip_size``.
    """
    from ..tokenizer import TextTokenizer

    base, lora, out = Path(base), Path(lora), Path(out)
    tlm = Path(tlm) if tlm is not None else None
    if out.exists() and not overwrite:  # before minutes of loading and merging, not after
        raise BundleError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    for name, path in (("BASE", base), ("LORA", lora), ("TLM", tlm)):
        if path is not None and not path.is_dir():
            raise BundleError(f"{path}: {name} must be a directory")
        # --force replaces OUT: never when OUT is (or holds) an input, e.g. the multi-GB base download
        if path is not None and out.exists() and (out.resolve() == path.resolve()
                                                  or out.resolve() in path.resolve().parents):
            raise InputError(f"--out {out}: is (or holds) the {name} folder {path}; --force would delete it; "
                             "write the bundle elsewhere")
    if tlm is not None:
        tlm_cfg = read_tlm_config(tlm, legacy_sigma)
        film = read_film_state(tlm)
        chip_size = int(tlm_cfg["image_size"])
        tlm_config = TLMConfig(enabled=True, vec_dim=64, hidden_mult=int(tlm_cfg["hidden_mult"]),
                               sigma=float(tlm_cfg["sigma"]))
    else:
        tlm_config = TLMConfig(enabled=False)
    copy_files = {}
    gen_path = base / GENERATION_CONFIG
    if gen_path.is_file():  # refused settings are named now, not at the first question
        GenerationSettings.from_bundle(base)
        copy_files[GENERATION_CONFIG] = gen_path
    tok_path = lora / "tokenizer.json" if (lora / "tokenizer.json").is_file() else base / "tokenizer.json"
    tokenizer = TextTokenizer.from_file(tok_path)
    backbone = load_backbone_json(base / "config.json")
    grasp_config, grasp_state = GRASPConfig(enabled=False), None
    if has_grasp(lora):
        grasp_config, grasp_state = read_grasp(lora, int(backbone["text_config"]["hidden_size"]))
    config = FusarConfig(
        name=f"fusar-gpt:{base.name}",
        backbone=backbone,
        chip_size=chip_size,
        tlm=tlm_config,
        grasp=grasp_config,
        max_new_tokens=REFERENCE_MAX_NEW_TOKENS,
        prompt_style="reference",
    )
    try:  # before minutes of loading and merging: a bad chip size is named now
        config.validate()
    except BundleError as exc:
        msg = str(exc)
        if msg.startswith("chip_size"):
            where = f"{tlm / 'tlm_config.json'}: image_size" if tlm is not None else "--chip"
        else:
            where = str(base / "config.json")
        raise BundleError(f"{where}: {msg}") from None
    progress(f"[1/3] loading {base} and merging the LoRA adapter {lora}")
    merged = merge_lora(base, lora)
    model = FusarModel(config, backbone=merged)
    if model.tlm is not None:
        try:
            model.tlm.film_mlp.load_state_dict(film, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{tlm / 'vec64_film.pt'}: film_mlp does not fit hidden size {config.hidden_size} "
                              f"and hidden_mult {config.tlm.hidden_mult} ({' '.join(str(exc).split())[:400]})") from None
        model.tlm.to(merged.dtype)
        progress(f"[2/3] TLM: sigma {config.tlm.sigma}, hidden_mult {config.tlm.hidden_mult}, chip {config.chip_size}")
    else:
        progress(f"[2/3] no TLM (trained without AEF), chip {config.chip_size}")
    if model.grasp is not None:
        try:
            model.grasp.load_state_dict(grasp_state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{lora / GRASP_WEIGHTS}: does not fit {lora / GRASP_CONFIG} "
                              f"({' '.join(str(exc).split())[:400]})") from None
        model.grasp.to(merged.dtype)
        g = config.grasp
        progress(f"      GRASP: grid {g.grid[0]}x{g.grid[1]}, {g.selector} k {g.k}, prompt_len {g.prompt_len}")
    _check_finite(model, base, lora, tlm)
    progress(f"[3/3] writing bundle {out}")
    return save_bundle(model, tokenizer, out, overwrite=overwrite, copy_files=copy_files)


@torch.no_grad()
def _check_finite(model, base: Path, lora: Path, tlm: Path | None) -> None:
    """A NaN or Inf in any weight makes every answer empty; name the tensor and where it came from
    now, not at the first question. (A pass over the weights: seconds for a 7B, against minutes of
    loading and merging.)"""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            where = (tlm / "vec64_film.pt" if name.startswith("tlm.") and tlm is not None
                     else lora / GRASP_WEIGHTS if name.startswith("grasp.")
                     else f"{base} merged with the LoRA adapter {lora}")
            raise BundleError(f"{where}: {name} holds NaN or Inf values; the checkpoint is damaged or its "
                              "training diverged")
