"""``vision.onnx`` and ``grasp.onnx`` for TensorRT beside TensorRT Edge-LLM's language model.

Edge-LLM builds the language model from our GPTQ checkpoint with its own plugins; what it
cannot build is ours: the ViT + merger + TLM, and GRASP. These two graphs are plain ONNX
(standard ``ai.onnx`` ops only, no plugins), fixed shapes for the bundle's chip size, weights
and activations in fp16 (``dtype`` selects fp32 for the reference check), for ``trtexec``::

    vision.onnx
      pixel_values      [N, 3*t*p*p]      N = patch grid h*w, chip_to_patches order
      anchor_weights    [T, S]            TLM's A (tlm_weights_numpy), zero-padded to S columns  (TLM only)
      anchor_features   [S, 64]           AEF vectors, zero rows where padded                      (TLM only)
      -> visual_tokens  [T, C]

    grasp.onnx                                                                                 (GRASP only)
      visual_tokens     [T, C]            vision.onnx's output
      question_hidden   [Q, C]            Edge-LLM's ``hidden_states`` (last layer, *before* the final
                                          norm) of a text-only pass over the question, zero-padded to Q rows
      question_mask     [Q]               1 for the question's rows, 0 for padding
      -> prompt_embeds  [P, C]            GRASP's global prompt, the rows after <|vision_end|>
         grasp_weights  float32 [N_blocks]

The graph applies the language model's final RMSNorm to ``question_hidden`` itself because
Edge-LLM emits the pre-norm residual (``CausalLM.emit_hidden_states``), while GRASP's ``q`` is
the mean of the *normed* states (``FusarModel.question_vector``). The mean is masked so the
shape stays fixed: Q (``MAX_QUESTION_TOKENS``) bounds the question's length, and a runner
refuses a longer question rather than cutting it.

The graphs reuse the fp32 export's stage code (``onnx_stages.VisionStage``, the same pooling and
selectors as ``FusionStage``) on an fp16 copy, with two things kept in fp32 on purpose: the ViT's
rotary cos/sin (positions up to the patch grid lose digits in fp16) and everything the reference
computes in fp32 (TLM's A @ gamma, GRASP's scores and prompt sum). ``check_graphs`` compares
them with the torch model's own methods (``FusarModel.vision`` / ``question_vector`` / ``grasp``),
not with the wrappers, so a wrapper that drifted from the model fails it.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .onnx_stages import (DEFAULT_MAX_ANCHORS, EXTERNAL_DATA_BYTES, MIN_OPSET, VisionStage, _check_graph,
                          _quiet_exporter_registry, _rel, _save, grasp_graph, grasp_pool, synthetic_anchors,
                          synthetic_chip)

MAX_QUESTION_TOKENS = 256
VISION, GRASP = "vision.onnx", "grasp.onnx"
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}  # relative error vs the fp32 torch model

Progress = Callable[[str], None]


class GraspStage(nn.Module):
    """Visual tokens + the question's pre-norm hidden states -> GRASP's prompt and block weights."""

    def __init__(self, model):
        super().__init__()
        self.norm = model.language_model.norm
        self.grasp = model.grasp
        self.register_buffer("pool", grasp_pool(model))

    def forward(self, visual_tokens, question_hidden, question_mask):
        m = question_mask.float()
        normed = self.norm(question_hidden).float()
        q = (normed * m[:, None]).sum(dim=0) / m.sum().clamp_min(1.0)  # masked mean: the shape stays fixed
        prompt, weights = grasp_graph(self.grasp, self.pool, visual_tokens, q)
        return prompt.to(visual_tokens.dtype), weights


def _in_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (the model stays fp32 for the checks)."""
    if dtype == torch.float32:
        return module
    out = copy.deepcopy(module).to(dtype)
    if isinstance(out, VisionStage):
        # fp32 rotary tables (transformers' rotary applies them in fp32 anyway); a finite mask
        # value: fp32's min becomes -inf in fp16, which some fp16 softmax kernels turn into NaN
        out.rope_cos, out.rope_sin = module.rope_cos.float(), module.rope_sin.float()
        out.window_bias = module.window_bias.clamp(min=torch.finfo(dtype).min).to(dtype)
    return out


def export_graphs(model, out_dir: str | Path, dtype: torch.dtype = torch.float16, *,
                  max_anchors: int = DEFAULT_MAX_ANCHORS, max_question: int = MAX_QUESTION_TOKENS,
                  progress: Progress | None = None) -> dict:
    """Write ``vision.onnx`` (and ``grasp.onnx`` when the model has GRASP) into ``out_dir``; -> their specs."""
    progress = progress or (lambda _m: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    c, t_tok = cfg.hidden_size, cfg.num_visual_tokens
    hp, wp = cfg.patch_grid
    pe = model.visual.patch_embed
    patch_dim = 3 * pe.temporal_patch_size * pe.patch_size ** 2
    gen = torch.Generator().manual_seed(0)
    specs: dict = {}

    def run(name: str, module: nn.Module, args: tuple, inputs: list[str], outputs: list[str]):
        progress(f"exporting {name} ({str(dtype).replace('torch.', '')})")
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter_registry():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=MIN_OPSET, input_names=inputs,
                                     output_names=outputs, optimize=True, verbose=False)
        _check_graph(prog.model, name, MIN_OPSET)
        data = _save(prog.model, out / name, EXTERNAL_DATA_BYTES)  # a 7B ViT's weights go beside it
        specs[name] = {"data": data.name if data else None,
                       "inputs": [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", "")}
                                  for n, a in zip(inputs, args)],
                       "outputs": outputs, "export_seconds": round(time.perf_counter() - t0, 2)}

    v_args: tuple = (torch.randn(hp * wp, patch_dim, generator=gen).to(dtype),)
    v_in = ["pixel_values"]
    if model.tlm is not None:
        v_args += (torch.rand(t_tok, max_anchors, generator=gen).to(dtype),
                   torch.randn(max_anchors, cfg.tlm.vec_dim, generator=gen).to(dtype))
        v_in += ["anchor_weights", "anchor_features"]
    run(VISION, _in_dtype(VisionStage(model), dtype), v_args, v_in, ["visual_tokens"])
    if model.grasp is not None:
        mask = torch.zeros(max_question, dtype=dtype)
        mask[:5] = 1
        g_args = (torch.randn(t_tok, c, generator=gen).to(dtype), torch.randn(max_question, c, generator=gen).to(dtype),
                  mask)
        run(GRASP, _in_dtype(GraspStage(model), dtype), g_args,
            ["visual_tokens", "question_hidden", "question_mask"], ["prompt_embeds", "grasp_weights"])
    return specs


def prenorm_hidden(model, question_ids) -> torch.Tensor:
    """``[n, C]``: the last decoder layer's output over the question, before the final norm --
    what Edge-LLM's ``hidden_states`` output holds for a text-only pass."""
    from fusar_edge.model.fusar import as_tensor
    from fusar_edge.model.rope import text_positions

    captured = {}
    hook = model.language_model.layers[-1].register_forward_hook(
        lambda _m, _a, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    ids = as_tensor(question_ids, model.device).view(1, -1)
    try:
        with torch.no_grad():
            model.language_model(input_ids=ids, position_ids=as_tensor(text_positions(0, ids.shape[1]), model.device),
                                  use_cache=False)
    finally:
        hook.remove()
    return captured["h"].reshape(-1, model.config.hidden_size)


def check_graphs(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float16, *, n: int = 3,
                 seed: int = 0) -> dict:
    """The graphs on ONNX Runtime (CPU) vs the fp32 torch model: worst relative errors and a verdict.

    ``n`` synthetic chips, every other one with a synthetic anchor set (3 anchors masked), each
    with one of the parity questions. ONNX Runtime's CPU provider runs fp16 graphs by casting
    around the ops it has no fp16 kernel for, so the fp16 numbers measure fp16 weights and
    activations between ops, not a GPU's fp16 arithmetic inside them.
    """
    import onnxruntime as ort

    from fusar_edge import tasks
    from fusar_edge.backends.tlm_host import tlm_weights_numpy
    from fusar_edge.model.preprocess import chip_to_patches

    from .onnx_stages import PARITY_QUESTIONS

    out = Path(out_dir)
    cfg = model.config
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    vision = ort.InferenceSession(str(out / VISION), opts, providers=["CPUExecutionProvider"])
    grasp = ort.InferenceSession(str(out / GRASP), opts, providers=["CPUExecutionProvider"]) \
        if model.grasp is not None else None
    s = vision.get_inputs()[1].shape[1] if model.tlm is not None else 0
    q_max = grasp.get_inputs()[1].shape[0] if grasp is not None else 0
    worst = {"vision": 0.0, **({"grasp_prompt": 0.0, "grasp_weights": 0.0} if grasp is not None else {})}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            chip = synthetic_chip(cfg.chip_size, seed + i)
            pixels, grid = chip_to_patches(chip, int(cfg.vision.get("patch_size", 14)),
                                           int(cfg.vision.get("spatial_merge_size", 2)),
                                           int(cfg.vision.get("temporal_patch_size", 2)))
            anchors = synthetic_anchors(min(64, s), seed + 100 + i, masked=3) if s and i % 2 == 0 else None
            feeds = {"pixel_values": np.asarray(pixels, np.float32).astype(np_dtype)}
            if s:
                a = np.zeros((cfg.num_visual_tokens, s), np.float32)
                f = np.zeros((s, cfg.tlm.vec_dim), np.float32)
                if anchors is not None:
                    feats, pos, mask = (t.numpy() for t in anchors)
                    a[:, :len(feats)] = tlm_weights_numpy(pos, mask, cfg.patch_grid, cfg.token_grid,
                                                          cfg.tlm.sigma, cfg.tlm.eps)
                    f[:len(feats)] = feats
                feeds.update(anchor_weights=a.astype(np_dtype), anchor_features=f.astype(np_dtype))
            ref_tokens = model.vision(pixels, grid, anchors).float()
            tokens = vision.run(None, feeds)[0]
            worst["vision"] = max(worst["vision"], _rel(tokens.astype(np.float32), ref_tokens))
            if grasp is None:
                continue
            question = PARITY_QUESTIONS[i % len(PARITY_QUESTIONS)]
            ids = np.asarray(tokenizer.encode(tasks.build_prompt(tasks.infer_task(question), question)), np.int64)
            if len(ids) > q_max:
                raise ValueError(f"parity question {question!r}: {len(ids)} tokens, grasp.onnx takes {q_max}")
            hidden = np.zeros((q_max, cfg.hidden_size), np.float32)
            hidden[:len(ids)] = prenorm_hidden(model, ids).float().numpy()
            qmask = (np.arange(q_max) < len(ids)).astype(np.float32)
            ref_prompt, ref_weights = model.grasp(ref_tokens, cfg.token_grid, model.question_vector(ids))
            # the reference's own visual tokens go in, so the GRASP error is GRASP's alone
            prompt, weights = grasp.run(None, {"visual_tokens": ref_tokens.numpy().astype(np_dtype),
                                               "question_hidden": hidden.astype(np_dtype),
                                               "question_mask": qmask.astype(np_dtype)})
            worst["grasp_prompt"] = max(worst["grasp_prompt"], _rel(prompt.astype(np.float32), ref_prompt.float()))
            worst["grasp_weights"] = max(worst["grasp_weights"], _rel(weights, ref_weights.float()))
    name = str(dtype).replace("torch.", "")
    tol = TOLERANCE[name]
    return {"dtype": name, "reference": "the fp32 torch model (FusarModel.vision / question_vector / grasp)",
            "runtime": "onnxruntime CPUExecutionProvider", "prompts": n, "tolerance": tol,
            "max_rel_err": {k: float(f"{v:.3e}") for k, v in worst.items()},
            "ok": all(v < tol for v in worst.values()), "seconds": round(time.perf_counter() - t0, 2)}
