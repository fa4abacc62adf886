"""Fuse ``MatMulNBits`` nodes that read the same input into one node and a ``Split``.

A decoder layer multiplies one normed hidden state by q, k and v, and another by gate and
up: five 4-bit matmuls where two would do. Each ``MatMulNBits`` call costs a thread-pool
dispatch and a pass over its input; at batch 1 on a small CPU that overhead is a large part
of a decode step. The weights of such nodes concatenate exactly along N (rows of ``B`` and
``scales``; each row's blocks are its own), so the fused node computes the same numbers and
a ``Split`` on the last axis gives each original output back. ONNX Runtime's optimizer does
not do this for contrib ops, and onnxruntime-genai's builder does it only for the graphs it
writes itself, hence this pass.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def fuse_parallel_matmulnbits(model: onnx.ModelProto) -> int:
    """Fuse, in place, every group of >= 2 ``MatMulNBits`` sharing input A, K, bits, block
    size, accuracy level, scale dtype and having a bias or not (Qwen2's q/k/v have one; biases
    concatenate like the rows). Nodes with zero points or g_idx are left as they are.
    -> how many nodes were removed."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or any(n.input[3:5]):
            continue
        bias = n.input[5] if len(n.input) > 5 and n.input[5] else None
        if any(i not in inits for i in (n.input[1], n.input[2], bias) if i is not None):
            continue
        a = _attrs(n)
        key = (n.input[0], a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0),
               inits[n.input[2]].data_type, bias is not None)
        groups[key].append(n)
    fused: dict[int, list[onnx.NodeProto]] = {}  # id(first member) -> replacement nodes
    gone: set[int] = set()
    dead_inits: set[str] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        ns = [int(_attrs(n)["N"]) for n in members]
        first = members[0]
        b = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in members], axis=0)
        s = np.concatenate([numpy_helper.to_array(inits[n.input[2]]).reshape(k, -1)
                            for n, k in zip(members, ns)], axis=0)
        base = first.name or first.output[0]
        names = [f"{base}_fused_B", f"{base}_fused_scales", f"{base}_fused_split", f"{base}_fused_out"]
        g.initializer.extend([numpy_helper.from_array(b, names[0]), numpy_helper.from_array(s, names[1]),
                              numpy_helper.from_array(np.array(ns, np.int64), names[2])])
        ins = [first.input[0], names[0], names[1]]
        if len(first.input) > 5 and first.input[5]:
            bias = np.concatenate([numpy_helper.to_array(inits[n.input[5]]).reshape(-1) for n in members])
            g.initializer.append(numpy_helper.from_array(bias, f"{base}_fused_bias"))
            ins += ["", "", f"{base}_fused_bias"]  # zero points and g_idx (inputs 3, 4) absent
            dead_inits.update(n.input[5] for n in members)
        attrs = _attrs(first)
        attrs["N"] = int(sum(ns))
        mm = helper.make_node("MatMulNBits", ins, [names[3]], name=f"{base}_fused", domain=MS_DOMAIN, **attrs)
        split = helper.make_node("Split", [names[3], names[2]], [n.output[0] for n in members],
                                 name=f"{base}_fused_split", axis=-1)
        for node in (mm, split):
            node.metadata_props.extend(first.metadata_props)
        fused[id(first)] = [mm, split]
        gone.update(id(n) for n in members[1:])
        dead_inits.update(i for n in members for i in n.input[1:3])
    if not fused:
        return 0
    kept = []
    for n in g.node:
        if id(n) in gone:
            continue
        kept.extend(fused.get(id(n), [n]))
    del g.node[:]
    g.node.extend(kept)
    still_read = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name in dead_inits and t.name not in still_read]:
        g.initializer.remove(t)
    return len(gone)


def pack_attention_inputs(model: onnx.ModelProto) -> int:
    """Feed ``GroupQueryAttention`` the fused q/k/v matmul's output whole, in place.

    After :func:`fuse_parallel_matmulnbits` q, k and v come from one node and a ``Split``;
    ``GroupQueryAttention`` takes them packed (``query`` = ``[q | k | v]`` along the last axis,
    ``key`` and ``value`` empty), so the ``Split`` (one more op per layer and decode step) goes.
    -> how many ``Split`` nodes were removed."""
    g = model.graph
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    gone: set[int] = set()
    for n in g.node:
        if n.op_type != "GroupQueryAttention" or n.domain != MS_DOMAIN or len(n.input) < 3:
            continue
        split = producer.get(n.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(n.input[:3]):
            continue
        if any(o in outputs or len(readers[o]) != 1 for o in split.output):
            continue
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        gone.add(id(split))
    if gone:
        kept = [n for n in g.node if id(n) not in gone]
        del g.node[:]
        g.node.extend(kept)
        read = {i for n in g.node for i in n.input}
        for t in [t for t in g.initializer if t.name.endswith("_fused_split") and t.name not in read]:
            g.initializer.remove(t)
    return len(gone)
