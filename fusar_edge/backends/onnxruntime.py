"""ONNX Runtime backend: the exported stages (``<bundle>/onnx/``) behind the runtime's stage interface.

``OnnxStages`` offers what ``fusar_edge.backends.torch_stages.TorchStages`` offers (``vision``,
``fusion``, ``prefill``, ``step``), over the graphs ``fusar_edge.export.onnx_stages``
writes:

- vision: the host computes TLM's matrix A (``tlm_host.tlm_weights_numpy``) from the anchor
  positions and mask, pads A and the features to the export's S anchors (zero columns =
  masked anchors); no anchors -> A = 0, i.e. the plain tower;
- fusion: ``embed.onnx`` embeds the chat sequence; with GRASP the question goes through
  ``embed.onnx`` + ``decoder.onnx`` (no past) for its hidden states; ``fusion.onnx``
  splices the visual tokens and the global prompt;
- decoder: prefill, then one token per ``step``; the KV cache (``kv_cache.DecoderState``) is
  one buffer per layer and side on the execution device, bound as both ``past_key_values.*``
  and ``present.*``, so ONNX Runtime writes each step's rows in place (no copy, no host
  round trip); so do the embeddings between ``embed.onnx``, ``fusion.onnx`` and
  ``decoder.onnx``. Only the last position's logits come back to the host. The prompt's
  head before the image (system prompt, ``<|vision_start|>``) is the same for every request:
  its KV rows are computed once and copied into each new state (``prefill_batch(prefix_len=)``).

Providers: CUDA when ONNX Runtime has the CUDA execution provider and ``device`` allows
it, else CPU; ``providers=[...]`` overrides (names or ``(name, options)`` pairs, as
``onnxruntime.InferenceSession`` takes them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AnchorError, FusarError, InputError
from ..lru import BoundedCache
from ..question_cache import QuestionCache
from ..threads import others_running
from .kv_cache import MIN_CAPACITY, DecoderState
from .tlm_host import tlm_weights_numpy

STAGES = ("vision", "embed", "fusion", "decoder")
PREFIX_CACHE_SIZE = 8  # distinct prompt heads kept (one per system prompt in practice)
PREFIX_MAX_BYTES = 32 << 20  # a longer head's rows are not kept: the cache stays under 8 x 32 MB
# Calls of at least this many tokens per sequence run on the int8 prefill graph when the export has one
# (export/int8_prefill.py); shorter ones and decode steps on the 4-bit graph, which reads half the bytes.
# At 16 rows the integer GEMM was already ~5x faster on a 1024 x 2816 weight (2-core Xeon with AMX).
# Per sequence, not per call: a prompt then takes the same graph alone or in a serve batch (and its
# activations are quantised per token, so batching does not change its numbers).
PREFILL_MIN_ROWS = 16

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


NOT_INSTALLED = ("onnxruntime is not installed: backend 'onnxruntime' needs the onnxruntime package "
                 "(pip install onnxruntime, or onnxruntime-gpu for CUDA; every fusar-edge install brings one)")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise FusarError(NOT_INSTALLED) from None
    return onnxruntime


def export_hint(bundle: str | Path | None = None) -> str:
    from ..config import builtin_bundle

    if bundle is not None and Path(bundle) == builtin_bundle():
        return "`fusar-edge export --out DIR --onnx` (the built-in demo)"
    src = str(bundle) if bundle is not None else "BUNDLE"
    return f"`fusar-edge export {src} --out DIR --onnx`"


def check_export(onnx_dir: str | Path, bundle: str | Path | None = None) -> dict:
    """``stages.json`` of ``onnx_dir`` after checking every file it needs exists (one-line errors)."""
    from ..export.stages_format import STAGE_FILES, STAGES_JSON, read_stages

    onnx_dir = Path(onnx_dir)
    hint = (f"backend 'onnxruntime' runs the exported ONNX stages: run {export_hint(bundle)} "
            "and open DIR")
    for name in (STAGES_JSON, *STAGE_FILES.values()):
        if not (onnx_dir / name).is_file():
            raise FusarError(f"{onnx_dir / name}: missing ({hint})")
    spec = read_stages(onnx_dir)
    for stage in spec["stages"].values():
        if not (onnx_dir / stage["file"]).is_file():
            raise FusarError(f"{onnx_dir / stage['file']}: missing (listed in stages.json; {hint})")
        if stage.get("data") and not (onnx_dir / stage["data"]).is_file():
            raise FusarError(f"{onnx_dir / stage['data']}: missing (external weights of {stage['file']}; {hint})")
    return spec


def resolve_providers(providers=None, device: str = "auto") -> list:
    ort = _ort()
    available = ort.get_available_providers()
    if providers:
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise FusarError(f"onnxruntime providers {missing} are not available here (available: "
                             f"{', '.join(available)})")
        return list(providers)
    dev = str(device or "auto")
    if dev == "cpu":
        return ["CPUExecutionProvider"]
    if dev == "auto" or dev.startswith("cuda"):
        if "CUDAExecutionProvider" in available:
            index = int(dev.split(":", 1)[1]) if ":" in dev else 0
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        if dev != "auto":
            raise FusarError(f"device {dev!r}: this onnxruntime has no CUDAExecutionProvider (install "
                             "onnxruntime-gpu, or use --device cpu)")
        return ["CPUExecutionProvider"]
    raise InputError(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")


def spin_policy(setting: str) -> dict[str, bool]:
    """Which stages' ONNX Runtime workers spin while idle, from ``FUSAR_ORT_SPIN``: ``auto`` (the
    decoder, when ``threads.others_running()`` says no other work runs now), ``decoder``, ``0``
    (none) or ``1`` (every stage)."""
    if setting not in ("auto", "0", "1", "decoder"):
        raise InputError(f"FUSAR_ORT_SPIN: expected auto, 0, 1 or decoder, got {setting!r}")
    if setting == "auto":
        setting = "decoder" if others_running() is False else "0"
    return {name: setting == "1" or (setting == "decoder" and name == "decoder") for name in STAGES}


EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot products that sum in int32


def int8_gemm_kind(machine: str | None = None, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """What ONNX Runtime's uint8 x int8 GEMM is on this CPU: ``exact`` (x86 with VNNI or AMX: int8
    dot products summed in int32; where the int8 prefill was measured fast), ``saturating`` (x86
    without them: pairs of products summed in int16 by ``vpmaddubsw``; also an x86 whose flags
    cannot be read, the safe answer) or ``other`` (not x86: ARM's dot products sum in int32)."""
    import platform

    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "other"
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "saturating"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "exact" if any(f in flags for f in EXACT_INT8_FLAGS) else "saturating"


def prefill_policy(setting: str, kind: str) -> bool:
    """Whether prompts run on the export's int8 prefill graph. ``FUSAR_ORT_PREFILL``: ``auto`` (the
    default: on x86 CPUs with VNNI or AMX, ``kind`` ``exact``, the only kind measured; elsewhere on
    ``decoder.onnx``), ``int8`` (wherever the export has the graph) or ``int4`` (never)."""
    if setting not in ("auto", "int8", "int4"):
        raise InputError(f"FUSAR_ORT_PREFILL: expected auto, int8 or int4, got {setting!r}")
    return setting == "int8" or (setting == "auto" and kind == "exact")


def _stage_options(ort, threads: int | None, spins: bool):
    """Our session options for one stage: ``threads`` intra-op threads, and whether its workers spin.

    Idle ONNX Runtime workers spin before they sleep. The stages run in turn with host work
    between them: spinning pools of the vision, embed and fusion sessions starved the next stage
    on a small CPU (`fusar-edge bench`, 2 cores: vision 77 -> 4 ms without). The decoder is the
    exception on idle cores: waking a sleeping worker for each of a decode step's ~50 ops cost
    1.2-1.4x in decode speed (small, 2 cores, quiet; README). With both cores taken by other
    processes spinning made it 1.6x slower instead (one busy neighbour: 1.02-1.12x faster still),
    so by default (auto) the decoder spins only when no other work was running at open
    (threads.others_running). FUSAR_ORT_SPIN=decoder / 0 / 1: the decoder always / no session /
    every session.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spins else "0")
    if spins:  # between the ops of a run only: after it the workers sleep at once, not ~50 ms more
        # on the CPU the next stage (or request) needs
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def kv_dtype(session) -> type:
    """The KV cache's numpy dtype of a decoder graph's session."""
    inputs = {i.name: i for i in session.get_inputs()}
    return _NP.get(inputs["past_key_values.0.key"].type, np.float32)


def new_decoder_state(spec: dict, batch: int, capacity: int, dtype, device: tuple[str, int] = ("cpu", 0)
                      ) -> DecoderState:
    """An empty KV cache for a decoder of the export ``spec`` (``stages.json``): ``batch`` sequences,
    room for ``capacity`` tokens (it grows)."""
    dec = spec["decoder"]
    return DecoderState(_ort(), batch=batch, layers=int(dec["num_layers"]), kv_heads=int(dec["num_kv_heads"]),
                        head_dim=int(dec["head_dim"]), capacity=capacity, dtype=dtype, rope=dec["rope"],
                        device=device)


def cache_bindings(state: DecoderState):
    """``(past input name, present output name, buffer)`` per layer and side: one buffer is both."""
    for i in range(state.layers):
        for j, side in enumerate(("key", "value")):
            yield f"past_key_values.{i}.{side}", f"present.{i}.{side}", state.buffers[2 * i + j]


def run_decoder(session, state: DecoderState, embeds, positions: np.ndarray, outputs: list[str],
                device: tuple[str, int] = ("cpu", 0)) -> list:
    """One call of ``decoder.onnx``: ``embeds`` (an OrtValue) at M-RoPE ``positions`` added to
    ``state``'s cache, in place; -> the OrtValues of ``outputs``.

    ``logits`` come back in host memory, other outputs stay on ``device``. The state keeps its
    IO binding: the cache buffers are bound as inputs once, and a call rebinds its embeddings
    and the outputs (the same buffers as ``present.*``).
    """
    feeds = state.feeds(positions)
    io = state.bindings.get(id(session))
    if io is None:  # a new state, one whose buffers grew, or the other decoder graph (int8 prefill)
        io = state.bindings[id(session)] = session.io_binding()
        for past, _, buffer in cache_bindings(state):
            io.bind_ortvalue_input(past, buffer)
    io.bind_ortvalue_input("inputs_embeds", embeds)
    for name, value in feeds.items():
        io.bind_ortvalue_input(name, value)
    io.clear_binding_outputs()
    for name in outputs:
        io.bind_output(name, "cpu" if name == "logits" else device[0], device[1])
    for _, present, buffer in cache_bindings(state):
        io.bind_ortvalue_output(present, buffer)
    session.run_with_iobinding(io)
    state.advance(int(np.asarray(positions).shape[-1]))
    return io.get_outputs()[:len(outputs)]


class StepBinding:
    """A CPU decode step with everything bound once: the token ids, the embeddings between
    ``embed.onnx`` and ``decoder.onnx``, and the logits live in numpy arrays that ONNX Runtime reads
    and writes in place, beside the state's cache buffers and small inputs (``DecoderState``). A
    step then writes its token ids and runs two sessions: no per-step binding, allocation or copy
    (rebinding ~25 values a step cost ~10 % of decode on ``small``: ``benchmarks/decoder_ab.py``).
    Made per state, on its first step; a state whose buffers grow drops it (``DecoderState.step_io``)."""

    def __init__(self, sessions: dict, state: DecoderState, feeds: dict):
        ort = _ort()
        wrap = ort.OrtValue.ortvalue_from_numpy
        embed_out = sessions["embed"].get_outputs()[0]
        self.tokens = np.zeros((state.batch, 1), np.int64)
        self.embeds = np.empty((state.batch, 1, int(embed_out.shape[-1])), _NP.get(embed_out.type, np.float32))
        logits = next(o for o in sessions["decoder"].get_outputs() if o.name == "logits")
        self.logits = np.empty((state.batch, 1, int(logits.shape[-1])), np.float32)
        self._values = [wrap(self.tokens), wrap(self.embeds), wrap(self.logits)]  # they must outlive the bindings
        self.embed_io = sessions["embed"].io_binding()
        self.embed_io.bind_ortvalue_input("input_ids", self._values[0])
        self.embed_io.bind_ortvalue_output("inputs_embeds", self._values[1])
        self.io = io = sessions["decoder"].io_binding()
        io.bind_ortvalue_input("inputs_embeds", self._values[1])
        for name, value in feeds.items():  # a one-token call's feeds: host arrays rewritten in place
            io.bind_ortvalue_input(name, value)
        for past, present, buffer in cache_bindings(state):
            io.bind_ortvalue_input(past, buffer)
            io.bind_ortvalue_output(present, buffer)
        io.bind_ortvalue_output("logits", self._values[2])


def decode_step(sessions: dict, state: DecoderState, tokens, position: int) -> np.ndarray:
    """One greedy step of a CPU state (``StepBinding``): ``tokens`` (one per sequence) at text
    position ``position`` -> logits ``[B, V]`` (a copy: the bound array is rewritten next step)."""
    if len(tokens) != state.batch:
        raise ValueError(f"decode step: {len(tokens)} token(s) for a state of {state.batch} sequence(s)")
    feeds = state.feeds(np.full((3, state.batch, 1), position, np.int64))  # may grow: drops step_io
    if state.step_io is None:
        state.step_io = StepBinding(sessions, state, feeds)
    step = state.step_io
    step.tokens[:, 0] = tokens
    sessions["embed"].run_with_iobinding(step.embed_io)
    sessions["decoder"].run_with_iobinding(step.io)
    state.advance(1)
    return step.logits[:, -1].copy()


class OnnxStages:
    """The exported stages of one bundle in ONNX Runtime sessions.

    Stateless like ``TorchStages``: ``prefill*`` return a fresh KV state (``DecoderState``, its
    own buffers) that the caller passes to ``step*``; ONNX Runtime's ``run`` is thread-safe, and
    each call binds its own inputs and outputs, so threads can share one object.
    """

    def __init__(self, onnx_dir: str | Path, providers=None, device: str = "auto", bundle=None,
                 session_options=None, threads: int | None = None, question_cache: int = 256,
                 int8_prefill: bool | None = None):
        ort = _ort()
        self.dir = Path(onnx_dir)
        self.spec = check_export(self.dir, bundle)
        chosen = resolve_providers(providers, device)
        # the caller's session options are used as they are; only ours get a spinning policy (and
        # only then is the CPU sampled for other work, ~40 ms)
        spinning = spin_policy(os.environ.get("FUSAR_ORT_SPIN", "auto")) if session_options is None else None
        self.decoder_spins = bool(spinning and spinning["decoder"])
        per_stage = {name: session_options if session_options is not None
                     else _stage_options(ort, threads, spinning[name]) for name in STAGES}
        self.intra_op_threads = per_stage["decoder"].intra_op_num_threads  # 0: ONNX Runtime's default
        self.sessions = {}
        for name in STAGES:
            path = self.dir / self.spec["stages"][name]["file"]
            try:
                self.sessions[name] = ort.InferenceSession(str(path), sess_options=per_stage[name], providers=chosen)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise FusarError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.providers = self.sessions["decoder"].get_providers()
        # Prompts on the integer GEMM (export/int8_prefill.py): CPU only (unmeasured on CUDA, where
        # the 4-bit kernels are not what holds prefill back), and with our session options only.
        prefill = self.spec["stages"].get("decoder_prefill")
        self.prefill_session = None
        kind = int8_gemm_kind() if prefill else "other"
        if int8_prefill is None:
            int8_prefill = prefill_policy(os.environ.get("FUSAR_ORT_PREFILL", "auto"), kind)
        if prefill and int8_prefill and session_options is None and self.providers[0] == "CPUExecutionProvider":
            path = self.dir / prefill["file"]
            opts = _stage_options(ort, threads, spinning["decoder"])
            if kind == "saturating":  # ONNX Runtime's exact uint8 x uint8 kernels instead; not set on
                # VNNI / AMX CPUs, where it would switch them too (3.5x slower on a 1024 x 2816
                # weight, Xeon with AMX) though their uint8 x int8 kernels are exact
                opts.add_session_config_entry("session.x64quantprecision", "1")
            try:
                self.prefill_session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
            except Exception as exc:
                raise FusarError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.device_type, self.device_id = "cpu", 0
        if self.providers[0] == "CUDAExecutionProvider":
            self.device_type = "cuda"
            opts_cuda = self.sessions["decoder"].get_provider_options().get("CUDAExecutionProvider", {})
            self.device_id = int(opts_cuda.get("device_id", 0))
        s = self.spec
        self.has_tlm = bool(s["tlm"]["enabled"])
        self.has_grasp = bool(s["grasp"]["enabled"])
        self.max_anchors = int(s["tlm"]["max_anchors"])
        dec = s["decoder"]
        self.num_layers = int(dec["num_layers"])
        self.kv_heads, self.head_dim = int(dec["num_kv_heads"]), int(dec["head_dim"])
        self.kv_dtype = kv_dtype(self.sessions["decoder"])
        self.questions = QuestionCache(question_cache)  # GRASP's question pass, by token ids
        self.prefixes = BoundedCache(PREFIX_CACHE_SIZE)  # KV rows of prompt heads, by their content

    # -- plumbing -----------------------------------------------------------------------------
    def _value(self, array: np.ndarray):
        ort = _ort()
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)

    def _run(self, stage: str, feeds: dict[str, Any], outputs: list[str], host: tuple[str, ...] = ()) -> list:
        """Run one stage through IO binding; inputs: numpy arrays or OrtValues.

        -> OrtValues, on the execution device except the outputs named in ``host`` (bound to CPU
        memory: what the host reads anyway, such as logits).
        """
        ort = _ort()
        sess = self.sessions[stage]
        io = sess.io_binding()
        keep = []
        for name, value in feeds.items():
            if not isinstance(value, ort.OrtValue):
                value = self._value(np.asarray(value))
                keep.append(value)
            io.bind_ortvalue_input(name, value)
        for name in outputs:
            if name in host:
                io.bind_output(name, "cpu")
            else:
                io.bind_output(name, self.device_type, self.device_id)
        sess.run_with_iobinding(io)
        return io.get_outputs()

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        """numpy from an OrtValue, a (CPU, detached) torch tensor or anything array-like."""
        if isinstance(value, np.ndarray):
            return value
        if hasattr(value, "detach"):  # a torch tensor (callers such as the parity check pass them)
            value = value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
        return value.numpy() if hasattr(value, "numpy") else np.asarray(value)

    # -- stages ---------------------------------------------------------------------------
    def anchor_inputs(self, anchors) -> tuple[np.ndarray, np.ndarray]:
        """``(A [T, S], features [S, 64])`` float32 for ``vision.onnx``, padded to the export's S."""
        s = self.spec
        t_tok, width = int(s["visual_tokens"]), int(s["tlm"]["vec_dim"])
        a = np.zeros((t_tok, self.max_anchors), np.float32)
        f = np.zeros((self.max_anchors, width), np.float32)
        if anchors is None:
            return a, f
        features, positions, mask = (self.to_numpy(x) for x in anchors)
        if features.ndim != 2 or features.shape[1] != width:
            raise AnchorError(f"anchor features: expected [S, {width}], got {list(features.shape)}")
        n = features.shape[0]
        if n > self.max_anchors:
            raise AnchorError(f"anchor set: {n} anchors, but vision.onnx in {self.dir} was exported for at most "
                              f"{self.max_anchors}; use a coarser anchor grid or re-export with more anchors")
        a[:, :n] = tlm_weights_numpy(positions, mask, tuple(s["patch_grid"]), tuple(s["token_grid"]),
                                     s["tlm"]["sigma"], s["tlm"]["eps"])
        f[:n] = features.astype(np.float32)
        return a, f

    def vision(self, pixels, grid_thw=None, anchors=None):
        """-> visual tokens ``[T, C]`` (an OrtValue on the execution device)."""
        s = self.spec
        px = np.asarray(pixels.numpy() if hasattr(pixels, "numpy") else pixels, dtype=np.float32)
        want = (int(s["num_patches"]), int(s["patch_dim"]))
        if px.shape != want:
            raise InputError(f"vision: pixel_values {list(px.shape)} do not match the export's chip "
                             f"({s['chip_size']} px -> {list(want)})")
        feeds: dict[str, Any] = {"pixel_values": px}
        if self.has_tlm:
            a, f = self.anchor_inputs(anchors)
            feeds.update(anchor_weights=a, anchor_features=f)
        return self._run("vision", feeds, ["visual_tokens"])[0]

    def vision_batch(self, images: list[tuple]) -> list:
        """One by one: the exported vision graph takes exactly one chip (fixed patch count)."""
        return [self.vision(p, g, a) for p, g, a in images]

    def embed(self, input_ids):
        ids = np.asarray(input_ids.numpy() if hasattr(input_ids, "numpy") else input_ids, dtype=np.int64)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids  # [L] or [B, L]
        return self._run("embed", {"input_ids": ids}, ["inputs_embeds"])[0]

    def new_state(self, batch: int, capacity: int) -> DecoderState:
        """An empty KV cache for ``batch`` sequences, room for ``capacity`` tokens (it grows)."""
        return new_decoder_state(self.spec, batch, capacity, self.kv_dtype, (self.device_type, self.device_id))

    def _decoder(self, embeds, positions: np.ndarray, state: DecoderState, outputs: list[str]) -> list:
        """One decoder call adding ``embeds``' tokens to ``state``'s cache (``run_decoder``)."""
        if not isinstance(embeds, _ort().OrtValue):
            embeds = self._value(np.asarray(embeds))
        shape = embeds.shape()
        session = self.sessions["decoder"]
        if self.prefill_session is not None and shape[1] >= PREFILL_MIN_ROWS:
            session = self.prefill_session
        return run_decoder(session, state, embeds, positions, outputs, (self.device_type, self.device_id))

    def question_hidden(self, question_ids):
        """The decoder's final hidden states over the question alone (GRASP's text-only pass)."""
        ids = np.asarray(question_ids.numpy() if hasattr(question_ids, "numpy") else question_ids,
                         dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        pos = np.broadcast_to(np.arange(n, dtype=np.int64), (3, 1, n))
        return self._decoder(self.embed(ids), pos, self.new_state(1, n), ["last_hidden_state"])[0]

    def fusion(self, input_ids, layout, visual_tokens, question_ids=None):
        """-> ``(inputs_embeds [1, L, C] OrtValue, GRASP block weights [N] numpy or None)``."""
        t_tok = int(self.spec["visual_tokens"])
        if layout.image_len != t_tok:
            raise ValueError(f"fusion: {t_tok} visual tokens for {layout.image_len} image placeholders")
        text = self.embed(input_ids)
        feeds: dict[str, Any] = {"text_embeds": text, "visual_tokens": visual_tokens,
                                 "image_start": np.array([layout.image_start], np.int64)}
        if not self.has_grasp:
            return self._run("fusion", feeds, ["inputs_embeds"])[0], None
        length = int(np.asarray(input_ids).size)
        if layout.prompt_len:
            if question_ids is None:
                raise ValueError("fusion: GRASP needs the question's token ids")
            feeds["question_hidden"] = self.questions.get(question_ids, lambda: self.question_hidden(question_ids))
            feeds["prompt_start"] = np.array([layout.prompt_start], np.int64)
        else:  # no prompt slots: nothing to splice (prompt_start past the end)
            c = int(self.spec["hidden_size"])
            feeds["question_hidden"] = np.zeros((1, 1, c), self.kv_dtype)
            feeds["prompt_start"] = np.array([length], np.int64)
        embeds, weights = self._run("fusion", feeds, ["inputs_embeds", "grasp_weights"], host=("grasp_weights",))
        return embeds, (weights.numpy() if layout.prompt_len else None)

    def stack(self, embeds: list):
        """B fused sequences ``[1, L, C]`` -> one ``[B, L, C]`` (through host memory when B > 1)."""
        if len(embeds) == 1:
            return embeds[0]
        return self._value(np.concatenate([self.to_numpy(e) for e in embeds], axis=0))

    def prefill_batch(self, embeds, positions, prefix_len: int = 0) -> tuple[np.ndarray, DecoderState]:
        """Run B sequences of one length (one layout); -> (the last position's logits ``[B, V]``, KV state).

        ``prefix_len``: the leading positions that are plain text shared by many requests (the
        layout's ``image_start``). Their KV rows are kept by content (the embeddings and
        positions, hashed) and copied into the state, so only the rest runs; causal attention
        makes the rows independent of what follows, so the logits equal a full prefill's. A batch
        of several sequences (``serve``'s micro-batches), or a head whose rows would pass
        ``PREFIX_MAX_BYTES``, runs whole.
        """
        pos = np.asarray(positions.numpy() if hasattr(positions, "numpy") else positions, dtype=np.int64)
        if isinstance(embeds, np.ndarray) or not hasattr(embeds, "numpy"):
            embeds = np.asarray(embeds)
        batch = int(embeds.shape()[0] if callable(getattr(embeds, "shape", None)) else embeds.shape[0])
        length = pos.shape[-1]
        pos = np.ascontiguousarray(np.broadcast_to(pos, (3, batch, length)))
        state = self.new_state(batch, length + MIN_CAPACITY)
        # batch 1 only: GroupQueryAttention takes new tokens after a past for one sequence at a time
        row_bytes = 2 * self.num_layers * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize
        if batch == 1 and 0 < prefix_len < length and prefix_len * row_bytes <= PREFIX_MAX_BYTES:
            host = self.to_numpy(embeds)
            self._load_prefix(host, pos, int(prefix_len), state)
            embeds = self._value(host[:, prefix_len:])
            pos = np.ascontiguousarray(pos[:, :, prefix_len:])
        logits = self._decoder(embeds, pos, state, ["logits"])[0]
        return logits.numpy()[:, -1], state

    def _load_prefix(self, embeds: np.ndarray, pos: np.ndarray, n: int, state: DecoderState) -> None:
        """Copy the KV rows of one sequence's first ``n`` positions (``embeds``: host ``[B, L, C]``)
        into ``state`` (computed on a miss)."""
        head = np.ascontiguousarray(embeds[:1, :n])
        head_pos = np.ascontiguousarray(pos[:, :1, :n])
        key = (n, hashlib.sha256(head.tobytes()).hexdigest(), hashlib.sha256(head_pos.tobytes()).hexdigest())

        def compute():
            alone = self.new_state(1, n)
            self._decoder(self._value(head), head_pos, alone, ["logits"])
            return alone.cached_rows(), alone.cos[:n].copy(), alone.sin[:n].copy()

        state.load_prefix(*self.prefixes.lookup(key, compute))

    def step_batch(self, tokens: list[int], position: int, state) -> tuple[np.ndarray, DecoderState]:
        """One decode step per sequence at M-RoPE text position ``position``; -> (logits ``[B, V]``, state).

        The state's cache grows in place: the returned state is the one passed in.
        """
        if state is None:
            raise FusarError("decode step before prefill")
        if state.on_host:
            return decode_step(self.sessions, state, np.asarray(tokens, np.int64), position), state
        embeds = self.embed(np.asarray(tokens, np.int64).reshape(-1, 1))
        pos = np.full((3, len(tokens), 1), position, np.int64)
        logits = self._decoder(embeds, pos, state, ["logits"])[0]
        return logits.numpy()[:, -1], state

    def prefill(self, embeds, positions, prefix_len: int = 0) -> tuple[np.ndarray, DecoderState]:
        """Run the whole sequence; -> (the last position's logits ``[V]``, KV state)."""
        logits, state = self.prefill_batch(embeds, positions, prefix_len)
        return logits[0], state

    def step(self, token: int, position: int, state) -> tuple[np.ndarray, DecoderState]:
        """One decode step at M-RoPE text position ``position``; -> (logits ``[V]``, state)."""
        logits, state = self.step_batch([token], position, state)
        return logits[0], state
