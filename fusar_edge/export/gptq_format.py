"""Hugging Face GPTQ checkpoints <-> ``Int4Weight``.

A GPTQ checkpoint is a folder with ``quantize_config.json`` and safetensors weights in which
every quantised linear ``NAME`` is replaced by four tensors (plus ``NAME.bias`` if it has one):

- ``NAME.qweight`` int32 ``[in / 8, out]``: the unsigned 4-bit codes ``u = q + 8`` packed
  8 per int32 *along the input dimension*, least significant nibble first:
  ``qweight[i, o] = sum_j u[o, 8 i + j] << (4 j)`` (a word's bit pattern, read as int32);
- ``NAME.qzeros`` int32 ``[n_groups, out / 8]``: the group zero points packed the same way
  *along the output dimension*: ``qzeros[g, k] = sum_j z[g, 8 k + j] << (4 j)``;
- ``NAME.scales`` float16 ``[n_groups, out]``;
- ``NAME.g_idx`` int32 ``[in]``: the group of each input column, ``i // group_size`` when
  ``desc_act`` is false (all this module writes, and all that ``Int4Weight`` can hold).

Dequantisation is ``w[o, i] = (u[o, i] - zero[g_idx[i], o]) * scales[g_idx[i], o]``, and the two
storages differ only in the stored zero (for our symmetric 4-bit the true zero is 8):

- ``checkpoint_format="gptq"`` (legacy AutoGPTQ "v1", the default in both AutoGPTQ and
  GPTQModel, what transformers/optimum/vLLM read by default): stores ``zero - 1`` = 7, i.e.
  every ``qzeros`` word is ``0x77777777``; readers add 1 back;
- ``checkpoint_format="gptq_v2"`` (GPTQModel's v2 storage): stores the zero as is = 8,
  ``0x88888888`` (-2004318072 as int32).

Sources followed (conventions only, no code taken): vLLM PR #38966 "auto-detect v1/v2
zero-point format" (v1: ``dequant = (w_int - (stored_zero + 1)) * scale``, stored 7 for
symmetric 4-bit; v2: ``dequant = (w_int - stored_zero) * scale``, stored 8), vLLM PR #26092
(v2 is selected by ``"checkpoint_format": "gptq_v2"`` in quantize_config.json), intel/auto-round
PR #1434 (v1 -> v2 by adding ``0x11111111`` to every 4-bit ``qzeros`` word), vLLM PR #55262
(unpacking: "4-bit codes along the input axis (LSB first)" to ``[in, out]``, zeros "along the
output axis (LSB first)" to ``[in / group_size, out]``), optimum PR #2064 (``checkpoint_format``:
``gptq`` is read by GPTQModel and AutoGPTQ, ``gptq_v2`` by GPTQModel only), IST-DASLab/gptq
issue #19 (the reference's symmetric zero 8 means codes in ``[-8, 7]``), and published
``quantize_config.json`` files of GPTQModel checkpoints (keys ``bits``, ``group_size``,
``desc_act``, ``sym``, ``lm_head``, ``quant_method``, ``checkpoint_format``, ``pack_dtype``, ``meta``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .quant_types import Int4Weight

FORMATS = ("gptq", "gptq_v2")
QUANTIZE_CONFIG = "quantize_config.json"
WEIGHTS = "model.safetensors"
PACK = 8  # 4-bit codes per int32
STORED_ZERO = {"gptq": 7, "gptq_v2": 8}  # symmetric 4-bit, true zero 8
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _check_format(checkpoint_format: str) -> str:
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {', '.join(FORMATS)}, got {checkpoint_format!r}")
    return checkpoint_format


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_nibbles(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Codes in [0, 15] -> int32 words of 8, packed along ``dim`` (element ``8k + j`` at bits ``4j``)."""
    codes = codes.to(torch.int64).movedim(dim, -1)
    n = codes.shape[-1]
    if n % PACK:
        raise ValueError(f"cannot pack {n} 4-bit codes into int32 words (needs a multiple of {PACK})")
    if int(codes.min()) < 0 or int(codes.max()) > 15:
        raise ValueError("4-bit codes must lie in [0, 15]")
    codes = codes.reshape(*codes.shape[:-1], n // PACK, PACK)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int64)
    return _to_int32((codes << shifts).sum(-1)).movedim(-1, dim).contiguous()


def unpack_nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: int32 words -> int64 codes in [0, 15], 8x longer along ``dim``."""
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int64)
    codes = (w.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(*w.shape[:-1], w.shape[-1] * PACK).movedim(-1, dim).contiguous()


def pack_weight(w: Int4Weight, checkpoint_format: str = "gptq",
                bias_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One ``Int4Weight`` -> ``{"qweight", "qzeros", "scales", "g_idx"[, "bias"]}`` (unprefixed).

    ``bias_dtype``: float32 by default (exact; loaders cast to their dtype); a checkpoint whose
    reader takes one float dtype throughout (TensorRT Edge-LLM: float16) asks for that."""
    _check_format(checkpoint_format)
    out_f, in_f = w.shape
    if in_f % PACK or out_f % PACK:
        raise ValueError(f"{w.name}: GPTQ packing needs in and out features that are multiples of {PACK}, "
                         f"got [{out_f}, {in_f}]")
    scales16 = w.scales.to(torch.float16)
    if not torch.equal(scales16.float(), w.scales.float()):
        raise ValueError(f"{w.name}: scales are not float16-representable (the checkpoint stores float16); "
                         "quantise with export.gptq, which rounds scales to float16")
    u = (w.q.to(torch.int64) + 8).t()  # [in, out], codes 0..15
    n_groups = in_f // w.group_size
    zeros = torch.full((n_groups, out_f), STORED_ZERO[checkpoint_format], dtype=torch.int64)
    tensors = {
        "qweight": pack_nibbles(u, 0),
        "qzeros": pack_nibbles(zeros, 1),
        "scales": scales16.t().contiguous(),
        "g_idx": (torch.arange(in_f, dtype=torch.int32) // w.group_size).to(torch.int32),
    }
    if w.bias is not None:
        tensors["bias"] = w.bias.detach().to(bias_dtype).contiguous()
    return tensors


def unpack_weight(name: str, tensors: dict[str, torch.Tensor], group_size: int,
                  checkpoint_format: str = "gptq") -> Int4Weight:
    """The inverse of ``pack_weight``; refuses what ``Int4Weight`` cannot hold (asymmetric zeros,
    act-order ``g_idx``) with a message naming the tensor."""
    _check_format(checkpoint_format)
    missing = [s for s in SUFFIXES if s not in tensors and s != "g_idx"]
    if missing:
        raise ValueError(f"{name}: missing GPTQ tensors {missing}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: qweight/qzeros must be int32 (pack_dtype int32), got {qweight.dtype}/{qzeros.dtype}")
    in_f, out_f = qweight.shape[0] * PACK, qweight.shape[1]
    if group_size == -1:
        group_size = in_f
    if in_f % group_size:
        raise ValueError(f"{name}: in_features {in_f} is not a multiple of group_size {group_size} "
                         "(ragged last groups cannot be held by Int4Weight)")
    n_groups = in_f // group_size
    if tuple(scales.shape) != (n_groups, out_f) or tuple(qzeros.shape) != (n_groups, out_f // PACK):
        raise ValueError(f"{name}: scales {list(scales.shape)} / qzeros {list(qzeros.shape)} do not match qweight "
                         f"{list(qweight.shape)} with group_size {group_size}")
    g_idx = tensors.get("g_idx")
    expected = torch.arange(in_f, dtype=torch.int64) // group_size
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), expected):
        raise ValueError(f"{name}.g_idx: not i // group_size (an act-order / desc_act checkpoint): Int4Weight needs "
                         "contiguous groups")
    zeros = unpack_nibbles(qzeros, 1)  # [n_groups, out]
    stored = STORED_ZERO[checkpoint_format]
    if not bool((zeros == stored).all()):
        values = sorted(set(zeros.unique().tolist()))[:4]
        hint = ""
        other = [f for f, z in STORED_ZERO.items() if f != checkpoint_format and bool((zeros == z).all())]
        if other:
            hint = f"; they match checkpoint_format={other[0]!r}: is quantize_config.json's checkpoint_format wrong?"
        raise ValueError(f"{name}.qzeros: stored zero points {values} are not the symmetric {stored} of "
                         f"checkpoint_format={checkpoint_format!r}{hint}")
    u = unpack_nibbles(qweight, 0)  # [in, out]
    q = (u - 8).t().contiguous().to(torch.int8)
    bias = tensors.get("bias")
    return Int4Weight(name=name, q=q, scales=scales.float().t().contiguous(), group_size=group_size,
                      bias=bias.float().clone() if bias is not None else None)


def quantize_config(group_size: int, checkpoint_format: str = "gptq", *, damp: float | None = None,
                    act_order: bool = False, true_sequential: bool = True, meta: dict[str, Any] | None = None) -> dict:
    """The ``quantize_config.json`` (also transformers' ``config.json["quantization_config"]``)."""
    from fusar_edge import __version__ as version

    cfg = {
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,  # always: act_order runs with static groups, so g_idx stays i // group_size
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": _check_format(checkpoint_format),
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"fusar-edge:{version}"], "static_groups": bool(act_order),
                 "true_sequential": bool(true_sequential), **({"damp_percent": damp} if damp is not None else {}),
                 **(meta or {})},
    }
    if damp is not None:
        cfg["damp_percent"] = damp
    return cfg


def save_gptq_checkpoint(out_dir: str | Path, weights: dict[str, Int4Weight], *, checkpoint_format: str = "gptq",
                         model: torch.nn.Module | None = None, damp: float | None = None, act_order: bool = False,
                         meta: dict[str, Any] | None = None, float_dtype: torch.dtype | None = None,
                         skip_prefixes: tuple[str, ...] = ()) -> Path:
    """Write ``quantize_config.json`` and ``model.safetensors`` into ``out_dir``.

    Without ``model`` the safetensors file holds the quantised linears only. With ``model`` (the
    module the weights were computed on: a transformers model, or a FusarModel whose backbone is
    then written) it is a complete checkpoint: every other tensor of its state dict under its
    transformers key, tied copies written once, and ``config.json`` with ``quantization_config``.

    ``float_dtype`` (e.g. float16): every non-quantised floating tensor and bias is stored in it and
    ``config.json`` says so (``dtype``); None keeps the model's own dtypes (and float32 biases).
    ``skip_prefixes``: state-dict keys left out (e.g. ``model.visual.`` when the vision tower ships
    in another form).
    """
    from .gptq import quant_root

    _check_format(checkpoint_format)
    if not weights:
        raise ValueError("save_gptq_checkpoint: no quantised weights")
    sizes = {w.group_size for w in weights.values()}
    if len(sizes) != 1:
        raise ValueError(f"save_gptq_checkpoint: one group size per checkpoint, got {sorted(sizes)}")
    group_size = sizes.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for key, t in pack_weight(w, checkpoint_format, bias_dtype=float_dtype or torch.float32).items():
            tensors[f"{name}.{key}"] = t
    cfg = quantize_config(group_size, checkpoint_format, damp=damp, act_order=act_order, meta=meta)
    if model is not None:
        root = quant_root(model)
        replaced = {f"{n}.weight" for n in weights} | {f"{n}.bias" for n in weights}
        seen_ptrs = set()
        for key, t in root.state_dict().items():
            if key in replaced or key.startswith(skip_prefixes):
                continue
            ptr = (t.data_ptr(), tuple(t.shape), t.dtype)
            if ptr in seen_ptrs:  # tied (e.g. lm_head = embed_tokens): stored once, as transformers does
                continue
            seen_ptrs.add(ptr)
            t = t.detach().cpu()
            if float_dtype is not None and t.is_floating_point():
                t = t.to(float_dtype)
            tensors[key] = t.contiguous()
        config = getattr(root, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            cdict = config.to_dict()
            cdict["quantization_config"] = cfg
            # readers that dispatch on the class (transformers' Auto*, Edge-LLM's exporter) need it;
            # a config built in code, as the presets' are, has none
            if not cdict.get("architectures"):
                cdict["architectures"] = [type(root).__name__]
            if float_dtype is not None:
                name = str(float_dtype).replace("torch.", "")
                cdict["dtype"] = cdict["torch_dtype"] = name  # transformers 5 reads dtype, older readers torch_dtype
                if isinstance(cdict.get("text_config"), dict):
                    cdict["text_config"]["dtype"] = name
            (out / "config.json").write_text(json.dumps(cdict, indent=2, default=str), encoding="utf-8")
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "quantizer": "fusar-edge gptq"})
    (out / QUANTIZE_CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out


def read_quantize_config(directory: str | Path) -> dict[str, Any]:
    """``quantize_config.json``, else ``config.json``'s ``quantization_config``; checked for what we can load."""
    d = Path(directory)
    path = d / QUANTIZE_CONFIG
    if path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
    elif (d / "config.json").is_file() and "quantization_config" in json.loads((d / "config.json").read_text()):
        path = d / "config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))["quantization_config"]
    else:
        raise ValueError(f"{d}: neither {QUANTIZE_CONFIG} nor config.json with quantization_config (not a GPTQ checkpoint)")
    if cfg.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{path}: quant_method {cfg.get('quant_method')!r} is not gptq")
    if int(cfg.get("bits", 0)) != 4:
        raise ValueError(f"{path}: bits {cfg.get('bits')} (only 4-bit GPTQ loads into Int4Weight)")
    if not cfg.get("sym", True):
        raise ValueError(f"{path}: sym false (asymmetric zero points) cannot be held by Int4Weight")
    if cfg.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"{path}: pack_dtype {cfg.get('pack_dtype')!r} (only int32 packing is read)")
    fmt = cfg.get("checkpoint_format", "gptq")
    if fmt not in FORMATS:
        raise ValueError(f"{path}: checkpoint_format {fmt!r} (readable: {', '.join(FORMATS)})")
    return cfg


def load_gptq_checkpoint(directory: str | Path) -> dict[str, Int4Weight]:
    """Every quantised linear of a GPTQ checkpoint folder (all its ``*.safetensors``) as ``Int4Weight``s."""
    d = Path(directory)
    cfg = read_quantize_config(d)
    fmt = cfg.get("checkpoint_format", "gptq")
    group_size = int(cfg["group_size"])
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors files")
    prefixes = set()
    for f in files:  # a linear's tensors may sit in different shards: find every quantised name first
        with safe_open(str(f), framework="pt") as sf:
            prefixes |= {k[: -len(".qweight")] for k in sf.keys() if k.endswith(".qweight")}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                prefix, _, suffix = k.rpartition(".")
                if prefix in prefixes and suffix in SUFFIXES + ("bias",):
                    groups.setdefault(prefix, {})[suffix] = sf.get_tensor(k)
    if not groups:
        raise ValueError(f"{d}: no '*.qweight' tensors in {', '.join(f.name for f in files)}")
    return {name: unpack_weight(name, t, group_size, fmt) for name, t in groups.items()}


__all__ = ["FORMATS", "STORED_ZERO", "pack_nibbles", "unpack_nibbles", "pack_weight", "unpack_weight",
           "quantize_config", "save_gptq_checkpoint", "read_quantize_config", "load_gptq_checkpoint"]
