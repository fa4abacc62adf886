"""ONNX export of the FUSAR stages, and their parity against the torch model.

``export_stages(model, out_dir)`` writes four graphs plus ``stages.json`` (their I/O, the
chip geometry they were built for, sha256 of every file):

``vision.onnx``  ViT + patch merger + TLM, static shapes for the bundle's chip size::

    pixel_values     float32 [N, 3*t*p*p]   N = patch_grid h*w (chip_to_patches order)
    anchor_weights   float32 [T, S]         TLM's A = kernels.tlm.tlm_weights(...), zero-padded to S columns
    anchor_features  float32 [S, 64]        AEF vectors, zero rows where padded
    -> visual_tokens [T, C]                 T = token_grid h*w, raster order

  The ``anchor_*`` inputs exist only when the bundle has TLM. S is fixed per export
  (``max_anchors``, default 256 = the tile store's default 16x16 grid); the host pads an
  anchor set with zero columns of A (= masked anchors, which is what masking means in
  A) and refuses sets larger than S. No anchors: A = 0, so ``y = x * (1 + 0) + 0 = x``
  exactly, i.e. the graph's output is the un-modulated tower, bit for bit.

``embed.onnx``   the token embedding (question pass, prefill text, every decode step)::

    input_ids int64 [batch_size, sequence_length] -> inputs_embeds [batch_size, sequence_length, C]

``fusion.onnx``  GRASP + the splice::

    text_embeds     [1, L, C]    embed(input_ids) of the chat sequence with its placeholders
    visual_tokens   [T, C]       vision's output
    image_start     int64 [1]    first image placeholder (SequenceLayout.image_start)
    question_hidden [1, Lq, C]   (GRASP) the decoder's last_hidden_state over the question
    prompt_start    int64 [1]    (GRASP) first prompt slot
    -> inputs_embeds [1, L, C], grasp_weights float32 [N_blocks] (GRASP)

``decoder.onnx`` the language model + LM head over a KV cache written in place, built by
:mod:`.decoder_graph` with ONNX Runtime's fused decoder ops (its docstring gives the I/O):
``inputs_embeds``, the cache buffers ``past_key_values.{i}.key|value`` (bound again as
``present.*``), and where the new tokens sit (``seqlens_k``, ``total_sequence_length``,
``position_ids`` into the host-computed M-RoPE rows ``cos_cache`` / ``sin_cache``) ->
the last position's ``logits`` and ``last_hidden_state`` (final-normed; GRASP's question pass).
It runs in ONNX Runtime only (``com.microsoft`` ops); the other three stages are standard ONNX.

Why this split rather than one ``fusion.onnx`` holding the question pass: the question
pass is the language model itself. Putting it into the fusion graph would store the LLM's
weights twice (7B: +15 GB in fp16, and twice the int4 rewrite); here the runner runs the
question through ``embed.onnx`` + ``decoder.onnx`` (no past) and hands the hidden states
to ``fusion.onnx``, which then holds only GRASP's few weights. The embedding table lives
in ``embed.onnx`` alone, shared by the splice and the decode loop.

Host-side and baked-in parts. M-RoPE positions (data dependent: they depend on where the
image sits) are a decoder input computed by ``model.rope``; the TLM matrix A is an input
computed by ``tlm_weights`` from the anchor positions and mask. The ViT's rotary
cos/sin, its window assignment and cu_seqlens depend on nothing but the chip size, which
a graph is built for anyway, so they are constants baked into ``vision.onnx`` (computed
at export time with transformers' own ``get_vision_position_ids`` /
``get_vision_window_index``): feeding them as inputs would hand every caller (ORT,
TensorRT, the C++ runners) the duty of recomputing the same numbers bit-exactly, for
nothing. The window attention is expressed as full attention with a block-diagonal mask
(same-window pairs) in the patches' own order, which equals transformers' permute ->
per-window attention -> un-permute, and keeps one static attention shape; the mask costs
~8% extra ViT FLOPs at 504 px. The patch embedding (a Conv3d whose kernel equals its
stride) is exported as the equivalent MatMul over the flattened patch.

Graph form. Vision, embed and fusion are ``nn.Module`` wrappers that call the backbone's
own submodules (norms, MLPs, rotary embedding, merger, TLM/GRASP weights) and spell out the
attention with plain tensors, then ``torch.onnx.export(..., dynamo=True)``. The decoder is
written node by node (:mod:`.decoder_graph`): every linear layer of the language model
(q/k/v/o, gate/up/down, lm_head) is one ``MatMul(x, W^T)`` named ``<module>/MatMul`` whose
second input is the initializer ``<module>.weight_t`` (``[in, out]``), ``<module>`` being
the backbone's qualified name (``model.language_model.layers.3.mlp.down_proj``,
``lm_head``); q/k/v's bias is the following ``<module>/Add`` with ``<module>.bias``. Those are
the nodes a 4-bit rewrite replaces.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusar_edge.hashing import file_record

from .decoder_graph import build_decoder, decoder_spec
from .int4_onnx import save_model
from .report_json import write_report
from .stages_format import FORMAT, STAGE_FILES, STAGES_JSON, read_stages  # noqa: F401  (the layout, torch-free)

DEFAULT_MAX_ANCHORS = 256  # the tile store's default 16 x 16 grid
EXTERNAL_DATA_BYTES = 512 << 20  # stages with more weight bytes than this keep them in <file>.data
MIN_OPSET = 21

Progress = Callable[[str], None]


# --- stage wrappers ---------------------------------------------------------------------------

class EmbedStage(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


def vision_constants(model) -> dict[str, torch.Tensor]:
    """The ViT's chip-size-only inputs: rotary cos/sin ``[N, head_dim]`` and window ids ``[N]``.

    Computed with transformers' own helpers, in the patches' input order (no window
    permutation: the block-diagonal mask plays its role).
    """
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.visual
    hp, wp = model.config.patch_grid
    grid = torch.tensor([[1, hp, wp]], dtype=torch.long)
    merge = visual.spatial_merge_size
    pos = get_vision_position_ids(grid, merge).to(model.device)
    cos, sin = visual.rotary_pos_emb(pos, pos)
    window_index, cu = get_vision_window_index(grid, merge, visual.window_size, visual.patch_size)
    unit = merge * merge
    starts = torch.arange(window_index.numel()) * unit  # window-order patch offset of each merge unit
    unit_window = torch.searchsorted(cu[1:].long(), starts, right=True)  # window of each window-order unit
    window_of_unit = torch.empty_like(unit_window)
    window_of_unit[window_index] = unit_window
    window_id = window_of_unit.repeat_interleave(unit)
    return {"cos": cos.float(), "sin": sin.float(), "window_id": window_id.to(model.device)}


class VisionStage(nn.Module):
    """ViT + merger + TLM for one chip of the bundle's size; see the module docstring."""

    def __init__(self, model):
        super().__init__()
        visual = model.visual
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.full = set(int(i) for i in visual.fullatt_block_indexes)
        pe = visual.patch_embed
        self.register_buffer("patch_weight_t", pe.proj.weight.detach().reshape(pe.embed_dim, -1).t())
        self.register_buffer("patch_bias", pe.proj.bias.detach() if pe.proj.bias is not None else None)
        const = vision_constants(model)
        self.register_buffer("rope_cos", const["cos"])
        self.register_buffer("rope_sin", const["sin"])
        wid = const["window_id"]
        dtype = model.visual.dtype
        mask = torch.zeros(wid.numel(), wid.numel(), dtype=dtype, device=wid.device)
        self.register_buffer("window_bias", mask.masked_fill(wid[:, None] != wid[None, :], torch.finfo(dtype).min))
        self.tlm = model.tlm

    def forward(self, pixel_values, anchor_weights=None, anchor_features=None):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        x = torch.matmul(pixel_values.to(self.patch_weight_t.dtype), self.patch_weight_t)
        if self.patch_bias is not None:
            x = x + self.patch_bias
        n = x.shape[0]
        for i, blk in enumerate(self.blocks):
            attn = blk.attn
            h = blk.norm1(x)
            q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, self.rope_cos, self.rope_sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if i in self.full else self.window_bias,
                                               scale=attn.scaling)
            x = x + attn.proj(o.transpose(1, 2).reshape(n, -1))
            x = x + blk.mlp(blk.norm2(x))
        tokens = self.merger(x)
        if self.tlm is None:
            return tokens
        a = anchor_weights.float()
        if a.shape[0] < a.shape[1]:
            g, b = self._anchor_fields_reassociated(a, anchor_features)
        else:
            gamma, beta = self.tlm.film(anchor_features)
            g, b = a @ gamma.float(), a @ beta.float()
        return (tokens.float() * (1.0 + g) + b).to(tokens.dtype)

    def _anchor_fields_reassociated(self, a, features):
        """``(A @ gamma, A @ beta)`` with the FiLM MLP's last linear applied after A, not before.

        ``A @ (H W2^T + b2) = (A @ H) W2^T + rowsum(A) b2`` exactly (H = SiLU(F W1^T + b1)), so the
        widest matmul (hidden -> 2C: 4096 x 2048 on ``small``) runs over the T visual tokens
        instead of the S anchor slots: 64 rows instead of 256 at 224 px (vision 27 -> 10 ms on
        2 CPU cores). ``VisionStage`` picks this form only when T < S; the torch model keeps the
        reference order (``TLM.film``), which the parity check compares against.
        """
        first, act, last = self.tlm.film_mlp
        w = first.weight
        h = act(F.linear(features.to(w.dtype), w, first.bias)).float()
        ah = a @ h
        gb = F.linear(ah.to(last.weight.dtype), last.weight).float()
        if last.bias is not None:
            gb = gb + a.sum(dim=1, keepdim=True) * last.bias.float()
        return gb.chunk(2, dim=-1)


class FusionStage(nn.Module):
    """GRASP (question vector -> block scores -> sparse selection -> global prompt) + the splice."""

    def __init__(self, model):
        super().__init__()
        self.grasp = model.grasp
        self.num_tokens = model.config.num_visual_tokens
        if self.grasp is not None:
            self.register_buffer("pool", grasp_pool(model))
            self.prompt_len = self.grasp.prompts.shape[1]

    def forward(self, text_embeds, visual_tokens, image_start, question_hidden=None, prompt_start=None):
        n_tok = self.num_tokens
        seq = torch.arange(text_embeds.shape[1], device=text_embeds.device)
        rel = seq - image_start
        is_img = (rel >= 0) & (rel < n_tok)
        vis = visual_tokens.to(text_embeds.dtype).index_select(0, rel.clamp(0, n_tok - 1))
        out = torch.where(is_img[None, :, None], vis[None], text_embeds)
        if self.grasp is None:
            return out
        prompt, weights = grasp_graph(self.grasp, self.pool, visual_tokens, question_hidden[0].mean(dim=0))
        prompt = prompt.to(text_embeds.dtype)
        prel = seq - prompt_start
        is_prompt = (prel >= 0) & (prel < self.prompt_len)
        pr = prompt.index_select(0, prel.clamp(0, self.prompt_len - 1))
        return torch.where(is_prompt[None, :, None], pr[None], out), weights


def grasp_pool(model) -> torch.Tensor:
    """GRASP's adaptive average pooling of the ``[h, w]`` token grid into its block grid, as one
    ``[N, h*w]`` matrix (exact for grids that do not divide evenly, and a plain MatMul in a graph)."""
    h, w = model.config.token_grid
    eye = torch.eye(h * w, dtype=torch.float32).reshape(h * w, 1, h, w)
    return F.adaptive_avg_pool2d(eye, model.grasp.grid).reshape(h * w, -1).t().contiguous().to(model.device)


def grasp_graph(g, pool: torch.Tensor, visual_tokens: torch.Tensor, q: torch.Tensor):
    """GRASP in graph form: blocks pooled in fp32, scores, selection, the weighted prompt sum;
    -> ``(prompt [P, C] float32, block weights [N])``. The fusion stage and grasp.onnx share it."""
    blocks = pool.float() @ visual_tokens.float() + g.block_pos.float()
    dtype = g.w_k.weight.dtype
    keys = g.w_k(blocks.to(dtype))
    query = g.w_q(q.to(dtype))
    scores = keys.float() @ query.float() / math.sqrt(g.proj_dim)
    weights = _select(scores, g.selector, g.k)
    n_blocks, plen, c = g.prompts.shape
    return (weights[None, :] @ g.prompts.float().reshape(n_blocks, plen * c)).reshape(plen, c), weights


def _select(scores: torch.Tensor, selector: str, k: int) -> torch.Tensor:
    """GRASP's selectors in export-friendly form (TopK: ONNX breaks ties by the lower index,
    like the reference's stable sort)."""
    n = scores.shape[-1]
    if selector == "topk":
        values, idx = torch.topk(scores, k, dim=-1, largest=True, sorted=True)
        return torch.zeros_like(scores).scatter(-1, idx, torch.softmax(values, dim=-1))
    x = scores.float() / 2.0
    x = x - x.max(dim=-1, keepdim=True).values
    srt, _ = torch.topk(x, n, dim=-1, largest=True, sorted=True)
    ks = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(-1) / ks
    mean_sq = (srt ** 2).cumsum(-1) / ks
    delta = (1.0 - ks * (mean_sq - mean ** 2)) / ks
    tau = mean - torch.sqrt(torch.clamp(delta, min=0.0))
    support = (tau <= srt).sum(dim=-1, keepdim=True)
    tau_star = tau.gather(-1, support - 1)
    return torch.clamp(x - tau_star, min=0.0) ** 2


# --- export --------------------------------------------------------------------------------------

def _noop(message: str) -> None:
    pass


@contextlib.contextmanager
def _quiet_exporter_registry():
    """torch.onnx logs one warning per torchvision op it cannot register ("torchvision is not
    installed. Skipping torchvision::nms", 4 per stage); we export no torchvision op."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_stages(model, out_dir: str | Path, opset: int = MIN_OPSET, progress: Progress | None = None, *,
                  max_anchors: int = DEFAULT_MAX_ANCHORS, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict:
    """Export ``model`` (a ``FusarModel``) into ``out_dir``; -> ``{stage: path, ..., "config": stages.json}``.

    ``opset`` >= 21 (standard ``ai.onnx`` ops only). A stage whose weights exceed
    ``external_data_bytes`` stores them in ``<file>.onnx.data`` next to it (then listed
    under ``"data"``). ``progress(message)`` is called before each stage.
    """
    from fusar_edge.errors import InputError

    if int(opset) < MIN_OPSET:
        raise InputError(f"opset: expected {MIN_OPSET} or newer, got {opset}")
    if int(max_anchors) < 1:
        raise InputError(f"max_anchors: expected a positive number of anchors, got {max_anchors}")
    progress = progress or _noop
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.config
    dev, dtype = model.device, model.dtype
    c, t_tok = cfg.hidden_size, cfg.num_visual_tokens
    hp, wp = cfg.patch_grid
    n_patch = hp * wp
    vis = model.visual
    patch_dim = 3 * vis.patch_embed.temporal_patch_size * vis.patch_embed.patch_size ** 2
    text = model.language_model.config
    tlm, grasp = model.tlm is not None, model.grasp is not None
    s = int(max_anchors)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dt)

    specs: dict[str, Any] = {}
    files: dict[str, Any] = {}
    data_files: list[Path] = []
    started = time.perf_counter()

    def run(name: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str],
            dynamic=None, rename=None, post=None):
        progress(f"exporting {STAGE_FILES[name]}")
        path = out / STAGE_FILES[name]
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_registry():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module, args, dynamo=True, opset_version=int(opset), input_names=inputs,
                                     output_names=outputs, dynamic_shapes=dynamic, optimize=True, verbose=False)
        if rename:
            prog.rename_axes(rename)
        irm = prog.model
        if post is not None:
            post(irm)
        _check_graph(irm, name, int(opset))
        data = _save(irm, path, external_data_bytes)
        if data is not None:
            data_files.append(data)
        files[name] = path
        specs[name] = {"file": path.name, "data": data.name if data else None,
                       "inputs": _io(irm.graph.inputs), "outputs": _io(irm.graph.outputs),
                       "export_seconds": round(time.perf_counter() - t0, 2)}

    # vision
    v_args = (rnd(n_patch, patch_dim),)
    v_in = ["pixel_values"]
    if tlm:
        v_args += (torch.rand(t_tok, s, generator=gen).to(dev), rnd(s, cfg.tlm.vec_dim))
        v_in += ["anchor_weights", "anchor_features"]
    run("vision", VisionStage(model).eval(), v_args, v_in, ["visual_tokens"])

    # embed
    ids = torch.randint(0, text.vocab_size, (2, 7), generator=gen).to(dev)
    run("embed", EmbedStage(model).eval(), (ids,), ["input_ids"], ["inputs_embeds"],
        dynamic={"input_ids": {0: "batch_size", 1: "sequence_length"}})

    # fusion
    plen = cfg.grasp.prompt_len if grasp else 0
    length = 5 + t_tok + 1 + plen + 6
    f_args = (rnd(1, length, c, dt=dtype), rnd(t_tok, c, dt=dtype), torch.tensor([5], device=dev))
    f_in, f_out = ["text_embeds", "visual_tokens", "image_start"], ["inputs_embeds"]
    f_dyn: dict[str, Any] = {"text_embeds": {1: "sequence_length"}, "visual_tokens": None, "image_start": None}
    if grasp:
        f_args += (rnd(1, 9, c, dt=dtype), torch.tensor([5 + t_tok + 1], device=dev))
        f_in += ["question_hidden", "prompt_start"]
        f_out += ["grasp_weights"]
        f_dyn.update(question_hidden={1: "question_length"}, prompt_start=None)
    run("fusion", FusionStage(model).eval(), f_args, f_in, f_out, dynamic=f_dyn)

    # decoder: written node by node with ONNX Runtime's fused ops (decoder_graph's docstring says why)
    progress(f"writing {STAGE_FILES['decoder']}")
    t0 = time.perf_counter()
    path = out / STAGE_FILES["decoder"]
    with torch.no_grad():
        dec = build_decoder(model, int(opset))
    save_model(dec, path, external_data=_proto_bytes(dec) > external_data_bytes)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data_files.append(data)
    files["decoder"] = path
    specs["decoder"] = {"file": path.name, "data": data.name if data.exists() else None,
                        "inputs": _proto_io(dec.graph.input), "outputs": _proto_io(dec.graph.output),
                        "export_seconds": round(time.perf_counter() - t0, 2)}

    manifest = {
        "format": FORMAT,
        "opset": int(opset),
        "dtype": str(dtype).replace("torch.", ""),
        "preset": cfg.name,
        "chip_size": cfg.chip_size,
        "patch_grid": [hp, wp],
        "token_grid": list(cfg.token_grid),
        "num_patches": n_patch,
        "patch_dim": patch_dim,
        "visual_tokens": t_tok,
        "hidden_size": c,
        "tlm": {"enabled": tlm, "max_anchors": s if tlm else 0, "vec_dim": cfg.tlm.vec_dim,
                "sigma": cfg.tlm.sigma, "eps": cfg.tlm.eps},
        "grasp": {"enabled": grasp, "blocks": model.grasp.num_blocks if grasp else 0, "prompt_len": plen},
        "decoder": decoder_spec(model),
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}; decoder: export/decoder_graph.py",
        "seconds": round(time.perf_counter() - started, 2),
        "stages": specs,
        "files": {p.name: file_record(p) for p in sorted([*files.values(), *data_files])},
    }
    cfg_path = out / STAGES_JSON
    write_report(cfg_path, manifest)  # hashed into the weights id: no timings (report_json)
    progress(f"wrote {len(files)} ONNX stages to {out} in {manifest['seconds']:.1f} s")
    result: dict[str, Any] = dict(files)
    result["config"] = cfg_path
    if data_files:
        result["data"] = data_files
    return result


def _check_graph(irm, name: str, opset: int) -> None:
    from fusar_edge.errors import FusarError

    got = irm.opset_imports.get("", 0)
    if got < opset:
        raise FusarError(f"{name}.onnx: exported with opset {got}, expected >= {opset}")
    custom = sorted({n.domain for n in irm.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if custom or irm.functions:
        raise FusarError(f"{name}.onnx: non-standard ops remain after export (domains {custom}, "
                         f"{len(irm.functions)} functions)")


def _weight_bytes(irm) -> int:
    return sum(v.const_value.nbytes for v in irm.graph.initializers.values() if v.const_value is not None)


def _save(irm, path: Path, threshold: int) -> Path | None:
    import onnx_ir as ir

    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if _weight_bytes(irm) > threshold:
        ir.save(irm, path, external_data=data.name, size_threshold_bytes=1024)
        return data
    ir.save(irm, path)
    return None


_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "BOOL": "bool", "DOUBLE": "float64"}


def _proto_io(values) -> list[dict]:
    """``_io`` for an ``onnx`` (protobuf) graph's inputs or outputs."""
    from onnx import TensorProto

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        name = TensorProto.DataType.Name(t.elem_type)
        out.append({"name": v.name, "dtype": _DTYPES.get(name, name.lower()), "shape": dims})
    return out


def _proto_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _io(values) -> list[dict]:
    out = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        out.append({"name": v.name, "dtype": _DTYPES.get(v.dtype.name, v.dtype.name.lower()), "shape": dims})
    return out


# --- parity --------------------------------------------------------------------------------------

PARITY_QUESTIONS = ("How many ships are there?", "Detect the ships in the image.", "Describe the scene.")


def synthetic_chip(size: int, seed: int) -> np.ndarray:
    """A speckled SAR-like uint8 chip ``[size, size, 3]``: gamma sea clutter with a few bright targets."""
    rng = np.random.default_rng(seed)
    amp = np.sqrt(0.05 * rng.gamma(4.0, 0.25, (size, size)))
    for _ in range(rng.integers(1, 5)):
        y, x = rng.integers(0, size - 8, 2)
        h, w = rng.integers(3, 8, 2)
        amp[y:y + h, x:x + w] = np.sqrt(rng.gamma(4.0, 0.25, (h, w)))
    db = 20 * np.log10(np.maximum(amp, 1e-4))
    img = np.clip((db + 40) / 45 * 255, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def synthetic_anchors(count: int, seed: int, masked: int = 0):
    """``(features [S, 64], positions [S, 2], mask [S])`` torch tensors, ``masked`` anchors masked."""
    gen = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(count, 64, generator=gen), dim=1)
    p = torch.rand(count, 2, generator=gen)
    m = torch.ones(count, dtype=torch.bool)
    m[:masked] = False
    return f, p, m


def _rel(a, b) -> float:
    a = torch.as_tensor(np.asarray(a)).double()
    b = torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def parity_report(model, tokenizer, onnx_dir: str | Path, n_prompts: int = 3, *, new_tokens: int = 16,
                  providers: list[str] | None = None, images: list[np.ndarray] | None = None,
                  questions: list[str] | None = None, progress: Progress | None = None, seed: int = 0,
                  int8_prefill: bool = True) -> dict:
    """Each stage of the export vs the torch model, and greedy-token agreement.

    ``n_prompts`` synthetic SAR chips (or ``images``: uint8 ``[H, W, 3]`` chips of the
    bundle's chip size) x ``questions`` (cycled); every other prompt carries a synthetic
    anchor set (some anchors masked), the rest none. Relative errors ``||a - b|| / ||b||``
    (worst over the prompts) for the visual tokens, the fused input embeddings, GRASP's
    block weights, the prefill's last-position logits and the first decode step's logits (when
    both sides feed it the same token: a near-tie that the prefill breaks differently on the
    two sides shows in the greedy agreement, not as a logits error); then
    ``new_tokens`` greedy tokens on each side (stop tokens not honoured, so the whole
    length is compared). ``ok``: every error below ``tolerance`` (1e-4 fp32, 2e-2 half) and
    identical greedy tokens. ``int8_prefill``: prompts on the export's int8 prefill graph when it
    has one, whatever this CPU (the runtime's default takes it on x86 with VNNI or AMX), else on
    ``decoder.onnx``.
    """
    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.model.preprocess import chip_to_patches
    from fusar_edge.model.rope import mrope_positions
    from fusar_edge.backends.torch_stages import TorchStages
    from fusar_edge.tokenizer import build_sequence
    from fusar_edge import tasks

    progress = progress or _noop
    cfg = model.config
    ort_side = OnnxStages(onnx_dir, providers=providers, int8_prefill=int8_prefill)
    torch_side = TorchStages(model)
    questions = list(questions or PARITY_QUESTIONS)
    if images is None:
        images = [synthetic_chip(cfg.chip_size, seed + i) for i in range(n_prompts)]
    vocab = tokenizer.vocab_size
    # decode_logits is reported only when some prompt's first decode step could be compared
    worst = {k: 0.0 for k in ("vision", "fusion", "grasp_weights", "prefill_logits")}
    prompts, identical, agree, total = [], 0, 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, chip in enumerate(images):
            question = questions[i % len(questions)]
            progress(f"parity {i + 1}/{len(images)}: {question!r}")
            pixels, grid = chip_to_patches(chip, int(cfg.vision.get("patch_size", 14)),
                                           int(cfg.vision.get("spatial_merge_size", 2)),
                                           int(cfg.vision.get("temporal_patch_size", 2)))
            anchors = None
            if i % 2 == 0 and model.tlm is not None:
                anchors = synthetic_anchors(min(64, ort_side.max_anchors), seed + 100 + i, masked=3)
            prompt = tasks.build_prompt(tasks.infer_task(question), question)
            plen = cfg.grasp.prompt_len if model.grasp is not None else 0
            seq = build_sequence(tokenizer, prompt, cfg.num_visual_tokens, plen, cfg.system_prompt)
            positions, next_pos = mrope_positions(len(seq.input_ids), seq.layout.image_start, cfg.token_grid)
            errs = {}
            v_t = torch_side.vision(pixels, grid, anchors)
            v_o = ort_side.vision(pixels, grid, anchors)
            errs["vision"] = _rel(ort_side.to_numpy(v_o), v_t.float())
            e_t, w_t = torch_side.fusion(seq.input_ids, seq.layout, v_t, seq.question_ids)
            e_o, w_o = ort_side.fusion(seq.input_ids, seq.layout, v_o, seq.question_ids)
            errs["fusion"] = _rel(ort_side.to_numpy(e_o), e_t.float())
            if w_t is not None:
                errs["grasp_weights"] = _rel(w_o, w_t.float())
            logits_t, state_t = torch_side.prefill(e_t, positions)
            logits_o, state_o = ort_side.prefill(e_o, positions)
            errs["prefill_logits"] = _rel(logits_o, logits_t)
            tok_t = [int(logits_t[:vocab].argmax())]
            tok_o = [int(np.asarray(logits_o)[:vocab].argmax())]
            pos = next_pos
            for step in range(new_tokens - 1):
                lt, state_t = torch_side.step(tok_t[-1], pos, state_t)
                lo, state_o = ort_side.step(tok_o[-1], pos, state_o)
                if step == 0 and tok_t[-1] == tok_o[-1]:  # after different tokens the logits differ anyway
                    errs["decode_logits"] = _rel(lo, lt)
                pos += 1
                tok_t.append(int(lt[:vocab].argmax()))
                tok_o.append(int(np.asarray(lo)[:vocab].argmax()))
            same = tok_t == tok_o
            identical += same
            agree += sum(a == b for a, b in zip(tok_t, tok_o))
            total += len(tok_t)
            for k, v in errs.items():
                worst[k] = max(worst.get(k, 0.0), v)
            prompts.append({"question": question, "anchors": anchors is not None,
                            "rel_err": {k: float(f"{v:.3e}") for k, v in errs.items()},
                            "tokens_identical": same, "torch_tokens": tok_t, "onnx_tokens": tok_o})
    dtype = str(model.dtype).replace("torch.", "")
    tol = 1e-4 if dtype == "float32" else 2e-2
    return {
        "dtype": dtype,
        "providers": ort_side.providers,
        "prompts": len(images),
        "new_tokens": new_tokens,
        "tolerance": tol,
        "max_rel_err": {k: float(f"{v:.3e}") for k, v in worst.items()},
        "greedy": {"identical_sequences": identical, "of": len(images),
                   "token_agreement": round(agree / total, 4) if total else 1.0},
        "ok": all(v < tol for v in worst.values()) and identical == len(images),
        "seconds": round(time.perf_counter() - t0, 2),
        "per_prompt": prompts,
    }
