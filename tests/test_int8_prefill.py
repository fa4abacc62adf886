"""The int8 prefill graph (export/int8_prefill.py) against its numpy reference and the 4-bit graph."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fusar_edge.export.int4_onnx import pack_matmulnbits, rtn_int4
from fusar_edge.export.int8_prefill import (dequantize_matmulnbits, int8_channels, int8_linear_reference,
                                            prefill_decoder)

MS = "com.microsoft"


def _graph(weights, biases, shared_input: bool, rank: int):
    """One or two 4-bit ``MatMulNBits`` (reading the same A when ``shared_input``), summed when two."""
    k = weights[0].shape[1]
    a_shape = [None, k] if rank == 2 else [1, None, k]
    nodes, inits, outs = [], [], []
    for i, (w, bias) in enumerate(zip(weights, biases)):
        pack = pack_matmulnbits(w)
        ins = ["A" if shared_input or i == 0 else "A2", f"B{i}", f"S{i}"]
        inits += [numpy_helper.from_array(pack.B, f"B{i}"), numpy_helper.from_array(pack.scales, f"S{i}")]
        if bias is not None:
            ins += ["", "", f"bias{i}"]
            inits.append(numpy_helper.from_array(bias, f"bias{i}"))
        nodes.append(helper.make_node("MatMulNBits", ins, [f"Y{i}"], name=f"lin{i}", domain=MS,
                                      **pack.attributes(accuracy_level=4)))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, a_shape[:-1] + [w.shape[0]]))
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)]
    if not shared_input and len(weights) > 1:
        inputs.append(helper.make_tensor_value_info("A2", TensorProto.FLOAT, a_shape))
    g = helper.make_graph(nodes, "g", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])


def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.x64quantprecision", "1")  # as the runtime opens it: exact on every x86
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("k,n,group,rows,rank,bias,shared", [
    (64, 32, 64, 1, 2, False, True),
    (128, 96, 64, 17, 2, True, True),
    (256, 48, 128, 40, 3, False, True),
    (192, 80, 64, 33, 3, True, False),
    (128, 256, 32, 5, 3, True, True),
])
def test_rewritten_linears_match_the_reference_and_the_4bit_graph(k, n, group, rows, rank, bias, shared):
    rng = np.random.default_rng(k * 1000 + n + rows)
    weights, biases = [], []
    for i in range(2):
        w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.05)
        w[0] *= 6  # one loud output channel: its own int8 scale
        weights.append(rtn_int4(w, group, name=f"lin{i}"))
        biases.append(rng.standard_normal(n).astype(np.float32) if bias else None)
    model = _graph(weights, biases, shared, rank)
    fast, count = prefill_decoder(model)
    assert count == 2
    onnx.checker.check_model(fast)
    ops = [node.op_type for node in fast.graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMulInteger") == 2
    assert ops.count("ReduceMax") == (1 if shared else 2)  # one activation quantisation per distinct input
    assert len(fast.graph.initializer) < len(model.graph.initializer) + 12  # the 4-bit weights are gone

    shape = (rows, k) if rank == 2 else (1, rows, k)
    a = rng.standard_normal(shape).astype(np.float32)
    a[..., 3] *= 20  # an outlier channel, as language models have
    if rows > 1:
        a[..., 1, :] = 0  # an all-zero token
    feeds = {"A": a} if shared else {"A": a, "A2": rng.standard_normal(shape).astype(np.float32)}
    got, four_bit = _run(fast, feeds), _run(model, feeds)
    for i, w in enumerate(weights):
        codes, scales = int8_channels(w.dequantize().numpy())
        src = feeds["A" if shared or i == 0 else "A2"]
        ref = int8_linear_reference(src, codes, scales, biases[i])
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got[i], ref, atol=1e-5 * scale, rtol=1e-5)
        # against the 4-bit weights in float: the activations' quantisation error, the same order as
        # the 4-bit graph's (accuracy level 4: int8 per block of K; per row here, about twice as coarse)
        exact = src @ w.dequantize().numpy().T + (biases[i] if bias else 0)
        err_int8 = np.linalg.norm(got[i] - exact) / np.linalg.norm(exact)
        err_4bit = np.linalg.norm(four_bit[i] - exact) / np.linalg.norm(exact)
        assert err_int8 < 0.05 and err_4bit < 0.05 and err_int8 < 4 * err_4bit + 1e-3, (err_int8, err_4bit)


def test_requantised_weights_stay_within_half_a_step_of_the_4bit_ones():
    rng = np.random.default_rng(0)
    w = rtn_int4(torch.from_numpy(rng.standard_normal((24, 128)).astype(np.float32)), 64)
    pack = pack_matmulnbits(w)
    deq = dequantize_matmulnbits(pack.B, pack.scales, 128, 24, 64)
    np.testing.assert_array_equal(deq, w.dequantize().numpy())  # the unpacking is exact
    codes, scales = int8_channels(deq)
    assert codes.dtype == np.int8 and codes.shape == (128, 24) and np.abs(codes).max() == 127
    err = np.abs(codes.T.astype(np.float32) * scales[:, None] - deq)
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    zero, s0 = int8_channels(np.zeros((3, 8), np.float32))  # an all-zero channel codes as zeros
    assert not zero.any() and (s0 == 1).all()


def test_other_nodes_are_left_alone():
    """8-bit heads, nodes with zero points and fp16 weights keep their MatMulNBits."""
    rng = np.random.default_rng(1)
    w = rtn_int4(torch.from_numpy(rng.standard_normal((16, 64)).astype(np.float32)), 64)
    pack = pack_matmulnbits(w, zero_points=True)
    inits = [numpy_helper.from_array(pack.B, "B"), numpy_helper.from_array(pack.scales, "S"),
             numpy_helper.from_array(pack.zero_points, "Z"),
             numpy_helper.from_array(pack.scales.astype(np.float16), "S16"),
             numpy_helper.from_array(np.full((16, 1, 64), 128, np.uint8), "B8")]
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y0"], domain=MS, **pack.attributes()),
             helper.make_node("MatMulNBits", ["A16", "B", "S16"], ["Y1"], domain=MS, **pack.attributes()),
             helper.make_node("MatMulNBits", ["A", "B8", "S"], ["Y2"], domain=MS, K=64, N=16, bits=8, block_size=64)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 64]),
                                       helper.make_tensor_value_info("A16", TensorProto.FLOAT16, [None, 64])],
                          [helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None) for i in range(3)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
    same, count = prefill_decoder(model)
    assert count == 0 and same == model


def test_which_cpus_run_prompts_on_the_int8_graph(tmp_path):
    from fusar_edge.backends.onnxruntime import int8_gemm_kind, prefill_policy
    from fusar_edge.errors import InputError

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    assert int8_gemm_kind("x86_64", info) == "saturating"  # AVX2 / AVX-512 without VNNI: vpmaddubsw
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        info.write_text(f"processor\t: 0\nflags\t\t: fpu avx2 {flag}\n")
        assert int8_gemm_kind("x86_64", info) == "exact", flag
    assert int8_gemm_kind("aarch64", info) == "other"
    assert int8_gemm_kind("x86_64", tmp_path / "absent") == "saturating"  # unknown flags: the safe answer
    # auto: only where it was measured faster; int8 / int4 force it either way
    assert [prefill_policy("auto", k) for k in ("exact", "saturating", "other")] == [True, False, False]
    assert all(prefill_policy("int8", k) and not prefill_policy("int4", k) for k in ("exact", "saturating", "other"))
    with pytest.raises(InputError, match="FUSAR_ORT_PREFILL: expected auto, int8 or int4, got 'fast'"):
        prefill_policy("fast", "exact")


def test_smoothing_moves_a_loud_channel_into_the_weights():
    """With activation ranges, the graph is the smoothed reference, and the loud channel costs less."""
    from fusar_edge.export.int8_prefill import activation_ranges, smoothing

    rng = np.random.default_rng(7)
    k, n = 128, 64
    w = rtn_int4(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32) * 0.05), 64)
    model = _graph([w], [None], True, 2)
    a = rng.standard_normal((48, k)).astype(np.float32)
    a[:, 5] *= 60  # one channel far louder than the rest, as silu(gate) * up has

    # activation_ranges: the per-channel peak of |A| over the samples the runner is given
    def make_runner(probe, names):
        assert names == ["A"] and probe.graph.output[-1].name == "A"
        return lambda sample: [sample]

    ranges = activation_ranges(model, make_runner, [a[:24], a[24:]])
    np.testing.assert_array_equal(ranges["A"], np.abs(a).max(axis=0))

    smooth_graph, _ = prefill_decoder(model, ranges)
    plain_graph, _ = prefill_decoder(model)
    deq = w.dequantize().numpy()
    m = smoothing(ranges["A"], np.abs(deq).max(axis=0))
    assert m[5] > 3 * np.median(m)  # the loud channel is divided down the most
    codes, scales = int8_channels(deq * m[None, :])
    got = _run(smooth_graph, {"A": a})[0]
    ref = int8_linear_reference(a, codes, scales, smooth=m)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-5)
    exact = a @ deq.T
    err = {name: np.linalg.norm(y - exact) / np.linalg.norm(exact)
           for name, y in (("smoothed", got), ("plain", _run(plain_graph, {"A": a})[0]))}
    assert err["smoothed"] < 0.5 * err["plain"], err
