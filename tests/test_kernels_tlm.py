"""The fused TLM kernel (``fusar_edge.kernels.tlm``) against its references.

Without a GPU the Triton kernel runs through Triton's interpreter (conftest.py sets
``TRITON_INTERPRET=1`` before anything imports the kernels), so these tests check the
kernel's indexing, masking, tiling and batching on the CPU. With one, the inputs are made on
the CPU (the same seeded values) and moved to CUDA for the kernel, which compiles for real with
one config per path (benchmarks/gpu_check.sh runs them there); autotuning and speed are
benchmarks/triton_kernels.py's.

Every kernel run writes into an output buffer filled with NaN first, so an element the
kernel fails to write shows up as NaN. Error bounds, relative Frobenius norm
``|y - ref| / |ref|`` against a float64 evaluation of ``x * (1 + a @ gamma) + a @ beta``
from the same (rounded) inputs:

- float32 inputs: <= 1e-5
- float16 inputs: <= 2e-3 (y is rounded to fp16: about 2.4e-4 rms)
- bfloat16 inputs: <= 8e-3 (y is rounded to bf16: about 2e-3 rms)
"""

import subprocess
import sys
import zlib

import pytest
import torch

import fusar_edge.kernels as K
from conftest import one_line, rel_err
from fusar_edge.errors import AnchorError, InputError
from fusar_edge.kernels import _backend
from fusar_edge.kernels.tlm import tlm_modulate, tlm_modulate_reference, tlm_weights
from fusar_edge.model.tlm import TLM, anchor_weights

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel runs (interpreter: the CPU)


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.fixture(autouse=True)
def one_config_per_path(monkeypatch):
    """The interpreter's one config per path on a GPU too: each test shape compiles once instead
    of autotuning every config (benchmarks/triton_kernels.py runs the autotuned kernel at the 7B shapes)."""
    import fusar_edge.kernels.tlm as tlm_mod

    configs = tlm_mod._configs
    monkeypatch.setattr(tlm_mod, "_configs", lambda interpret: configs(True))
    tlm_mod._kernel.cache_clear()
    yield
    tlm_mod._kernel.cache_clear()


def exact(x, a, gamma, beta):
    """The formula in float64 from the given (already rounded) inputs."""
    a = a.double()
    return x.double() * (1 + a @ gamma.double()) + a @ beta.double()


def poisoned(x):
    return torch.full_like(x, float("nan"))


def make(gen, b, t, c, s, dtype, a_dtype=torch.float32, film_dtype=None):
    lead = () if b is None else (b,)
    x = torch.randn(*lead, t, c, generator=gen).to(dtype)
    a = torch.rand(*lead, t, s, generator=gen)
    a = (a / a.sum(-1, keepdim=True)).to(a_dtype)  # rows sum to 1, like tlm_weights
    film_dtype = film_dtype or dtype
    gamma = (0.5 * torch.randn(*lead, s, c, generator=gen)).to(film_dtype)
    beta = (0.5 * torch.randn(*lead, s, c, generator=gen)).to(film_dtype)
    return x, a, gamma, beta


def run_triton(x, a, gamma, beta):
    """The kernel on DEVICE, writing into a NaN-poisoned buffer; the result comes back on the CPU."""
    x, a, gamma, beta = on_device(x, a, gamma, beta)
    out = poisoned(x)
    y = tlm_modulate(x, a, gamma, beta, backend="triton", out=out)
    assert y is out and y.dtype == x.dtype and y.shape == x.shape
    assert not torch.isnan(y).any(), "the kernel left elements of the output unwritten"
    return y.cpu()


# (B, T, C, S): T and C not powers of two; S = 1 and the rank-1 path (S <= 8), one dot
# chunk (S = 12), several chunks with a ragged tail (37, 130); tiles under the interpreter
# are 32 x 64, so T = 33, 81 and C = 100 span several tiles with ragged edges.
SHAPES = [
    (None, 1, 8, 1), (None, 7, 24, 1), (None, 33, 40, 3), (None, 81, 100, 8),
    (None, 1, 100, 37), (None, 7, 8, 12), (None, 33, 100, 130), (None, 81, 24, 37),
    (1, 81, 40, 1), (1, 33, 24, 37), (3, 7, 100, 5), (3, 81, 100, 130), (3, 33, 40, 12),
]


@pytest.mark.parametrize("b,t,c,s", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(b, t, c, s, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((b, t, c, s, str(dtype))).encode()))
    x, a, gamma, beta = make(gen, b, t, c, s, dtype)
    ref = exact(x, a, gamma, beta)
    y = run_triton(x, a, gamma, beta)
    assert rel_err(y, ref) <= BOUND[dtype]
    y_ref = tlm_modulate_reference(x, a, gamma, beta)
    assert y_ref.dtype == dtype and rel_err(y_ref, ref) <= BOUND[dtype]


@pytest.mark.parametrize("b,t,c,s", [(None, 33, 100, 37), (3, 7, 40, 5)])
def test_triton_bf16_and_mixed_dtypes(b, t, c, s):
    """a in fp32 with bf16 / fp16 tokens, and film outputs in yet another dtype."""
    gen = torch.Generator().manual_seed(7)
    for dtype, a_dtype, film_dtype in [(torch.bfloat16, torch.float32, torch.bfloat16),
                                       (torch.float16, torch.float16, torch.float32),
                                       (torch.bfloat16, torch.float16, torch.float32)]:
        x, a, gamma, beta = make(gen, b, t, c, s, dtype, a_dtype, film_dtype)
        ref = exact(x, a, gamma, beta)
        assert rel_err(run_triton(x, a, gamma, beta), ref) <= BOUND[dtype]
        assert rel_err(tlm_modulate_reference(x, a, gamma, beta), ref) <= BOUND[dtype]


@pytest.mark.parametrize("s", [3, 37])
def test_triton_strided_inputs_and_in_place(s):
    """Views (transposed tokens, gamma/beta as the two halves of the FiLM output) are read
    through their strides; out=x modulates in place."""
    gen = torch.Generator().manual_seed(s)
    t, c = 33, 40
    x = torch.randn(c, t, generator=gen).to(DEVICE).T  # non-contiguous [T, C]
    a = torch.rand(s, t, generator=gen).to(DEVICE).T
    gamma, beta = torch.randn(s, 2 * c, generator=gen).to(DEVICE).chunk(2, dim=-1)  # like TLM.film
    assert not (x.is_contiguous() or a.is_contiguous() or gamma.is_contiguous())
    ref = exact(x, a, gamma, beta)
    assert rel_err(run_triton(x, a, gamma, beta), ref.cpu()) <= 1e-5
    beta_t = torch.randn(c, s, generator=gen).to(DEVICE).T  # gamma and beta with different strides
    out = torch.full((t, c), float("nan"), device=DEVICE)  # laid out unlike x
    y = tlm_modulate(x, a, gamma, beta_t, backend="triton", out=out)
    assert not torch.isnan(y).any() and rel_err(y, exact(x, a, gamma, beta_t)) <= 1e-5
    y = tlm_modulate(x.contiguous(), a, gamma, beta, backend="triton")  # allocates its output
    assert rel_err(y, ref) <= 1e-5
    xb, ab, gb, bb = on_device(torch.randn(3, t, c, generator=gen), torch.rand(3, t, s, generator=gen),
                               torch.randn(3, s, c, generator=gen), torch.randn(3, s, c, generator=gen))
    xv = torch.randn(t, 3, c, generator=gen).to(DEVICE).transpose(0, 1)  # [B, T, C], the image axis in the middle
    y = tlm_modulate(xv, ab, gb, bb, backend="triton", out=torch.full((3, t, c), float("nan"), device=DEVICE))
    assert not torch.isnan(y).any() and rel_err(y, exact(xv, ab, gb, bb)) <= 1e-5
    ref = exact(xb, ab, gb, bb)
    y = tlm_modulate(xb, ab, gb, bb, backend="triton", out=xb)
    assert y is xb and rel_err(xb, ref) <= 1e-5


def test_triton_empty_and_no_anchors():
    x = torch.randn(0, 8, device=DEVICE)
    assert tlm_modulate(x, *on_device(torch.rand(0, 3), torch.randn(3, 8), torch.randn(3, 8)),
                        backend="triton").shape == (0, 8)
    x = torch.randn(5, 8)
    assert torch.equal(run_triton(x, torch.rand(5, 0), torch.randn(0, 8), torch.randn(0, 8)), x)


# --- the matrix a ---------------------------------------------------------------------------

def random_anchors(gen, s, masked=0):
    f = torch.nn.functional.normalize(torch.randn(s, 64, generator=gen), dim=1)
    p = torch.rand(s, 2, generator=gen)
    m = torch.ones(s, dtype=torch.bool)
    m[torch.randperm(s, generator=gen)[:masked]] = False
    return f, p, m


def test_tlm_weights_is_anchor_weights_and_batches():
    gen = torch.Generator().manual_seed(0)
    ps, ms, singles = [], [], []
    for i in range(3):
        _, p, m = random_anchors(gen, 37, masked=5 * i)
        ps.append(p)
        ms.append(m)
        a = tlm_weights(p, m, (12, 12), (6, 6), 2.0)
        assert a.shape == (36, 37) and a.dtype == torch.float32
        assert torch.equal(a, anchor_weights(p, m, (12, 12), (6, 6), 2.0))
        assert torch.all(a[:, ~m] == 0)
        assert torch.allclose(a.sum(1), torch.ones(36), atol=1e-4)  # partition of unity over valid anchors
        singles.append(a)
    ab = tlm_weights(torch.stack(ps), torch.stack(ms), (12, 12), (6, 6), 2.0)
    assert ab.shape == (3, 36, 37)
    assert torch.allclose(ab, torch.stack(singles), rtol=1e-6, atol=1e-7)


def test_tlm_weights_all_masked_is_an_anchor_error():
    gen = torch.Generator().manual_seed(1)
    _, p, m = random_anchors(gen, 6, masked=6)
    with pytest.raises(AnchorError) as e:
        tlm_weights(p, m, (8, 8), (4, 4), 2.0)
    one_line(e, "anchor mask", "every anchor", "masked out")
    _, p2, m2 = random_anchors(gen, 6, masked=2)
    with pytest.raises(AnchorError) as e:
        tlm_weights(torch.stack([p2, p]), torch.stack([m2, m]), (8, 8), (4, 4), 2.0)
    one_line(e, "image 1", "masked out")
    with pytest.raises(AnchorError, match="masked out"):  # the TLM module raises the same, from the same place
        TLM(channels=8)(torch.randn(16, 8), torch.randn(6, 64), p, m, (8, 8), (4, 4))


def test_tlm_weights_rejects_bad_inputs():
    p, m = torch.rand(5, 2), torch.ones(5, dtype=torch.bool)
    for args, words in [
        ((torch.rand(5, 3), m, (8, 8), (4, 4), 2.0), ("positions", "[S, 2]", "[5, 3]")),
        ((p, torch.ones(4, dtype=torch.bool), (8, 8), (4, 4), 2.0), ("mask", "[5]", "[4]")),
        ((torch.rand(2, 5, 2), m, (8, 8), (4, 4), 2.0), ("mask", "[B, S]", "[2, 5]")),
        ((p, m, (8, 0), (4, 4), 2.0), ("patch_grid",)),
        ((p, m, (8, 8), 4, 2.0), ("token_grid",)),
        ((p, m, (8, 8), (4, 4), 0.0), ("sigma",)),
    ]:
        with pytest.raises(InputError) as e:
            tlm_weights(*args)
        one_line(e, "tlm_weights", *words)


# --- the fused path is the TLM module --------------------------------------------------------

@pytest.mark.parametrize("c,s,masked,grid", [(24, 1, 0, (8, 8)), (40, 37, 9, (12, 12)), (100, 130, 40, (18, 18))])
def test_fused_path_equals_tlm_module(c, s, masked, grid):
    gen = torch.Generator().manual_seed(s)
    tlm = TLM(channels=c)
    hp, wp = grid
    tg = (hp // 2, wp // 2)
    feats, pos, msk = [], [], []
    for _ in range(3):
        f, p, m = random_anchors(gen, s, masked)
        feats.append(f)
        pos.append(p)
        msk.append(m)
    x = torch.randn(3, tg[0] * tg[1], c, generator=gen)
    with torch.no_grad():
        expected = torch.stack([tlm(x[i], feats[i], pos[i], msk[i], grid, tg) for i in range(3)])
        # one image at a time: a from tlm_weights, gamma/beta from the module's own MLP
        for i in range(3):
            a = tlm_weights(pos[i], msk[i], grid, tg, tlm.sigma, tlm.eps)
            gamma, beta = tlm.film(feats[i])
            assert rel_err(run_triton(x[i], a, gamma, beta), expected[i]) <= 1e-5
        # the batch in one launch
        a = tlm_weights(torch.stack(pos), torch.stack(msk), grid, tg, tlm.sigma, tlm.eps)
        gamma, beta = tlm.film(torch.stack(feats))
        assert rel_err(run_triton(x, a, gamma, beta), expected) <= 1e-5


def test_tlm_module_dispatches_to_the_kernel(monkeypatch):
    """TLM.forward calls fusar_edge.kernels.tlm_modulate; forcing that to Triton gives the same tokens."""
    gen = torch.Generator().manual_seed(5)
    tlm = TLM(channels=40)
    f, p, m = random_anchors(gen, 37, masked=4)
    x = torch.randn(36, 40, generator=gen)
    calls = []

    def forced(*args, **kwargs):
        calls.append(1)
        return tlm_modulate(*args, backend="triton", out=poisoned(args[0]), **kwargs)

    tlm, (x, f, p, m) = tlm.to(DEVICE), on_device(x, f, p, m)
    with torch.no_grad():
        expected = tlm(x, f, p, m, (12, 12), (6, 6))
        monkeypatch.setattr(K, "tlm_modulate", forced)
        y = tlm(x, f, p, m, (12, 12), (6, 6))
    assert calls and rel_err(y, expected) <= 1e-5


# --- backends and errors ---------------------------------------------------------------------

def test_auto_on_cpu_runs_the_reference(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    x, a, gamma, beta = make(gen, None, 7, 24, 5, torch.float32)
    assert _backend.resolve_backend("auto", x, a, op="t") == "torch"
    import fusar_edge.kernels.tlm as tlm_mod

    def no_kernel(*args):
        raise AssertionError("auto on CPU tensors must not launch the kernel")

    monkeypatch.setattr(tlm_mod, "_launch", no_kernel)
    assert torch.equal(tlm_modulate(x, a, gamma, beta), tlm_modulate_reference(x, a, gamma, beta))
    assert torch.equal(tlm_modulate(x, a, gamma, beta, backend="torch"), tlm_modulate_reference(x, a, gamma, beta))
    # float64 and autograd inputs take the reference under "auto" and are refused by "triton"
    # (on the kernel's device: CPU tensors on a GPU machine are refused for that first)
    xd, ad, gd, bd = on_device(x, a, gamma, beta)
    x64 = xd.double()
    assert tlm_modulate(x64, ad, gd, bd).dtype == torch.float64
    with pytest.raises(InputError) as e:
        tlm_modulate(x64, ad, gd, bd, backend="triton")
    one_line(e, "tlm_modulate", "float64", "backend='torch'")
    g = gd.clone().requires_grad_()
    with pytest.raises(InputError) as e:
        tlm_modulate(xd, ad, g, bd, backend="triton")
    one_line(e, "tlm_modulate", "grad")
    tlm_modulate(xd, ad, g, bd).sum().backward()  # the reference path keeps autograd
    assert g.grad is not None


def test_triton_backend_errors(monkeypatch):
    x, a, gamma, beta = make(torch.Generator().manual_seed(0), None, 7, 8, 3, torch.float32)
    with pytest.raises(InputError) as e:
        tlm_modulate(x, a, gamma, beta, backend="cuda")
    one_line(e, "tlm_modulate", "backend", "auto, triton, torch", "'cuda'")
    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    with pytest.raises(InputError) as e:
        tlm_modulate(x, a, gamma, beta, backend="triton")
    one_line(e, "tlm_modulate", "CUDA", "TRITON_INTERPRET=1")
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(InputError) as e:
        tlm_modulate(x, a, gamma, beta, backend="triton")
    one_line(e, "tlm_modulate", "not installed")


def test_bad_shapes_and_dtypes():
    x, a, g, b = torch.randn(7, 8), torch.rand(7, 3), torch.randn(3, 8), torch.randn(3, 8)
    xb, ab, gb = (t.expand(2, *t.shape) for t in (x, a, g))
    for args, words in [
        ((torch.randn(8), a, g, b), ("x", "[T, C]", "[8]")),
        ((x, torch.rand(6, 3), g, b), ("a", "[T, S] = [7, S]", "[6, 3]")),
        ((x, a, torch.randn(4, 8), b), ("gamma", "[S, C] = [3, 8]", "[4, 8]")),
        ((x, a, g, torch.randn(3, 9)), ("beta", "[S, C] = [3, 8]", "[3, 9]")),
        ((xb, a, g, b), ("a", "[B, T, S] = [2, 7, S]", "[7, 3]")),
        ((xb, ab, gb, torch.randn(3, 3, 8)), ("beta", "[B, S, C] = [2, 3, 8]", "[3, 3, 8]")),
        ((x.long(), a, g, b), ("x", "torch.int64")),
        ((x, a.bool(), g, b), ("a", "torch.bool")),
        ((x, a.to("meta"), g, b), ("a", "meta", "cpu")),
    ]:
        for fn in (tlm_modulate, tlm_modulate_reference):
            with pytest.raises(InputError) as e:
                fn(*args)
            one_line(e, *words)
    with pytest.raises(InputError) as e:
        tlm_modulate(x, a, g, b, out=torch.empty(7, 8, dtype=torch.float16))
    one_line(e, "out", "torch.float32 [7, 8]", "torch.float16")


def test_import_without_triton():
    """fusar_edge.kernels imports and runs its references where Triton is not installed."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
import fusar_edge.kernels as K
from fusar_edge.errors import InputError
assert not K.triton_available()
x, a, g = torch.randn(4, 8), torch.rand(4, 2), torch.randn(2, 8)
y = K.tlm_modulate(x, a, g, g)
assert torch.allclose(y, x * (1 + a @ g) + a @ g)
try:
    K.tlm_modulate(x, a, g, g, backend="triton")
except InputError as e:
    assert "not installed" in str(e)
else:
    raise SystemExit("backend='triton' without Triton must fail")
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_reference_matches_model_reference():
    """The kernels' reference and the model's modulate_reference agree (batched too)."""
    from fusar_edge.model.tlm import modulate_reference

    gen = torch.Generator().manual_seed(4)
    for b in (None, 3):
        x, a, g, bt = make(gen, b, 9, 24, 5, torch.float16)
        assert torch.equal(tlm_modulate_reference(x, a, g, bt), modulate_reference(x, a, g, bt))
