"""Fused GRASP kernel (``fusar_edge.kernels.grasp_fuse``) against its torch reference.

Without a GPU the Triton kernel runs through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) on CPU tensors; with one, the tensors live on CUDA and the kernel
compiles for real. Both use one pinned config with tiny tiles (BLOCK_H 16, BLOCK_C 32,
2 programs per row), so the h loop, the column loop, the split across programs and every
mask run on these small shapes; ``test_autotuned_real_shape`` (GPU only) runs the autotuned
launch at the 7B shape.

Error bounds (relative Frobenius error, ``conftest.rel_err``), reference = the torch reference
in fp32 on the same (upcast) inputs:

- weights (always float32):               <= 1e-5, and the support (nonzero set) identical
- prompt, fp32 inputs:                    <= 1e-5
- prompt, fp16 inputs (fp16 output):      <= 2e-3
- prompt, bf16 inputs (bf16 output):      <= 8e-3 (the interpreter rounds fp32 -> bf16 toward
  zero, up to 2^-7 relative; the GPU rounds to nearest)

Every kernel output is written into NaN-filled buffers (``out=``), so an element the kernel
fails to write fails the comparison.
"""

import copy
import functools
import itertools
import math
import subprocess
import sys

import pytest
import torch

from conftest import one_line, rel_err
from fusar_edge import kernels
from fusar_edge.kernels import grasp as grasp_kernels
from fusar_edge.errors import InputError
from fusar_edge.kernels import grasp_fuse, grasp_fuse_reference
from fusar_edge.model.grasp import GRASP, entmax15, select, sincos_2d, topk_softmax

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
WEIGHTS_BOUND = 1e-5

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def pinned_config(monkeypatch):
    """The interpreter's tiny-tile config on the GPU too (no autotuning per test shape)."""
    monkeypatch.setattr(grasp_kernels, "FIXED_CONFIG", dict(grasp_kernels._INTERPRET_META))


def make_inputs(b, n, h, c, l, dtype, seed, integer=False):
    """q, keys, prompts (batched when b is not None); integer=True gives exact scores (ties stay ties)."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if b is None else (b,)
    if integer:
        q = torch.randint(-3, 4, lead + (h,), generator=gen).float()
        keys = torch.randint(-3, 4, lead + (n, h), generator=gen).float()
    else:
        q = torch.randn(lead + (h,), generator=gen)
        keys = torch.randn(lead + (n, h), generator=gen)
    prompts = torch.randn((n, c) if l is None else (n, l, c), generator=gen)
    return q.to(DEVICE, dtype), keys.to(DEVICE, dtype), prompts.to(DEVICE, dtype)


def run_triton(q, keys, prompts, selector, k):
    """The kernel, writing into NaN-poisoned output buffers."""
    batched = q.dim() == 2
    prompt_shape = ((q.shape[0],) if batched else ()) + tuple(prompts.shape[1:])
    weights_shape = (q.shape[0], keys.shape[-2]) if batched else (keys.shape[-2],)
    out = (torch.full(prompt_shape, float("nan"), dtype=prompts.dtype, device=prompts.device),
           torch.full(weights_shape, float("nan"), dtype=torch.float32, device=prompts.device))
    prompt, weights = grasp_fuse(q, keys, prompts, selector, k, backend="triton", out=out)
    assert prompt is out[0] and weights is out[1]
    return prompt, weights


def check_against_reference(q, keys, prompts, selector, k):
    prompt, weights = run_triton(q, keys, prompts, selector, k)
    ref_p, ref_w = grasp_fuse_reference(q.float(), keys.float(), prompts.float(), selector, k)
    assert prompt.dtype == prompts.dtype and weights.dtype == torch.float32
    assert prompt.shape == ref_p.shape and weights.shape == ref_w.shape
    assert torch.isfinite(prompt).all() and torch.isfinite(weights).all()
    assert torch.equal(weights > 0, ref_w > 0), (weights, ref_w)  # identical support
    assert rel_err(weights, ref_w) <= WEIGHTS_BOUND
    assert rel_err(prompt, ref_p) <= BOUND[prompts.dtype]
    sums = weights.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
    if selector == "topk":
        assert torch.all((weights > 0).sum(-1) == k)
    return weights, ref_w


# --- Triton vs reference over many shapes ---------------------------------------------------

NS, HS, CS, LS, BS = (1, 3, 4, 9, 16, 37), (8, 24, 64), (8, 40, 100), (None, 1, 3), (None, 4)


def cases():
    """Every N x selector x dtype; h, C, L, B rotate so each value meets several others."""
    out = []
    grid = itertools.product(NS, ("topk", "entmax15"), (torch.float32, torch.float16))
    for i, (n, selector, dtype) in enumerate(grid):
        h, c, l, b = HS[i % 3], CS[(i // 3) % 3], LS[(i // 2 + i // 9) % 3], BS[(i // 4) % 2]
        ks = sorted({1, n, (n + 1) // 2}) if selector == "topk" else [2]
        out.append(pytest.param(n, h, c, l, b, selector, ks, dtype,
                                id=f"N{n}-h{h}-C{c}-L{l}-B{b}-{selector}-{str(dtype)[6:]}"))
    return out


@needs_triton
@pytest.mark.parametrize("n,h,c,l,b,selector,ks,dtype", cases())
def test_kernel_matches_reference(n, h, c, l, b, selector, ks, dtype):
    for j, k in enumerate(ks):
        q, keys, prompts = make_inputs(b, n, h, c, l, dtype, seed=1000 * n + 10 * h + c + j)
        check_against_reference(q, keys, prompts, selector, k)


@needs_triton
@pytest.mark.parametrize("selector", ["topk", "entmax15"])
def test_kernel_bf16_and_default_buffers(selector):
    q, keys, prompts = make_inputs(4, 9, 24, 40, 3, torch.bfloat16, seed=7)
    check_against_reference(q, keys, prompts, selector, 3)
    # without out=: freshly allocated results, same values
    p1, w1 = grasp_fuse(q, keys, prompts, selector, 3, backend="triton")
    p2, w2 = run_triton(q, keys, prompts, selector, 3)
    assert torch.equal(p1, p2) and torch.equal(w1, w2)


@needs_triton
def test_kernel_strided_inputs():
    """q / keys are read through their strides; a non-contiguous prompts view is handled."""
    q, keys, prompts = make_inputs(4, 9, 24, 40, 3, torch.float32, seed=8)
    q_t = torch.randn(24, 4, device=DEVICE).T  # [4, 24], stride (1, 4)
    q_t.copy_(q)
    keys_t = keys.transpose(1, 2).contiguous().transpose(1, 2)  # [4, 9, 24], h stride 9
    prompts_t = prompts.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # [9, 3, 40] non-contiguous
    for sel in ("topk", "entmax15"):
        p1, w1 = run_triton(q_t, keys_t, prompts_t, sel, 4)
        p2, w2 = grasp_fuse_reference(q, keys, prompts, sel, 4)
        assert rel_err(p1, p2) <= 1e-5 and rel_err(w1, w2) <= WEIGHTS_BOUND


@needs_triton
def test_batched_equals_rows():
    q, keys, prompts = make_inputs(4, 16, 24, 40, 3, torch.float32, seed=9)
    for sel in ("topk", "entmax15"):
        pb, wb = run_triton(q, keys, prompts, sel, 5)
        for i in range(4):
            pi, wi = run_triton(q[i], keys[i], prompts, sel, 5)
            assert torch.equal(wb[i], wi) and torch.equal(pb[i], pi)
            rp, rw = grasp_fuse_reference(q[i], keys[i], prompts, sel, 5)
            assert rel_err(pi, rp) <= 1e-5


# --- ties --------------------------------------------------------------------------------------

def tied_inputs(b, n, h, seed, dup_rows):
    """Integer q / keys (exact scores), with keys rows duplicated -> exactly equal scores."""
    q, keys, prompts = make_inputs(b, n, h, 40, 3, torch.float32, seed, integer=True)
    for src, dst in dup_rows:
        keys[..., dst, :] = keys[..., src, :]
    return q, keys, prompts


def test_reference_topk_tie_rule():
    """The reference itself: among equal scores the lower block index wins."""
    w = topk_softmax(torch.tensor([1.0, 1.0, 1.0, 0.0]), 1)
    assert torch.equal(w, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    w = topk_softmax(torch.tensor([[0.0, 2.0, 2.0, 2.0, 2.0, 1.0]] * 2), 3)
    assert torch.equal(w > 0, torch.tensor([[False, True, True, True, False, False]] * 2))
    s = torch.randint(0, 3, (50, 16), generator=torch.Generator().manual_seed(0)).float()
    for k in (1, 5, 16):
        sel = topk_softmax(s, k) > 0
        for row, mask in zip(s, sel):
            expect = sorted(range(16), key=lambda i: (-row[i].item(), i))[:k]
            assert sorted(mask.nonzero().flatten().tolist()) == sorted(expect)


@needs_triton
@pytest.mark.parametrize("selector", ["topk", "entmax15"])
def test_ties_follow_the_reference(selector):
    n = 9
    dup = [(0, 3), (0, 5), (2, 7), (2, 8), (1, 6)]  # groups {0,3,5}, {2,7,8}, {1,6}
    q, keys, prompts = tied_inputs(4, n, 24, seed=11, dup_rows=dup)
    ref_s = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(ref_s[:, 0], ref_s[:, 3]) and torch.equal(ref_s[:, 2], ref_s[:, 8])  # exact ties
    for k in ((1, 2, 3, 4, 5, 8, 9) if selector == "topk" else (2,)):
        w, ref_w = check_against_reference(q, keys, prompts, selector, k)
        assert torch.equal(w > 0, ref_w > 0)
        for group in ((0, 3, 5), (2, 7, 8), (1, 6)):
            if selector == "entmax15":  # entmax gives tied scores the same weight
                assert torch.all(w[:, list(group)] == w[:, group[0]:group[0] + 1])
            # topk: the selected members of a tie group are its lowest indices
            chosen = w[:, list(group)] > 0
            assert torch.all(chosen[:, :-1] | ~chosen[:, 1:]), (k, group, w)


@needs_triton
def test_all_equal_scores():
    """Every score equal: topk keeps blocks 0..k-1 with weight 1/k, entmax is uniform."""
    n = 9
    q = torch.zeros(24, device=DEVICE)
    keys = torch.randn(n, 24, device=DEVICE)
    prompts = torch.randn(n, 3, 40, device=DEVICE)
    for k in (1, 4, 9):
        w = run_triton(q, keys, prompts, "topk", k)[1].cpu()
        assert torch.equal(w > 0, torch.arange(n) < k)
        assert torch.allclose(w[:k], torch.full((k,), 1.0 / k))
    w = run_triton(q, keys, prompts, "entmax15", 2)[1].cpu()
    assert torch.allclose(w, torch.full((n,), 1.0 / n))


# --- entmax -----------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("n,scale", [(9, 3.0), (37, 3.0), (16, 0.05), (16, 40.0)])
def test_entmax_sums_to_one_sparse_and_exact(n, scale):
    gen = torch.Generator().manual_seed(n)
    q = (torch.randn(4, 8, generator=gen) * scale).to(DEVICE)
    keys = torch.randn(4, n, 8, generator=gen).to(DEVICE)
    prompts = torch.randn(n, 8, generator=gen).to(DEVICE)
    w, ref_w = check_against_reference(q, keys, prompts, "entmax15", 2)
    assert torch.allclose(w.sum(-1), torch.ones(4, device=DEVICE), atol=1e-5)
    assert torch.all(w >= 0)
    if scale >= 3:
        assert int((w == 0).sum()) > 0  # spread-out scores leave blocks with exactly zero weight
    # the reference is the sort-based closed form; the kernel its sort-free rank form
    s = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1) / math.sqrt(8)
    assert rel_err(ref_w, entmax15(s)) == 0.0


# --- the GRASP module -------------------------------------------------------------------------

def manual_grasp(g: GRASP, tokens, grid, q, old_topk=False, own_pool=False):
    """GRASP.forward as written before the fused op: pool, sin-cos, project, score, select, sum.

    ``own_pool``: pool by slicing here instead of ``g.blocks`` (adaptive pooling; equal up to
    rounding)."""
    if own_pool:
        h, w = grid
        fmap = tokens.T.reshape(tokens.shape[1], h, w)
        rh, rw = h // g.grid[0], w // g.grid[1]
        blocks = torch.stack([fmap[:, r * rh:(r + 1) * rh, c * rw:(c + 1) * rw].mean((1, 2))
                              for r in range(g.grid[0]) for c in range(g.grid[1])])
        blocks = blocks + sincos_2d(*g.grid, tokens.shape[1])
    else:
        blocks = g.blocks(tokens, grid)
    s = g.w_k(blocks).float() @ g.w_q(q).float() / math.sqrt(g.proj_dim)
    if old_topk and g.selector == "topk":  # the pre-change selector (torch.topk; equal without ties)
        top = torch.topk(s, g.k, sorted=False)
        weights = torch.zeros_like(s).scatter(-1, top.indices, torch.softmax(top.values, -1))
    else:
        weights = select(s, g.selector, g.k)
    return torch.einsum("n,nlc->lc", weights, g.prompts.float()).to(tokens.dtype), weights


@pytest.mark.parametrize("selector,k,plen", [("topk", 2, 3), ("topk", 1, 1), ("entmax15", 2, 2)])
def test_grasp_module_unchanged(selector, k, plen, monkeypatch):
    torch.manual_seed(0)
    g = GRASP(channels=16, grid=(3, 3), proj_dim=8, prompt_len=plen, selector=selector, k=k)
    tokens, q = torch.randn(36, 16), torch.randn(16)
    with torch.no_grad():
        prompt, w = g(tokens, (6, 6), q)  # CPU: the torch reference path of grasp_fuse
        ref_p, ref_w = manual_grasp(g, tokens, (6, 6), q)
        assert prompt.shape == (plen, 16) and w.shape == (9,)
        assert torch.equal(prompt, ref_p) and torch.equal(w, ref_w)  # bitwise: same ops as before
        own_p, own_w = manual_grasp(g, tokens, (6, 6), q, own_pool=True)
        assert rel_err(prompt, own_p) < 1e-6 and rel_err(w, own_w) < 1e-6
        old_p, old_w = manual_grasp(g, tokens, (6, 6), q, old_topk=True)
        assert rel_err(prompt, old_p) < 1e-6 and torch.equal(w > 0, old_w > 0)
        assert torch.equal(g.scores(tokens, (6, 6), q), g.w_k(g.blocks(tokens, (6, 6))) @ g.w_q(q) / math.sqrt(8))
        if kernels.triton_available():  # the same module through the kernel
            monkeypatch.setattr(kernels, "grasp_fuse", functools.partial(grasp_fuse, backend="triton"))
            tp, tw = copy.deepcopy(g).to(DEVICE)(tokens.to(DEVICE), (6, 6), q.to(DEVICE))
            tp, tw = tp.cpu(), tw.cpu()
            assert rel_err(tp, ref_p) <= 1e-5 and rel_err(tw, ref_w) <= WEIGHTS_BOUND
            assert torch.equal(tw > 0, ref_w > 0)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bad_arguments_raise_clear_errors(backend):
    dev = DEVICE if backend == "triton" else "cpu"
    q, keys, prompts = torch.randn(8, device=dev), torch.randn(4, 8, device=dev), torch.randn(4, 2, 16, device=dev)
    call = functools.partial(grasp_fuse, backend=backend)
    for bad_k in (0, 5, -1):
        with pytest.raises(InputError) as e:
            call(q, keys, prompts, "topk", bad_k)
        one_line(e, "k", "1..4", bad_k)
    with pytest.raises(InputError) as e:
        call(q, keys, prompts, "topk", 2.0)
    one_line(e, "k", "2.0")
    with pytest.raises(InputError) as e:
        call(q, keys, prompts, "softmax", 2)
    one_line(e, "selector", "topk", "entmax15", "'softmax'")
    with pytest.raises(InputError) as e:
        call(torch.randn(2, 3, 8, device=dev), keys, prompts)
    one_line(e, "q", "(2, 3, 8)")
    with pytest.raises(InputError) as e:
        call(q, torch.randn(4, 7, device=dev), prompts)
    one_line(e, "keys", "h = 7", "h = 8")
    with pytest.raises(InputError) as e:
        call(q, torch.randn(2, 4, 8, device=dev), prompts)
    one_line(e, "keys", "[N, h]", "(2, 4, 8)")
    with pytest.raises(InputError) as e:
        call(torch.randn(3, 8, device=dev), torch.randn(2, 4, 8, device=dev), prompts)
    one_line(e, "keys", "[3, N, h]", "(2, 4, 8)")
    with pytest.raises(InputError) as e:
        call(q, keys, torch.randn(5, 16, device=dev))
    one_line(e, "prompts", "N = 4", "(5, 16)")
    with pytest.raises(InputError) as e:
        call(q, keys, torch.randn(4, 2, 3, 16, device=dev))
    one_line(e, "prompts", "[N, L, C]")
    with pytest.raises(InputError) as e:
        call(q.int(), keys, prompts)
    one_line(e, "q", "torch.int32")
    with pytest.raises(InputError) as e:
        call(q, keys, prompts, out=(torch.empty(3, 16, device=dev), torch.empty(4, device=dev)))
    one_line(e, "out[0]", "(2, 16)", "(3, 16)")
    with pytest.raises(InputError) as e:
        grasp_fuse(q, keys, prompts, backend="cuda")
    one_line(e, "backend", "'cuda'")
    if backend == "triton":  # the kernel's block limit; the torch path takes any N
        with pytest.raises(InputError) as e:
            call(q, torch.randn(300, 8, device=dev), torch.randn(300, 16, device=dev), "topk", 2)
        one_line(e, "256", "N = 300", "backend='torch'")
        with pytest.raises(InputError) as e:
            call(q, keys, prompts.clone().requires_grad_(), "topk", 2)
        one_line(e, "backward", "backend='torch'")
    else:  # the reference keeps autograd (GRASP's prompts and projections are trained through it)
        p = prompts.clone().requires_grad_()
        call(q, keys, p, "topk", 2)[0].sum().backward()
        assert p.grad is not None and int((p.grad.abs().sum((1, 2)) > 0).sum()) == 2
    # entmax ignores k's value (any int), but not its type
    assert grasp_fuse(q, keys, prompts, "entmax15", 99, backend=backend)[1].shape == (4,)


def test_import_without_triton():
    """``import fusar_edge.kernels`` and the torch path work when Triton is missing."""
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, fusar_edge.kernels as K\n"
            "assert not K.triton_available()\n"
            "p, w = K.grasp_fuse(torch.randn(8), torch.randn(4, 8), torch.randn(4, 16), 'topk', 2)\n"
            "assert p.shape == (16,) and int((w > 0).sum()) == 2\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or not kernels.triton_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("selector", ["topk", "entmax15"])
def test_autotuned_real_shape(selector, monkeypatch):
    """The autotuned launch at the 7B shape: C = 3584, L = 2, N = 16, h = 512, B = 3."""
    monkeypatch.setattr(grasp_kernels, "FIXED_CONFIG", None)
    for dtype in (torch.float32, torch.bfloat16):
        q, keys, prompts = make_inputs(3, 16, 512, 3584, 2, dtype, seed=5)
        check_against_reference(q, keys, prompts, selector, 4)


def test_auto_runs_the_reference_until_the_kernel_has_passed_on_a_gpu(monkeypatch):
    """AUTO_RUNS_KERNEL is off (see grasp.py): auto on CUDA tensors takes the reference, not the kernel."""
    assert grasp_kernels.AUTO_RUNS_KERNEL is False
    monkeypatch.setattr(grasp_kernels, "resolve_backend", lambda *a, **kw: "triton")  # as on CUDA tensors
    monkeypatch.setattr(grasp_kernels, "_launch", lambda *a: pytest.fail("backend='auto' launched the kernel"))
    q, keys, prompts = make_inputs(None, 4, 8, 16, None, torch.float32, seed=3)
    p, w = grasp_fuse(q, keys, prompts, "topk", 2)
    rp, rw = grasp_fuse_reference(q, keys, prompts, "topk", 2)
    assert torch.equal(p, rp) and torch.equal(w, rw)
