"""4-bit ONNX packing (export/int4_onnx.py): MatMulNBits from GPTQ / RTN weights."""

import warnings

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fusar_edge.export.int4_onnx import (  # noqa: E402
    pack_matmulnbits,
    pack_nibbles,
    quantize_onnx_model,
    rtn_int4,
    save_model,
    unpack_nibbles,
)
from fusar_edge.export.quant_types import Int4Weight  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 512)
        self.fc2 = torch.nn.Linear(512, 384, bias=False)
        self.fc3 = torch.nn.Linear(384, 256)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def random_int4(name, out_f, in_f, group=128, gen=None):
    q = torch.randint(-8, 8, (out_f, in_f), dtype=torch.int8, generator=gen)
    s = torch.rand(out_f, in_f // group, generator=gen) * 0.02 + 1e-3
    return Int4Weight(name, q, s, group)


def linears(m):
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}


@pytest.fixture(scope="module")
def mlp():
    """The MLP with each linear's weight set to a fresh random Int4Weight, dequantised."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = MLP().eval()
    weights = {}
    for name, mod in linears(m).items():
        weights[name] = random_int4(name, *mod.weight.shape, gen=gen)
        with torch.no_grad():
            mod.weight.copy_(weights[name].dequantize())
    return m, weights


def export(m, x, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(m, (x,), str(path), dynamo=True, verbose=False)
        else:
            torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17)
    return path


# dynamo: 3-D input -> MatMul(x, folded W^T) + Add; legacy: 2-D input -> Gemm(transB=1) + MatMul
EXPORTS = {"dynamo": (True, (2, 5, 256)), "legacy": (False, (3, 256))}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, mlp, tmp_path_factory):
    m, weights = mlp
    dynamo, shape = EXPORTS[request.param]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    path = export(m, x, tmp_path_factory.mktemp(request.param) / "mlp.onnx", dynamo)
    with torch.no_grad():
        ref = m(x).numpy()
    return path, x.numpy(), ref, weights


def session(model, accuracy_level=0, optimize=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    # ORT fuses DequantizeLinear -> MatMul into MatMulNBits at accuracy level 4 (int8
    # activations) unless told otherwise
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model, x, **kw):
    s = session(model, **kw)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ----------------------------------------------------------------------------- layouts


def test_nibble_packing_low_first():
    u = np.array([[1, 2, 3, 4, 15]], np.uint8)
    b = pack_nibbles(u)
    assert b.tolist() == [[0x21, 0x43, 0x0F]]
    assert unpack_nibbles(b, 5).tolist() == u.tolist()


def test_matmulnbits_layout_by_hand():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 4)  # [2, 64]
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    pk = pack_matmulnbits(Int4Weight("w", q, s, 16), zero_points=True)
    assert pk.B.shape == (2, 4, 8) and pk.B.dtype == np.uint8
    # u = q + 8 = 0..15 per block; pairs (0, 1) -> 0x10, (2, 3) -> 0x32, ...
    assert pk.B[0, 0].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert pk.scales.shape == (2, 4) and pk.scales[1, 2] == 7.0
    assert pk.zero_points.shape == (2, 2) and np.all(pk.zero_points == 0x88)
    assert pk.attributes(4) == dict(K=64, N=2, bits=4, block_size=16, accuracy_level=4)


def test_layout_agrees_with_ort_packers():
    """ONNX Runtime's own C++ packers (used by its quantizer) read back with our unpacking."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(0)
    k, n, bs = 256, 64, 32
    w = rng.standard_normal((k, n)).astype(np.float32)  # MatMul's B: [K, N]
    B = np.zeros((n, k // bs, bs // 2), np.uint8)
    s = np.zeros((n, k // bs), np.float32)
    quantize_matmul_4bits(B, w, s, np.zeros((n, k // bs // 2), np.uint8), bs, n, k, True)
    deq = ((unpack_nibbles(B).astype(np.float32) - 8) * s[..., None]).reshape(n, k).T
    assert rel(deq, w) < 0.1  # RTN error; the high-nibble-first reading gives ~1.4


# ----------------------------------------------------------------------------- numerics


def test_matmulnbits_matches_torch(exported):
    path, x, ref, weights = exported
    res = quantize_onnx_model(path, weights)
    onnx.checker.check_model(res.model)
    assert sorted(res.quantized.values()) == ["fc1", "fc2", "fc3"], res.quantized
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops
    assert "Add" not in ops  # biases went into MatMulNBits' bias input
    # the float weight matrices are gone: no float initializer has 256 or more columns
    assert not [t.name for t in res.model.graph.initializer
                if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and min(t.dims) >= 256]
    assert rel(run(res.model, x), ref) < 1e-5


def test_the_retired_qdq_form_is_refused(exported):
    path, _, _, weights = exported
    with pytest.raises(ValueError, match="retired.*Edge-LLM"):
        quantize_onnx_model(path, weights, form="qdq")


def test_block_finer_than_group(exported):
    path, x, ref, weights = exported
    model = quantize_onnx_model(path, weights, block_size=64).model
    assert rel(run(model, x), ref) < 1e-5
    with pytest.raises(ValueError, match="does not divide"):
        quantize_onnx_model(path, {k: random_int4(k, *w.shape, group=64) for k, w in weights.items()},
                            block_size=128)


def test_explicit_zero_points(exported):
    path, x, ref, weights = exported
    model = quantize_onnx_model(path, weights, zero_points=True).model
    zp = [t for t in model.graph.initializer if t.name.endswith("_zp")]
    assert len(zp) == 3
    assert rel(run(model, x), ref) < 1e-5


def test_int8_accuracy_level_runs(exported):
    path, x, ref, weights = exported
    model = quantize_onnx_model(path, weights, accuracy_level=4).model
    assert rel(run(model, x), ref) < 2e-2  # activations quantised to int8 per block


def test_rtn_standalone(exported, mlp):
    path, x, ref, _ = exported
    m, _ = mlp
    # the same RTN in torch: the model with every weight replaced by its RTN dequantisation
    m_rtn = MLP().eval()
    m_rtn.load_state_dict(m.state_dict())
    for name, mod in linears(m_rtn).items():
        with torch.no_grad():
            mod.weight.copy_(rtn_int4(mod.weight, 128, name).dequantize())
    with torch.no_grad():
        ref_rtn = m_rtn(torch.from_numpy(x)).numpy()
    res = quantize_onnx_model(path, None)
    assert sorted(res.quantized.values()) == ["fc1", "fc2", "fc3"]
    y = run(res.model, x)
    assert rel(y, ref_rtn) < 1e-5
    assert 1e-4 < rel(y, ref) < 0.2  # RTN of the (already 4-bit) weights: close, not exact


def test_rtn_weight():
    w = torch.randn(8, 256)
    w[0, :128] = 0
    iw = rtn_int4(w, 128, "w")
    assert iw.q.dtype == torch.int8 and int(iw.q.min()) >= -8 and int(iw.q.max()) <= 7
    assert torch.all(iw.scales > 0) and torch.equal(iw.scales, iw.scales.half().float())
    assert torch.all(iw.q[0, :128] == 0)
    err = (iw.dequantize() - w).abs().view(8, 2, 128).amax(-1)
    assert torch.all(err <= iw.scales * 0.51)  # no clipping: half a step (+ float16 rounding of s)


def disk_size(path):
    data = path.with_name(path.name + ".data")  # the dynamo exporter writes external data
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def test_size_on_disk(exported, tmp_path):
    path, x, _, weights = exported
    n_float = sum(w.q.numel() for w in weights.values())
    assert disk_size(path) > 4 * n_float
    out = tmp_path / "q.onnx"
    quantize_onnx_model(path, weights, out_path=out)
    assert not out.with_name("q.onnx.data").exists()  # small: one file
    ratio = disk_size(path) / disk_size(out)
    # float32 -> 4 bits + one float32 scale per 128: 32 / (4 + 32/128) = 7.5x on the weights
    assert 6.0 < ratio < 8.0, ratio
    assert disk_size(out) < n_float * (0.5 + 4 / 128) + 64 * 1024
    assert rel(run(out, x), run(quantize_onnx_model(path, weights).model, x)) == 0


def test_external_data_roundtrip(exported, tmp_path):
    path, x, ref, weights = exported
    src = tmp_path / "ext" / "float.onnx"
    save_model(onnx.load(str(path)), src, external_data=True)
    assert (tmp_path / "ext" / "float.onnx.data").stat().st_size > 1 << 20
    # the weights are as readable as their graph (onnx writes them owner-only)
    assert (tmp_path / "ext" / "float.onnx.data").stat().st_mode & 0o777 == src.stat().st_mode & 0o777
    out = tmp_path / "ext" / "q.onnx"
    res = quantize_onnx_model(src, weights, out_path=out, external_data=True)
    assert res.path == out and (tmp_path / "ext" / "q.onnx.data").exists()
    assert out.stat().st_size < 64 * 1024  # the weights live in q.onnx.data
    assert rel(run(out, x), ref) < 1e-5


def test_missing_include_and_errors(exported):
    path, x, ref, weights = exported
    with pytest.raises(KeyError, match="no Int4Weight"):
        quantize_onnx_model(path, {"fc1": weights["fc1"]})
    res = quantize_onnx_model(path, {"fc1": weights["fc1"]}, missing="skip")
    assert list(res.quantized.values()) == ["fc1"] and len(res.skipped) == 2
    assert rel(run(res.model, x), ref) < 1e-5  # the float layers hold the same weights
    res = quantize_onnx_model(path, {"fc1.weight": weights["fc1"]}, missing="rtn")
    assert sorted(res.quantized.values()) == ["fc1", "fc2", "fc3"]
    res = quantize_onnx_model(path, weights, include=lambda m: m != "fc3")
    assert sorted(res.quantized.values()) == ["fc1", "fc2"]
    bad = dict(weights, fc2=random_int4("fc2", 384, 256))
    with pytest.raises(ValueError, match="fc2"):
        quantize_onnx_model(path, bad)
    with pytest.raises(ValueError, match="form"):
        quantize_onnx_model(path, weights, form="gptq")


# ----------------------------------------------------------------------------- hand-built graphs


def _linear_graph(w_t: np.ndarray, dtype=TensorProto.FLOAT, transpose_node=False, twice=False, opset=21):
    """y = x @ W^T through MatMul(x, Transpose(W)) or MatMul(x, W^T); ``twice``: tied weight."""
    k, n = w_t.shape
    nodes, inits = [], []
    if transpose_node:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w_t.T), "lin.weight"))
        nodes.append(helper.make_node("Transpose", ["lin.weight"], ["wt"], perm=[1, 0]))
        b = "wt"
    else:
        inits.append(numpy_helper.from_array(w_t, "lin.weight_t"))
        b = "lin.weight_t"
    nodes.append(helper.make_node("MatMul", ["x", b], ["y"], name="/lin/MatMul"))
    outs = [helper.make_tensor_value_info("y", dtype, None)]
    if twice:
        nodes.append(helper.make_node("MatMul", ["x", b], ["y2"], name="/lin/MatMul_1"))
        outs.append(helper.make_tensor_value_info("y2", dtype, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [None, k])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_float16_transpose_and_tied():
    rng = np.random.default_rng(3)
    w = random_int4("lin", 256, 512, gen=torch.Generator().manual_seed(3))
    w.scales = w.scales.half().float()  # exactly representable in float16
    wd = w.dequantize().numpy()
    model = _linear_graph(wd.T.astype(np.float16), TensorProto.FLOAT16, transpose_node=True, twice=True)
    res = quantize_onnx_model(model, {"lin": w})
    assert len(res.quantized) == 2 and "Transpose" not in [n.op_type for n in res.model.graph.node]
    n_q4 = [t for t in res.model.graph.initializer if t.name.endswith("_q4")]
    assert len(n_q4) == 1  # the tied weight is packed once
    scales = [t for t in res.model.graph.initializer if "scale" in t.name]
    assert scales[0].data_type == TensorProto.FLOAT16
    x = rng.standard_normal((2, 512)).astype(np.float16)
    y, y2 = session(res.model).run(None, {"x": x})
    ref = x.astype(np.float32) @ wd.T
    assert rel(y, ref) < 3e-3 and np.array_equal(y, y2)  # float16 output rounding


def test_name_map():
    w = random_int4("lin", 128, 256)
    model = _linear_graph(w.dequantize().numpy().T.copy())
    # node name /lin/MatMul gives "lin"; a name map overrides it
    assert quantize_onnx_model(model, {"lin": w}).quantized == {"/lin/MatMul": "lin"}
    for nm in ({"lin.weight_t": "blocks.0.proj"}, lambda init: "blocks.0.proj"):
        res = quantize_onnx_model(model, {"blocks.0.proj": w}, name_map=nm)
        assert res.quantized == {"/lin/MatMul": "blocks.0.proj"}
    with pytest.raises(KeyError, match="blocks.0.proj"):
        quantize_onnx_model(model, {"other": w}, name_map={"lin.weight_t": "blocks.0.proj"})


def test_gemm_untransposed_with_2d_bias():
    w = random_int4("lin", 128, 256)
    wd = w.dequantize().numpy()
    c = np.random.default_rng(1).standard_normal((1, 128)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="/lin/Gemm", transB=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(wd.T.copy(), "W"), numpy_helper.from_array(c, "C")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    res = quantize_onnx_model(model, {"lin": w})
    assert res.quantized == {"/lin/Gemm": "lin"}
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    assert rel(run(res.model, x), x @ wd.T + c) < 1e-5
