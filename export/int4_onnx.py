"""4-bit weights in ONNX: two forms from the same :class:`Int4Weight`, and a TensorRT lint.

Both forms hold exactly the same numbers, ``W[out, in] = q * scale`` per block of
``block_size`` consecutive input columns, symmetric (no zero point in signed form):

``matmulnbits`` -- ONNX Runtime's contrib op ``com.microsoft.MatMulNBits`` (CPU/CUDA EPs)::

    Y = A @ dequant(B)^T (+ bias)     A [..., K], Y [..., N]   (K = in, N = out)
    B      uint8 [N, n_blocks, block_size / 2]  unsigned codes u = q + 8, two per byte
                                              along K, the even element in the LOW nibble
    scales T1    [N, n_blocks]                same dtype as A
    zero_points  omitted (default 2^(bits-1) = 8), or uint8 [N, ceil(n_blocks / 2)] of 0x88
    bias   T1    [N]                          optional input 5 (after the deprecated g_idx)

  (``docs/ContribOperators.md`` of onnxruntime: "for 4 bits, the first 4 bits are stored in
  the lower 4 bits of a byte"; checked end to end against ORT 1.32's CPU kernel in
  ``tests/test_int4_onnx.py``.)

``qdq`` -- standard ONNX (opset >= 21), the form TensorRT builds weight-only INT4 from::

    W = DequantizeLinear(Bq, scales, axis=0, block_size=bs)   W [K, N] = W_linear^T
    Y = MatMul(A, W) (+ Add(bias))
    Bq     INT4  [K, N]        signed q^T, packed two per byte in row-major order, the even
                               (flat) element in the low nibble (ONNX IR 4-bit packing)
    scales T     [K / bs, N]   float32 / float16; blocked along axis 0 = the reduction axis
    zero point   omitted (TensorRT accepts only zeros; ``zero_point=True`` writes INT4 zeros)

:func:`quantize_onnx_model` rewrites every ``x @ W^T`` of an exported model (``MatMul`` with
a 2-D float initializer, ``MatMul`` fed by ``Transpose(initializer)``, ``Gemm``) into one of
the two forms, with the GPTQ weights given, or by round-to-nearest (:func:`rtn_int4`) when
none are. :func:`lint_tensorrt_qdq` checks a QDQ graph against TensorRT's INT4 rules.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .quant_types import Int4Weight

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
QDQ_MIN_OPSET = 21  # DequantizeLinear with INT4 input and the block_size attribute
INT4_MIN_IR = 10  # ONNX IR version that introduced INT4 / UINT4
TRT_INT4_BLOCK_SIZES = (64, 128)
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


def int4_tensor(name: str, values: np.ndarray) -> TensorProto:
    """A signed ``TensorProto.INT4`` initializer from int values in [-8, 7] (any shape), packed
    two per byte in row-major order, the even flat element in the low nibble."""
    v = np.asarray(values)
    if v.size and (v.min() < -8 or v.max() > 7):
        raise ValueError(f"{name}: INT4 values must lie in [-8, 7]")
    raw = pack_nibbles((v.astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)).tobytes()
    return helper.make_tensor(name, TensorProto.INT4, list(v.shape), vals=raw, raw=True)


@dataclass
class QdqPack:
    """The initializers and attributes of one blocked ``DequantizeLinear`` feeding ``MatMul``."""

    q: np.ndarray  # int8 [K, N] in [-8, 7] (stored as INT4)
    scales: np.ndarray  # dtype [K / block_size, N]
    zero_point: np.ndarray | None  # int8 zeros [K / block_size, N] (stored as INT4) or None
    block_size: int
    axis: int = 0

    def tensors(self, prefix: str) -> tuple[TensorProto, TensorProto, TensorProto | None]:
        q = int4_tensor(prefix + "_q4", self.q)
        s = numpy_helper.from_array(self.scales, prefix + "_scale")
        z = None if self.zero_point is None else int4_tensor(prefix + "_zp", self.zero_point)
        return q, s, z


def pack_qdq_int4(w: Int4Weight, block_size: int | None = None, dtype=np.float32,
                  zero_point: bool = False) -> QdqPack:
    """:class:`Int4Weight` -> blocked INT4 ``DequantizeLinear`` operands for ``MatMul(A, W^T)``:
    the weight transposed to ``[in, out]``, blocked along axis 0 (the reduction axis)."""
    bs = _check_block(w, block_size)
    q = np.ascontiguousarray(_np(w.q).astype(np.int8).T)
    scales = np.ascontiguousarray(_blocked_scales(w, bs, np.dtype(dtype).type).T)
    zp = np.zeros_like(scales, dtype=np.int8) if zero_point else None
    return QdqPack(q=q, scales=scales, zero_point=zp, block_size=bs)


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


def _set_opset(model: onnx.ModelProto, domain: str, version: int):
    for o in model.opset_import:
        if o.domain == domain or (not domain and o.domain == "ai.onnx"):
            o.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def _ensure_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    cur = _opset(model) or 1
    if cur >= QDQ_MIN_OPSET:
        return model
    try:
        from onnx import version_converter

        conv = version_converter.convert_version(model, QDQ_MIN_OPSET)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        log.warning("opset %d -> %d conversion failed (%s); bumping the opset import only", cur,
                    QDQ_MIN_OPSET, e)
        _set_opset(model, "", QDQ_MIN_OPSET)
        return model
    log.info("converted the model from opset %d to %d", cur, QDQ_MIN_OPSET)
    # the converter drops metadata_props, which name the torch modules: carry them over
    old_nodes, new_nodes = list(model.graph.node), list(conv.graph.node)
    if len(old_nodes) == len(new_nodes) and all(a.op_type == b.op_type for a, b in zip(old_nodes, new_nodes)):
        pairs = zip(old_nodes, new_nodes)
    else:
        by_name = {n.name: n for n in old_nodes if n.name}
        pairs = ((by_name[n.name], n) for n in new_nodes if n.name in by_name)
    for a, b in pairs:
        if a.metadata_props and not b.metadata_props:
            b.metadata_props.extend(a.metadata_props)
    meta = {v.name: v.metadata_props for v in model.graph.value_info if v.metadata_props}
    have = {v.name for v in conv.graph.value_info}
    for v in conv.graph.value_info:
        if v.name in meta and not v.metadata_props:
            v.metadata_props.extend(meta[v.name])
    for v in model.graph.value_info:
        if v.metadata_props and v.name not in have:
            conv.graph.value_info.append(v)
    return conv


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
    """Rewrite every linear layer of ``model`` into 4-bit ``form`` (``"matmulnbits"`` / ``"qdq"``).

    A linear layer is ``MatMul(A, W)`` with ``W`` a 2-D float32/float16 initializer ``[in, out]``,
    ``MatMul(A, Transpose(W'))`` with ``W'`` ``[out, in]``, or ``Gemm(A, W, C)`` (``transA=0``,
    ``alpha = beta = 1``, either ``transB``). Biases stay: a ``Gemm``'s C becomes the
    ``MatMulNBits`` bias input (or an ``Add`` after the QDQ ``MatMul``), and with ``fuse_bias``
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
    large). The QDQ form raises the model to opset 21 (via onnx's version converter).
    ``fuse_parallel`` (``matmulnbits``): layers reading one input (q/k/v, gate/up) become one
    node and a ``Split`` (:mod:`.int4_fuse`).
    """
    if form not in ("matmulnbits", "qdq"):
        raise ValueError(f"form must be 'matmulnbits' or 'qdq', not {form!r}")
    missing = missing or ("error" if weights is not None else "rtn")
    if missing not in ("error", "rtn", "skip"):
        raise ValueError(f"missing must be 'error', 'rtn' or 'skip', not {missing!r}")
    src = load_model(model)
    if isinstance(model, onnx.ModelProto) and not inplace:
        m = onnx.ModelProto()
        m.CopyFrom(src)
    else:
        m = src
    if form == "qdq":
        m = _ensure_qdq_opset(m)
    m.ir_version = max(m.ir_version, INT4_MIN_IR)
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
            if form == "matmulnbits":
                pk = pack_matmulnbits(w, block_size, dtype, zero_points=zero_points)
                tensors = [numpy_helper.from_array(pk.B, prefix + "_q4"),
                           numpy_helper.from_array(pk.scales, prefix + "_scales")]
                if pk.zero_points is not None:
                    tensors.append(numpy_helper.from_array(pk.zero_points, prefix + "_zp"))
                packed[key] = (pk, [x.name for x in tensors], module)
            else:
                pk = pack_qdq_int4(w, block_size, dtype, zero_point=zero_points)
                tensors = [x for x in pk.tensors(prefix) if x is not None]
                packed[key] = (pk, [x.name for x in tensors], module)
            new_inits.extend(tensors)
        pk, names, module = packed[key]

        # bias: Gemm's C (the MatMulNBits bias input when it is a constant [N], else an Add
        # after the node), or (MatMulNBits, fuse_bias) a MatMul's only consumer Add(out, b[N])
        bias, add_node, gemm_add = None, None, None
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if form == "matmulnbits" and c is not None and int(np.prod(c.dims)) == n_out and \
                    c.data_type == t.data_type:
                bias = node.input[2]
                if list(c.dims) != [n_out]:
                    nb = numpy_helper.from_array(numpy_helper.to_array(c).reshape(n_out), fresh(bias + "_n"))
                    new_inits.append(nb)
                    bias = nb.name
            else:
                gemm_add = node.input[2]
        elif node.op_type == "MatMul" and form == "matmulnbits" and fuse_bias and \
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
        if form == "matmulnbits":
            ins = [node.input[0], names[0], names[1]]
            if len(names) > 2 or bias is not None:
                ins.append(names[2] if len(names) > 2 else "")
            if bias is not None:
                ins += ["", bias]  # g_idx (deprecated) is input 4, bias input 5
            nodes.append(helper.make_node("MatMulNBits", ins, [mm_out], name=fresh(label + "_q4"),
                                          domain=MS_DOMAIN, **pk.attributes(accuracy_level)))
        else:
            w_out = fresh(f"{module}_w_dq")
            nodes.append(helper.make_node("DequantizeLinear", names, [w_out], name=fresh(label + "_dq"),
                                          axis=pk.axis, block_size=pk.block_size))
            nodes.append(helper.make_node("MatMul", [node.input[0], w_out], [mm_out], name=fresh(label + "_q4")))
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
    if form == "matmulnbits" and replace and _opset(m, MS_DOMAIN) is None:
        m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if form == "matmulnbits" and fuse_parallel:
        from .int4_fuse import fuse_parallel_matmulnbits

        res.fused_nodes = fuse_parallel_matmulnbits(m)
    if out_path is not None:
        res.path = save_model(m, out_path, external_data)
    return res


# --------------------------------------------------------------------------- TensorRT lint


def lint_tensorrt_qdq(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """Violations of TensorRT's weight-only INT4 rules in a QDQ graph (``[]``: none found).

    Rules (TensorRT docs: "Quantization Schemes" -- INT4 is weight-only, per-block scales,
    block sizes {64, 128}; ``IDequantizeLayer`` -- symmetric, zero points absent or all zero,
    scales a build-time constant, strictly positive, blocked along one of the last two axes):
    the default opset is >= 21 (blocked ``DequantizeLinear``); no ``com.microsoft`` (or other
    custom-domain) op such as ``MatMulNBits``; every ``DequantizeLinear`` dequantises a 2-D
    signed INT4 constant (never an activation), with float32 / float16 / bfloat16 constant
    positive scales of the input's rank blocked along axis 0 of the ``[K, N]`` weight (the
    reduction axis of ``MatMul``) with ``block_size`` 64 or 128 and the matching scale shape
    ``[ceil(K / block), N]``, an INT4 zero point that is absent or all zero, and its output
    feeding only ``MatMul`` nodes, as their B input.
    """
    m = load_model(model)
    g = m.graph
    out: list[str] = []
    opset = _opset(m) or 0
    if opset < QDQ_MIN_OPSET:
        out.append(f"model: default-domain opset {opset} < {QDQ_MIN_OPSET} (blocked INT4 DequantizeLinear needs 21)")
    consts: dict[str, TensorProto] = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            v = _attr(n, "value", None)
            if isinstance(v, TensorProto):
                consts[n.output[0]] = v
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def nm(n: onnx.NodeProto) -> str:
        return f"node '{n.name or n.output[0]}' ({n.op_type})"

    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            out.append(f"{nm(n)}: custom-domain op '{n.domain}.{n.op_type}' is not a TensorRT ONNX op"
                       + (" (use the QDQ form: DequantizeLinear -> MatMul)" if n.op_type == "MatMulNBits" else ""))
            continue
        if n.op_type != "DequantizeLinear":
            continue
        x = consts.get(n.input[0])
        if x is None:
            out.append(f"{nm(n)}: input '{n.input[0]}' is not a constant; INT4 is weight-only in TensorRT")
            continue
        if x.data_type != TensorProto.INT4:
            out.append(f"{nm(n)}: weight '{x.name or n.input[0]}' is {TensorProto.DataType.Name(x.data_type)}, "
                       f"not INT4")
            continue
        shape = list(x.dims)
        if len(shape) != 2:
            out.append(f"{nm(n)}: INT4 weight has rank {len(shape)}, expected a 2-D [K, N] MatMul weight")
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            out.append(f"{nm(n)}: scale '{n.input[1] if len(n.input) > 1 else ''}' is not a constant")
        else:
            if scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
                out.append(f"{nm(n)}: scale dtype {TensorProto.DataType.Name(scale.data_type)} is not "
                           f"float32/float16/bfloat16")
            elif scale.data_type != TensorProto.BFLOAT16:
                sv = numpy_helper.to_array(scale).astype(np.float32)
                if not np.all(sv > 0) or not np.all(np.isfinite(sv)):
                    out.append(f"{nm(n)}: scales must be finite and strictly positive "
                               f"({int(np.sum(~(sv > 0)))} are not)")
        block = _attr(n, "block_size", 0)
        axis = _attr(n, "axis", 1)
        if len(shape) == 2:
            axis_n = axis + 2 if axis < 0 else axis
            if not block:
                out.append(f"{nm(n)}: no block_size (per-tensor / per-channel INT4); TensorRT's INT4 needs "
                           f"block quantization with block size 64 or 128")
            else:
                if block not in TRT_INT4_BLOCK_SIZES:
                    out.append(f"{nm(n)}: block_size {block} not in {list(TRT_INT4_BLOCK_SIZES)}")
                if axis_n != 0:
                    out.append(f"{nm(n)}: blocked along axis {axis}; the [K, N] MatMul weight must be blocked "
                               f"along axis 0 (K, the reduction axis)")
                if scale is not None:
                    want = [-(-shape[0] // block), shape[1]] if axis_n == 0 else [shape[0], -(-shape[1] // block)]
                    if list(scale.dims) != want:
                        out.append(f"{nm(n)}: scale shape {list(scale.dims)} does not match the weight "
                                   f"{shape} blocked by {block} along axis {axis} (expected {want})")
                    if shape[axis_n] % block:
                        out.append(f"{nm(n)}: dimension {shape[axis_n]} is not a multiple of block_size {block}")
        if len(n.input) > 2 and n.input[2]:
            zp = consts.get(n.input[2])
            if zp is None:
                out.append(f"{nm(n)}: zero point '{n.input[2]}' is not a constant")
            else:
                if zp.data_type != x.data_type:
                    out.append(f"{nm(n)}: zero point dtype {TensorProto.DataType.Name(zp.data_type)} differs "
                               f"from the weight's INT4")
                try:
                    zv = numpy_helper.to_array(zp)
                    nonzero = int(np.count_nonzero(zv.astype(np.int32)))
                except Exception:  # noqa: BLE001
                    nonzero = -1
                if nonzero:
                    out.append(f"{nm(n)}: zero point must be absent or all zero (TensorRT is symmetric-only); "
                               f"{nonzero if nonzero > 0 else 'some'} entries are non-zero")
                if scale is not None and list(zp.dims) != list(scale.dims):
                    out.append(f"{nm(n)}: zero point shape {list(zp.dims)} differs from the scale's "
                               f"{list(scale.dims)}")
        users = consumers.get(n.output[0], [])
        if n.output[0] in graph_outputs:
            out.append(f"{nm(n)}: output '{n.output[0]}' is a graph output; it must feed MatMul")
        if not users:
            out.append(f"{nm(n)}: output '{n.output[0]}' feeds nothing")
        for u in users:
            if u.op_type != "MatMul" or u.domain not in ("", "ai.onnx"):
                out.append(f"{nm(n)}: output feeds {nm(u)}, not MatMul directly")
            elif len(u.input) < 2 or u.input[1] != n.output[0] or u.input[0] == n.output[0]:
                out.append(f"{nm(n)}: output is not the B (weight) input of {nm(u)}")
    return out
