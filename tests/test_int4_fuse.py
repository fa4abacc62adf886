"""Sibling MatMulNBits fused into one node + Split: same outputs as the unfused graph."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fusar_edge.export.int4_onnx import quantize_onnx_model  # noqa: E402


def _graph(k=128, widths=(96, 32, 32), seed=0, bias_on_first=False, bias_on_all=False):
    """x -> MatMuls sharing x (q/k/v-like; with bias Adds on the first or on all) and y -> one more."""
    rng = np.random.default_rng(seed)
    inits, nodes, outs = [], [], []
    for i, n in enumerate(widths):
        w = numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}")
        inits.append(w)
        if (i == 0 and bias_on_first) or bias_on_all:
            inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}"))
            nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"o{i}"])]
        else:
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"o{i}"]))
        outs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None))
    inits.append(numpy_helper.from_array(rng.standard_normal((k, 64)).astype(np.float32), "wy"))
    nodes.append(helper.make_node("MatMul", ["y", "wy"], ["oy"]))
    outs.append(helper.make_tensor_value_info("oy", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info(v, TensorProto.FLOAT, ["b", "s", k]) for v in ("x", "y")]
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # as the exporter writes


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("k,widths,block", [(128, (96, 32, 32), 32), (256, (64, 64), 128), (64, (32, 16, 16, 8), 64)])
def test_fused_graph_computes_what_the_unfused_one_does(level, k, widths, block):
    model = _graph(k, widths, seed=k + len(widths))
    plain = quantize_onnx_model(model, form="matmulnbits", block_size=block, accuracy_level=level).model
    fused = quantize_onnx_model(model, form="matmulnbits", block_size=block, accuracy_level=level,
                                fuse_parallel=True)
    ops = [n.op_type for n in fused.model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1  # x's siblings in one node; y's alone
    assert fused.fused_nodes == len(widths) - 1
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (2, 7)):  # a decode step and a prefill
        feeds = {v: rng.standard_normal((*shape, k)).astype(np.float32) for v in ("x", "y")}
        for a, b in zip(_run(plain, feeds), _run(fused.model, feeds)):
            assert a.shape == b.shape
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
    read = {i for n in fused.model.graph.node for i in n.input}
    assert {t.name for t in fused.model.graph.initializer} <= read  # the unfused weights are gone, not carried


def test_biased_and_unbiased_siblings_fuse_separately():
    model = _graph(bias_on_first=True)
    fused = quantize_onnx_model(model, form="matmulnbits", block_size=32, fuse_parallel=True)
    ops = [n.op_type for n in fused.model.graph.node]
    assert ops.count("MatMulNBits") == 3 and fused.fused_nodes == 1  # the biased one stays; the other two fuse
    feeds = {v: np.random.default_rng(2).standard_normal((1, 3, 128)).astype(np.float32) for v in ("x", "y")}
    plain = quantize_onnx_model(model, form="matmulnbits", block_size=32).model
    for a, b in zip(_run(plain, feeds), _run(fused.model, feeds)):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("level", [0, 4])
def test_biased_siblings_fuse_with_their_biases(level):
    model = _graph(bias_on_all=True, seed=3)
    fused = quantize_onnx_model(model, form="matmulnbits", block_size=32, accuracy_level=level, fuse_parallel=True)
    ops = [n.op_type for n in fused.model.graph.node]
    assert ops.count("MatMulNBits") == 2 and fused.fused_nodes == 2
    plain = quantize_onnx_model(model, form="matmulnbits", block_size=32, accuracy_level=level).model
    feeds = {v: np.random.default_rng(4).standard_normal((2, 5, 128)).astype(np.float32) for v in ("x", "y")}
    for a, b in zip(_run(plain, feeds), _run(fused.model, feeds)):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())
