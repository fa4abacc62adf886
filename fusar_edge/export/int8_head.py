"""The LM head as an 8-bit ``MatMulNBits`` (round to nearest, symmetric, per block).

GPTQ quantises the decoder layers and leaves the head in fp32; on a CPU every decode step reads
all of it: 4 MB of the 52 MB a token of the ``small`` preset, but vocabulary x hidden x 4 bytes
= 2.2 GB of a 7B's ~5.7 GB. Eight bits with one scale per ``block_size`` inputs keep the head's
error near int8's rounding (a relative error around 1e-3 on the logits, measured by the export's
parity report) and read a quarter of the bytes (benchmarks/decoder_ab.py on ``small``: 1.08x
decode). ``MatMulNBits`` with ``bits=8`` and no zero-point input takes codes offset by 128.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def int8_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``W [N, K]`` -> (codes uint8 ``[N, K / block, block]`` = round(W / scale) + 128, scales ``[N * K / block]``)."""
    n, k = weight.shape
    if k % block_size:
        raise ValueError(f"in_features {k} is not a multiple of block size {block_size}")
    blocks = weight.astype(np.float32).reshape(n, k // block_size, block_size)
    scale = np.abs(blocks).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale codes it
    codes = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8), scale.reshape(-1)


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The reference: ``W [N, K]`` that the codes and scales stand for."""
    n, blocks, size = codes.shape
    return ((codes.astype(np.float32) - 128) * scales.reshape(n, blocks, 1)).reshape(n, blocks * size)


def quantize_head_int8(model: onnx.ModelProto, module: str = "lm_head", block_size: int = 128,
                       accuracy_level: int = 4) -> int | None:
    """Replace, in place, ``<module>/MatMul`` over the initializer ``<module>.weight_t`` (``W^T``)
    by an 8-bit ``MatMulNBits`` (blocks of ``block_size`` inputs, or the largest power of two
    below it that divides them); -> the block size used, None when the graph has no such fp32 node
    (left as it is)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for index, node in enumerate(g.node):
        if node.op_type != "MatMul" or node.name != f"{module}/MatMul" or node.input[1] not in inits:
            continue
        w_t = numpy_helper.to_array(inits[node.input[1]])
        block = block_size  # the largest power of two <= block_size (and >= 16) that divides K
        while block >= 16 and w_t.shape[0] % block:
            block //= 2
        if w_t.ndim != 2 or block < 16:
            return None
        codes, scales = int8_blocks(w_t.T, block)
        n, k = codes.shape[0], w_t.shape[0]
        dtype = w_t.dtype if w_t.dtype in (np.float16, np.float32) else np.float32
        g.initializer.extend([numpy_helper.from_array(codes, f"{module}_q8"),
                              numpy_helper.from_array(scales.astype(dtype), f"{module}_q8_scales")])
        g.node.remove(node)
        g.node.insert(index, helper.make_node(
            "MatMulNBits", [node.input[0], f"{module}_q8", f"{module}_q8_scales"], list(node.output),
            name=f"{module}/MatMulNBits8", domain=MS_DOMAIN, K=k, N=n, bits=8, block_size=block,
            accuracy_level=int(accuracy_level)))
        if not any(node.input[1] in other.input for other in g.node):
            g.initializer.remove(inits[node.input[1]])
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return block
    return None
