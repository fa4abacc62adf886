"""``fusar-edge export --edgellm``: the bundle as TensorRT Edge-LLM (Jetson) takes it, in ``edgellm/``.

::

    edgellm/
      checkpoint/          the language model as a GPTQ checkpoint Edge-LLM's exporter reads:
                           4-bit linears (group 128, symmetric, no act-order, legacy "gptq" zeros),
                           every other tensor in fp16 with ``dtype: float16``; tokenizer files,
                           chat_template.jinja, preprocessor_config.json. No vision tower: it is
                           vision.onnx's (Edge-LLM's own Qwen2.5-VL encoder has no TLM).
      llm/                 Edge-LLM's exporter run on checkpoint/ (edgellm_llm.py), when installed
      vision.onnx          ViT + merger + TLM, fp16, fixed shapes (edgellm_graphs.py)
      grasp.onnx           GRASP: visual tokens + the question's hidden states -> prompt rows (fp16)
      fusar_edgellm.json   how a runner joins them (``MANIFEST_NAME``, below)

Why group 128 only: Edge-LLM's INT4 GEMM plugin (``Int4GroupwiseGemmPluginV2``) has kernels for
group size 128 alone and needs K and N of every quantised linear to be multiples of 64. Its
exporter does not refuse other checkpoints: a group-64 checkpoint exports without a word and the
engine would compute with the wrong grouping. So this module refuses them (``check_shapes``),
before GPTQ spends its time.

The join (``fusar_edgellm.json`` ``sequence``): Edge-LLM's LLM engine takes ``inputs_embeds``; its
runtime builds them from token ids, reading ids ``>= vocab_size`` as rows of a multimodal
embedding table (``id - vocab_size``; Edge-LLM's "prompt tuning" insertion). Our runner fills
that table with vision.onnx's T visual tokens, then grasp.onnx's P prompt rows, and writes the
ids ``vocab_size + k`` over the image placeholders and ``vocab_size + T + j`` over the GRASP
slots; positions are M-RoPE as ``fusar_edge.model.rope.mrope_positions`` computes them.
``join_reference`` is that rule in numpy, and the export checks it against the torch fusion.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fusar_edge.errors import InputError

from .edgellm_llm import DISTRIBUTION, EDGELLM_VERSION
from .report_json import write_report

FORMAT = "fusar-edgellm-v1"
MANIFEST_NAME = "fusar_edgellm.json"
GROUP_SIZE = 128
SHAPE_MULTIPLE = 64
VISION_PREFIX = "model.visual."

Progress = Callable[[str], None]


def check_group_size(group_size: int) -> None:
    if group_size != GROUP_SIZE:
        raise InputError(f"--group-size {group_size}: TensorRT Edge-LLM's INT4 GEMM kernels take group size "
                         f"{GROUP_SIZE} only (omit --group-size with --edgellm)")


def _check_linear(what: str, n: int, k: int) -> None:
    """One linear of ``n`` out, ``k`` in features: one clear line unless Edge-LLM's INT4 GEMM takes it."""
    if k % GROUP_SIZE or n % SHAPE_MULTIPLE:
        raise InputError(f"{what} [{n} out, {k} in]; TensorRT Edge-LLM's INT4 GEMM needs in features a multiple of "
                         f"{GROUP_SIZE} and out features a multiple of {SHAPE_MULTIPLE} (a model of width >= 128 in "
                         "steps of 128, e.g. `small`)")


def check_config_shapes(cfg, source: str) -> None:
    """``check_shapes`` from the config alone, before a (7B: minutes-long) load: the decoder's
    linears are hidden -> q/k/v, hidden -> o, hidden -> gate/up, intermediate -> down."""
    text = cfg.text
    hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
    head_dim = int(text.get("head_dim") or hidden // int(text["num_attention_heads"]))
    kv = int(text.get("num_key_value_heads") or text["num_attention_heads"]) * head_dim
    for what, n, k in (("q/o projections are", hidden, hidden), ("k/v projections are", kv, hidden),
                       ("gate/up projections are", inter, hidden), ("down projection is", hidden, inter)):
        _check_linear(f"{source}: the {what}", n, k)


def check_shapes(model) -> None:
    """Every linear GPTQ will quantise, as loaded (the config check's assumptions aside): K a
    multiple of 128 and N of 64, else one clear line."""
    from .gptq import _select

    for layer in _select(model, None):
        for name, lin in layer:
            _check_linear(f"{model.config.name}: {name} is", *lin.weight.shape)


def chat_template(system_prompt: str) -> str:
    """Qwen2.5-VL's ChatML with our default system prompt: for Edge-LLM's exporter (it requires one)
    and its text-only chats. Our runner builds the multimodal sequence itself (``sequence``)."""
    system = system_prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return ("{%- for message in messages %}\n"
            "{%- if loop.first and message['role'] != 'system' %}"
            f"{{{{ '<|im_start|>system\\n{system}<|im_end|>\\n' }}}}{{% endif %}}\n"
            "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
            "{%- if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
            "{% endfor %}{% endif %}\n"
            "{{- '<|im_end|>\\n' }}\n"
            "{%- endfor %}\n"
            "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def preprocessor_config(model) -> dict:
    """Qwen2-VL image processor settings for one square chip of the bundle's size (no resizing)."""
    from fusar_edge.model.preprocess import CLIP_MEAN, CLIP_STD

    cfg, vis = model.config, model.config.vision
    side = cfg.chip_size
    return {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": CLIP_MEAN.tolist(), "image_std": CLIP_STD.tolist(),
            "patch_size": int(vis.get("patch_size", 14)), "merge_size": int(vis.get("spatial_merge_size", 2)),
            "temporal_patch_size": int(vis.get("temporal_patch_size", 2)),
            "min_pixels": side * side, "max_pixels": side * side}


def write_checkpoint(model, tokenizer, weights: dict, out: Path) -> dict:
    """``checkpoint/``: the GPTQ checkpoint Edge-LLM reads (module docstring); -> its summary."""
    from .gptq_format import save_gptq_checkpoint

    sizes = {w.group_size for w in weights.values()}
    if sizes != {GROUP_SIZE}:
        raise InputError(f"GPTQ group size {sorted(sizes)}: TensorRT Edge-LLM's INT4 GEMM takes {GROUP_SIZE} only")
    save_gptq_checkpoint(out, weights, model=model, float_dtype=torch.float16, skip_prefixes=(VISION_PREFIX,),
                         meta={"for": f"TensorRT Edge-LLM {EDGELLM_VERSION} (fusar-edge export --edgellm)"})
    tokenizer.save(out)
    (out / "chat_template.jinja").write_text(chat_template(model.config.system_prompt), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(model), indent=2) + "\n",
                                                  encoding="utf-8")
    return {"dir": out.name, "quantized_linears": len(weights), "group_size": GROUP_SIZE, "bits": 4, "sym": True,
            "desc_act": False, "checkpoint_format": "gptq", "float_dtype": "float16"}


def join_reference(input_ids: np.ndarray, layout, vocab_size: int) -> np.ndarray:
    """The runner's token ids: image placeholder k -> ``vocab_size + k``, GRASP slot j ->
    ``vocab_size + T + j`` (rows of the table ``[visual_tokens; prompt_embeds]``)."""
    ids = np.array(input_ids, dtype=np.int64, copy=True)
    s, n = layout.image_start, layout.image_len
    ids[s:s + n] = vocab_size + np.arange(n)
    if layout.prompt_len:
        p = layout.prompt_start
        ids[p:p + layout.prompt_len] = vocab_size + n + np.arange(layout.prompt_len)
    return ids


def lookup_with_insertion(ids: np.ndarray, embed_table: np.ndarray, extra_rows: np.ndarray) -> np.ndarray:
    """Edge-LLM's embedding lookup with insertion, in numpy: id < V -> the embedding row, else
    ``extra_rows[id - V]``."""
    v = embed_table.shape[0]
    out = np.empty((len(ids), embed_table.shape[1]), dtype=embed_table.dtype)
    text = ids < v
    out[text] = embed_table[ids[text]]
    out[~text] = extra_rows[ids[~text] - v]
    return out


def check_join(model, tokenizer) -> dict:
    """The join rule against the torch fusion: ids + table -> the same ``inputs_embeds`` (fp32, exact)."""
    from fusar_edge import tasks
    from fusar_edge.model.preprocess import chip_to_patches
    from fusar_edge.tokenizer import build_sequence

    from .onnx_stages import PARITY_QUESTIONS, synthetic_anchors, synthetic_chip

    cfg = model.config
    question = PARITY_QUESTIONS[0]
    prompt = tasks.build_prompt(tasks.infer_task(question), question)
    plen = cfg.grasp.prompt_len if model.grasp is not None else 0
    seq = build_sequence(tokenizer, prompt, cfg.num_visual_tokens, plen, cfg.system_prompt)
    pixels, grid = chip_to_patches(synthetic_chip(cfg.chip_size, 0), int(cfg.vision.get("patch_size", 14)),
                                   int(cfg.vision.get("spatial_merge_size", 2)),
                                   int(cfg.vision.get("temporal_patch_size", 2)))
    with torch.inference_mode():
        anchors = synthetic_anchors(16, 1) if model.tlm is not None else None
        tokens = model.vision(pixels, grid, anchors)
        want, _ = model.fusion(seq.input_ids, seq.layout, tokens, seq.question_ids)
        rows = [tokens.float()]
        if plen:
            prompt_rows, _ = model.grasp(tokens, cfg.token_grid, model.question_vector(seq.question_ids))
            rows.append(prompt_rows.float())
        table = model.language_model.embed_tokens.weight.float().numpy()
        ids = join_reference(seq.input_ids, seq.layout, table.shape[0])
        got = lookup_with_insertion(ids, table, torch.cat(rows).numpy())
    err = float(np.abs(got - want[0].float().numpy()).max())
    return {"what": "ids with vocab_size + k placeholders and the [visual; prompt] table, looked up as Edge-LLM "
                    "does, vs the torch model's fusion (fp32)", "max_abs_err": err, "ok": err == 0.0}


def manifest(model, tokenizer, graphs: dict, checkpoint: dict, max_question: int, max_anchors: int) -> dict:
    """``fusar_edgellm.json``: everything a runner needs to join Edge-LLM's engine with ours."""
    cfg = model.config
    text = model.language_model.config
    t_tok, plen = cfg.num_visual_tokens, (cfg.grasp.prompt_len if model.grasp is not None else 0)
    vocab = int(model.language_model.embed_tokens.weight.shape[0])
    rope = dict(getattr(text, "rope_parameters", None) or {})
    ids = tokenizer.ids
    return {
        "format": FORMAT,
        "edgellm": {"distribution": DISTRIBUTION, "version": EDGELLM_VERSION,
                    "exporter": "tensorrt-edgellm-export CHECKPOINT OUT --skip-visual, with the hidden_states "
                                "output (python -m fusar_edge.export.edgellm_llm)"},
        "preset": cfg.name,
        # what --prompt the runner is given: fusar_edge.tasks.build_prompt(task, question, style=this)
        "prompt_style": cfg.prompt_style,
        "checkpoint": checkpoint,
        "llm": None,
        "llm_config": {"layers": int(text.num_hidden_layers), "hidden_size": int(cfg.hidden_size),
                       "vocab_size": vocab, "rms_norm_eps": float(text.rms_norm_eps)},
        "engines": {name: {"onnx": name, **spec} for name, spec in graphs.items()},
        "dtypes": {"vision.onnx": "float16 in, float16 out", "grasp.onnx": "float16 in; prompt_embeds float16, "
                   "grasp_weights float32", "llm": "float16 activations, INT4 weights (group 128), fp16 KV cache",
                   "positions": "int64 host-side; Edge-LLM takes rotary cos/sin computed from them"},
        "chip": {"size": cfg.chip_size, "patch_grid": list(cfg.patch_grid), "token_grid": list(cfg.token_grid),
                 "pixels": "fusar_edge.model.preprocess.chip_to_patches (CLIP mean/std, 2x2 merge-window order); "
                           "see checkpoint/preprocessor_config.json"},
        "anchors": {"enabled": model.tlm is not None, "max_anchors": max_anchors if model.tlm is not None else 0,
                    "vec_dim": cfg.tlm.vec_dim, "sigma": cfg.tlm.sigma, "eps": cfg.tlm.eps,
                    "anchor_weights": "fusar_edge.backends.tlm_host.tlm_weights_numpy(positions, mask, patch_grid, "
                                      "token_grid, sigma, eps), zero columns past the set's S (= masked)",
                    "none": "all-zero anchor_weights: the tower's plain output, exactly"},
        "sequence": {
            "template": "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|> "
                        "[image x T] <|vision_end|> [GRASP slot x P] {question}<|im_end|>\\n"
                        "<|im_start|>assistant\\n  (fusar_edge.tokenizer.build_sequence)",
            "system_prompt": cfg.system_prompt,
            "visual_tokens": t_tok, "grasp_slots": plen, "vocab_size": vocab,
            "image_placeholder_ids": f"image token k (0 <= k < {t_tok}) -> vocab_size + k",
            "grasp_slot_ids": f"GRASP slot j (0 <= j < {plen}) -> vocab_size + {t_tok} + j",
            "counting_form": "equivalently image_token_id at all T + P positions: Edge-LLM's "
                             "generateMultimodalIndices numbers them 0..T+P-1 in order, the same rows",
            "image_token_id": int(getattr(model.backbone.config, "image_token_id", ids.get("<|image_pad|>", -1))),
            "multimodal_table": f"[{t_tok + plen}, {cfg.hidden_size}] = vision.onnx visual_tokens, then grasp.onnx "
                                "prompt_embeds",
            "special_ids": {k: int(ids[k]) for k in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                     "<|vision_end|>", "<|image_pad|>", "<|endoftext|>") if k in ids},
            "stop_ids": [int(i) for i in tokenizer.stop_ids],
        },
        "mrope": {"rule": "text before the image: (i, i, i); image token (r, c) starting at p: (p, p + r, p + c); "
                          "everything after the image (vision_end, GRASP slots, question, answer) continues at "
                          "p + max(h, w) (fusar_edge.model.rope.mrope_positions)",
                  "mrope_section": rope.get("mrope_section"), "rope_theta": rope.get("rope_theta")},
        "question_pass": {"max_tokens": max_question if model.grasp is not None else 0,
                          "rule": "the question's ids alone (ChatSequence.question_ids), positions 0..n-1, through the "
                                  "LLM engine as its own sequence (its KV cache discarded); its hidden_states "
                                  "(pre-norm) zero-padded to max_tokens rows + question_mask -> grasp.onnx; a longer "
                                  "question is refused, never cut"},
    }


def export_edgellm(model, tokenizer, weights: dict, out: Path, *, max_anchors: int, progress: Progress,
                   bundle: str | Path = "BUNDLE") -> dict:
    """``out`` (= ``BUNDLE/edgellm``): checkpoint, fp16 graphs checked against torch, the join check,
    Edge-LLM's exporter when installed, and the manifest; -> the report's ``edgellm`` entry.
    ``bundle``: the published bundle's path, for the command a note gives (``out`` may be a work folder)."""
    from .edgellm_graphs import MAX_QUESTION_TOKENS, check_graphs, export_graphs
    from .edgellm_llm import check_graph, check_weights, command, installed_version, run_exporter

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    progress("writing the Edge-LLM checkpoint (GPTQ, group 128, fp16)")
    checkpoint = write_checkpoint(model, tokenizer, weights, out / "checkpoint")
    graphs = export_graphs(model, out, torch.float16, max_anchors=max_anchors, progress=progress)
    progress("checking vision.onnx / grasp.onnx (fp16) against the torch model")
    parity = check_graphs(model, tokenizer, out, torch.float16)
    join = check_join(model, tokenizer)
    spec = manifest(model, tokenizer, graphs, checkpoint, MAX_QUESTION_TOKENS, max_anchors)
    report = {"dir": out.name, "checkpoint": checkpoint, "parity": parity, "join_check": join}
    if installed_version() is not None:
        progress(f"running TensorRT Edge-LLM {installed_version()}'s exporter (--skip-visual, hidden_states)")
        llm = run_exporter(out / "checkpoint", out / "llm")
        progress("checking Edge-LLM's packed INT4 weights against ours")
        llm["weights_check"] = check_weights(out / "llm", weights)
        llm["problems"] = (check_graph(llm["graph"], len(weights), spec["llm_config"]["layers"])
                           + llm["weights_check"]["problems"][:5])
        spec["llm"] = report["llm"] = llm
    else:
        report["llm"] = None
        report["llm_note"] = (f"{DISTRIBUTION} is not installed, so llm/ was not written; on a machine with it: "
                              f"{command(bundle)}")
    write_report(out / MANIFEST_NAME, spec)  # hashed into the weights id: no timings (report_json)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
