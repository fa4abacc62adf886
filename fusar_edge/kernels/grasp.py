"""Fused GRASP selection: scores, sparse selection and the weighted prompt sum in one launch.

``grasp_fuse(q, keys, prompts, selector, k)`` computes, for one query (or a batch of them)::

    s = keys @ q / sqrt(h)                        # [N] block scores
    w = topk_softmax(s, k) | entmax15(s)          # [N] sparse weights, float32
    prompt = w @ prompts                          # [C] or [L, C]

with the semantics of ``fusar_edge.model.grasp`` (``topk``: softmax over the k largest
scores, exact zeros elsewhere, ties broken by the lower block index; ``entmax15``: exact
1.5-entmax). Shapes: ``q [h]``, ``keys [N, h]``, ``prompts [N, C]`` or ``[N, L, C]``; batched
``q [B, h]``, ``keys [B, N, h]`` with the prompts shared (they are parameters) ->
``prompt [B, C]`` / ``[B, L, C]``, ``weights [B, N]``. The prompt comes back in the prompts'
dtype (fp32 accumulation), the weights in float32.

Kernel design (one launch, grid ``(B, P)``):

- Program ``(b, p)`` recomputes the tiny score vector of batch row ``b`` (``N <= 256``
  blocks padded to the power of two ``N_PAD``; ``h`` read in ``BLOCK_H`` chunks, fp32
  accumulation) and its selection, then walks the flattened prompt columns
  ``L * C`` in ``BLOCK_C`` tiles ``p, p + P, p + 2P, ...``, accumulating
  ``sum_n w_n * prompts[n, tile]`` in fp32. The selection costs ``N * h`` MACs per program,
  so ``P`` (autotuned, ``SPLIT_C``) trades that redundancy against parallelism. The
  ``[B, N]`` scores make one round trip through a scratch buffer so that every comparison
  sees the same bits (see the kernel).
- Selection is sort-free by rank counting: ``j`` beats ``i`` iff ``s_j > s_i`` or
  (``s_j == s_i`` and ``j < i``); ``rank_i`` = number of valid ``j`` that beat ``i``. This is a
  strict total order, so ranks are a permutation of ``0..N-1`` (a stable descending sort).
  ``topk`` keeps ``rank < k`` (exactly the lower-index tie rule, for any N, no ``tl.topk``).
  ``entmax15`` evaluates the sort-based closed form for every prefix at once: the prefix of
  length ``rank_i + 1`` of the sorted order is {i} plus everything that beats i, so its
  count, sum and sum of squares are masked row sums of the ``[N_PAD, N_PAD]`` comparison
  matrix; ``tau_i`` solves ``sum_prefix (x - tau)^2 = 1``; the support size is the number of
  ``i`` with ``tau_i <= x_i`` and the threshold is ``tau`` at rank ``support - 1``, exactly as
  in the reference (so the support is exact, no bisection).
- Weights are stored by the ``p == 0`` program of each row.

The kernel is inference-only: with autograd recording (an input requires grad) ``auto``
runs the torch reference, so training the prompts and projections keeps its gradients.
"""

from __future__ import annotations

import math
import operator

import torch

from fusar_edge.errors import InputError

from ._backend import interpreting, resolve_backend, triton_available

SELECTORS = ("topk", "entmax15")
MAX_TRITON_BLOCKS = 256  # the selection holds an [N_PAD, N_PAD] comparison tile in registers
# Whether backend="auto" runs the kernel on CUDA. Off: on an H200 the kernel without the score
# round trip chose wrong blocks for 1-4 of 16 rows (benchmarks/results/gpu-h200.md); the round
# trip is the fix, and has run only under the interpreter so far. Turn this on once
# benchmarks/gpu_check.sh's kernel-tests and grasp-rows pass on a GPU. The reference costs
# 0.3-1 ms per question there (benchmarks/triton_kernels.py), once per request.
AUTO_RUNS_KERNEL = False
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["grasp_fuse", "grasp_fuse_reference", "SELECTORS", "MAX_TRITON_BLOCKS"]


# --- validation -----------------------------------------------------------------------------

def _check(q: torch.Tensor, keys: torch.Tensor, prompts: torch.Tensor, selector: str, k: int, op: str):
    """-> ``(batched, B, N, h, k as int, LC)``; raises InputError naming the bad argument."""
    k_arg = k
    for name, t in (("q", q), ("keys", keys), ("prompts", prompts)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if q.dim() == 1:
        batched, b = False, 1
        if keys.dim() != 2:
            raise InputError(f"{op}: keys must be [N, h] for q of shape [h], got keys {tuple(keys.shape)}")
    elif q.dim() == 2:
        batched, b = True, q.shape[0]
        if keys.dim() != 3 or keys.shape[0] != b:
            raise InputError(f"{op}: keys must be [B, N, h] = [{b}, N, h] for q of shape [B, h] = "
                             f"{list(q.shape)}, got keys {tuple(keys.shape)}")
    else:
        raise InputError(f"{op}: q must be [h] or [B, h], got shape {tuple(q.shape)}")
    n, h = keys.shape[-2], keys.shape[-1]
    if h != q.shape[-1]:
        raise InputError(f"{op}: keys' last dim (h = {h}) must equal q's last dim (h = {q.shape[-1]})")
    if h < 1:
        raise InputError(f"{op}: q and keys need a projection width h >= 1, got h = {h}")
    if n < 1:
        raise InputError(f"{op}: keys must hold at least one block (N >= 1), got shape {tuple(keys.shape)}")
    if prompts.dim() not in (2, 3) or prompts.shape[0] != n:
        raise InputError(f"{op}: prompts must be [N, C] or [N, L, C] with N = {n} (keys' blocks), "
                         f"got prompts {tuple(prompts.shape)}")
    if any(d < 1 for d in prompts.shape):
        raise InputError(f"{op}: prompts must have no empty dimension, got shape {tuple(prompts.shape)}")
    if not (q.device == keys.device == prompts.device):
        raise InputError(f"{op}: q, keys and prompts must be on one device, got {q.device}, {keys.device}, "
                         f"{prompts.device}")
    if selector not in SELECTORS:
        raise InputError(f"{op}: selector must be one of {', '.join(SELECTORS)}, got {selector!r}")
    try:
        k = operator.index(k)  # ints, numpy ints; not floats or bools
    except TypeError:
        k = None
    if k is None or isinstance(k_arg, bool):
        raise InputError(f"{op}: k must be an int in 1..{n} (N blocks), got {k_arg!r}")
    if selector == "topk" and not 1 <= k <= n:
        raise InputError(f"{op}: k must be in 1..{n} (N blocks) for the topk selector, got k = {k}")
    return batched, b, n, h, k, math.prod(prompts.shape[1:])


def _check_out(out, prompt_shape, weights_shape, prompts: torch.Tensor, op: str):
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise InputError(f"{op}: out must be a (prompt, weights) pair of tensors, got {type(out).__name__}")
    for name, t, shape, dtype in (("out[0] (prompt)", out[0], prompt_shape, prompts.dtype),
                                  ("out[1] (weights)", out[1], weights_shape, torch.float32)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype \
                or t.device != prompts.device or not t.is_contiguous():
            got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{op}: {name} must be a contiguous {tuple(shape)} {dtype} tensor on "
                             f"{prompts.device}, got {got}")


# --- torch reference ------------------------------------------------------------------------

def grasp_fuse_reference(q: torch.Tensor, keys: torch.Tensor, prompts: torch.Tensor, selector: str = "topk",
                         k: int = 2, out=None):
    """Plain torch: ``fusar_edge.model.grasp``'s selectors over ``keys @ q / sqrt(h)`` (fp32)."""
    from fusar_edge.model.grasp import entmax15, topk_softmax  # lazy: the model imports this package

    op = "grasp_fuse"
    batched, b, n, h, k, _ = _check(q, keys, prompts, selector, k, op)
    qf, kf, pf = q.float(), keys.float(), prompts.float()
    if batched:
        scores = torch.matmul(kf, qf.unsqueeze(-1)).squeeze(-1) / math.sqrt(h)  # [B, N]
    else:
        scores = kf @ qf / math.sqrt(h)  # [N] (the exact op GRASP.scores uses)
    weights = topk_softmax(scores, k) if selector == "topk" else entmax15(scores)
    flat = pf.reshape(n, -1)
    if batched:
        prompt = (weights @ flat).reshape(b, *prompts.shape[1:])
    elif prompts.dim() == 3:
        prompt = torch.einsum("n,nlc->lc", weights, pf)  # GRASP.forward's original sum
    else:
        prompt = torch.einsum("n,nc->c", weights, pf)
    prompt = prompt.to(prompts.dtype)
    if out is not None:
        _check_out(out, prompt.shape, weights.shape, prompts, op)
        out[0].copy_(prompt)
        out[1].copy_(weights)
        return out[0], out[1]
    return prompt, weights


# --- Triton kernel --------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _ranks(v, offs_n, n_mask):
        """Per element: how many valid elements beat it (greater, or equal with a lower index),
        plus the [N_PAD, N_PAD] 'j beats i' matrix (rows i, columns j)."""
        vi = v[:, None]
        vj = v[None, :]
        beats = n_mask[None, :] & ((vj > vi) | ((vj == vi) & (offs_n[None, :] < offs_n[:, None])))
        return tl.sum(beats.to(tl.int32), axis=1), beats

    @triton.jit
    def _grasp_fuse_kernel(
        q_ptr, k_ptr, p_ptr, out_ptr, w_ptr, scr_ptr,
        N, H, LC, K_SEL, scale, B_BUCKET,  # B_BUCKET: autotune key only
        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_pn, stride_ob, stride_wb, stride_sb,
        SELECTOR: tl.constexpr,  # 0: topk, 1: entmax15
        N_PAD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_C: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1)
        n_progs_c = tl.num_programs(1)  # <= SPLIT_C (the launcher clamps it to the tile count)

        offs_n = tl.arange(0, N_PAD)
        n_mask = offs_n < N

        # scores s = keys[b] @ q[b] * (1 / sqrt(h)), fp32 accumulation over h chunks
        s = tl.zeros([N_PAD], dtype=tl.float32)
        q_row = q_ptr + pid_b * stride_qb
        k_rows = k_ptr + pid_b * stride_kb + offs_n[:, None] * stride_kn
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            qv = tl.load(q_row + offs_h * stride_qh, mask=h_mask, other=0.0).to(tl.float32)
            kv = tl.load(k_rows + offs_h[None, :] * stride_kh, mask=n_mask[:, None] & h_mask[None, :],
                         other=0.0).to(tl.float32)
            s += tl.sum(kv * qv[None, :], axis=1)
        s = s * scale
        # The ranks compare s[i] with s[j] in two layouts ([:, None] and [None, :]). The compiler may
        # recompute the reduction in each layout rather than move it, in another summation order:
        # on an H200 an element then "beat" itself and the wrong blocks were chosen (1-4 rows of 16,
        # benchmarks/results/gpu-h200.md). Written out and read back, both layouts hold the same bits.
        # Every program of row b writes the same values (same code, same inputs).
        scr_row = scr_ptr + pid_b * stride_sb
        tl.store(scr_row + offs_n, s, mask=n_mask)
        tl.debug_barrier()
        s = tl.load(scr_row + offs_n, mask=n_mask, other=0.0)

        if SELECTOR == 0:
            # softmax over the K_SEL best (rank < K_SEL), exact zeros elsewhere
            s = tl.where(n_mask, s, float("-inf"))
            rank, beats = _ranks(s, offs_n, n_mask)
            sel = n_mask & (rank < K_SEL)
            m = tl.max(s, axis=0)  # the best score is always selected
            e = tl.where(sel, tl.exp(s - m), 0.0)
            w = tl.div_rn(e, tl.sum(e, axis=0))
        else:
            # exact 1.5-entmax: p = [x - tau]_+^2, x = s / 2 - max(s / 2)
            x = tl.where(n_mask, s * 0.5, float("-inf"))
            x = x - tl.max(x, axis=0)
            x = tl.where(n_mask, x, 0.0)
            rank, beats = _ranks(x, offs_n, n_mask)
            # prefix of the sorted order ending at i = {i} + everything that beats i
            incl = beats | ((offs_n[None, :] == offs_n[:, None]) & n_mask[None, :])
            xj = x[None, :]
            cnt = (rank + 1).to(tl.float32)
            # IEEE division / sqrt (Triton's defaults are approximate on NVIDIA): the support test
            # tau <= x below should decide like the reference's
            mean = tl.div_rn(tl.sum(tl.where(incl, xj, 0.0), axis=1), cnt)
            mean_sq = tl.div_rn(tl.sum(tl.where(incl, xj * xj, 0.0), axis=1), cnt)
            delta = tl.div_rn(1.0 - cnt * (mean_sq - mean * mean), cnt)
            tau = mean - tl.sqrt_rn(tl.maximum(delta, 0.0))
            support = tl.sum((n_mask & (tau <= x)).to(tl.int32), axis=0)  # >= 1 (the max has tau <= 0)
            tau_star = tl.sum(tl.where(n_mask & (rank == support - 1), tau, 0.0), axis=0)
            w = tl.maximum(x - tau_star, 0.0)
            w = tl.where(n_mask, w * w, 0.0)

        if pid_c == 0:
            tl.store(w_ptr + pid_b * stride_wb + offs_n, w, mask=n_mask)

        # weighted prompt sum over this program's column tiles
        w_col = w[:, None]
        p_rows = p_ptr + offs_n[:, None] * stride_pn
        out_row = out_ptr + pid_b * stride_ob
        for c0 in range(pid_c * BLOCK_C, LC, n_progs_c * BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < LC
            p = tl.load(p_rows + offs_c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
            acc = tl.sum(p.to(tl.float32) * w_col, axis=0)
            tl.store(out_row + offs_c, acc.to(out_ptr.dtype.element_ty), mask=c_mask)

    def _prune(configs, named_args, **kwargs):
        """Keep the [N_PAD, BLOCK_C] prompt tile register-sized (8 warps for the big tiles, 4 for the
        small ones) and drop splits with more programs than column tiles (the launcher clamps the
        grid, so they would only repeat a smaller split)."""
        n_pad, lc = kwargs["N_PAD"], named_args["LC"]

        def keep(c):
            tile = n_pad * c.kwargs["BLOCK_C"]
            return (tile <= 16384 and c.kwargs["SPLIT_C"] <= triton.cdiv(lc, c.kwargs["BLOCK_C"])
                    and (c.num_warps == 8) == (tile >= 8192))

        return [c for c in configs if keep(c)] or [triton.Config({"BLOCK_C": 128, "SPLIT_C": 1}, num_warps=8)]

    # Shapes that matter: C = 3584, L = 1..4 (LC = 3584..14336), N = 4..64 (N_PAD 4..64), h = 512,
    # B <= 32: at most 18 configs survive the pruning per key. BLOCK_H is not tuned (the launcher
    # sizes the [N_PAD, BLOCK_H] key tile to ~8K elements, all of h = 512 for N <= 16).
    _CONFIGS = [triton.Config({"BLOCK_C": bc, "SPLIT_C": sp}, num_warps=nw)
                for bc in (128, 256, 512) for sp in (1, 2, 4, 8, 16, 32) for nw in (4, 8)]
    _grasp_fuse_autotuned = triton.autotune(
        configs=_CONFIGS, key=["N_PAD", "H", "LC", "B_BUCKET", "SELECTOR"],
        prune_configs_by={"early_config_prune": _prune},
    )(_grasp_fuse_kernel)

# Interpreter (CPU tests): one small fixed config, so the h loop, the column loop, the split
# across programs and every mask all run on the tests' small shapes.
_INTERPRET_META = {"BLOCK_C": 32, "BLOCK_H": 16, "SPLIT_C": 2}
# Set to a dict like _INTERPRET_META (optionally with "num_warps") to bypass autotuning on a GPU:
# the tests do, so their many small shapes compile once each instead of once per config.
FIXED_CONFIG: dict | None = None


def _launch(q2, k3, flat, out_prompt, out_w, n, h, lc, selector, k):
    """q2 [B, h], k3 [B, N, h] (any strides), flat [N, LC] (unit column stride), out_prompt [B, LC],
    out_w [B, N] (contiguous)."""
    b = q2.shape[0]
    n_pad = max(2, triton.next_power_of_2(n))
    scores = torch.empty((b, n), dtype=torch.float32, device=flat.device)  # the kernel's score round trip
    common = (q2, k3, flat, out_prompt, out_w, scores, n, h, lc, k, 1.0 / math.sqrt(h), triton.next_power_of_2(b),
              q2.stride(0), q2.stride(1), k3.stride(0), k3.stride(1), k3.stride(2), flat.stride(0),
              out_prompt.stride(0), out_w.stride(0), scores.stride(0))
    sel = SELECTORS.index(selector)
    meta = FIXED_CONFIG if FIXED_CONFIG is not None else _INTERPRET_META if interpreting() else None
    if meta is not None:  # interpreter (no benchmarking there) or a pinned config
        grid = (b, min(meta["SPLIT_C"], triton.cdiv(lc, meta["BLOCK_C"])))
        _grasp_fuse_kernel[grid](*common, SELECTOR=sel, N_PAD=n_pad, **meta)
    else:
        block_h = min(triton.next_power_of_2(h), max(32, 8192 // n_pad))
        grid = lambda meta: (b, min(meta["SPLIT_C"], triton.cdiv(lc, meta["BLOCK_C"])))  # noqa: E731
        _grasp_fuse_autotuned[grid](*common, SELECTOR=sel, N_PAD=n_pad, BLOCK_H=block_h)


def grasp_fuse(q: torch.Tensor, keys: torch.Tensor, prompts: torch.Tensor, selector: str = "topk", k: int = 2,
               backend: str = "auto", out=None):
    """Scores, sparse selection and weighted prompt sum -> ``(prompt, weights)`` (see module doc).

    ``q [h]``, ``keys [N, h]``, ``prompts [N, C] | [N, L, C]`` -> ``prompt [C] | [L, C]`` (prompts'
    dtype), ``weights [N]`` (float32); batched ``q [B, h]``, ``keys [B, N, h]`` -> ``[B, ...]``.
    ``selector``: ``"topk"`` (softmax over the ``k`` best, ``1 <= k <= N``) or ``"entmax15"``
    (``k`` unused). ``backend``: ``"auto"`` (the reference until ``AUTO_RUNS_KERNEL``; then Triton on
    CUDA), ``"triton"`` or ``"torch"``.
    ``out``: optional preallocated ``(prompt, weights)`` pair (contiguous, the shapes and dtypes
    above) that the result is written into and returned.
    """
    op = "grasp_fuse"
    batched, b, n, h, k, _ = _check(q, keys, prompts, selector, k, op)
    chosen = resolve_backend(backend, q, keys, prompts, op=op)
    if chosen == "triton" and backend == "auto" and not AUTO_RUNS_KERNEL:
        chosen = "torch"
    if chosen == "triton" and n > MAX_TRITON_BLOCKS:
        if backend == "triton":
            raise InputError(f"{op}: the Triton kernel takes at most {MAX_TRITON_BLOCKS} blocks (keys' N), got "
                             f"N = {n}; use backend='torch'")
        chosen = "torch"
    if chosen == "triton" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, prompts)):
        # the kernel has no backward: training (prompts, W_q, W_k) goes through the reference
        if backend == "triton":
            raise InputError(f"{op}: the Triton kernel has no backward, but q, keys or prompts requires grad; "
                             "use backend='torch' or run under torch.no_grad()")
        chosen = "torch"
    if chosen == "torch" or b == 0:
        return grasp_fuse_reference(q, keys, prompts, selector, k, out=out)

    prompt_shape = ((b,) if batched else ()) + tuple(prompts.shape[1:])
    weights_shape = (b, n) if batched else (n,)
    if out is not None:
        _check_out(out, prompt_shape, weights_shape, prompts, op)
        out_prompt, out_w = out
    else:
        out_prompt = torch.empty(prompt_shape, dtype=prompts.dtype, device=prompts.device)
        out_w = torch.empty(weights_shape, dtype=torch.float32, device=prompts.device)
    flat = prompts.reshape(n, -1)
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    lc = flat.shape[1]
    q2 = q if batched else q.unsqueeze(0)
    k3 = keys if batched else keys.unsqueeze(0)
    _launch(q2, k3, flat, out_prompt.view(b, lc), out_w.view(b, n), n, h, lc, selector, k)
    return out_prompt, out_w
