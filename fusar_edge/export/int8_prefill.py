"""The prompt's decoder on integer GEMMs: the 4-bit weights as 8-bit, for ONNX Runtime's int8 kernels.

Why a second decoder graph: a prompt (prefill, GRASP's question pass) multiplies many rows by
each weight, and ONNX Runtime's ``MatMulNBits`` stays at ~140 GMAC/s for 120 rows on 2 cores
whatever its accuracy level, while its integer GEMM behind ``MatMulInteger`` (uint8 x int8: the
VNNI and AMX kernels of MLAS) does 470-750 (``benchmarks/prefill_rows.py``; Intel Xeon with
AMX). A decode step (one row) reads weights and stays on the 4-bit graph, which reads half the
bytes. Both graphs share every input and output name, so one KV cache serves both.

Each 4-bit ``MatMulNBits`` (``Y = A @ W^T + bias``, ``W = (u - 8) * scale`` per block) becomes

    s_a  = max(|A| over K, 1e-30) / 127                       per row (token) of A
    A_u8 = round(A / s_a) + 128                                uint8, zero point 128 (symmetric)
    Y    = float(MatMulInteger(A_u8, W8^T, 128)) * s_a * s_w (+ bias)

with ``W8 = round(W / s_w)``, ``s_w = max(|W| over K) / 127`` per output channel: the same 4-bit
weights requantised to 8 bits (a 4-bit code times its block's scale is held to within half a
step of ``s_w``; per channel and not per block because the integer GEMM takes one scale per
column; on random weights that rounding is ~0.8 % of a weight, the larger part of this graph's
error). Activations per row, not per tensor, so one loud token does not coarsen the others (and a
prompt's numbers do not depend on what else is in its batch). Only fp32 graphs (the CPU export);
the 8-bit LM head (one row in prefill) is left as it is.

x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) sum pairs of uint8 x int8 products in
int16 (``vpmaddubsw``), which saturates for 8-bit weights. The runtime uses this graph by default
only on x86 CPUs with VNNI or AMX (``backends/onnxruntime.int8_gemm_kind``: exact int32 sums, and
the only kind measured); forced elsewhere (``FUSAR_ORT_PREFILL=int8``) it opens it with ONNX
Runtime's ``session.x64quantprecision``, which turns the weights to uint8 for the exact, slower
uint8 x uint8 kernel (left off on VNNI / AMX CPUs, where it would do the same). 7-bit weights
would avoid saturation on every CPU, at twice the rounding.

Loud input channels (the MLP's down projection reads ``silu(gate) * up``, whose few large
channels set every row's scale) are smoothed as SmoothQuant does (Xiao et al. 2023): with each
input channel's largest activation ``a_k`` measured on calibration prompts
(:func:`activation_ranges`), ``A`` is divided and ``W``'s column multiplied by
``m_k = sqrt(a_k / max_n |W[n, k]|)`` before both are quantised, so ``A @ W^T`` is unchanged
and the range moves from the activations into the weights. On the demo this took the prefill
logits' error against the dequantised 4-bit model from 4.6e-2 to 6.4e-3, under the 4-bit graph's
own 1.2e-2 (``export.json``: ``int8_prefill_vs_dequantised``; README).

:func:`int8_linear_reference` is the same arithmetic in numpy, for the tests.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .int4_onnx import unpack_nibbles

MS_DOMAIN = "com.microsoft"
PREFILL_FILE = "decoder-prefill.onnx"
TINY = 1e-30  # an all-zero row quantises to zeros instead of dividing by zero


def dequantize_matmulnbits(packed: np.ndarray, scales: np.ndarray, k: int, n: int, block_size: int) -> np.ndarray:
    """``W [N, K]`` float32 that a symmetric 4-bit ``MatMulNBits`` (no zero points) stands for."""
    codes = unpack_nibbles(packed.reshape(n, -1), None)[:, :k].astype(np.float32) - 8.0
    blocks = -(-k // block_size)
    s = scales.astype(np.float32).reshape(n, blocks)
    return codes * np.repeat(s, block_size, axis=1)[:, :k]


WEIGHT_QMAX = 127


def int8_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W [N, K]`` -> (int8 codes in [-127, 127] ``[K, N]`` (MatMulInteger's B), float32 scales ``[N]``)."""
    s = np.abs(w).max(axis=1) / float(WEIGHT_QMAX)
    s = np.where(s > 0, s, 1.0).astype(np.float32)  # an all-zero channel: any scale codes it
    codes = np.clip(np.rint(w / s[:, None]), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
    return np.ascontiguousarray(codes.T), s


def quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A [..., K]`` -> (signed codes as int32, per-row scales ``[..., 1]``), as the graph does it."""
    a = np.asarray(a, np.float32)
    s = np.maximum(np.abs(a).max(axis=-1, keepdims=True), np.float32(TINY)) / np.float32(127)
    return np.rint(a / s).astype(np.int32), s.astype(np.float32)


def smoothing(act_max: np.ndarray, w_max: np.ndarray) -> np.ndarray:
    """SmoothQuant's per-input-channel factor ``m [K]`` (alpha 0.5) for activations whose channels
    reach ``act_max [K]`` and weights whose columns reach ``w_max [K]``; 1 where either is zero."""
    a = np.asarray(act_max, np.float64)
    wmax = np.asarray(w_max, np.float64)
    m = np.sqrt(np.where((a > 0) & (wmax > 0), a / np.where(wmax > 0, wmax, 1), 1.0))
    return np.clip(m, 1e-4, 1e4).astype(np.float32)


def int8_linear_reference(a: np.ndarray, codes: np.ndarray, scales: np.ndarray, bias=None,
                          smooth: np.ndarray | None = None) -> np.ndarray:
    """The plain reference of one rewritten linear: ``A [..., K]``, codes ``[K, N]`` (of ``W * m``
    when smoothed), scales ``[N]``, ``smooth`` = ``m [K]`` or None."""
    if smooth is not None:
        a = np.asarray(a, np.float32) * (np.float32(1) / smooth)
    qa, sa = quantize_rows(a)
    y = (qa.astype(np.int64) @ codes.astype(np.int64)).astype(np.float32) * sa * scales
    return y if bias is None else y + np.asarray(bias, np.float32)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewritable(node: onnx.NodeProto, inits: dict) -> bool:
    a = _attrs(node)
    return (node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and a.get("bits") == 4
            and not any(node.input[3:5]) and node.input[1] in inits and node.input[2] in inits
            and inits[node.input[2]].data_type == TensorProto.FLOAT)


def _weight(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    a = _attrs(node)
    return dequantize_matmulnbits(numpy_helper.to_array(inits[node.input[1]]),
                                  numpy_helper.to_array(inits[node.input[2]]), int(a["K"]), int(a["N"]),
                                  int(a["block_size"]))


def rewritten_inputs(model: onnx.ModelProto) -> list[str]:
    """The activations (tensor names) that :func:`prefill_decoder` quantises, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    return list(dict.fromkeys(n.input[0] for n in model.graph.node if _rewritable(n, inits)))


def activation_ranges(model: onnx.ModelProto, make_runner, samples) -> dict[str, np.ndarray]:
    """Each rewritten linear's input: its channels' largest ``|A|`` over ``samples`` -> ``{name: [K]}``.

    ``make_runner(probe, names)`` gets the 4-bit decoder with those activations added as outputs and
    returns ``run(sample) -> [arrays]`` over one calibration prompt; the caller owns the session and
    the KV cache (``bundle_export``: ``OnnxStages``)."""
    names = rewritten_inputs(model)
    probe = copy.deepcopy(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    run = make_runner(probe, names)
    ranges: dict[str, np.ndarray] = {}
    for sample in samples:
        for name, value in zip(names, run(sample)):
            peak = np.abs(np.asarray(value, np.float32)).reshape(-1, value.shape[-1]).max(axis=0)
            ranges[name] = peak if name not in ranges else np.maximum(ranges[name], peak)
    return ranges


def prefill_decoder(model: onnx.ModelProto, act_max: dict[str, np.ndarray] | None = None
                    ) -> tuple[onnx.ModelProto, int]:
    """A copy of a 4-bit decoder with every fp32 4-bit ``MatMulNBits`` on the integer GEMM; -> (model, count).

    ``act_max``: :func:`activation_ranges`; the inputs it names are smoothed (module docstring)."""
    out = copy.deepcopy(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    # one smoothing factor per activation, from its readers' weights together (fused nodes: one
    # reader); only column maxima are kept, never a model's worth of float weights
    w_max: dict[str, np.ndarray] = {}
    for node in g.node:
        if _rewritable(node, inits) and node.input[0] in (act_max or {}):
            col = np.abs(_weight(node, inits)).max(axis=0)
            w_max[node.input[0]] = col if node.input[0] not in w_max else np.maximum(w_max[node.input[0]], col)
    smooth = {src: smoothing(act_max[src], col) for src, col in w_max.items()}
    shared = {  # constants of the activation quantisation, one set per graph
        "int8_prefill/axis": numpy_helper.from_array(np.array([-1], np.int64), "int8_prefill/axis"),
        "int8_prefill/tiny": numpy_helper.from_array(np.array(TINY, np.float32), "int8_prefill/tiny"),
        "int8_prefill/127": numpy_helper.from_array(np.array(127, np.float32), "int8_prefill/127"),
        "int8_prefill/128": numpy_helper.from_array(np.array(128, np.float32), "int8_prefill/128"),
        "int8_prefill/zp": numpy_helper.from_array(np.array(128, np.uint8), "int8_prefill/zp"),
    }
    quantized_inputs: dict[str, tuple[str, str]] = {}  # A's name -> (uint8 codes, row scales)
    nodes, count, dropped = [], 0, set()
    for node in g.node:
        if not _rewritable(node, inits):
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        src = node.input[0]
        w = _weight(node, inits)
        if src in smooth:
            w = w * smooth[src][None, :]
        codes, scales = int8_channels(w)
        w_name, s_name = f"{base}/int8_weight", f"{base}/int8_scale"
        g.initializer.extend([numpy_helper.from_array(codes, w_name), numpy_helper.from_array(scales, s_name)])
        for name in node.input[1:3]:
            consumers[name] -= 1
            if consumers[name] == 0:
                dropped.add(name)
        if src not in quantized_inputs:
            q = f"{base}/act"
            a_in = src
            if src in smooth:
                inv = f"{q}/inv_smooth"
                g.initializer.append(numpy_helper.from_array((np.float32(1) / smooth[src]).astype(np.float32), inv))
                nodes.append(helper.make_node("Mul", [src, inv], [f"{q}/smoothed"], name=f"{q}/Smooth"))
                a_in = f"{q}/smoothed"
            nodes += [
                helper.make_node("Abs", [a_in], [f"{q}/abs"], name=f"{q}/Abs"),
                helper.make_node("ReduceMax", [f"{q}/abs", "int8_prefill/axis"], [f"{q}/max"], name=f"{q}/ReduceMax",
                                 keepdims=1),
                helper.make_node("Max", [f"{q}/max", "int8_prefill/tiny"], [f"{q}/max1"], name=f"{q}/Max"),
                helper.make_node("Div", [f"{q}/max1", "int8_prefill/127"], [f"{q}/scale"], name=f"{q}/Scale"),
                helper.make_node("Div", [a_in, f"{q}/scale"], [f"{q}/div"], name=f"{q}/Div"),
                helper.make_node("Round", [f"{q}/div"], [f"{q}/round"], name=f"{q}/Round"),
                helper.make_node("Add", [f"{q}/round", "int8_prefill/128"], [f"{q}/shift"], name=f"{q}/Shift"),
                helper.make_node("Cast", [f"{q}/shift"], [f"{q}/u8"], name=f"{q}/Cast", to=TensorProto.UINT8),
            ]
            quantized_inputs[src] = (f"{q}/u8", f"{q}/scale")
        a_u8, a_scale = quantized_inputs[src]
        y = node.output[0]
        bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
        nodes += [
            helper.make_node("MatMulInteger", [a_u8, w_name, "int8_prefill/zp"], [f"{base}/i32"], name=f"{base}/MatMulInteger"),
            helper.make_node("Cast", [f"{base}/i32"], [f"{base}/f32"], name=f"{base}/CastF", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{base}/f32", a_scale], [f"{base}/rows"], name=f"{base}/RowScale"),
            helper.make_node("Mul", [f"{base}/rows", s_name], [f"{base}/cols" if bias else y], name=f"{base}/ColScale"),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [f"{base}/cols", bias], [y], name=f"{base}/Bias"))
        count += 1
    if count:
        kept = [t for t in g.initializer if t.name not in dropped]
        del g.initializer[:]
        g.initializer.extend(kept + list(shared.values()))
        del g.node[:]
        g.node.extend(nodes)
    return out, count
