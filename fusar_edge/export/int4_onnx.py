"""4-bit weights in ONNX as ONNX Runtime's ``MatMulNBits``, from an :class:`Int4Weight`.

``W[out, in] = q * scale`` per block of ``block_size`` consecutive input columns, symmetric
(no zero point in signed form), as the contrib op ``com.microsoft.MatMulNBits`` (CPU/CUDA EPs)::

    Y = A @ dequant(B)^T (+ bias)     A [..., K], Y [..., N]   (K = in, N = out)
    B      uint8 [N, n_blocks, block_size / 2]  unsigned codes u = q + 8, two per byte
                                              along K, the even element in the LOW nibble
    scales T1    [N, n_blocks]                same dtype as A
    zero_points  omitted (default 2^(bits-1) = 8), or uint8 [N, ceil(n_blocks / 2)] of 0x88
    bias   T1    [N]                          optional input 5 (after the deprecated g_idx)

  (``docs/ContribOperators.md`` of onnxruntime: "for 4 bits, the first 4 bits are stored in
  the lower 4 bits of a byte"; checked end to end against ORT 1.32's CPU kernel in
  ``tests/test_int4_onnx.py``.)

:func:`quantize_onnx_model` rewrites every ``x @ W^T`` of an exported model (``MatMul`` with
a 2-D float initializer, ``MatMul`` fed by ``Transpose(initializer)``, ``Gemm``) into that
form, with the GPTQ weights given, or by round-to-nearest (:func:`rtn_int4`) when none are.

The INT4 ``DequantizeLinear -> MatMul`` form we once wrote for TensorRT, and its lint, are
gone: on NVIDIA's edge GPUs the language model goes through TensorRT Edge-LLM, which builds
its INT4 plugins from the GPTQ checkpoint itself (``edgellm.py``, docs/jetson.md).
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quant_types import Int4Weight

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# models whose tensors add up to more than this are saved with external data (protobuf
# cannot serialise a message over 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30

_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


# --------------------------------------------------------------------------- packing


def _np(t) -> np.ndarray:
    try:
        import torch

        if isinstance(t, torch.Tensor):
            return t.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(t)


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 codes in [0, 15] -> bytes, two per byte along the last axis, element ``2i`` in
    the low nibble and ``2i + 1`` in the high nibble (an odd tail is padded with 0)."""
    u = np.asarray(u, dtype=np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (u[..., 0::2] & 0x0F) | ((u[..., 1::2] & 0x0F) << 4)


def unpack_nibbles(b: np.ndarray, n: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: bytes -> uint8 codes, ``n`` of them on the last axis."""
    b = np.asarray(b, dtype=np.uint8)
    u = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[:-1] + (2 * b.shape[-1],))
    return u if n is None else u[..., :n]


def _check_block(w: Int4Weight, block_size: int | None) -> int:
    bs = w.group_size if block_size is None else int(block_size)
    if w.group_size % bs:
        raise ValueError(f"{w.name}: block size {bs} does not divide the weight's group size {w.group_size} "
                         f"(a block must lie inside one group)")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"{w.name}: block size {bs} is not a power of two >= 16")
    return bs


def _blocked_scales(w: Int4Weight, bs: int, dtype) -> np.ndarray:
    """float ``[out, in / bs]`` (group scales repeated when the block is finer than the group)."""
    s = _np(w.scales).astype(np.float32)
    rep = w.group_size // bs
    if rep > 1:
        s = np.repeat(s, rep, axis=1)
    s = s.astype(dtype)
    if dtype == np.float16 and np.any((s == 0) & (_np(w.scales) != 0)):
        raise ValueError(f"{w.name}: scales underflow in float16")
    return s


@dataclass
class MatMulNBitsPack:
    """The initializers and attributes of one ``com.microsoft.MatMulNBits`` node."""

    B: np.ndarray  # uint8 [N, n_blocks, block_size // 2]
    scales: np.ndarray  # dtype [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks / 2)] or None (default 8)
    K: int
    N: int
    block_size: int
    bits: int = 4

    def attributes(self, accuracy_level: int = 0) -> dict:
        return dict(K=self.K, N=self.N, bits=self.bits, block_size=self.block_size,
                    accuracy_level=int(accuracy_level))


def pack_matmulnbits(w: Int4Weight, block_size: int | None = None, dtype=np.float32,
                     zero_points: bool = False) -> MatMulNBitsPack:
    """:class:`Int4Weight` -> ``MatMulNBits`` initializers (see the module docstring).

    ``block_size`` defaults to the weight's group size; a smaller power of two that divides it
    repeats the group's scale. ``dtype`` is the activation dtype (the scales' dtype must
    match A's). ``zero_points=True`` writes the default zero point 8 explicitly.
    """
    bs = _check_block(w, block_size)
    n_out, k_in = w.shape
    n_blocks = k_in // bs
    u = (_np(w.q).astype(np.int16) + 8).astype(np.uint8).reshape(n_out, n_blocks, bs)
    B = np.ascontiguousarray(pack_nibbles(u))
    scales = np.ascontiguousarray(_blocked_scales(w, bs, np.dtype(dtype).type))
    zp = None
    if zero_points:
        zp = np.full((n_out, (n_blocks + 1) // 2), 0x88, np.uint8)
    return MatMulNBitsPack(B=B, scales=scales, zero_points=zp, K=k_in, N=n_out, block_size=bs)


def rtn_int4(weight, group_size: int = 128, name: str = "", scale_method: str = "signed") -> Int4Weight:
    """Round-to-nearest 4-bit of a float ``weight [out, in]`` on the same symmetric grid as GPTQ
    (``export/gptq.py``: ``rtn_matrix``; by default ``s = max(max(w) / 7, -min(w) / 8)`` per
    group, rounded to float16, ``q = clamp(round(w / s), -8, 7)``)."""
    import torch

    from .gptq import rtn_matrix

    w = torch.as_tensor(_np(weight), dtype=torch.float32)
    if w.shape[1] % group_size:
        raise ValueError(f"{name}: in_features {w.shape[1]} is not a multiple of the group size {group_size}")
    q, s = rtn_matrix(w, group_size, scale_method)
    return Int4Weight(name=name, q=q, scales=s, group_size=group_size)


# --------------------------------------------------------------------------- model rewrite


@dataclass
class QuantizedOnnx:
    """What :func:`quantize_onnx_model` did: the model, and per quantized node the module name."""

    model: onnx.ModelProto
    form: str
    quantized: dict[str, str] = field(default_factory=dict)  # node name -> module name
    skipped: list[str] = field(default_factory=list)  # "node: reason"
    path: Path | None = None
    fused_nodes: int = 0  # MatMulNBits nodes folded into a sibling (fuse_parallel)


def _literal(s: str):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return None


def _strip_weight(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def module_name_candidates(init_name: str, node: onnx.NodeProto,
                           value_meta: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Module names a float weight initializer may belong to, most specific first.

    From: the initializer name (``fc1.weight``); the dynamo exporter's record of a folded
    transpose (``pkg.onnxscript.optimizer.folded_from = "['fc1.weight']"``); the dynamo
    exporter's node scopes (``pkg.torch.onnx.name_scopes = "['', 'fc1', 'linear']"``); the
    legacy exporter's node names (``/fc1/MatMul``).
    """
    out: list[str] = []
    if (m := _strip_weight(init_name)) is not None:
        out.append(m)
    folded = value_meta.get(init_name, {}).get("pkg.onnxscript.optimizer.folded_from")
    if folded and isinstance(src := _literal(folded), (list, tuple)) and len(src) == 1:
        if (m := _strip_weight(str(src[0]))) is not None:
            out.append(m)
    meta = {p.key: p.value for p in node.metadata_props}
    scopes = _literal(meta.get("pkg.torch.onnx.name_scopes", ""))
    if isinstance(scopes, (list, tuple)) and len(scopes) >= 2:
        parts = [str(s) for s in scopes[:-1] if s]
        if parts:
            out.append(".".join(parts))
    if node.name.startswith("/") and node.name.count("/") >= 2:
        out.append(".".join(p for p in node.name.strip("/").split("/")[:-1] if p))
    seen = set()
    return [m for m in out if not (m in seen or seen.add(m))]


def _lookup(weights: Mapping[str, Int4Weight], cands: list[str]) -> tuple[str, Int4Weight] | None:
    for m in cands:
        for key in (m, m + ".weight"):
            if key in weights:
                return m, weights[key]
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto, domain: str = "") -> int | None:
    for o in model.opset_import:
        if o.domain in ((domain,) if domain else ("", "ai.onnx")):
            return o.version
    return None


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                for sn in g.node:
                    names.update(sn.input)
                names |= _subgraph_inputs(g)
    return names


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += 4 * (len(t.float_data) + len(t.int32_data)) + 8 * (len(t.int64_data) + len(t.double_data))
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Save, with all tensors > 1 KiB in ``<name>.data`` beside it when ``external_data`` (default:
    when the tensors add up to more than :data:`EXTERNAL_DATA_THRESHOLD`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        # onnx creates the data file owner-only (0600); give it the graph file's mode, so a service
        # account that can read the bundle's graphs can read their weights too
        shutil.copymode(path, data)
    else:
        onnx.save_model(model, str(path))
    return path


def load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=True)


def quantize_onnx_model(model: onnx.ModelProto | str | os.PathLike,
                        weights: Mapping[str, Int4Weight] | None = None,
                        form: str = "matmulnbits", block_size: int | None = None,
                        out_path: str | os.PathLike | None = None,
                        name_map: Callable[[str], str | None] | Mapping[str, str] | None = None,
                        *, accuracy_level: int = 0, zero_points: bool = False, fuse_bias: bool = True,
                        include: Callable[[str], bool] | None = None, missing: str | None = None,
                        external_data: bool | None = None, inplace: bool = False,
                        fuse_parallel: bool = False) -> QuantizedOnnx:
    """Rewrite every linear layer of ``model`` into ``MatMulNBits`` (``form``: ``"matmulnbits"``, the one form).

    A linear layer is ``MatMul(A, W)`` with ``W`` a 2-D float32/float16 initializer ``[in, out]``,
    ``MatMul(A, Transpose(W'))`` with ``W'`` ``[out, in]``, or ``Gemm(A, W, C)`` (``transA=0``,
    ``alpha = beta = 1``, either ``transB``). Biases stay: a ``Gemm``'s C becomes the
    ``MatMulNBits`` bias input (or an ``Add`` after it), and with ``fuse_bias``
    a ``MatMul``'s lone following ``Add(out, b[N])`` folds into ``MatMulNBits``' bias.

    ``weights``: module name (``fc1``, or ``fc1.weight``) -> :class:`Int4Weight` (its ``bias``
    is not used: the model's own bias is kept). The module of
    an initializer is ``name_map(initializer name)`` when that gives one, else what
    :func:`module_name_candidates` finds. ``weights=None`` quantises each float weight itself
    with :func:`rtn_int4`. ``missing`` says what to do with a layer that has no entry in
    ``weights``: ``"error"`` (the default when weights are given), ``"rtn"``, or ``"skip"``.

    ``block_size``: ``None`` = each weight's group size (128 for round-to-nearest); else it
    must divide the group size. ``accuracy_level``: ``MatMulNBits``' attribute (0 = compute
    in A's dtype; 4 = int8 activations, fastest on CPU). ``include(module_name)`` picks layers.
    ``out_path``: where to save (with external data beside it when ``external_data`` or when
    large).
    ``fuse_parallel`` (``matmulnbits``): layers reading one input (q/k/v, gate/up) become one
    node and a ``Split`` (:mod:`.int4_fuse`).
    """
    if form != "matmulnbits":
        raise ValueError(f"form must be 'matmulnbits', not {form!r} (the INT4 QDQ form for TensorRT is retired: "
                         "TensorRT Edge-LLM builds the language model from the GPTQ checkpoint, export --edgellm)")
    missing = missing or ("error" if weights is not None else "rtn")
    if missing not in ("error", "rtn", "skip"):
        raise ValueError(f"missing must be 'error', 'rtn' or 'skip', not {missing!r}")
    src = load_model(model)
    if isinstance(model, onnx.ModelProto) and not inplace:
        m = onnx.ModelProto()
        m.CopyFrom(src)
    else:
        m = src
    g = m.graph
    res = QuantizedOnnx(model=m, form=form)

    inits = {t.name: t for t in g.initializer}
    value_meta = {v.name: {p.key: p.value for p in v.metadata_props} for v in g.value_info}
    for t in g.initializer:
        if t.metadata_props:
            value_meta.setdefault(t.name, {}).update({p.key: p.value for p in t.metadata_props})
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    packed: dict[tuple[str, bool], tuple] = {}  # shared (tied) weights are packed once
    replace: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> new nodes
    drop: set[int] = set()
    transposes: list[onnx.NodeProto] = []  # Transpose(W) nodes that may be left unused
    new_inits: list[TensorProto] = []
    used_names = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | \
                 {i.name for i in g.input}

    def fresh(base: str, suffixes: tuple[str, ...] = ("",)) -> str:
        """A name not yet in the graph (nor any ``name + suffix``), now reserved."""
        base = base.replace("/", "_").strip("_") or "w"
        name, k = base, 1
        while any(name + s in used_names for s in suffixes):
            k += 1
            name = f"{base}_{k}"
        used_names.update(name + s for s in suffixes)
        return name

    for idx, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        label = node.name or f"{node.op_type}#{idx}"
        if len(node.input) < 2:
            continue
        b_name = node.input[1]
        transposed = False  # True: the tensor is [out, in] (W itself), else [in, out] (W^T)
        t_node = None
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or (
                    len(node.input) > 2 and node.input[2] and _attr(node, "beta", 1.0) != 1.0):
                res.skipped.append(f"{label}: Gemm with transA / alpha / beta")
                continue
            transposed = bool(_attr(node, "transB", 0))
        if b_name not in inits and node.op_type == "MatMul":
            p = producers.get(b_name)
            if p is not None and p.op_type == "Transpose" and p.input[0] in inits and \
                    list(_attr(p, "perm", [1, 0])) == [1, 0]:
                t_node, b_name, transposed = p, p.input[0], True
        if b_name not in inits or node.input[0] in inits:
            continue
        t = inits[b_name]
        if t.data_type not in _FLOAT_TYPES or len(t.dims) != 2:
            if len(t.dims) == 2:
                res.skipped.append(f"{label}: weight {b_name} is {TensorProto.DataType.Name(t.data_type)}")
            continue
        dtype = _FLOAT_TYPES[t.data_type]
        n_out, k_in = (t.dims[0], t.dims[1]) if transposed else (t.dims[1], t.dims[0])

        key = (b_name, transposed)
        if key not in packed:
            if callable(name_map):
                mapped = name_map(b_name)
            elif name_map is not None:
                mapped = name_map.get(b_name)
            else:
                mapped = None
            cands = ([mapped] if mapped else []) + module_name_candidates(b_name, node, value_meta)
            module = cands[0] if cands else b_name
            if include is not None and not include(module):
                res.skipped.append(f"{label}: excluded ({module})")
                continue
            w = None
            if weights is not None:
                hit = _lookup(weights, cands)
                if hit is not None:
                    module, w = hit
                elif missing == "error":
                    raise KeyError(f"no Int4Weight for {label} (weight {b_name}); tried {cands}")
                elif missing == "skip":
                    res.skipped.append(f"{label}: no Int4Weight (tried {cands})")
                    continue
            if w is not None and tuple(w.shape) != (n_out, k_in):
                raise ValueError(f"{label}: Int4Weight {w.name or module} is {list(w.shape)}, the ONNX weight "
                                 f"{b_name} is [out={n_out}, in={k_in}]")
            if w is None:
                gs = block_size or 128
                if k_in % gs:
                    res.skipped.append(f"{label}: in_features {k_in} not a multiple of block size {gs}")
                    continue
                arr = numpy_helper.to_array(t).astype(np.float32)
                w = rtn_int4(arr if transposed else arr.T, gs, module)
            prefix = fresh(module or b_name, ("_q4", "_scales", "_scale", "_zp"))
            pk = pack_matmulnbits(w, block_size, dtype, zero_points=zero_points)
            tensors = [numpy_helper.from_array(pk.B, prefix + "_q4"),
                       numpy_helper.from_array(pk.scales, prefix + "_scales")]
            if pk.zero_points is not None:
                tensors.append(numpy_helper.from_array(pk.zero_points, prefix + "_zp"))
            packed[key] = (pk, [x.name for x in tensors], module)
            new_inits.extend(tensors)
        pk, names, module = packed[key]

        # bias: Gemm's C (the MatMulNBits bias input when it is a constant [N], else an Add
        # after the node), or (MatMulNBits, fuse_bias) a MatMul's only consumer Add(out, b[N])
        bias, add_node, gemm_add = None, None, None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if c is not None and int(np.prod(c.dims)) == n_out and \
                    c.data_type == t.data_type:
                bias = node.input[2]
                if list(c.dims) != [n_out]:
                    nb = numpy_helper.from_array(numpy_helper.to_array(c).reshape(n_out), fresh(bias + "_n"))
                    new_inits.append(nb)
                    bias = nb.name
            else:
                gemm_add = node.input[2]
        elif node.op_type == "MatMul" and fuse_bias and \
                node.output[0] not in graph_outputs and len(consumers.get(node.output[0], [])) == 1:
            a = consumers[node.output[0]][0]
            if a.op_type == "Add" and a.domain in ("", "ai.onnx") and len(a.input) == 2:
                other = a.input[1] if a.input[0] == node.output[0] else a.input[0]
                c = inits.get(other)
                if c is not None and list(c.dims) == [n_out] and c.data_type == t.data_type:
                    bias, add_node = other, a

        out = node.output[0]
        nodes: list[onnx.NodeProto] = []
        mm_out = fresh(out + "_mm") if gemm_add else (add_node.output[0] if add_node else out)
        ins = [node.input[0], names[0], names[1]]
        if len(names) > 2 or bias is not None:
            ins.append(names[2] if len(names) > 2 else "")
        if bias is not None:
            ins += ["", bias]  # g_idx (deprecated) is input 4, bias input 5
        nodes.append(helper.make_node("MatMulNBits", ins, [mm_out], name=fresh(label + "_q4"),
                                      domain=MS_DOMAIN, **pk.attributes(accuracy_level)))
        if gemm_add:
            nodes.append(helper.make_node("Add", [mm_out, gemm_add], [out], name=fresh(label + "_bias")))
        for n in nodes:
            n.metadata_props.extend(node.metadata_props)
        replace[id(node)] = nodes
        if add_node is not None:
            drop.add(id(add_node))
        if t_node is not None:
            transposes.append(t_node)
        res.quantized[label] = module

    if not replace:
        log.warning("no linear layer was quantized")
    kept: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) in drop:
            continue
        kept.extend(replace.get(id(n), [n]))
    read = {i for n in kept for i in n.input} | _subgraph_inputs(g) | graph_outputs
    dead_t = {id(t) for t in transposes if t.output[0] not in read}
    del g.node[:]
    g.node.extend(n for n in kept if id(n) not in dead_t)
    g.initializer.extend(new_inits)
    # drop the float weights nothing reads any more
    live = {i for n in g.node for i in n.input} | _subgraph_inputs(g) | graph_outputs
    dead = [t for t in g.initializer if t.name not in live]
    for t in dead:
        g.initializer.remove(t)
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    for v in [v for v in g.value_info if v.name not in known]:
        g.value_info.remove(v)
    if replace and _opset(m, MS_DOMAIN) is None:
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if fuse_parallel:
        from .int4_fuse import fuse_parallel_matmulnbits, pack_attention_inputs

        res.fused_nodes = fuse_parallel_matmulnbits(m)
        pack_attention_inputs(m)
    if out_path is not None:
        res.path = save_model(m, out_path, external_data)
    return res
