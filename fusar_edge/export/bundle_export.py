"""``fusar-edge export``: a bundle (or preset) in, a deployable bundle with artifacts out.

The output directory is a complete bundle (``load_bundle`` opens it) with the exported
artifacts in sub-folders:

    onnx/             the three stages in fp32 (ONNX Runtime, and the source of the others)
    gptq/             Hugging Face GPTQ checkpoint of the language model's linear layers
    onnx-int4/        decoder with com.microsoft.MatMulNBits weights (ONNX Runtime CPU/CUDA), and
                      decoder-prefill.onnx: the same 4-bit weights as 8-bit for prompts on the CPU's
                      integer GEMM (int8_prefill.py; --no-int8-prefill leaves it out)
    edgellm/          TensorRT Edge-LLM (Jetson): its GPTQ checkpoint, its exporter's llm/ when
                      installed, our fp16 vision.onnx / grasp.onnx, fusar_edgellm.json (edgellm.py)
    export.json       what was exported, from what, with the parity checks (below)
    manifest.json     sha256 and size of every file, sub-folders included

Everything is written into a temporary sibling directory and moved into place at the end:
a failed or interrupted export leaves no half-written directory, and an existing output is
replaced only with ``force``. The temporary directory's name carries the process id
(``.NAME.export-PID-*``): the next export into the same parent deletes those of killed runs.

Parity checks that gate the export (a failure publishes nothing unless ``force``):

    onnx.parity                     the fp32 graphs vs the torch model (fp32 tolerance)
    onnx-int4.packing_check         the 4-bit weights packed as MatMulNBits at accuracy level 0
                                    (fp32 compute) vs the torch model holding the same dequantised
                                    weights: wrong packing, scales or layer mapping fail it
    edgellm.parity                  fp16 vision.onnx / grasp.onnx vs the fp32 torch model
    edgellm.join_check              the runner's id/table rule vs the torch fusion (exact)
    edgellm.llm.problems            Edge-LLM's graph: one INT4 GEMM plugin per quantised linear,
                                    one attention plugin per layer, the hidden_states output, and its
                                    packed INT4 weights and scales equal to ours (weights_check)

and measurements that are only reported (``onnx-int4``):

    accuracy_level_4_vs_dequantised the shipped graph (accuracy level 4: int8 activations inside
                                    ONNX Runtime) vs the dequantised torch model
    int8_prefill_vs_dequantised     the same with prompts on decoder-prefill.onnx (as the CPU runs it)
    quantisation_vs_fp32            the 4-bit weights alone (the level-0 graph) vs the fp32 model

``failed_checks`` lists the gating checks a ``force``d export was written despite.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fusar_edge.errors import BundleError, FusarError
from fusar_edge.hashing import file_record
from fusar_edge.config import resolve_model
from fusar_edge.fsutil import publish_dir, remove_stale_work_dirs, work_dir
from fusar_edge.model.bundle import open_model, save_bundle, write_manifest

from .report_json import write_report

Progress = Callable[[str], None]


def _noop(message: str) -> None:
    pass


def export_bundle(source: str | Path | None, out: str | Path, *, onnx: bool = True, gptq4: bool = False,
                  calib: int = 16, group_size: int | None = None, edgellm: bool = False, force: bool = False,
                  parity_prompts: int = 3, progress: Progress | None = None, int8_prefill: bool = True) -> dict:
    """Export ``source`` (bundle directory or preset name; None = the built-in demo) into ``out``; -> the report.

    A gating parity check that fails raises ``FusarError`` and publishes nothing; ``force``
    replaces an existing ``out`` and publishes despite such a failure (listed in ``failed_checks``).
    ``group_size`` None: 128 when it divides every decoder input width (Edge-LLM's), else 64.
    ``edgellm`` takes the GPTQ weights of the source's ``gptq/`` (or ``edgellm/checkpoint/``) when
    they are group 128 and ``gptq4`` is not asked (GPTQ of a 7B model takes hours), else runs GPTQ.
    ``int8_prefill``: onnx-int4/ also gets ``decoder-prefill.onnx`` (twice the 4-bit weights' bytes).
    """
    progress = progress or _noop
    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out}: already exists; pass --force to replace a previous export")
    if edgellm:
        from .edgellm import GROUP_SIZE, check_group_size

        group_size = GROUP_SIZE if group_size is None else group_size
        check_group_size(group_size)
    if gptq4 and not onnx:
        onnx = True  # the 4-bit graphs are rewrites of the fp32 decoder graph
    started = time.perf_counter()
    source = resolve_model(source)
    if edgellm:  # from the config: a model Edge-LLM cannot run is refused before it loads
        from fusar_edge.config import model_config

        from .edgellm import check_config_shapes

        check_config_shapes(model_config(source), str(source))
    progress(f"loading {source}")
    # fp32: the exported graphs are the fp32 reference the 4-bit forms and other runtimes derive from
    model, tokenizer, weights_id = open_model(source, dtype=torch.float32, device="cpu")
    model.eval()
    if edgellm:
        from .edgellm import check_shapes

        check_shapes(model)  # before any work: GPTQ of a model Edge-LLM cannot run is time lost
        reused = None if gptq4 else _source_gptq(source)
    if gptq4 or edgellm:
        from .gptq import choose_group_size

        group_size = choose_group_size(model, group_size)
    parent = out.absolute().parent  # absolute: the report's paths are made relative to the stage
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(parent, "export")
    work = work_dir(parent, out.name, "export")
    try:
        stage = work / "bundle"
        progress("writing the bundle")
        save_bundle(model, tokenizer, stage, manifest=False,  # hashed once, at the end
                    copy_files=_generation_config(source))
        report: dict = {"source": str(source), "source_weights": weights_id,
                        "preset": model.config.name, "chip_size": model.config.chip_size, "artifacts": {}}
        gate = _Gate(force)
        if onnx:
            from .onnx_stages import export_stages, parity_report

            progress("exporting the ONNX stages")
            # its messages name the final bundle, not this temporary work folder
            stages = export_stages(model, stage / "onnx",
                                   progress=lambda msg: progress(msg.replace(str(stage), str(out))))
            progress("checking parity against the torch model")
            parity = parity_report(model, tokenizer, stage / "onnx", n_prompts=parity_prompts)
            report["artifacts"]["onnx"] = {"files": _rel(stages, stage), "parity": parity}
            gate.require("onnx/ parity check (fp32 graphs vs the torch model)", parity)
        weights = None
        if gptq4 or (edgellm and reused is None):
            weights = _gptq_weights(model, tokenizer, calib, group_size, progress)
        if gptq4:
            report["artifacts"].update(_export_gptq4(model, tokenizer, stage, work, weights, calib, group_size,
                                                     parity_prompts, gate, progress, int8_prefill))
        if edgellm:
            report["artifacts"]["edgellm"] = _export_edgellm(model, tokenizer, stage, weights, reused, gate,
                                                             progress, out)
        report["failed_checks"] = gate.failed
        report["seconds"] = round(time.perf_counter() - started, 1)
        write_report(stage / "export.json", report)  # hashed into the weights id: no timings (report_json)
        progress("hashing")
        write_manifest(stage)
        publish_dir(stage, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report  # the caller says where it wrote (the CLI: "wrote DIR in N s")


def _generation_config(source) -> dict[str, Path]:
    """The source bundle's generation_config.json travels with the export (its greedy settings)."""
    from fusar_edge.generation import GENERATION_CONFIG

    path = Path(source) / GENERATION_CONFIG if source is not None else None
    return {GENERATION_CONFIG: path} if path is not None and path.is_file() else {}


def _rel(paths, root: Path):
    if isinstance(paths, dict):
        return {k: _rel(v, root) for k, v in paths.items()}
    if isinstance(paths, (list, tuple)):
        return [_rel(v, root) for v in paths]
    if isinstance(paths, (str, Path)) and Path(paths).is_absolute():
        return Path(paths).relative_to(root).as_posix()
    return paths


class _Gate:
    """The parity checks that decide whether an export is published; ``force`` publishes despite them."""

    def __init__(self, force: bool):
        self.force = force
        self.failed: list[str] = []

    def require(self, check: str, parity: dict) -> None:
        if not parity.get("ok"):
            self.expect(False, f"{check} failed: {_parity_summary(parity, tolerance=True)}")

    def expect(self, ok: bool, failure: str) -> None:
        if ok:
            return
        if not self.force:
            raise FusarError(f"{failure}; nothing written (--force writes the export anyway)")
        self.failed.append(failure)


def _parity_summary(parity: dict, tolerance: bool = False) -> str:
    """``worst relative error 4.70e-03 (decode_logits), greedy tokens identical on 3/3 prompts``."""
    errs = parity.get("max_rel_err") or {"?": float("nan")}
    stage = max(errs, key=errs.get)
    where = stage
    if tolerance and "tolerance" in parity:
        where += f", {'within' if errs[stage] < parity['tolerance'] else 'above'} {parity['tolerance']:g}"
    text = f"worst relative error {errs[stage]:.2e} ({where})"
    g = parity.get("greedy")
    if g is None:  # a stage check (edgellm's graphs): no generation
        return text
    text += f", greedy tokens identical on {g.get('identical_sequences', '?')}/{g.get('of', '?')} prompts"
    if "token_agreement" in g and g.get("identical_sequences") != g.get("of"):
        text += f" (token agreement {g['token_agreement']:.0%})"
    return text


def _measurement(parity: dict, what: str) -> dict:
    """A parity report kept as a measurement: no ``ok`` / ``tolerance``, which would read as a verdict."""
    kept = {k: v for k, v in parity.items() if k not in ("ok", "tolerance")}
    return {"what": what, "gates_export": False, **kept}


def _module_of(initializer: str) -> str | None:
    """decoder.onnx names each linear's W^T ``<module>.weight_t``."""
    return initializer[: -len(".weight_t")] if initializer.endswith(".weight_t") else None


def _pack_decoder(src: Path, target: Path, weights: dict, form: str, group_size: int, level: int,
                  link: bool = False, int8_head: bool = False, prefill_samples: list | None = None,
                  scratch: Path | None = None):
    """``src``'s stages with the decoder's linears in 4-bit ``form`` (and, with ``int8_head``, the LM
    head in 8 bits; with ``prefill_samples``, calibration prompts, ``decoder-prefill.onnx`` beside
    it, smoothed by their activations) -> ``target``; -> the packing result."""
    from .int4_onnx import quantize_onnx_model, save_model
    from .int8_head import quantize_head_int8
    from .int8_prefill import PREFILL_FILE, activation_ranges, prefill_decoder

    _copy_stages(src, target, link=link)
    result = quantize_onnx_model(src / "decoder.onnx", weights, form=form, block_size=group_size,
                                 name_map=_module_of, missing="skip", accuracy_level=level, fuse_parallel=True)
    head_block = quantize_head_int8(result.model, block_size=group_size, accuracy_level=level) if int8_head else None
    if head_block:
        result.skipped = [s for s in result.skipped if not s.startswith("lm_head/")]
    result.path = save_model(result.model, target / "decoder.onnx")
    rewritten = None
    if prefill_samples:
        ranges = activation_ranges(result.model, _probe_runner(target, scratch), prefill_samples)
        prefill_model, rewritten = prefill_decoder(result.model, ranges)
        if rewritten:
            save_model(prefill_model, target / PREFILL_FILE)
    _restamp_stages(target, form, group_size, head_block, rewritten)  # once: it hashes every graph
    return result


def _probe_runner(stage_dir: Path, scratch: Path):
    """``make_runner`` for ``int8_prefill.activation_ranges``: the probe graph in ONNX Runtime over
    ``stage_dir``'s KV-cache layout, one calibration prompt (``inputs_embeds``, ``position_ids``) a call.
    Only the probe's session is opened (not the export's other graphs: a 7B's would be gigabytes)."""
    import onnxruntime as ort

    from fusar_edge.backends.onnxruntime import kv_dtype, new_decoder_state, run_decoder

    from .int4_onnx import save_model
    from .stages_format import read_stages

    spec = read_stages(stage_dir)  # the decoder's layout is the fp32 export's, copied in

    def make_runner(probe, names):
        path = save_model(probe, scratch / "activation-probe" / "decoder.onnx")  # > 2 GiB: external data
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shutil.rmtree(path.parent, ignore_errors=True)  # loaded: a decoder's worth of disk freed
        dtype = kv_dtype(session)

        def run(sample):
            embeds = np.ascontiguousarray(sample["inputs_embeds"].detach().float().numpy())
            positions = sample["position_ids"].detach().numpy().astype(np.int64)
            state = new_decoder_state(spec, 1, embeds.shape[1], dtype)
            outs = run_decoder(session, state, ort.OrtValue.ortvalue_from_numpy(embeds), positions, names)
            return [o.numpy() for o in outs]

        return run

    return make_runner


def _gptq_weights(model, tokenizer, calib: int, group_size: int, progress: Progress) -> dict:
    """GPTQ on real multimodal inputs (synthetic SAR scenes + anchors + questions)."""
    from .gptq import fusar_calibration_inputs, quantize_gptq

    progress(f"building {calib} calibration inputs (synthetic SAR scenes + anchors + questions)")
    samples = fusar_calibration_inputs(model, tokenizer, n=calib)
    progress(f"GPTQ 4-bit, group size {group_size}")
    try:
        return quantize_gptq(model, samples, group_size=group_size, progress=progress)
    except ValueError as exc:  # e.g. a group size that does not divide the layers (tiny: width 64)
        raise FusarError(f"--gptq4: {exc} (--group-size 64 or 128)") from None


def _source_gptq(source) -> tuple[str, dict] | None:
    """``(folder, weights)`` of the source bundle's group-128 GPTQ checkpoint (its ``gptq/``, else
    the ``edgellm/checkpoint/`` of an earlier --edgellm export), or None."""
    from .edgellm import GROUP_SIZE
    from .gptq_format import load_gptq_checkpoint, read_quantize_config

    if source is None:
        return None
    for rel in ("gptq", "edgellm/checkpoint"):
        folder = Path(source) / rel
        if not folder.is_dir():
            continue
        try:
            group = int(read_quantize_config(folder).get("group_size", 0))
            if group == GROUP_SIZE:
                return rel, load_gptq_checkpoint(folder)
        except ValueError as exc:
            raise BundleError(f"{folder}: {exc}") from None
    return None  # GPTQ runs here at 128; a group-64 gptq/ of the source stays as it is


def _export_edgellm(model, tokenizer, stage: Path, weights: dict | None, reused: tuple | None, gate: _Gate,
                    progress: Progress, out: Path) -> dict:
    """edgellm/ (edgellm.py), its checks gating the export like the others."""
    from .edgellm import export_edgellm
    from .onnx_stages import DEFAULT_MAX_ANCHORS

    if weights is None:
        progress(f"taking the GPTQ weights of the source's {reused[0]}/ (group 128)")
    rep = export_edgellm(model, tokenizer, weights if weights is not None else reused[1], stage / "edgellm",
                         max_anchors=DEFAULT_MAX_ANCHORS, progress=progress, bundle=out)
    rep["gptq"] = "computed here" if weights is not None else f"the source bundle's {reused[0]}/"
    gate.require("edgellm/ fp16 vision.onnx / grasp.onnx vs the torch model", rep["parity"])
    join = rep["join_check"]
    gate.expect(join["ok"], f"edgellm/ join check (placeholder ids + table vs the torch fusion): max abs error "
                            f"{join['max_abs_err']:.2e}")
    if rep.get("llm"):
        problems = rep["llm"]["problems"]
        gate.expect(not problems, "edgellm/llm/ (TensorRT Edge-LLM's graph): " + "; ".join(problems))
    return rep


def _export_gptq4(model, tokenizer, stage: Path, scratch: Path, weights: dict, calib: int, group_size: int,
                  prompts: int, gate: _Gate, progress: Progress, int8_prefill: bool = True) -> dict:
    """``weights`` (GPTQ) -> gptq/ checkpoint and onnx-int4/ (MatMulNBits).

    The packing is checked on a MatMulNBits graph at accuracy level 0 built in ``scratch`` (not
    published): with fp32 compute it must match the torch model holding the same dequantised
    weights at the fp32 tolerance. The shipped graph's accuracy level 4 (int8 activations) and
    the quantisation itself move the logits far more than that, so both are only measured.
    """
    from .gptq import apply_quantized, restore_weights, summarize
    from .gptq_format import save_gptq_checkpoint
    from .onnx_stages import parity_report

    progress("writing the GPTQ checkpoint")
    save_gptq_checkpoint(stage / "gptq", weights, model=model)

    out: dict = {"gptq": {"dir": "gptq", "group_size": group_size, "calibration_samples": calib,
                          "summary": summarize(weights)}}
    check_dir = scratch / "int4-packing-check"
    originals = apply_quantized(model, weights)
    try:
        progress("checking the 4-bit packing (MatMulNBits, accuracy level 0) against the dequantised torch model")
        _pack_decoder(stage / "onnx", check_dir, weights, "matmulnbits", group_size, 0, link=True)
        packing = parity_report(model, tokenizer, check_dir, n_prompts=prompts)
        gate.require("4-bit packing check (MatMulNBits at accuracy level 0 vs the dequantised torch model)",
                     packing)
        progress("packing the decoder as MatMulNBits into onnx-int4/ (LM head: 8-bit)")
        samples = None
        if int8_prefill:
            from .gptq import fusar_calibration_inputs

            progress(f"measuring activation ranges on {calib} calibration prompts for decoder-prefill.onnx")
            samples = fusar_calibration_inputs(model, tokenizer, n=calib)
        result = _pack_decoder(stage / "onnx", stage / "onnx-int4", weights, "matmulnbits", group_size, 4,
                               int8_head=True, prefill_samples=samples, scratch=scratch)
        out["onnx-int4"] = {"dir": "onnx-int4", "form": "matmulnbits", "quantized_layers": len(result.quantized),
                            "kept_float": [str(s) for s in result.skipped]}
        progress("measuring accuracy level 4 (int8 activations) and the 8-bit LM head against the dequantised "
                 "torch model")
        level4 = parity_report(model, tokenizer, stage / "onnx-int4", n_prompts=prompts, int8_prefill=False)
        prefill8 = None
        if int8_prefill:
            progress("measuring the int8 prefill graph (prompts on the integer GEMM) against the dequantised "
                     "torch model")
            prefill8 = parity_report(model, tokenizer, stage / "onnx-int4", n_prompts=prompts, int8_prefill=True)
    finally:
        restore_weights(model, originals)
    progress("measuring the 4-bit quantisation error against the fp32 torch model")
    quantisation = parity_report(model, tokenizer, check_dir, n_prompts=prompts)
    shutil.rmtree(check_dir, ignore_errors=True)  # a decoder's worth of disk, not part of the bundle
    out["onnx-int4"].update({
        "packing_check": {"what": "the same 4-bit weights as MatMulNBits at accuracy level 0 (fp32 compute) vs "
                                  "the torch model holding them dequantised; fails the export unless --force",
                          "accuracy_level": 0, "gates_export": True, **packing},
        "accuracy_level_4_vs_dequantised": _measurement(
            level4, "this graph (MatMulNBits accuracy level 4: int8 activations inside ONNX Runtime; the LM "
                    "head 8-bit, export/int8_head.py) vs the torch model holding the same dequantised 4-bit "
                    "weights and an fp32 head: the error level 4 and the 8-bit head add"),
        **({"int8_prefill_vs_dequantised": _measurement(
            prefill8, "as the CPU runs this folder: prompts on decoder-prefill.onnx (the same 4-bit weights "
                      "requantised to 8 bits per output channel, activations 8-bit per token, ONNX Runtime's "
                      "integer GEMM; export/int8_prefill.py), decode steps on the 4-bit graph, vs the torch "
                      "model holding the dequantised 4-bit weights")} if prefill8 else {}),
        "quantisation_vs_fp32": _measurement(
            quantisation, "the 4-bit weights alone (MatMulNBits at accuracy level 0) vs the fp32 torch model: "
                          "the error GPTQ's quantisation adds"),
    })
    return out


def describe(report: dict) -> list[str]:
    """One human line per artifact (and per check of the 4-bit graph) of an export report."""
    lines = []
    for name, art in report.get("artifacts", {}).items():
        if not isinstance(art, dict):
            lines.append(f"{name}: written")
            continue
        if name == "edgellm":
            lines.extend(_describe_edgellm(art))
            continue
        if "parity" in art:
            lines.append(f"{name}: parity {_verdict(art['parity'])}")
        elif "packing_check" not in art:
            lines.append(f"{name}: written")
        if "packing_check" in art:
            lines.append(f"{name}: packing check (accuracy level 0 vs dequantised torch) "
                         f"{_verdict(art['packing_check'])}")
        for key, label in (
                ("accuracy_level_4_vs_dequantised", "accuracy level 4 + 8-bit LM head vs dequantised torch"),
                ("int8_prefill_vs_dequantised", "the same with prompts on the int8 prefill graph"),
                ("quantisation_vs_fp32", "4-bit quantisation vs fp32 torch")):
            if key in art:
                lines.append(f"{name}: {label} (measured only): {_parity_summary(art[key])}")
    for failure in report.get("failed_checks", []):
        lines.append(f"WRITTEN WITH --force DESPITE: {failure}")
    return lines


def _describe_edgellm(art: dict) -> list[str]:
    lines = [f"edgellm: checkpoint/ GPTQ 4-bit, {art['checkpoint']['quantized_linears']} linears, group "
             f"{art['checkpoint']['group_size']}, fp16 ({art['gptq']})",
             f"edgellm: vision.onnx / grasp.onnx fp16 vs torch {_verdict(art['parity'])}",
             f"edgellm: join check (placeholder ids + table vs the torch fusion) "
             f"{'ok' if art['join_check']['ok'] else 'FAILED'}: max abs error {art['join_check']['max_abs_err']:.1e}"]
    llm = art.get("llm")
    if llm:
        plugins = ", ".join(f"{n} {k}" for k, n in llm["graph"]["plugins"].items())
        verdict = "ok" if not llm["problems"] else "FAILED: " + "; ".join(llm["problems"])
        lines.append(f"edgellm: llm/ by TensorRT Edge-LLM {llm['edgellm_version']} in {llm['seconds']} s: {plugins}, "
                     f"hidden_states {llm['graph']['hidden_states']} ({verdict})")
        wc = llm.get("weights_check")
        if wc:
            lines.append(f"edgellm: llm/ INT4 weights vs ours: {'ok' if wc['ok'] else 'FAILED'} "
                         f"({wc['linears']} linears' scales, {wc['packed_weights_compared']} linears' packed codes)")
    else:
        lines.append(f"edgellm: llm/ not written: {art['llm_note']}")
    return lines


def _verdict(parity: dict) -> str:
    """``ok: worst relative error ... (prefill_logits, within 0.0001), greedy ...`` or ``FAILED: ...``."""
    return f"{'ok' if parity.get('ok') else 'FAILED'}: {_parity_summary(parity, tolerance=True)}"


def _copy_stages(src: Path, dst: Path, link: bool = False) -> None:
    """Every file of ``src`` but the decoder; ``link``: hard links where possible (a throwaway copy).

    stages.json is always copied: ``_restamp_stages`` rewrites it in place, which through a
    link would rewrite ``src``'s too.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith("decoder.onnx"):
            if link and p.suffix != ".json":
                try:
                    os.link(p, dst / p.name)
                    continue
                except OSError:
                    pass
            shutil.copy2(p, dst / p.name)


def _restamp_stages(folder: Path, form: str, group_size: int, head_block: int | None = None,
                    prefill_linears: int | None = None) -> None:
    """stages.json of a 4-bit folder: say what its decoder holds (``head_block``: the 8-bit LM head's
    block size; ``prefill_linears``: how many linears decoder-prefill.onnx has on the integer GEMM)
    and refresh file hashes/sizes."""
    from .int8_prefill import PREFILL_FILE

    path = folder / "stages.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["weights"] = {"decoder": f"int4 {form}, symmetric, block {group_size} (GPTQ)"
                                  + (f"; lm_head int8, symmetric, block {head_block} (round to nearest)"
                                     if head_block else "")}
    if prefill_linears:
        spec["weights"]["decoder_prefill"] = (f"{prefill_linears} linears: the same 4-bit weights as int8 per "
                                              "output channel, int8 activations per token (MatMulInteger)")
        spec["stages"]["decoder_prefill"] = {
            "file": PREFILL_FILE,
            "what": "the decoder for prompts on the CPU's integer GEMM (>= 16 tokens a sequence: "
                    "backends/onnxruntime.py PREFILL_MIN_ROWS); decode steps run decoder.onnx; same inputs "
                    "and outputs"}
    files = spec.get("files")
    if isinstance(files, dict):
        for name in list(files):
            p = folder / name
            if p.is_file():
                files[name] = file_record(p)
            else:
                files.pop(name)
        for p in [*folder.glob("decoder.onnx*"), *folder.glob(PREFILL_FILE + "*")]:
            files[p.name] = file_record(p)
    for key, name in (("decoder", "decoder.onnx"), ("decoder_prefill", PREFILL_FILE)):
        dec = spec.get("stages", {}).get(key)
        if isinstance(dec, dict):
            data = [p.name for p in folder.glob(name + ".*")]
            dec["data"] = data[0] if data else None
    write_report(path, spec, indent=1)
