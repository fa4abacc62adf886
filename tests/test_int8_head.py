"""The LM head as an 8-bit MatMulNBits (export/int8_head.py) against its numpy reference."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fusar_edge.export.int8_head import dequantize, int8_blocks, quantize_head_int8  # noqa: E402


def _head_graph(k: int, n: int, seed: int):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    node = helper.make_node("MatMul", ["h", "lm_head.weight_t"], ["logits"], name="lm_head/MatMul")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 1, k])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w.T.copy(), "lm_head.weight_t")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), w  # as the exporter


def _run(model, h):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]


@pytest.mark.parametrize("k,n,block", [(64, 96, 64), (256, 1024, 128), (192, 640, 128), (96, 40, 32)])
def test_int8_head_computes_its_dequantised_weights(k, n, block):
    model, w = _head_graph(k, n, seed=k + n)
    h = np.random.default_rng(1).standard_normal((3, 1, k)).astype(np.float32)
    exact = quantize_head_int8(model, block_size=block, accuracy_level=0)
    assert exact and [x.op_type for x in model.graph.node] == ["MatMulNBits"]
    assert "lm_head.weight_t" not in {t.name for t in model.graph.initializer}
    node = model.graph.node[0]
    used = {a.name: helper.get_attribute_value(a) for a in node.attribute}["block_size"]
    assert used == exact and used <= block and k % used == 0  # 192 inputs: blocks of 64
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ref_w = dequantize(inits["lm_head_q8"], inits["lm_head_q8_scales"])
    got = _run(model, h)
    ref = h @ ref_w.T
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()  # fp32 compute: the dequantised weights
    assert np.abs(ref - h @ w.T).max() <= 1e-2 * np.abs(ref).max()  # and those are W to int8 rounding


def test_int8_blocks_round_trip_and_zero_blocks():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    w[3, :32] = 0.0
    codes, scales = int8_blocks(w, 32)
    assert codes.dtype == np.uint8 and codes.min() >= 1 and codes.max() <= 255
    back = dequantize(codes, scales)
    assert np.all(back[3, :32] == 0)
    assert np.abs(back - w).max() <= scales.max() / 2 + 1e-7  # half a step at most
    with pytest.raises(ValueError):
        int8_blocks(w, 48)


def test_no_fp32_head_is_left_alone():
    model, _ = _head_graph(20, 8, seed=0)  # 20 inputs: no power-of-two block >= 16 divides them
    before = model.SerializeToString()
    assert quantize_head_int8(model) is None
    assert model.SerializeToString() == before
