"""``decoder.onnx`` written node by node with ONNX Runtime's fused decoder ops.

Why not ``torch.onnx.export`` of the language model: the exporter spells every layer out in
standard ops (norm as five nodes, rotary as a dozen, attention as MatMul/Softmax/MatMul over
a KV cache that a ``Concat`` copies in full every step). On a 2-core CPU that per-op and
per-copy overhead, not the 4-bit weight bytes, set the decode speed (``benchmarks/peers.py``:
0.75x llama.cpp). onnxruntime-genai's builder writes its decoders with the contrib ops below,
and so does this module, for our Qwen2.5-VL language model:

- ``SkipSimplifiedLayerNormalization`` (``com.microsoft``): RMSNorm fused with the residual
  add that precedes it (the first norm, with no residual, is ONNX's ``RMSNormalization``);
- ``GroupQueryAttention`` (``com.microsoft``): rotary embedding, grouped attention and the KV
  cache write in one op. The cache is one buffer per layer and side, ``[B, kv, capacity, d]``,
  bound as both ``past`` and ``present`` (ONNX Runtime then writes the new rows in place:
  "past-present share buffer"), so a decode step copies nothing;
- every linear layer a plain ``MatMul`` (+ ``Add`` bias) named as the 4-bit rewrite expects
  (``<module>.weight_t`` = ``W^T``, ``<module>.bias``; :mod:`.int4_onnx` turns them into
  ``MatMulNBits`` and fuses q/k/v and gate/up);
- the LM head over the last position only (prefill needs one token's logits, not ``L x V``).

M-RoPE without a rotary graph: ``GroupQueryAttention`` rotates by ``cos_cache[position_ids]``,
one angle per frequency. Qwen2.5-VL's M-RoPE gives each frequency its own axis (t, h or w), so
the host computes the rows for exactly the tokens of this call (``fusar_edge.model.rope.
rotary_rows``) and passes ``position_ids = 0..S-1`` into them. For text tokens the three axes
agree and the row is plain RoPE.

I/O (``B`` batch, ``S`` new tokens, ``M`` cache capacity, ``C`` hidden, ``d`` head dim)::

    inputs_embeds               [B, S, C]
    seqlens_k                   int32 [B]      tokens in the cache after this call, minus one
    total_sequence_length       int32 []       the same plus one (equal for every sequence)
    position_ids                int64 [B, S]   rows of cos_cache / sin_cache for the new tokens
    cos_cache, sin_cache        float [R, d/2] rotation of each row (R >= S)
    past_key_values.{i}.key     [B, kv, M, d]  (and .value) the cache buffer, bound as present too
    -> logits                   float32 [B, 1, V]   the last position's
       last_hidden_state        [B, S, C]           final-normed (GRASP's question pass)
       present.{i}.key          [B, kv, M, d]       (and .value) the same buffer, rows written
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
RMS_NORM_OPSET = 23  # ONNX's RMSNormalization
GRAPH_KIND = "gqa-shared-kv"  # stages.json decoder.graph: this graph's I/O contract

_ONNX_DTYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


class _Graph:
    """The nodes and initializers of one graph, named after the modules they come from."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, array: np.ndarray, dtype=None) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype or self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, name: str, domain: str = "", outputs=None,
             **attrs) -> list[str]:
        outs = outputs or [f"{name}/out{i}" if n_out > 1 else f"{name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def linear(self, x: str, module: str, weight, bias=None) -> str:
        """``x @ W^T (+ b)``: the node pair the 4-bit rewrite replaces by ``MatMulNBits``."""
        w_t = self.init(f"{module}.weight_t", _np(weight).T)
        (y,) = self.node("MatMul", [x, w_t], name=f"{module}/MatMul")
        if bias is None:
            return y
        b = self.init(f"{module}.bias", _np(bias))
        (y,) = self.node("Add", [y, b], name=f"{module}/Add")
        return y


def decoder_spec(model) -> dict:
    """What the runtime needs to feed ``decoder.onnx`` (stored under ``stages.json`` ``decoder``)."""
    lm = model.language_model
    text = lm.config
    attn = lm.layers[0].self_attn
    rope = lm.rotary_emb
    section = [int(s) for s in getattr(rope, "mrope_section", None) or text.rope_parameters["mrope_section"]]
    scaling = float(getattr(rope, "attention_scaling", 1.0))
    return {
        "graph": GRAPH_KIND,
        "num_layers": int(text.num_hidden_layers),
        "num_heads": int(text.num_attention_heads),
        "num_kv_heads": int(text.num_key_value_heads),
        "head_dim": int(attn.head_dim),
        "vocab_size": int(text.vocab_size),
        "rope": {"inv_freq": [float(f) for f in _np(rope.inv_freq).astype(np.float64)],
                 "mrope_section": section, "attention_scaling": scaling},
    }


def build_decoder(model, opset: int = 21) -> onnx.ModelProto:
    """The language model + LM head of a ``FusarModel`` as one ONNX graph (see the module docstring)."""
    lm = model.language_model
    text = lm.config
    act = getattr(text, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"decoder graph: hidden_act {act!r} (this builder writes SiLU MLPs only)")
    dtype = np.dtype(str(model.dtype).replace("torch.", ""))
    if dtype not in _ONNX_DTYPE:
        raise ValueError(f"decoder graph: dtype {dtype} (float32 or float16)")
    elem = _ONNX_DTYPE[dtype]
    n_layers, heads, kv = int(text.num_hidden_layers), int(text.num_attention_heads), int(text.num_key_value_heads)
    c, head_dim, vocab = int(text.hidden_size), int(lm.layers[0].self_attn.head_dim), int(text.vocab_size)
    eps = float(text.rms_norm_eps)
    prefix = backbone_prefix(model, lm)
    g = _Graph(dtype)

    def norm_weight(module) -> np.ndarray:
        return _np(module.weight)

    x = "inputs_embeds"
    # the first norm has no residual to fuse: ONNX's own RMSNormalization (opset 23)
    (h,) = g.node("RMSNormalization", [x, g.init(f"{prefix}layers.0.input_layernorm.weight",
                                                 norm_weight(lm.layers[0].input_layernorm))],
                  name=f"{prefix}layers.0.input_layernorm", axis=-1, epsilon=eps, stash_type=1)
    residual = x
    for i, layer in enumerate(lm.layers):
        p = f"{prefix}layers.{i}."
        sa, mlp = layer.self_attn, layer.mlp
        q = g.linear(h, p + "self_attn.q_proj", sa.q_proj.weight, sa.q_proj.bias)
        k = g.linear(h, p + "self_attn.k_proj", sa.k_proj.weight, sa.k_proj.bias)
        v = g.linear(h, p + "self_attn.v_proj", sa.v_proj.weight, sa.v_proj.bias)
        attn_out, _, _ = g.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache", "position_ids"],
            name=p + "self_attn/GroupQueryAttention", domain=MS_DOMAIN,
            outputs=[p + "self_attn/out", f"present.{i}.key", f"present.{i}.value"],
            num_heads=heads, kv_num_heads=kv, scale=float(sa.scaling), do_rotary=1, rotary_interleaved=0)
        o = g.linear(attn_out, p + "self_attn.o_proj", sa.o_proj.weight, sa.o_proj.bias)
        h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                   [o, residual, g.init(p + "post_attention_layernorm.weight",
                                                        norm_weight(layer.post_attention_layernorm))],
                                   4, name=p + "post_attention_layernorm", domain=MS_DOMAIN, epsilon=eps)
        gate = g.linear(h, p + "mlp.gate_proj", mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = g.linear(h, p + "mlp.up_proj", mlp.up_proj.weight, mlp.up_proj.bias)
        (sig,) = g.node("Sigmoid", [gate], name=p + "mlp/Sigmoid")
        (silu,) = g.node("Mul", [gate, sig], name=p + "mlp/SiLU")
        (hidden,) = g.node("Mul", [silu, up], name=p + "mlp/Mul")
        down = g.linear(hidden, p + "mlp.down_proj", mlp.down_proj.weight, mlp.down_proj.bias)
        if i + 1 < n_layers:
            nxt, w_name = lm.layers[i + 1].input_layernorm, f"{prefix}layers.{i + 1}.input_layernorm"
        else:
            nxt, w_name = lm.norm, f"{prefix}norm"
        h, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                   [down, residual, g.init(w_name + ".weight", norm_weight(nxt))], 4,
                                   name=w_name, domain=MS_DOMAIN, epsilon=eps,
                                   outputs=None if i + 1 < n_layers else
                                   ["last_hidden_state", w_name + "/mean", w_name + "/inv_std",
                                    w_name + "/residual"])
    # the LM head over the last position only
    starts, ends, axes = (g.init(f"last_token/{n}", np.array([v], np.int64), np.int64)
                          for n, v in (("starts", -1), ("ends", np.iinfo(np.int64).max), ("axes", 1)))
    (last,) = g.node("Slice", ["last_hidden_state", starts, ends, axes], name="last_token/Slice")
    logits = g.linear(last, "lm_head", model.lm_head.weight, getattr(model.lm_head, "bias", None))
    if elem != TensorProto.FLOAT:
        (logits,) = g.node("Cast", [logits], name="logits/Cast", to=TensorProto.FLOAT)
    g.nodes[-1].output[0] = "logits"

    cache = ["batch_size", kv, "capacity", head_dim]
    inputs = [helper.make_tensor_value_info("inputs_embeds", elem, ["batch_size", "sequence_length", c]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("cos_cache", elem, ["rotary_rows", head_dim // 2]),
              helper.make_tensor_value_info("sin_cache", elem, ["rotary_rows", head_dim // 2])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, vocab]),
               helper.make_tensor_value_info("last_hidden_state", elem, ["batch_size", "sequence_length", c])]
    for i in range(n_layers):
        for side in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{side}", elem, cache))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{side}", elem, cache))
    graph = helper.make_graph(g.nodes, "fusar_decoder", inputs, outputs, g.inits)
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(int(opset), RMS_NORM_OPSET)),
                                                          helper.make_opsetid(MS_DOMAIN, 1)],
                                    producer_name="fusar-edge")
    model_proto.ir_version = 10
    return model_proto


def backbone_prefix(model, lm) -> str:
    """The language model's module path inside the backbone (``model.language_model.``)."""
    for name, module in model.backbone.named_modules():
        if module is lm:
            return f"{name}." if name else ""
    return "model.language_model."

