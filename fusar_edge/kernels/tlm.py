"""TLM as one fused pass over the visual tokens: ``y = x * (1 + a @ gamma) + a @ beta``.

``tlm_weights`` builds ``a[T, S]`` (DESIGN.md, TLM): Gaussian weights between every anchor
and every pre-merge patch centre, normalised over anchors (+eps), masked, renormalised
(+eps), then bilinearly resized (align_corners=False) to the merged token grid. Both steps
are linear in the anchors, so the whole spatial part is this one small matrix.
``fusar_edge.model.tlm.anchor_weights`` is this function; the all-masked check lives here.

``tlm_modulate`` applies it. The Triton kernel reads ``x`` once and writes ``y`` once: each
program owns a ``[BLOCK_T, BLOCK_C]`` tile of one image, loops over the anchors in chunks
of ``BLOCK_S`` and accumulates the two small-K products ``g = a @ gamma`` and
``b = a @ beta`` in fp32 registers, so the ``[T, C]`` fields never touch memory:

- ``BLOCK_S >= 16``: each chunk is two ``tl.dot``s, ``[BLOCK_T, BLOCK_S] @ [BLOCK_S, BLOCK_C]``
  (fp32 operands; ``input_precision`` "ieee" when ``y`` is fp32, "tf32" tensor cores when
  ``y`` is fp16/bf16, whose own rounding is no finer than tf32's);
- ``BLOCK_S < 16`` (S <= 8, where a dot would be mostly padding): rank-1 updates,
  ``g += a[:, s, None] * gamma[None, s, :]`` for each anchor of the chunk (unrolled).

Grid ``(cdiv(T, BLOCK_T), cdiv(C, BLOCK_C), B)``: the batched form (several images) is the
same launch. All inputs are read through their strides (no copies) and converted to fp32
in registers, so mixed dtypes (fp32 ``a`` with bf16 ``x``) need nothing special; ``y`` has
``x``'s dtype. ``out=x`` modulates in place (each program reads its tile of ``x`` before
writing the same tile). Autotuning is keyed on ``(T, C, S, B)`` (+ dtypes); under
``TRITON_INTERPRET=1`` there is exactly one config per path, so nothing is benchmarked.

Without Triton this module still imports (``resolve_backend`` then never picks the kernel);
with it, Triton is imported here and the kernel is built on first use. For the interpreter,
``TRITON_INTERPRET=1`` must be set before Triton is first imported (tests/conftest.py).
"""

import contextlib
import functools

import torch
import torch.nn.functional as F

from fusar_edge.errors import AnchorError, InputError

from ._backend import interpreting, resolve_backend

try:  # Triton is optional: CUDA builds of torch bring it, the CPU install may not have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = tl = None

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_SMALL_S = 8  # S at or below this takes the rank-1 path (a tl.dot needs K >= 16)


# --- the matrix a ---------------------------------------------------------------------------

def _grid2(name: str, grid) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise InputError(f"tlm_weights: {name}: expected two positive integers (rows, cols), got {grid!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"tlm_weights: {name}: expected two positive integers (rows, cols), got {grid!r}")
    return h, w


def tlm_weights(
    positions: torch.Tensor,
    mask: torch.Tensor,
    patch_grid: tuple[int, int],
    token_grid: tuple[int, int],
    sigma: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The combined Gaussian + bilinear matrix ``a`` (float32, on ``positions``' device).

    ``positions[S, 2]`` (normalised ``(y, x)``), ``mask[S]`` -> ``a[h*w, S]``; batched
    ``positions[B, S, 2]``, ``mask[B, S]`` -> ``a[B, h*w, S]``. Masked anchors get zero
    columns; an image with every anchor masked is an ``AnchorError``.
    """
    if not isinstance(positions, torch.Tensor) or positions.ndim not in (2, 3) or positions.shape[-1] != 2:
        got = list(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise InputError(f"tlm_weights: positions: expected [S, 2] or [B, S, 2] (normalised y, x), got {got}")
    if positions.is_complex():
        raise InputError(f"tlm_weights: positions: expected real numbers, got {positions.dtype}")
    lead = list(positions.shape[:-1])
    if not isinstance(mask, torch.Tensor) or list(mask.shape) != lead:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        want = "[S]" if positions.ndim == 2 else "[B, S]"
        raise InputError(f"tlm_weights: mask: expected {want} = {lead} to match positions {list(positions.shape)}, "
                         f"got {got}")
    hp, wp = _grid2("patch_grid", patch_grid)
    h, w = _grid2("token_grid", token_grid)
    if not float(sigma) > 0:
        raise InputError(f"tlm_weights: sigma: expected a positive width in patches, got {sigma!r}")

    single = positions.ndim == 2
    pos = positions.to(torch.float32)
    valid = mask.to(device=pos.device, dtype=torch.float32)
    if single:
        pos, valid = pos.unsqueeze(0), valid.unsqueeze(0)
    empty = (valid == 0).all(dim=1)  # [B]
    if bool(empty.any()):
        which = "" if single else f" of image {int(empty.nonzero()[0, 0])} (of {pos.shape[0]})"
        none = " (there are none: S = 0)" if pos.shape[1] == 0 else ""
        raise AnchorError(f"anchor mask: every anchor{which} is masked out{none}; "
                          "TLM needs at least one valid AEF vector")

    n, s = pos.shape[0], pos.shape[1]
    yy, xx = torch.meshgrid(
        torch.arange(hp, dtype=torch.float32, device=pos.device),
        torch.arange(wp, dtype=torch.float32, device=pos.device),
        indexing="ij",
    )
    d2 = (pos[..., 0, None] * (hp - 1) - yy.flatten()).square() + (pos[..., 1, None] * (wp - 1) - xx.flatten()).square()
    wts = torch.exp(-d2 / (2.0 * float(sigma) ** 2))  # [B, S, hp*wp]
    wts = wts / (wts.sum(dim=1, keepdim=True) + eps)
    wts = wts * valid.unsqueeze(-1)
    wts = wts / (wts.sum(dim=1, keepdim=True) + eps)
    # Resize each anchor's weight map exactly as the reference resizes the fields: bilinear
    # interpolation is linear, so resizing W (S maps) equals resizing W^T gamma (C maps).
    resized = F.interpolate(wts.reshape(n * s, 1, hp, wp), size=(h, w), mode="bilinear", align_corners=False)
    a = resized.reshape(n, s, h * w).transpose(1, 2).contiguous()  # [B, h*w, S]
    return a[0] if single else a


# --- y = x * (1 + a @ gamma) + a @ beta ------------------------------------------------------

def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check(x, a, gamma, beta, out, op: str) -> None:
    """Shapes, dtypes and devices, each failure one line naming the argument."""
    for name, t in (("x", x), ("a", a), ("gamma", gamma), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{op}: {name}: expected float32, float16, bfloat16 or float64, got {t.dtype}")
    if x.ndim not in (2, 3):
        raise InputError(f"{op}: x: expected [T, C] (one image) or [B, T, C] (a batch), got {_shape(x)}")
    batched = x.ndim == 3
    b = f"{x.shape[0]}, " if batched else ""
    bn = "B, " if batched else ""
    t, c = x.shape[-2], x.shape[-1]
    if a.ndim != x.ndim or a.shape[:-1] != x.shape[:-1]:
        raise InputError(f"{op}: a: expected [{bn}T, S] = [{b}{t}, S] to match x {_shape(x)}, got {_shape(a)}")
    s = a.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if list(p.shape) != list(x.shape[:-2]) + [s, c]:
            raise InputError(f"{op}: {name}: expected [{bn}S, C] = [{b}{s}, {c}] (S from a, C from x), "
                             f"got {_shape(p)}")
    for name, p in (("a", a), ("gamma", gamma), ("beta", beta)):
        if p.device != x.device:
            raise InputError(f"{op}: {name}: on {p.device} but x is on {x.device}; put all four on one device")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            got = f"{out.dtype} {_shape(out)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"{op}: out: expected {x.dtype} {_shape(x)} on {x.device} (like x), got {got}")


def tlm_modulate_reference(x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference: fp32 math (any input dtype), result in ``x``'s dtype.

    ``x[T, C], a[T, S], gamma/beta[S, C]`` or the batched ``[B, ...]`` of each.
    """
    _check(x, a, gamma, beta, out, "tlm_modulate_reference")
    af = a.float()
    y = (x.float() * (1.0 + af @ gamma.float()) + af @ beta.float()).to(x.dtype)
    if out is None:
        return y
    return out.copy_(y)


def tlm_modulate(x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x * (1 + a @ gamma) + a @ beta`` in one pass over ``x`` (fp32 accumulation).

    ``x[T, C], a[T, S], gamma/beta[S, C]`` -> ``y[T, C]``, or the batched form
    ``x[B, T, C], a[B, T, S], gamma/beta[B, S, C]`` -> ``y[B, T, C]``. ``y`` has ``x``'s
    dtype; ``out`` (same shape and dtype as ``x``, may be ``x`` itself) receives it.
    ``backend``: ``"auto"`` (Triton on CUDA tensors), ``"triton"`` or ``"torch"``.
    """
    op = "tlm_modulate"
    _check(x, a, gamma, beta, out, op)
    tensors = (x, a, gamma, beta) + (() if out is None else (out,))
    chosen = resolve_backend(backend, *tensors, op=op)
    if chosen == "triton":
        why = None
        if any(t.dtype == torch.float64 for t in tensors):
            why = "float64 inputs (the kernel computes in fp32)"
        elif torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            why = "inputs that require grad (the kernel has no backward; use torch.no_grad())"
        if why is not None:
            if backend == "triton":
                raise InputError(f"{op}: backend='triton' does not take {why}; use backend='torch'")
            chosen = "torch"
    if chosen == "torch":
        return tlm_modulate_reference(x, a, gamma, beta, out=out)
    return _launch(x, a, gamma, beta, out)


def _launch(x, a, gamma, beta, out):
    y = torch.empty_like(x) if out is None else out
    batched = x.ndim == 3
    xb, ab, gb, bb, yb = ((v if batched else v.unsqueeze(0)) for v in (x, a, gamma, beta, y))
    n, t, c = xb.shape
    s = ab.shape[-1]
    if n == 0 or t == 0 or c == 0:
        return y
    # Benchmarking while autotuning runs the kernel many times: when y overwrites an input
    # (out=x), that variant restores y after each run (a copy the plain variant does not pay).
    storages = {v.untyped_storage().data_ptr() for v in (x, a, gamma, beta)}
    kernel = _kernel(interpreting(), y.untyped_storage().data_ptr() in storages)
    grid = lambda meta: (triton.cdiv(t, meta["BLOCK_T"]), triton.cdiv(c, meta["BLOCK_C"]), n)  # noqa: E731
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[grid](
            xb, ab, gb, bb, yb,
            t, c, s, n,
            *xb.stride(), *ab.stride(), *gb.stride(), *bb.stride(), *yb.stride(),
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )
    return y


# --- the Triton kernel ----------------------------------------------------------------------

def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _configs(interpret: bool) -> list:
    """Small-S (rank-1) configs for BLOCK_S in 1, 2, 4, 8, and tl.dot configs (BLOCK_S >= 16)."""
    cfg = lambda bt, bc, bs, w, st: triton.Config(  # noqa: E731
        {"BLOCK_T": bt, "BLOCK_C": bc, "BLOCK_S": bs}, num_warps=w, num_stages=st)
    if interpret:  # one config per path: no benchmarking, few interpreted programs
        return [cfg(32, 64, bs, 1, 1) for bs in (1, 2, 4, 8)] + [cfg(32, 64, 32, 4, 1)]
    small = [cfg(bt, bc, bs, w, 1) for bs in (1, 2, 4, 8)
             for bt, bc, w in ((16, 256, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8))]
    # For the 7B shapes (T = 324, C = 3584, bf16): x is read once and y written once; a and
    # gamma/beta are re-read per tile from L2. Wide C tiles cut the re-reads of a.
    # The two fp32 accumulators take 2 * BLOCK_T * BLOCK_C / (32 * num_warps) registers per
    # thread: 64 for most configs below, 128 for the widest.
    dot = [cfg(bt, bc, bs, w, st) for bt, bc, bs, w, st in (
        (32, 128, 16, 4, 2), (64, 128, 16, 8, 2),
        (32, 128, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3), (64, 128, 32, 8, 3), (32, 256, 32, 8, 3),
        (64, 256, 32, 8, 3), (128, 128, 32, 8, 3),
        (64, 128, 64, 8, 3),
    )]
    return small + dot


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the path S takes: rank-1 with BLOCK_S = next_pow2(S) for S <= 8,
    else tl.dot with BLOCK_S no larger than S needs."""
    s = int(named_args["S"])
    if s <= _SMALL_S:
        bs = _next_pow2(s)
        return [c for c in configs if c.kwargs["BLOCK_S"] == bs]
    dot = [c for c in configs if c.kwargs["BLOCK_S"] >= 16]
    cap = max(min(c.kwargs["BLOCK_S"] for c in dot), _next_pow2(s))
    return [c for c in dot if c.kwargs["BLOCK_S"] <= cap]


if tl is not None:

    def _tlm_modulate_kernel(
        x_ptr, a_ptr, g_ptr, b_ptr, y_ptr,
        T, C, S, B,
        sxb, sxt, sxc,
        sab, sat, sas,
        sgb, sgs, sgc,
        sbb, sbs, sbc,
        syb, syt, syc,
        PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        img = tl.program_id(2).to(tl.int64)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_t = offs_t < T
        mask_c = offs_c < C
        a_base = a_ptr + img * sab
        g_base = g_ptr + img * sgb
        b_base = b_ptr + img * sbb

        acc_g = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        if BLOCK_S >= 16:
            offs_s = tl.arange(0, BLOCK_S)
            for s0 in range(0, S, BLOCK_S):
                ss = s0 + offs_s
                ms = ss < S
                at = tl.load(a_base + offs_t[:, None] * sat + ss[None, :] * sas,
                             mask=mask_t[:, None] & ms[None, :], other=0.0).to(tl.float32)
                mk = ms[:, None] & mask_c[None, :]
                gt = tl.load(g_base + ss[:, None] * sgs + offs_c[None, :] * sgc, mask=mk, other=0.0).to(tl.float32)
                bt = tl.load(b_base + ss[:, None] * sbs + offs_c[None, :] * sbc, mask=mk, other=0.0).to(tl.float32)
                acc_g = tl.dot(at, gt, acc_g, input_precision=PRECISION)
                acc_b = tl.dot(at, bt, acc_b, input_precision=PRECISION)
        else:
            for s0 in range(0, S, BLOCK_S):
                for j in tl.static_range(BLOCK_S):
                    s = s0 + j
                    mt = mask_t & ((offs_t * 0 + s) < S)  # vector compares: a scalar i1 & vector
                    mc = mask_c & ((offs_c * 0 + s) < S)  # upsets the interpreter
                    ac = tl.load(a_base + offs_t * sat + s * sas, mask=mt, other=0.0).to(tl.float32)
                    gr = tl.load(g_base + s * sgs + offs_c * sgc, mask=mc, other=0.0).to(tl.float32)
                    br = tl.load(b_base + s * sbs + offs_c * sbc, mask=mc, other=0.0).to(tl.float32)
                    acc_g += ac[:, None] * gr[None, :]
                    acc_b += ac[:, None] * br[None, :]

        m2 = mask_t[:, None] & mask_c[None, :]
        xt = tl.load(x_ptr + img * sxb + offs_t[:, None] * sxt + offs_c[None, :] * sxc, mask=m2, other=0.0)
        yt = xt.to(tl.float32) * (1.0 + acc_g) + acc_b
        tl.store(y_ptr + img * syb + offs_t[:, None] * syt + offs_c[None, :] * syc,
                 yt.to(y_ptr.dtype.element_ty), mask=m2)


@functools.lru_cache(maxsize=4)
def _kernel(interpret: bool, in_place: bool):
    """The autotuned kernel, built on first use (``triton.jit`` reads TRITON_INTERPRET then)."""
    if tl is None:  # resolve_backend refuses "triton" first; this is a guard
        raise InputError("tlm_modulate: backend='triton' but Triton is not installed (pip install triton)")
    return triton.autotune(
        configs=_configs(interpret),
        key=["T", "C", "S", "B"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["y_ptr"] if in_place else None,  # benchmarking must not modulate x repeatedly
    )(triton.jit(_tlm_modulate_kernel))
