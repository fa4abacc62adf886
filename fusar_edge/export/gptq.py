"""GPTQ and round-to-nearest 4-bit weight quantisation of a causal LM's decoder linears.

``quantize_gptq(model, calib_inputs)`` implements GPTQ (Frantar, Ashkboos, Hoefler, Alistarh,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", 2022,
arXiv:2210.17323) for any transformers causal LM whose decoder keeps its blocks in a
``.layers`` ``ModuleList`` (Llama, Qwen2, Qwen2.5-VL's text model, Mistral, ...), and for our
``FusarModel`` through its backbone. ``quantize_rtn`` is the round-to-nearest baseline with
the same grid. Both return ``{qualified linear name: Int4Weight}`` (``quant_types.py``);
``apply_quantized`` writes the dequantised weights back into the model (evaluation, and the
ONNX export of the dequantised graph); ``gptq_format.py`` stores them as a Hugging Face
GPTQ checkpoint.

Why implemented here rather than through GPTQModel: PyPI ``gptqmodel`` 7.7.0 is a source
tarball whose requirements.txt asks for ``torch>=2.14.1`` (and torchao, datasets, pyarrow,
triton, ...); ``pip install --dry-run`` of it beside our torch 2.13.0+cpu resolves to
installing torch-2.14.1 plus the CUDA 13 wheels (nvidia-cublas, cudnn, nccl, ...), i.e. it
would replace the torch the project pins. The algorithm itself is ~100 lines of linear
algebra, so it is written out here from the paper (no code taken from GPTQModel/AutoGPTQ);
the checkpoint layout follows their documented storage so their loaders read our output.

The pipeline (the paper's Section 4 / Algorithm 1, "sequential" over layers):

1. Capture: the calibration inputs (token ids for generic LMs; ``inputs_embeds`` +
   ``position_ids`` for our decoder, see ``fusar_calibration_inputs``) run once through the
   decoder; forward pre-hooks record the hidden states entering layer 0 and the keyword
   arguments of *every* layer (masks can differ per layer, e.g. sliding-window layers).
2. For each decoder layer in turn: the layer's linears are processed in execution order,
   grouped by shared input ("true sequential": q/k/v, then o, then gate/up, then down). For
   each group, the layer runs over all calibration samples with the already-quantised
   linears in place, hooks accumulate ``H = 2/N sum x x^T`` over the group's input tokens,
   and the group's weights (rows concatenated: GPTQ treats rows independently given H) are
   quantised. The layer's output with all its linears quantised feeds the next layer.
3. Per weight matrix (``_gptq_matrix``): dead inputs (``H_ii == 0``) are zeroed,
   ``H += damp * mean(diag H) * I``, ``U = chol(H^-1)`` (upper), then columns are quantised
   left to right in blocks of 128 (lazy batch updates); each column's error, divided by
   ``U_jj``, is propagated to the remaining columns of the block through row ``j`` of ``U``
   and to the later blocks once per block. Group scales are computed when the sweep reaches
   a group's first column, from the *updated* weights of that group (blocks are a multiple
   of the group size, so a group never straddles two blocks). ``act_order=True`` processes
   columns by decreasing ``H_ii`` with "static groups": the scales of the (contiguous)
   groups are fixed up front from the unquantised weights, so the result still has the
   contiguous groups and trivial ``g_idx`` that ``Int4Weight``, MatMulNBits and Edge-LLM need.

The quantisation grid (symmetric, zero point 0 in signed form): per row and group of
``group_size`` consecutive input columns, ``q = clamp(round(w / s), -8, 7)``, ``w ~= q * s``.

- ``scale_method="signed"`` (default): ``s = max(max(w) / 7, -min(w) / 8)``, the smallest
  scale that represents the whole group without clipping while using all 16 levels (the
  negative side reaches -8). A group whose extremes are ``+m`` and ``-m`` gets ``m / 7``
  (the positive side limits); one dominated by its negative side gets ``|min| / 8``.
- ``scale_method="gptq"``: ``s = max|w| / 7.5`` (the GPTQ reference quantiser's symmetric
  mode: ``scale = 2 max|w| / 15`` with stored zero 8); it clips the positive extreme by up
  to half a step in exchange for a finer grid.

Scales are rounded to float16 before ``q`` is computed (``q`` is chosen for the float16
scale), so a float16-scale checkpoint reproduces the ``Int4Weight`` exactly. The unsigned
codes that checkpoints and ONNX store are ``u = q + 8`` in ``[0, 15]``:

- ONNX ``MatMulNBits`` (bits=4): ``B`` holds ``u``, zero point 8 (its default when
  ``zero_points`` is absent), ``w = (u - 8) * s``;
- GPTQ checkpoints: ``qweight`` holds ``u``; ``qzeros`` holds 7 (legacy AutoGPTQ
  ``checkpoint_format="gptq"``, which stores zero - 1) or 8 (GPTQModel ``"gptq_v2"``).

Sources for these conventions (semantics only): IST-DASLab/gptq issue #19 (the reference's
symmetric 4-bit ``zero = 8`` "means that quantized values are in range [-8, 7]"); the ONNX
Runtime MatMulNBits contrib-op spec (``(code - zero_point) * scale`` per power-of-two K block,
codes packed low-first; tract-onnx's importer documents the absent ``zero_points`` as 8);
``gptq_format.py`` cites the checkpoint side (which TensorRT Edge-LLM reads, ``edgellm.py``).
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusar_edge.errors import InputError

from .quant_types import Int4Weight

QMIN, QMAX = -8, 7
SCALE_METHODS = ("signed", "gptq")
BLOCK = 128  # GPTQ's lazy-batch column block
_FP16_MAX = float(torch.finfo(torch.float16).max)
_SCALE_FLOOR = 2.0 ** -24  # smallest float16 subnormal: a scale never rounds to 0


# ----------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------

def group_scales(w: torch.Tensor, scale_method: str = "signed") -> torch.Tensor:
    """Scales ``[..., G]`` for weight groups ``w [..., G, group_size]`` (float16-representable float32)."""
    w = w.float()
    if scale_method == "signed":
        s = torch.maximum(w.amax(-1).clamp_min(0) / QMAX, (-w.amin(-1)).clamp_min(0) / -QMIN)
    elif scale_method == "gptq":
        s = w.abs().amax(-1) / ((QMAX - QMIN) / 2)
    else:
        raise ValueError(f"scale_method: expected one of {', '.join(SCALE_METHODS)}, got {scale_method!r}")
    top = float(s.max()) if s.numel() else 0.0
    if not torch.isfinite(s).all() or top > _FP16_MAX:
        raise ValueError(f"weights too large (or not finite) for float16 group scales (max scale {top:.3g})")
    s = torch.where(s == 0, torch.ones_like(s), s.clamp_min(_SCALE_FLOOR))  # an all-zero group: q = 0 anyway
    return s.half().float()


def quantize_codes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``round(w / s)`` clamped to [-8, 7] (round half to even), as float."""
    return torch.clamp(torch.round(w / scales), QMIN, QMAX)


def rtn_matrix(weight: torch.Tensor, group_size: int, scale_method: str = "signed") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: ``weight [out, in]`` -> ``(q int8 [out, in], scales float32 [out, in // group_size])``."""
    out_f, in_f = weight.shape
    g = weight.float().reshape(out_f, in_f // group_size, group_size)
    s = group_scales(g, scale_method)
    q = quantize_codes(g, s.unsqueeze(-1)).reshape(out_f, in_f)
    return q.to(torch.int8), s


def _block_size(group_size: int) -> int:
    """The largest multiple of ``group_size`` not above 128 (or the group size when larger)."""
    return group_size if group_size >= BLOCK else (BLOCK // group_size) * group_size


def _cholesky_inverse_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``chol(H^-1)`` (upper) after dampening ``H`` by ``damp * mean(diag H)``; more damping if H is not PD."""
    h = h.double()
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(8):
        lam = damp * (10 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper.float()
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after damping (calibration data degenerate?)")


def gptq_matrix(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = 0.01,
                act_order: bool = False, scale_method: str = "signed") -> tuple[torch.Tensor, torch.Tensor, float]:
    """GPTQ on one matrix: ``weight [out, in]``, ``hessian [in, in]`` (``2/N X^T X``).

    Returns ``(q int8 [out, in], scales float32 [out, in // group_size], loss)`` where ``loss`` is
    GPTQ's own estimate ``sum (w - q s)^2 / U_jj^2 / 2`` of the output error it introduced.
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_groups = in_f // group_size
    scales = torch.zeros(out_f, n_groups, dtype=torch.float32, device=w.device)
    if act_order:
        # static groups: scales of the contiguous groups fixed before the reordered sweep
        scales = group_scales(w.reshape(out_f, n_groups, group_size), scale_method)
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        col_group = (perm // group_size).tolist()
    upper = _cholesky_inverse_upper(h, damp)
    q_all = torch.zeros(out_f, in_f, dtype=torch.float32, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    block = _block_size(group_size)
    s_col = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if act_order:
                s_col = scales[:, col_group[col]]
            elif col % group_size == 0:
                s_col = group_scales(w1[:, i:i + group_size], scale_method)
                scales[:, col // group_size] = s_col
            wc = w1[:, i]
            qc = quantize_codes(wc, s_col)
            q_all[:, col] = qc
            d = u1[i, i]
            e = (wc - qc * s_col) / d
            loss += (e.double() ** 2).sum() / 2
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        if i2 < in_f:
            w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    if act_order:
        q_all = q_all[:, torch.argsort(perm)]
    return q_all.to(torch.int8), scales, float(loss)


# ----------------------------------------------------------------------------------------
# Finding the decoder and its linears
# ----------------------------------------------------------------------------------------

def quant_root(model: nn.Module) -> nn.Module:
    """The module whose qualified names key the results: a ``FusarModel``'s transformers backbone
    (so names are transformers checkpoint keys, e.g. ``model.language_model.layers.0.mlp.up_proj``),
    otherwise the model itself."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module) and hasattr(model, "language_model"):
        return backbone
    return model


def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(decoder, decoder.layers)`` of a transformers causal LM (or a FusarModel)."""
    root = quant_root(model)
    candidates = []
    get_decoder = getattr(root, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except (AttributeError, NotImplementedError):
            pass
    for attr in ("language_model", "model", "transformer"):
        sub = getattr(root, attr, None)
        if isinstance(sub, nn.Module):
            candidates.extend([sub, getattr(sub, "language_model", None)])
    candidates.append(root)
    for cand in candidates:
        layers = getattr(cand, "layers", None) if isinstance(cand, nn.Module) else None
        if isinstance(layers, nn.ModuleList) and len(layers):
            return cand, layers
    raise ValueError(f"{type(root).__name__}: no decoder with a `.layers` ModuleList found")


def _select(model: nn.Module, layers: Iterable[str] | Callable[[str], bool] | None) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder layer, the selected ``(qualified name, nn.Linear)`` in registration order."""
    root = quant_root(model)
    _, blocks = find_decoder(model)
    names = {id(m): n for n, m in root.named_modules()}
    if layers is None:
        keep = lambda n: True  # noqa: E731
    elif callable(layers):
        keep = layers
    else:
        wanted = set(layers)
        keep = wanted.__contains__
    per_layer = []
    found = set()
    for block in blocks:
        chosen = []
        for mod in block.modules():
            if isinstance(mod, nn.Linear) and keep(names[id(mod)]):
                chosen.append((names[id(mod)], mod))
                found.add(names[id(mod)])
        per_layer.append(chosen)
    if layers is not None and not callable(layers):
        missing = sorted(set(layers) - found)
        if missing:
            raise ValueError(f"layers: not linears of the decoder layers: {missing[:5]}")
    return per_layer


GROUP_SIZES = (128, 64)  # the group sizes the export offers, largest (fewest scales) first


def choose_group_size(model: nn.Module, requested: int | None) -> int:
    """The 4-bit group size for ``model``'s decoder linears: ``requested`` when it divides every
    in_features, else (``requested`` None) the largest of ``GROUP_SIZES`` that does. Checked
    before any work, so a group that cannot fit costs a second, not an export."""
    widths = sorted({m.in_features for lin in _select(model, None) for _, m in lin})
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    if requested is not None:
        if any(w % requested for w in widths):
            hint = f"use --group-size {fits[0]} (or omit it)" if fits else "no offered group size fits"
            raise InputError(f"--group-size {requested}: does not divide the decoder's input widths "
                             f"{widths}; {hint}")
        return requested
    if not fits:
        raise InputError(f"4-bit export: no group size of {list(GROUP_SIZES)} divides the decoder's input widths {widths}")
    return fits[0]


def _check_divisible(per_layer, group_size: int, indivisible: str, progress) -> list[list[tuple[str, nn.Linear]]]:
    if indivisible not in ("error", "skip"):
        raise ValueError(f"indivisible: expected 'error' or 'skip', got {indivisible!r}")
    if group_size < 1:
        raise ValueError(f"group_size: expected a positive integer, got {group_size}")
    bad = [(n, m.in_features) for lin in per_layer for n, m in lin if m.in_features % group_size]
    if bad and indivisible == "error":
        raise ValueError(f"group_size {group_size} does not divide in_features of {len(bad)} linear(s), e.g. "
                         f"{bad[0][0]} ({bad[0][1]}); use a group size that divides them, or indivisible='skip' "
                         "to leave them unquantised")
    if bad:
        _say(progress, f"skipping {len(bad)} linear(s) whose in_features is not a multiple of {group_size}")
    return [[(n, m) for n, m in lin if m.in_features % group_size == 0] for lin in per_layer]


def _say(progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _int4(name: str, module: nn.Linear, q: torch.Tensor, s: torch.Tensor, group_size: int) -> Int4Weight:
    bias = module.bias.detach().float().cpu().clone() if module.bias is not None else None
    return Int4Weight(name=name, q=q.cpu().contiguous(), scales=s.cpu().contiguous(), group_size=group_size, bias=bias)


# ----------------------------------------------------------------------------------------
# RTN
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_rtn(model: nn.Module, group_size: int = 128, *, scale_method: str = "signed",
                 layers: Iterable[str] | Callable[[str], bool] | None = None, indivisible: str = "error",
                 progress: Callable[[str], None] | None = None) -> dict[str, Int4Weight]:
    """Round-to-nearest baseline on the same grid as ``quantize_gptq`` (no calibration)."""
    per_layer = _check_divisible(_select(model, layers), group_size, indivisible, progress)
    out = {}
    for lin in per_layer:
        for name, mod in lin:
            q, s = rtn_matrix(mod.weight.detach(), group_size, scale_method)
            out[name] = _int4(name, mod, q, s, group_size)
    return out


# ----------------------------------------------------------------------------------------
# Applying
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def apply_quantized(model: nn.Module, weights: dict[str, Int4Weight]) -> dict[str, torch.Tensor]:
    """Replace each named linear's weight by its dequantised ``Int4Weight`` (in the module's dtype).

    Returns the original weights ``{name: tensor}`` so that ``restore_weights`` can undo it.
    """
    root = quant_root(model)
    originals = {}
    for name, w in weights.items():
        mod = root.get_submodule(name)
        if not isinstance(mod, nn.Linear) or tuple(mod.weight.shape) != w.shape:
            raise ValueError(f"{name}: not a linear of shape {list(w.shape)} in {type(root).__name__}")
        originals[name] = mod.weight.detach().clone()
        mod.weight.copy_(w.dequantize().to(device=mod.weight.device, dtype=mod.weight.dtype))
    return originals


@torch.no_grad()
def restore_weights(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    root = quant_root(model)
    for name, t in originals.items():
        root.get_submodule(name).weight.copy_(t)


# ----------------------------------------------------------------------------------------
# Calibration inputs
# ----------------------------------------------------------------------------------------

def _as_kwargs(item: Any, device: torch.device) -> dict[str, Any]:
    """One calibration item -> keyword arguments of the decoder's forward."""
    if isinstance(item, torch.Tensor):
        item = {"input_ids": item}
    if not isinstance(item, dict):
        raise TypeError(f"calibration input: expected a LongTensor of token ids or a dict, got {type(item).__name__}")
    allowed = {"input_ids", "inputs_embeds", "position_ids", "attention_mask"}
    extra = set(item) - allowed
    if extra:
        raise ValueError(f"calibration input: unexpected keys {sorted(extra)} (allowed: {sorted(allowed)})")
    if ("input_ids" in item) == ("inputs_embeds" in item):
        raise ValueError("calibration input: give exactly one of input_ids and inputs_embeds")
    kw = {}
    for key, value in item.items():
        value = torch.as_tensor(value).to(device)
        if key == "input_ids" and value.dim() == 1:
            value = value.unsqueeze(0)
        if key == "inputs_embeds" and value.dim() == 2:
            value = value.unsqueeze(0)
        if key == "attention_mask" and value.dim() == 1:
            value = value.unsqueeze(0)
        kw[key] = value
    return kw


class _Stop(Exception):
    pass


class _Captured:
    """Per sample: the hidden state entering layer 0, and every layer's other call arguments."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[tuple[tuple, dict, bool]]] = []  # [sample][layer] -> (args, kwargs, hidden_as_kwarg)
        self.token_mask: list[torch.Tensor | None] = []


@torch.no_grad()
def _capture(decoder: nn.Module, blocks: nn.ModuleList, samples: list[dict[str, Any]]) -> _Captured:
    cap = _Captured()
    current: list = []

    def make_hook(idx: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                hidden, rest, as_kw = args[0], tuple(args[1:]), False
            else:
                hidden, rest, as_kw = kwargs.pop("hidden_states"), (), True
            if idx == 0:
                cap.hidden.append(hidden.detach())
            current.append((rest, kwargs, as_kw))
            if idx == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for kw in samples:
            current = []
            try:
                decoder(**kw, use_cache=False)
            except _Stop:
                pass
            if len(current) != len(blocks):
                raise RuntimeError(f"calibration: the decoder called {len(current)} of {len(blocks)} layers")
            cap.calls.append(current)
            mask = kw.get("attention_mask")
            cap.token_mask.append(mask.reshape(-1).bool() if mask is not None and not bool(mask.all()) else None)
    finally:
        for h in handles:
            h.remove()
    return cap


def _run_layer(block: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict, bool]) -> torch.Tensor:
    rest, kwargs, as_kw = call
    out = block(hidden_states=hidden, **kwargs) if as_kw else block(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------
# GPTQ over the model
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def _discover_groups(block, hidden, call, linears: list[tuple[str, nn.Linear]], true_sequential: bool):
    """Execution order of the layer's linears, grouped by shared input: ``[[[names sharing one input], ...], ...]``,
    and whether every linear ran exactly once (then Hessian passes may stop at their last linear).

    With ``true_sequential`` each group is one run of consecutive calls on the same input tensor
    (q/k/v; o; gate/up; down); otherwise one group holding every input. The inputs are kept
    alive during the pass so a freed tensor's address is never mistaken for a shared input.
    """
    seen: dict[str, tuple] = {}
    order: list[str] = []
    alive = []
    calls = {n: 0 for n, _ in linears}

    def make_hook(name):
        def hook(module, args):
            calls[name] += 1
            if name not in seen:
                x = args[0]
                alive.append(x)
                seen[name] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                order.append(name)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears]
    try:
        _run_layer(block, hidden, call)
    finally:
        for h in handles:
            h.remove()
    order += [n for n, _ in linears if n not in seen]  # never called on this sample: own groups, last
    keys = [seen.get(n, ("uncalled", n)) for n in order]
    once = all(c == 1 for c in calls.values())
    if not true_sequential:
        merged: dict[tuple, list[str]] = {}
        for name, key in zip(order, keys):
            merged.setdefault(key, []).append(name)
        return [list(merged.values())], once
    groups: list[list[list[str]]] = []
    for j, (name, key) in enumerate(zip(order, keys)):
        if j and key == keys[j - 1]:
            groups[-1][0].append(name)
        else:
            groups.append([[name]])
    return groups, once


@torch.no_grad()
def quantize_gptq(model: nn.Module, calib_inputs: Sequence[Any], bits: int = 4, group_size: int = 128,
                  sym: bool = True, act_order: bool = False, damp: float = 0.01,
                  layers: Iterable[str] | Callable[[str], bool] | None = None,
                  progress: Callable[[str], None] | None = None, *, scale_method: str = "signed",
                  true_sequential: bool = True, indivisible: str = "error", inplace: bool = False,
                  stats: dict[str, dict[str, float]] | None = None) -> dict[str, Int4Weight]:
    """GPTQ 4-bit (symmetric, grouped) of the decoder layers' linears -> ``{name: Int4Weight}``.

    ``calib_inputs``: a sequence whose items are token ids (LongTensor ``[L]`` or ``[B, L]``) or
    dicts with ``input_ids`` or ``inputs_embeds`` (``[1, L, C]``) and optionally ``position_ids``
    (our decoder's M-RoPE ids ``[3, 1, L]``) and ``attention_mask`` (padded tokens are left out
    of the Hessians). ``layers``: names or a predicate over qualified names (default: every
    ``nn.Linear`` inside the decoder layers, so never ``lm_head`` or the embeddings).
    ``damp``: fraction of ``mean(diag H)`` added to the diagonal. ``act_order``: decreasing
    ``H_ii`` order with static groups (see the module docstring). ``indivisible``: ``"error"``
    or ``"skip"`` for linears whose ``in_features`` is not a multiple of ``group_size``.
    ``inplace``: leave the dequantised weights in the model (default: restore the originals).
    ``stats``: filled with ``{name: {"loss": GPTQ's error estimate, "tokens": N}}`` (``loss`` is
    shared by the linears quantised together, e.g. q/k/v). The model runs in eval mode throughout.
    Names are the model's qualified module names (a FusarModel's: its backbone's).
    """
    if bits != 4 or not sym:
        raise ValueError("quantize_gptq: only bits=4, sym=True is implemented (the Int4Weight/MatMulNBits/TRT form)")
    if not 0 < damp < 1:
        raise ValueError(f"damp: expected a fraction in (0, 1), got {damp}")
    if scale_method not in SCALE_METHODS:
        raise ValueError(f"scale_method: expected one of {', '.join(SCALE_METHODS)}, got {scale_method!r}")
    per_layer = _check_divisible(_select(model, layers), group_size, indivisible, progress)
    decoder, blocks = find_decoder(model)
    device = next(decoder.parameters()).device
    samples = [_as_kwargs(item, device) for item in calib_inputs]
    if not samples:
        raise ValueError("quantize_gptq: no calibration inputs")
    root = quant_root(model)
    was_training = root.training
    root.eval()
    try:
        result = _gptq_layers(blocks, decoder, samples, per_layer, group_size, damp, act_order, scale_method,
                              true_sequential, inplace, stats, progress)
    finally:
        root.train(was_training)
    order = [n for lin in per_layer for n, _ in lin]  # registration order, whatever the execution order
    assert set(result) == set(order)
    return {n: result[n] for n in order}


def _gptq_layers(blocks, decoder, samples, per_layer, group_size, damp, act_order, scale_method,
                 true_sequential, inplace, stats, progress) -> dict[str, Int4Weight]:
    _say(progress, f"capturing layer inputs for {len(samples)} calibration sample(s)")
    cap = _capture(decoder, blocks, samples)
    hidden = cap.hidden
    result: dict[str, Int4Weight] = {}
    for li, (block, linears) in enumerate(zip(blocks, per_layer)):
        originals = {n: m.weight.detach().clone() for n, m in linears}
        if linears:
            by_name = dict(linears)
            groups, once = _discover_groups(block, hidden[0], cap.calls[0][li], linears, true_sequential)
            for group in groups:
                hessians = _accumulate(block, hidden, [c[li] for c in cap.calls], cap.token_mask,
                                       [(names[0], by_name[names[0]]) for names in group], stop_early=once)
                for names in group:
                    h, n_tok = hessians[names[0]]
                    mods = [by_name[n] for n in names]
                    if n_tok == 0:
                        _say(progress, f"layer {li}: {', '.join(names)} saw no calibration tokens: round-to-nearest")
                    w_cat = torch.cat([m.weight.detach() for m in mods], dim=0)
                    if n_tok:
                        q, s, loss = gptq_matrix(w_cat, h, group_size, damp=damp, act_order=act_order,
                                                 scale_method=scale_method)
                    else:
                        (q, s), loss = rtn_matrix(w_cat, group_size, scale_method), float("nan")
                    row = 0
                    for n, m in zip(names, mods):
                        rows = m.out_features
                        w = _int4(n, m, q[row:row + rows], s[row:row + rows], group_size)
                        result[n] = w
                        m.weight.copy_(w.dequantize().to(device=m.weight.device, dtype=m.weight.dtype))
                        if stats is not None:
                            stats[n] = {"loss": loss, "tokens": n_tok}
                        row += rows
            _say(progress, f"layer {li + 1}/{len(blocks)}: quantised {len(linears)} linear(s)")
        hidden = [_run_layer(block, x, c[li]) for x, c in zip(hidden, cap.calls)]
        if not inplace:
            for n, m in linears:
                m.weight.copy_(originals[n])
    return result


@torch.no_grad()
def _accumulate(block, hidden, calls, token_masks, hooked: list[tuple[str, nn.Linear]], stop_early: bool = False):
    """Run the layer over every sample and return ``{name: (H = 2/N X^T X, N)}`` for the hooked linears.

    ``stop_early``: each linear runs once per forward, so the forward is cut short once every hooked
    linear has seen its input (the q/k/v pass costs a norm, the o pass stops before the MLP, ...).
    """
    acc = {n: [torch.zeros(m.in_features, m.in_features, dtype=torch.float32, device=m.weight.device), 0]
           for n, m in hooked}
    mask_box: list[torch.Tensor | None] = [None]
    pending: set[str] = set()

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            mask = mask_box[0]
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.to(x.device)]
            a = acc[name]
            a[0].addmm_(x.t(), x)
            a[1] += x.shape[0]
            pending.discard(name)
            if stop_early and not pending:
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in hooked]
    try:
        for x, call, mask in zip(hidden, calls, token_masks):
            mask_box[0] = mask
            pending.clear()
            pending.update(n for n, _ in hooked)
            try:
                _run_layer(block, x, call)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: (a[0] * (2.0 / a[1]) if a[1] else a[0], a[1]) for n, a in acc.items()}


# ----------------------------------------------------------------------------------------
# Layer-output error (evaluation)
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def layer_output_errors(model: nn.Module, weights: dict[str, Int4Weight], calib_inputs: Sequence[Any]) -> dict[str, float]:
    """``{name: ||X W^T - X Wq^T||_F^2 / ||X W^T||_F^2}`` with ``X`` each linear's inputs in the
    unquantised model on ``calib_inputs`` (the quantity GPTQ minimises, per layer)."""
    root = quant_root(model)
    decoder, _ = find_decoder(model)
    device = next(decoder.parameters()).device
    sums = {n: [0.0, 0.0] for n in weights}
    deltas = {n: (root.get_submodule(n).weight.detach().float() - w.dequantize().to(device)) for n, w in weights.items()}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name][0] += float((x @ deltas[name].t()).pow(2).sum())
            sums[name][1] += float((x @ module.weight.detach().float().t()).pow(2).sum())
        return hook

    handles = [root.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in weights]
    try:
        for item in calib_inputs:
            decoder(**_as_kwargs(item, device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: (e / r if r else 0.0) for n, (e, r) in sums.items()}


# ----------------------------------------------------------------------------------------
# FUSAR calibration: real multimodal decoder inputs from synthetic SAR scenes
# ----------------------------------------------------------------------------------------

# Questions of every task (tasks.infer_task maps each to the task it is listed under); {label}
# is a ship class. The answers are written from the scene's known ship boxes, so the
# calibration covers the prefill (image, GRASP slot, prompt) and answer-like decode tokens.
CALIB_QUESTIONS: dict[str, tuple[str, ...]] = {
    "count": ("How many {label}s are there in this image?", "Count the {label}s.",
              "What is the number of {label}s visible?"),
    "locate": ("Where is the {label}?", "Which part of the image contains the {label}?", "Locate the {label}."),
    "classify": ("What type of ship is this?", "Classify the target in this image.",
                 "What kind of vessel is shown here?"),
    "detect": ("Detect all {label}s.", "Find all {label}s in the image.", "Detect the {label}s in this scene."),
    "caption": ("Describe this SAR image.", "Give a short description of the scene.",
                "Summarise what this image shows."),
}
CALIB_LABELS = ("ship", "vessel", "boat", "cargo ship", "tanker", "fishing boat")


def _calib_answer(task: str, label: str, boxes: list[list[float]], chip: int, rng: random.Random) -> str:
    from fusar_edge.tasks import GRID_CELLS

    if task == "count":
        return str(len(boxes))
    if task == "locate":
        x0, y0, x1, y1 = boxes[0]
        row, col = min(2, int((y0 + y1) / 2 * 3 / chip)), min(2, int((x0 + x1) / 2 * 3 / chip))
        return GRID_CELLS[row][col] if rng.random() < 0.5 else f'{{"bbox_2d": [{x0}, {y0}, {x1}, {y1}]}}'
    if task == "classify":
        return rng.choice(("cargo", "tanker", "fishing", "passenger", "other"))
    if task == "detect":
        items = ", ".join(f'{{"bbox_2d": [{b[0]}, {b[1]}, {b[2]}, {b[3]}], "label": "{label}"}}' for b in boxes)
        return f"```json\n[{items}]\n```"
    return f"A SAR image of open sea with {len(boxes)} {label}s and sea clutter."


@torch.no_grad()
def fusar_calibration_inputs(model, tokenizer, n: int = 32, seed: int = 0, *, scene_size: int = 256,
                             anchor_fraction: float = 0.75, with_answers: bool = True,
                             workdir: str | Path | None = None) -> list[dict[str, torch.Tensor]]:
    """``n`` decoder inputs ``{"inputs_embeds": [1, L, C], "position_ids": [3, 1, L]}`` for a FusarModel.

    Each is built exactly as ``Runtime.ask`` builds its prefill: a synthetic SAR sea scene
    (``write_demo_scene``, a fresh seed each) -> chip -> patches -> vision (+ TLM on the scene's
    anchors for ``anchor_fraction`` of the samples) -> a random question of a random task through
    ``tasks.build_prompt`` and the chat sequence -> fusion (+ GRASP) -> M-RoPE positions. With
    ``with_answers`` a plausible answer (from the scene's ship boxes) and ``<|im_end|>`` follow
    the assistant header, so answer tokens are calibrated too. Deterministic for a given seed.
    """
    from fusar_edge import tasks
    from fusar_edge.geo.anchors import AnchorSet
    from fusar_edge.geo.chip import to_chip
    from fusar_edge.geo.sar import read_sar
    from fusar_edge.geo.synthetic import write_demo_scene
    from fusar_edge.model.preprocess import chip_to_patches
    from fusar_edge.model.rope import mrope_positions
    from fusar_edge.tokenizer import build_sequence

    if n < 1:
        raise ValueError(f"n: expected a positive number of samples, got {n}")
    cfg = model.config
    rng = random.Random(seed)
    grasp_len = cfg.grasp.prompt_len if model.grasp is not None else 0
    vision = cfg.vision
    out = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in range(n):
            scene = write_demo_scene(Path(tmp) / f"s{i}", size=scene_size, seed=rng.randrange(2 ** 31))
            img = read_sar(scene["scene_tif"])
            chip = to_chip(img, cfg.chip_size)
            pixels, grid_thw = chip_to_patches(chip, int(vision.get("patch_size", 14)),
                                               int(vision.get("spatial_merge_size", 2)),
                                               int(vision.get("temporal_patch_size", 2)))
            task = rng.choice(tasks.TASKS)
            label = rng.choice(CALIB_LABELS)
            question = rng.choice(CALIB_QUESTIONS[task]).format(label=label)
            prompt = tasks.build_prompt(tasks.infer_task(question), question)
            seq = build_sequence(tokenizer, prompt, cfg.num_visual_tokens, grasp_len, cfg.system_prompt)
            ids = torch.from_numpy(seq.input_ids)
            if with_answers:
                k = cfg.chip_size / scene_size
                boxes = [[round(v * k) for v in b] for b in scene["ships"]]
                answer = _calib_answer(task, label, boxes, cfg.chip_size, rng)
                ids = torch.cat([ids, torch.tensor(tokenizer.encode(answer + "<|im_end|>"), dtype=torch.long)])
            anchors = AnchorSet.load(scene["anchors"]).to_torch() if rng.random() < anchor_fraction else None
            visual = model.vision(pixels, grid_thw, anchors)
            embeds, _ = model.fusion(ids, seq.layout, visual, seq.question_ids)
            positions, _ = mrope_positions(len(ids), seq.layout.image_start, cfg.token_grid)
            out.append({"inputs_embeds": embeds.detach(), "position_ids": torch.from_numpy(positions)})
    return out


def summarize(weights: dict[str, Int4Weight]) -> dict[str, Any]:
    """Counts and sizes for reports."""
    params = sum(w.q.numel() for w in weights.values())
    groups = sum(w.scales.numel() for w in weights.values())
    return {"linears": len(weights), "params": params, "int4_bytes": params // 2 + groups * 2,
            "fp16_bytes": params * 2, "group_sizes": sorted({w.group_size for w in weights.values()})}


__all__ = ["QMIN", "QMAX", "SCALE_METHODS", "group_scales", "quantize_codes", "rtn_matrix", "gptq_matrix",
           "quant_root", "find_decoder", "quantize_rtn", "quantize_gptq", "apply_quantized", "restore_weights",
           "layer_output_errors", "fusar_calibration_inputs", "summarize", "CALIB_QUESTIONS", "CALIB_LABELS"]
