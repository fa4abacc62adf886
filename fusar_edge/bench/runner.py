"""Run one request through a backend's stages, repeatedly, and through the transformers baseline.

One request is what ``Runtime.ask`` does, split at the stage boundaries the report shows:

    preprocess  read the image, chip + patches, chat sequence (per image of the batch)
    anchors     AEF lookup in the tile store (per image; nothing without a store)
    vision      ViT + merger + TLM (per image)
    fusion      token embeddings + visual tokens + GRASP prompt (per image)
    prefill     the decoder over the batch's sequences, up to the first token (greedy argmax)
    decode      one step per further token, ``new_tokens - 1`` steps
    other       dropping the KV cache

The work is fixed: exactly ``new_tokens`` tokens per sequence, end-of-sequence ignored (as
llama-bench and trtllm-bench do), so every backend and run does the same amount.

The baseline is what a user runs without fusar-edge: ``Qwen2_5_VLForConditionalGeneration
.generate`` of transformers on the same weights (the torch model's own backbone), the same
pixels and token ids, greedy with ``min_new_tokens = max_new_tokens``. It has no AEF lookup,
TLM or GRASP (transformers does not know them), and its vision runs inside the prefill, so
it reports preprocess, prefill (first token) and per-token decode only.
"""

from __future__ import annotations

import gc
import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import FusarError, InputError
from .bandwidth import (bandwidth_entry, cache_note, decoder_weight_bytes, noise_notes, read_ceiling_gbs,
                        same_size_ceiling_gbs)
from .clock import PeakMemory, StageClock
from .stats import summarize

BACKENDS = ("torch", "onnxruntime")
# names an older command line may still pass, and where that work went
RETIRED = {"tensorrt": "retired: on NVIDIA edge GPUs the language model runs in TensorRT Edge-LLM (fusar-edge export "
                       "--edgellm, docs/jetson.md); time it there with its own benchmark tools"}
STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill", "decode", "other")
QUESTION = "How many ships are there in this image?"

Progress = Callable[[str, int, int], None]  # (label, runs done, runs total)


@dataclass
class BenchSettings:
    model: str = "tiny"  # bundle directory or preset name
    backends: list[str] = field(default_factory=lambda: ["torch"])
    image: str | None = None  # None: the built-in synthetic scene (with its tile store)
    tiles: str | None = None
    question: str = QUESTION
    runs: int = 10
    warmup: int = 2
    new_tokens: int = 32
    batch: int = 1
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None
    baseline: bool = True
    anchor_grid: tuple[int, int] = (16, 16)

    def validate(self) -> None:
        for name, low in (("runs", 1), ("warmup", 0), ("new_tokens", 1), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name.replace('_', '-')}: expected an integer >= {low}, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"threads: expected an integer >= 1, got {self.threads!r}")
        if not self.question.strip():
            raise InputError("question: expected a non-empty string")
        if self.image is not None and not Path(self.image).is_file():
            raise InputError(f"{self.image}: no such image file")


def split_backends(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """-> (backends to run, in order, without repeats; {unknown name: why it is skipped})."""
    run, skipped = [], {}
    for name in names:
        name = name.strip()
        if not name or name in run:
            continue
        if name in BACKENDS:
            run.append(name)
        elif name in RETIRED:
            skipped[name] = f"backend {name!r} {RETIRED[name]}"
        else:
            skipped[name] = f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}"
    return run, skipped


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (missing package, no runtime support), before loading anything."""
    if backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        from ..backends.onnxruntime import NOT_INSTALLED

        return NOT_INSTALLED
    return None


# -- opening a backend ------------------------------------------------------------------------
def check_fits(settings: BenchSettings) -> None:
    """Refuse a random-weight preset that cannot fit this machine's memory, before allocating it."""
    from ..config import PRESETS, preset
    from ..model.bundle import count_parameters
    from ..backends.torch_stages import resolve_device
    from .machine import meminfo_kb

    if settings.model not in PRESETS or Path(settings.model).is_dir():
        return
    device, dtype = resolve_device(settings.device, settings.dtype)
    need = count_parameters(preset(settings.model)) * torch.tensor([], dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where, have = f"GPU {torch.cuda.get_device_name(device)}", free
    else:
        kb = meminfo_kb("MemAvailable")
        if kb is None:
            return
        where, have = "this machine", kb * 1024
    if need * 1.1 > have:
        hint = " (try --dtype bfloat16)" if dtype == torch.float32 else ""
        raise FusarError(f"preset {settings.model!r}: {need / 2**30:.1f} GiB of {str(dtype).replace('torch.', '')} "
                         f"weights do not fit the {have / 2**30:.1f} GiB available on {where}{hint}")


def open_backend(settings: BenchSettings, backend: str):
    from ..runtime import Runtime

    return Runtime.open(settings.model, tiles=settings.tiles, backend=backend, device=settings.device,
                        dtype=settings.dtype if backend == "torch" else None, anchor_grid=settings.anchor_grid,
                        threads=settings.threads)


def _cuda_device(rt):
    model = rt.model
    return model.device if model is not None and model.device.type == "cuda" else None


def _argmax(logits, banned: list[int]) -> list[int]:
    """Greedy tokens ``[B]`` from logits ``[B, V]``, never a ``banned`` (end-of-sequence) id: the
    fixed-length rule, the same as the baseline's ``min_new_tokens``."""
    logits[:, banned] = -float("inf")
    if isinstance(logits, torch.Tensor):
        return logits.argmax(dim=-1).tolist()
    return logits.argmax(axis=-1).tolist()


# -- one request --------------------------------------------------------------------------------
@torch.inference_mode()  # as Runtime.ask: no autograd graph (it would hold every activation)
def run_request(rt, settings: BenchSettings, clock: StageClock, cold_question: bool = True) -> dict:
    """One batch of requests through ``rt``'s stages, marking ``clock`` at every boundary.

    ``cold_question``: the question is new to the runtime (GRASP's question cache emptied first:
    the cold time to first token); False asks it as a repeated question."""
    stages, b = rt.stages, settings.batch
    if cold_question:
        stages.questions.clear()
    clock.start()
    reqs = [rt.prepare(settings.image, settings.question) for _ in range(b)]
    clock.mark("preprocess")
    anchors = [rt.anchor_tensors(None, r.image) for r in reqs]
    clock.mark("anchors")
    visual = [stages.vision(r.pixels, r.grid_thw, a) for r, (a, _) in zip(reqs, anchors)]
    clock.mark("vision")
    embeds = stages.stack([stages.fusion(r.sequence.input_ids, r.sequence.layout, v, r.sequence.question_ids)[0]
                           for r, v in zip(reqs, visual)])
    clock.mark("fusion")
    stop = rt.tokenizer.stop_ids
    logits, state = stages.prefill_batch(embeds, reqs[0].positions, reqs[0].sequence.layout.image_start)
    tokens = _argmax(logits, stop)
    clock.mark("prefill")
    generated = [tokens]
    position = reqs[0].next_position
    for _ in range(settings.new_tokens - 1):
        logits, state = stages.step_batch(tokens, position, state)
        tokens = _argmax(logits, stop)
        position += 1
        clock.mark("decode")
        generated.append(tokens)
    clock.mark("other")
    return {"anchor": anchors[0][1], "sequence_length": int(reqs[0].sequence.input_ids.size),
            "tokens": [list(seq) for seq in zip(*generated)]}


def _token_marks(clock: StageClock):
    """A transformers streamer that marks ``clock`` at every generated token.

    ``generate`` calls ``put`` with the prompt first, then once per step with the new tokens.
    """
    from transformers.generation.streamers import BaseStreamer

    class TokenMarks(BaseStreamer):
        calls = 0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls > 1:
                clock.mark("prefill" if self.calls == 2 else "decode")

        def end(self) -> None:
            pass

    return TokenMarks()


@torch.inference_mode()  # generate itself only disables gradients
def run_baseline_request(rt, settings: BenchSettings, clock: StageClock) -> dict:
    """The same batch through plain ``Qwen2_5_VLForConditionalGeneration.generate``."""
    from transformers import GenerationConfig

    model = rt.model
    backbone, dev = model.backbone, model.device
    clock.start()
    reqs = [rt.prepare(settings.image, settings.question) for _ in range(settings.batch)]
    inputs = {
        "input_ids": torch.from_numpy(np.stack([r.sequence.input_ids for r in reqs])).to(dev),
        "pixel_values": torch.from_numpy(np.concatenate([r.pixels for r in reqs])).to(device=dev,
                                                                                        dtype=model.visual.dtype),
        "image_grid_thw": torch.from_numpy(np.concatenate([r.grid_thw for r in reqs])).to(dev),
    }
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    # what Qwen's processor returns: transformers 5 computes M-RoPE positions only when it is given
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == backbone.config.image_token_id).int()
    clock.mark("preprocess")
    stop = rt.tokenizer.stop_ids
    config = GenerationConfig(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens,
                              do_sample=False, eos_token_id=stop, pad_token_id=stop[-1])
    out = backbone.generate(**inputs, generation_config=config, streamer=_token_marks(clock))
    clock.mark("other")
    new = out[:, inputs["input_ids"].shape[1]:]
    if new.shape[1] != settings.new_tokens:
        raise FusarError(f"baseline: generate returned {new.shape[1]} new tokens, expected {settings.new_tokens}")
    return {"sequence_length": int(inputs["input_ids"].shape[1]), "tokens": new.tolist()}


# -- repeated runs -> one backend's report ---------------------------------------------------
def measure(label: str, request, rt, settings: BenchSettings, progress: Progress | None = None) -> dict:
    """``warmup`` untimed then ``runs`` timed requests -> stage statistics and the raw runs."""
    cuda = _cuda_device(rt) if label in ("torch", "baseline") else None
    total = settings.warmup + settings.runs
    runs, per_token, device_runs, info = [], [], [], {}
    if progress:
        progress(label, 0, total)
    for i in range(total):
        clock = StageClock(cuda_device=cuda)
        info = request(rt, settings, clock)
        if i >= settings.warmup:
            row = {k: round(v, 4) for k, v in clock.totals().items()}
            row["end_to_end"] = round(clock.elapsed_ms(), 4)
            runs.append(row)
            per_token.extend(ms for name, ms in clock.stages if name == "decode")
            if cuda is not None:
                clock.finish()
                device_runs.append({n: ms for n, ms in clock.device_ms})
        if progress:
            progress(label, i + 1, total)
    stages = {name: summarize([r[name] for r in runs]) for name in STAGES if name in runs[0]}
    stages.pop("decode", None)
    stages["decode_per_token"] = summarize(per_token)
    first = [sum(r[s] for s in ("preprocess", "anchors", "vision", "fusion", "prefill") if s in r) for r in runs]
    stages["ttft"] = summarize(first)
    stages["end_to_end"] = summarize([r["end_to_end"] for r in runs])
    decode = stages["decode_per_token"]
    entry = {
        "status": "ok",
        "stages": stages,
        "ttft_ms": stages["ttft"]["p50_ms"],
        "decode_ms_per_token": decode["p50_ms"] if decode else None,
        "decode_tokens_per_s": round(settings.batch * 1000.0 / decode["p50_ms"], 2) if decode else None,
        "end_to_end_ms": stages["end_to_end"]["p50_ms"],
        "sequence_length": info.get("sequence_length"),
        "tokens": info.get("tokens"),  # of the last run: a check that backends compute the same thing
        "runs_ms": runs,
    }
    if device_runs:
        entry["device_stages"] = {name: summarize([r[name] for r in device_runs if name in r])
                                  for name in device_runs[0]}
    if "anchor" in info:
        a = info["anchor"]
        entry["anchor"] = {k: a.get(k) for k in ("source", "year", "coverage", "count", "notes") if a.get(k) is not None}
    return entry


def _size_mb(rt, baseline: bool = False) -> float:
    if rt.model is None:  # exported stages: their files
        d = rt.stages.dir
        return round(sum(p.stat().st_size for p in d.iterdir() if p.is_file()) / 2**20, 1)
    module = rt.model.backbone if baseline else rt.model
    tensors = list(module.parameters()) + list(module.buffers())
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)


def _describe(rt, backend: str) -> dict:
    out = {"weights": rt.weights, "model_size_mb": _size_mb(rt, backend == "baseline"), **rt.placement()}
    if rt.model is not None:
        out.update(threads={"torch": torch.get_num_threads()})
    else:
        st = rt.stages
        out.update(providers=list(st.providers), variant=st.dir.name,
                   threads={"onnxruntime_intra_op": st.intra_op_threads})
    return out


def _release() -> None:
    """Free what the last backend left (the caller drops its references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # hand freed heap back to the OS so the next backend's peak RSS is its own
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_bench(settings: BenchSettings, progress: Progress | None = None,
              status: Callable[[str], None] | None = None) -> dict:
    """Every requested backend, then the baseline -> the result document (see ``report``).

    A backend that cannot run (unknown, not installed, no exported artifacts) is listed under
    ``skipped`` with the reason; the others still run.
    """
    from .. import __version__
    from ..geo.synthetic import write_demo_scene
    from .clock import timer_resolution_ms
    from .machine import machine_info

    settings.validate()
    say = status or (lambda msg: None)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    backends, skipped = split_backends(settings.backends)
    with tempfile.TemporaryDirectory(prefix="fusar-bench-") as tmp:
        if settings.image is None:
            demo = write_demo_scene(Path(tmp) / "scene")
            settings.image = demo["scene_tif"]
            if settings.tiles is None:
                settings.tiles = demo["tiles"]
        result = {
            "benchmark": "fusar-edge bench",
            "fusar_edge": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "settings": {"model": settings.model, "backends": backends, "image": str(settings.image),
                         "tiles": str(settings.tiles) if settings.tiles else None, "question": settings.question,
                         "runs": settings.runs, "warmup": settings.warmup, "new_tokens": settings.new_tokens,
                         "batch": settings.batch, "device": settings.device, "dtype": settings.dtype,
                         "threads": settings.threads, "anchor_grid": list(settings.anchor_grid),
                         "timer": {"clock": "time.perf_counter", "resolution_ms": timer_resolution_ms()},
                         "work": "exactly new_tokens tokens per sequence (end-of-sequence ignored); the question "
                                 "cache is emptied before each request (a question never seen)"},
            "backends": {},
            "skipped": dict(skipped),
        }
        baseline_rt, baseline_done = None, not settings.baseline
        order = list(backends)
        for backend in order:
            reason = unavailable_reason(backend)
            if reason:
                result["skipped"][backend] = reason
                say(f"{backend}: skipped: {reason}")
                continue
            try:
                if backend == "torch":
                    check_fits(settings)
                say(f"{backend}: opening {settings.model}")
                with PeakMemory(_maybe_cuda(settings, backend), torch_allocator=backend == "torch") as mem:
                    t0 = time.perf_counter()
                    rt = open_backend(settings, backend)
                    open_s = time.perf_counter() - t0
                    entry = measure(backend, run_request, rt, settings, progress)
            except FusarError as exc:
                result["skipped"][backend] = str(exc)
                say(f"{backend}: skipped: {exc}")
                continue
            on_cpu = rt.model is None and rt.stages.device_type == "cpu"  # onnxruntime without its CUDA EP
            entry.update(_describe(rt, backend), open_s=round(open_s, 3),
                         peak_mem_mb={"host": mem.host_mb, "device": None if on_cpu else mem.device_mb,
                                      "host_at_start": mem.host_start_mb})
            entry.update(bandwidth_entry(decoder_weight_bytes(rt), entry.get("decode_tokens_per_s"), settings.batch))
            result["backends"][backend] = entry
            if backend == "torch" and not baseline_done:
                result["backends"]["baseline"] = _run_baseline(rt, settings, progress, say)
                baseline_done = True
            rt = None
            _release()
        if not baseline_done:  # no torch backend asked for: the baseline loads the weights itself
            try:
                check_fits(settings)
                with PeakMemory(_maybe_cuda(settings, "torch")) as opening:  # not nested: one peak mark
                    say(f"baseline: opening {settings.model} (torch)")
                    baseline_rt = open_backend(settings, "torch")
                entry = _run_baseline(baseline_rt, settings, progress, say)
                peak = entry["peak_mem_mb"]
                peak["host"] = max(peak["host"], opening.host_mb)
                if opening.device_mb is not None:
                    peak["device"] = max(peak["device"] or 0.0, opening.device_mb)
                result["backends"]["baseline"] = entry
            except FusarError as exc:
                result["skipped"]["baseline"] = str(exc)
                say(f"baseline: skipped: {exc}")
            finally:
                baseline_rt = None
                _release()
        add_ratios(result)
        if result["backends"]:  # after the runs: its buffer never overlaps a backend's memory
            # each decoder against the memory it reads its weights from: host RAM, or its GPU's
            ceilings = {"cpu": read_ceiling_gbs()}
            result["machine"]["read_ceiling_gbs"] = ceilings["cpu"]
            for entry in result["backends"].values():
                where = str(entry.get("device", "cpu"))
                where = where if where.startswith("cuda") else "cpu"
                if where not in ceilings:
                    ceilings[where] = read_ceiling_gbs(device=where)
                    result["machine"].setdefault("device_read_ceiling_gbs", {})[where] = ceilings[where]
                entry["read_ceiling_gbs"] = ceilings[where]
                if entry.get("decode_read_gbs"):
                    entry["decode_read_of_ceiling"] = round(entry["decode_read_gbs"] / ceilings[where], 3)
                    if where == "cpu":  # the weights' own working set: in the cache or not
                        same = same_size_ceiling_gbs(int(entry["decode_weight_mb"] * 2**20), memory_gbs=ceilings["cpu"])
                        entry["same_size_read_ceiling_gbs"] = same
                        entry["decode_read_of_same_size_ceiling"] = round(entry["decode_read_gbs"] / same, 3)
        weights = {e["weights"] for e in result["backends"].values()}
        result["notes"] = []
        if "random" in weights:
            result["notes"].append("weights are random (a preset at its true size): timings are the architecture's, "
                                   "the answers are meaningless")
        result["notes"] += noise_notes(result)
        for entry in result["backends"].values():
            note = entry.get("same_size_read_ceiling_gbs") and cache_note(
                entry["decode_weight_mb"], entry["read_ceiling_gbs"], entry["same_size_read_ceiling_gbs"])
            if note and note not in result["notes"]:
                result["notes"].append(note)
    return result


def _maybe_cuda(settings: BenchSettings, backend: str):
    from ..backends.torch_stages import resolve_device

    if backend != "torch":
        return torch.device("cuda") if torch.cuda.is_available() and settings.device != "cpu" else None
    device, _ = resolve_device(settings.device, settings.dtype)
    return device if device.type == "cuda" else None


def _run_baseline(rt, settings: BenchSettings, progress, say) -> dict:
    say("baseline: transformers Qwen2_5_VLForConditionalGeneration.generate on the same weights and inputs")
    with PeakMemory(_cuda_device(rt)) as mem:
        entry = measure("baseline", run_baseline_request, rt, settings, progress)
    entry.update(bandwidth_entry(decoder_weight_bytes(rt), entry.get("decode_tokens_per_s"), settings.batch))
    entry.update(_describe(rt, "baseline"), open_s=None,
                 peak_mem_mb={"host": mem.host_mb, "device": mem.device_mb, "host_at_start": mem.host_start_mb})
    entry["notes"] = ["transformers generate: no AEF lookup, TLM or GRASP; its vision runs inside the prefill "
                      "stage (time to first token)"]
    return entry


def add_ratios(result: dict) -> None:
    """``vs_baseline`` per backend: how many times faster than the baseline (>1 = faster)."""
    base = result["backends"].get("baseline")
    if not base:
        return
    for name, entry in result["backends"].items():
        if name == "baseline":
            continue
        ratios = {}
        for key in ("ttft_ms", "end_to_end_ms", "decode_ms_per_token"):
            if entry.get(key) and base.get(key):
                ratios[key.replace("_ms", "")] = round(base[key] / entry[key], 2)
        if entry.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            ratios["decode_tokens_per_s"] = round(entry["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        entry["vs_baseline"] = ratios
