"""The runtime: one SAR image + one question -> a typed answer, with per-stage timings.

``Runtime.open(bundle)`` loads a bundle (default: the built-in trained demo); ``runtime.ask``
reads the image, prepares its anchors, runs the three stages (vision + TLM, fusion +
GRASP, decoder) with greedy decoding over a KV cache, and parses the text into the
task's answer type. Decoding is deterministic: greedy, no sampling, fixed bound.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tasks
from .config import PRESETS, resolve_model
from .errors import AnchorError, BundleError, FusarError, InputError, MissingAnchorsError
from .geo.anchors import Anchor, AnchorSet
from .tiles.store import DEFAULT_GRID, TileStore, check_grid
from .generation import GenerationSettings, GreedyPicker
from .geo.chip import to_chip
from .geo.sar import SarImage, image_from_array, parse_date, read_sar
from .model.preprocess import chip_to_patches
from .model.rope import mrope_positions
from .tokenizer import build_sequence

BACKENDS = ("torch", "onnxruntime")
# the dtype names both backends take (torch_stages.DTYPES maps them to torch dtypes; the ONNX Runtime
# backend checks them against its export without importing torch)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}


@dataclass
class Answer:
    answer: Any  # typed per task: int, list of boxes, dict cell, str
    text: str  # the model's raw text
    task: str
    question: str
    anchor: dict[str, Any]
    timings_ms: dict[str, float]
    parse_error: str | None = None
    flags: list[str] = field(default_factory=list)
    image: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    grasp_weights: list[float] | None = None
    token_ids: list[int] = field(default_factory=list)  # the generated ids, stop token excluded

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_text(name: str, text: str) -> None:
    """Text must be valid Unicode: an undecodable byte on the command line arrives as a lone
    surrogate (Python's surrogateescape), which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise InputError(f"{name}: not valid UTF-8 text ({what} at character {exc.start})") from None


def _check_prompt_fits(context: int | None, prompt_tokens: int, question_tokens: int) -> None:
    """A prompt must leave the model's context room for at least one answer token."""
    if context and prompt_tokens >= context:
        raise InputError(f"question: {question_tokens} tokens; with the image and chat template the prompt takes "
                         f"{prompt_tokens} tokens, beyond the model's context of {context}: shorten the question")


def _source_label(bundle) -> str:
    return "built-in demo" if bundle is None else str(bundle)


def _require_torch() -> None:
    """The edge install has no torch: say what to do instead of a traceback."""
    missing = []
    for name in ("torch", "transformers", "safetensors"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FusarError(f"backend 'torch' needs {', '.join(missing)}, which this install lacks (the edge install "
                         "runs exported bundles only): use --backend onnxruntime (backend='onnxruntime') with a "
                         "bundle from `fusar-edge export`, or pip install 'fusar-edge[torch]'")


class _Timer:
    def __init__(self):
        self.ms: dict[str, float] = {}
        self.batch = 0  # sequences decoded together with this request (0: no batcher)
        self.vision_batch = 0  # images whose vision stage ran together with this one's

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.ms[name] = round((time.perf_counter() - t0) * 1e3, 3)


@dataclass
class Request:
    """One image + question made ready for the stages (what ``Runtime.prepare`` returns)."""

    image: SarImage
    pixels: np.ndarray  # float32 [patches, patch_dim]
    grid_thw: np.ndarray  # int64 [1, 3]
    sequence: Any  # tokenizer.ChatSequence
    positions: np.ndarray  # int64 M-RoPE [3, 1, L]
    next_position: int  # the first generated token's text position
    task: str
    label: str | None
    prompt: str  # the text sent to the model (the question, or its task template)


def _check_positive_int(name: str, value, expected: str = "a positive integer") -> None:
    """An argument that counts something: an int or numpy integer >= 1 (True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}: expected {expected}, got {value!r}")


def _check_sar_image(img: SarImage) -> None:
    """A SarImage built by hand (``read_sar`` / ``image_from_array`` make checked ones): its data
    must be what the chip code expects, or the answer would be made of garbage."""
    d = img.data
    shape_ok = (isinstance(d, np.ndarray)
                and ((d.ndim == 2 and d.dtype.kind == "f") or (d.ndim == 3 and d.shape[2] == 3 and d.dtype == np.uint8)))
    if not shape_ok:
        raise InputError(f"image {img.path}: SarImage.data must be float [H, W] in [0, 1] or uint8 [H, W, 3], got "
                         f"{getattr(d, 'dtype', type(d).__name__)} {list(getattr(d, 'shape', []))}; build it with "
                         "fusar_edge.geo.sar.image_from_array")
    if d.dtype.kind == "f" and d.size and not (np.isfinite(d).all() and d.min() >= 0.0 and d.max() <= 1.0):
        raise InputError(f"image {img.path}: SarImage.data must be finite and in [0, 1] (NaN or out of range); build "
                         "it with fusar_edge.geo.sar.image_from_array")
    if int(img.height) < 1 or int(img.width) < 1:
        raise InputError(f"image {img.path}: height and width must be positive, got {img.height} x {img.width}")


class Runtime:
    """A bundle opened for questions: ``Runtime.open(...)``, then ``ask(image, question)``.

    Concurrency contract: one Runtime may be shared by threads. ``ask`` keeps every piece of
    per-request state (KV cache, timers, picker) in the call, the stages only read weights,
    and the tile store's reader is thread-safe; concurrent calls answer exactly as sequential
    ones do. Each call runs its own forwards unless ``enable_batching()`` was called (then
    concurrent calls share vision and decode batches), so give the backend's thread pool
    (``threads=``) the cores that concurrent calls will share.
    """

    def __init__(self, model, tokenizer, weights: str, source: str, backend: str = "torch",
                 max_image_side: int = 20000, tiles: TileStore | None = None,
                 anchor_grid: tuple[int, int] = DEFAULT_GRID, allow_empty_anchors: bool = False,
                 *, stages=None, config=None, generation: GenerationSettings | None = None):
        """``model``: the torch ``FusarModel`` (None for the ONNX Runtime backend, which then
        gives ``stages``, an ``OnnxStages``, and the bundle's ``config``). ``generation``: the
        bundle's ``generation_config.json`` settings (plain greedy when None)."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config if config is not None else model.config
        if stages is None:
            from .backends.torch_stages import TorchStages

            stages = TorchStages(model)
        self.stages = stages
        self.generation = generation or GenerationSettings()
        self.batcher = None  # enable_batching(): concurrent decodes share prefill/decode steps
        self.vision_batcher = None  # ... and concurrent images share ViT calls
        self.weights, self.source, self.backend = weights, source, backend
        self.max_image_side = max_image_side
        self.tiles, self.anchor_grid, self.allow_empty_anchors = tiles, anchor_grid, allow_empty_anchors
        self.closed = False
        self._in_flight = 0  # asks running now: close() waits for them before it drops the model
        self._in_flight_changed = threading.Condition()

    def close(self) -> None:
        """Release the runtime: questions already being answered finish (from any thread), later
        ones are refused (``FusarError``), batch threads end, and the model and its sessions are
        dropped. Closing twice is harmless. Also what ``with Runtime.open(...) as rt:`` does on
        leaving the block."""
        with self._in_flight_changed:
            if self.closed:
                return
            self.closed = True
            self._in_flight_changed.wait_for(lambda: self._in_flight == 0)
        for batcher in (self.vision_batcher, self.batcher):
            if batcher is not None:
                batcher.close()
        self.batcher = self.vision_batcher = None
        self.model = self.stages = None

    def placement(self) -> dict:
        """``{"device", "dtype"}`` the answers are computed on (torch's device and weights dtype,
        or ONNX Runtime's device type and the exported graphs' dtype)."""
        if self.model is not None:
            return {"device": str(self.model.device), "dtype": str(self.model.dtype).replace("torch.", "")}
        return {"device": self.stages.device_type, "dtype": self.stages.spec["dtype"]}

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def open(cls, bundle: str | Path | None = None, tiles: str | Path | None = None, backend: str = "torch",
             dtype=None, device: str = "auto",
             max_image_side: int = 20000, anchor_grid: tuple[int, int] = DEFAULT_GRID,
             allow_empty_anchors: bool = False, providers: list | None = None,
             threads: int | None = None, verify: bool = False) -> "Runtime":
        """Open a bundle directory or a preset name (default: the built-in trained demo).

        ``device="auto"`` takes the GPU when torch sees one; ``dtype=None`` means bf16 on a GPU
        that supports it (the reference's inference dtype) and fp32 on the CPU.
        ``tiles``: an AEF tile store; every georeferenced image (or one given a ``bbox``) then
        gets its anchors looked up on an ``anchor_grid`` (rows, cols) over its footprint. A
        footprint the store does not cover is an error unless ``allow_empty_anchors``.

        ``backend="onnxruntime"`` runs the bundle's exported stages (``<bundle>/onnx/``, written
        by ``fusar-edge export BUNDLE --out DIR --onnx``) in ONNX Runtime; ``device`` then picks
        the execution provider (auto: CUDA when onnxruntime has it), ``providers`` overrides it,
        and ``dtype`` is the export's. ``threads``: ONNX Runtime's intra-op threads (default: its
        own choice, one per physical core); on torch, ``torch.set_num_threads(threads)``, which is
        process-wide (torch has one pool; default: left as it is).
        ``verify``: recompute every bundle file's sha256 against manifest.json before loading
        (every open checks sizes; ``model.bundle`` says how the weights id is made).
        """
        if backend not in BACKENDS:
            raise InputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if threads is not None:
            _check_positive_int("threads", threads, "a positive integer (or None for the default)")
        _check_positive_int("max_image_side", max_image_side, "a positive integer (pixels)")
        if not isinstance(allow_empty_anchors, (bool, np.bool_)):
            raise InputError(f"allow_empty_anchors: expected True or False, got {allow_empty_anchors!r}")
        if providers is not None and backend != "onnxruntime":
            raise InputError("providers: ONNX Runtime execution providers; only with backend='onnxruntime'")
        store = TileStore.open(tiles) if tiles is not None else None  # cheap; fail before loading weights
        check_grid(anchor_grid)
        if backend == "onnxruntime":
            return cls._open_onnx(bundle, store, device, dtype, providers, max_image_side, tuple(anchor_grid),
                                  allow_empty_anchors, threads, verify)
        _require_torch()
        from .backends.torch_stages import resolve_device
        from .model.bundle import open_model
        from .threads import set_torch_threads

        if threads is not None:
            set_torch_threads(int(threads))

        generation = GenerationSettings.from_bundle(resolve_model(bundle))  # refused settings: before loading
        device, dtype = resolve_device(device, dtype)
        model, tok, weights = open_model(bundle, dtype=dtype, device=device, verify=verify)
        return cls(model, tok, weights, _source_label(bundle), backend, max_image_side,
                   store, tuple(anchor_grid), allow_empty_anchors, generation=generation)

    @classmethod
    def _open_onnx(cls, bundle, store, device, dtype, providers, max_image_side, anchor_grid,
                   allow_empty_anchors, threads=None, verify=False) -> "Runtime":
        from .backends.onnxruntime import OnnxStages, export_hint
        from .config import read_config
        from .model.manifest import check_bundle
        from .tokenizer import TextTokenizer

        name = resolve_model(bundle)
        if not Path(name).is_dir():
            if name in PRESETS:
                raise FusarError(f"backend 'onnxruntime' runs an exported bundle, and preset {name!r} is not one: "
                                 f"run {export_hint(name)}, then open DIR (--bundle DIR)")
            raise BundleError(f"{name}: not a directory (expected a bundle exported with {export_hint()})")
        root = Path(name)
        weights = check_bundle(root, verify_hashes=verify)  # before any file is read
        config = read_config(root)
        generation = GenerationSettings.from_bundle(root)
        tok = TextTokenizer.from_file(root / "tokenizer.json")
        # the 4-bit export when there is one (what `export --gptq4` is for), else the fp32 stages;
        # FUSAR_ONNX_VARIANT=onnx forces the fp32 ones
        variant = os.environ.get("FUSAR_ONNX_VARIANT") or ("onnx-int4" if (root / "onnx-int4").is_dir() else "onnx")
        stages = OnnxStages(root / variant, providers=providers, device=device, bundle=root, threads=threads)
        spec = stages.spec
        if spec["chip_size"] != config.chip_size or tuple(spec["token_grid"]) != config.token_grid:
            raise BundleError(f"{root / 'onnx'}: exported for chip {spec['chip_size']} px, but fusar.json says "
                              f"{config.chip_size} px (re-run {export_hint(root)})")
        if dtype is not None:
            want = DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else str(dtype).replace("torch.", "")
            if want != spec["dtype"]:
                raise InputError(f"dtype: the ONNX stages in {root / 'onnx'} are {spec['dtype']}; "
                                 f"got dtype={dtype!r} (leave it unset for onnxruntime)")
        rows, cols = anchor_grid
        if store is not None and stages.has_tlm and rows * cols > stages.max_anchors:
            raise InputError(f"anchor_grid: {rows} x {cols} = {rows * cols} anchors, but {root / 'onnx'} was "
                             f"exported for at most {stages.max_anchors}; use a coarser grid")
        return cls(None, tok, weights, _source_label(bundle), "onnxruntime", max_image_side, store, anchor_grid,
                   allow_empty_anchors, stages=stages, config=config, generation=generation)

    # -- inputs --------------------------------------------------------------------------
    def _image(self, image: str | Path | SarImage | np.ndarray, scale: str, band: int | None = None) -> SarImage:
        if isinstance(image, SarImage):
            _check_sar_image(image)
            return image
        if isinstance(image, np.ndarray):  # checked and normalised as a .npy file is
            return image_from_array(image, "<array>", scale, self.max_image_side)
        if not isinstance(image, (str, Path)):
            raise InputError(f"image: expected a file path (str or Path), a 2-D numpy array or a SarImage, got "
                             f"{type(image).__name__}")
        return read_sar(image, scale=scale, band=band, max_side=self.max_image_side)

    def _anchors(self, anchors, img: SarImage, bbox, date,
                  no_anchors: bool = False) -> tuple[AnchorSet | None, dict[str, Any]]:
        if anchors is not None:  # given anchors say where and when: a bbox or date beside them would be ignored
            for name, value in (("bbox", bbox), ("date", date)):
                if value is not None:
                    raise InputError(f"{name}: given together with anchors; {name} chooses the footprint looked up "
                                     "in the tile store, and the given anchors already carry theirs (pass one or "
                                     "the other)")
        if no_anchors:  # before the footprint is built: its checks (e.g. across lon 180) are the anchors'
            if anchors is not None:
                raise InputError("anchors: given together with no_anchors (--no-anchors); pass one or the other")
            bounds = bbox or img.bounds_lonlat
            when = date if date is not None else img.acquisition_date
            return None, {"source": "none", "crs": img.crs, "bounds": list(bounds) if bounds else None,
                          "date": when.isoformat() if when else None, "year": None, "coverage": 0.0, "count": 0,
                          "notes": ["no_anchors: TLM skipped on request"]}
        footprint = Anchor.from_sar_image(img, date=date, bbox=bbox) if (img.bounds_lonlat or bbox) else None
        info: dict[str, Any] = {
            "source": "none", "crs": img.crs,
            "bounds": list(footprint.bbox) if footprint else None,
            "date": footprint.date.isoformat() if footprint and footprint.date else (date.isoformat() if date else None),
            "year": None, "coverage": 0.0, "count": 0,
        }
        if anchors is None and self.tiles is not None:
            if footprint is None:
                raise AnchorError(f"image {img.path}: no georeference, so the tile store cannot be used; give the "
                                  "footprint (ask --bbox LON_MIN LAT_MIN LON_MAX LAT_MAX; bbox=... in Python and in "
                                  "serve's form), or anchors from a file")
            anchors = footprint
        if anchors is None:
            info["notes"] = ["no anchors given: TLM not applied"]
            return None, info
        if isinstance(anchors, Anchor):
            if self.tiles is None:
                raise AnchorError("anchors: an Anchor needs a tile store for the AEF lookup: open the runtime with "
                                 "tiles=DIR (--tiles DIR), or pass an anchor file (.npz/.npy) or an AnchorSet")
            info.update(bounds=list(anchors.bbox), date=anchors.date.isoformat() if anchors.date else None)
            anchors = self.tiles.lookup(anchors, grid=self.anchor_grid, allow_empty=self.allow_empty_anchors)
            info["source"] = anchors.source
            info["crs"] = anchors.crs
        elif isinstance(anchors, (str, Path)):
            info["source"] = f"file:{anchors}"
            anchors = AnchorSet.load(anchors)
        elif isinstance(anchors, AnchorSet):
            info["source"] = anchors.source or "anchor set"
        else:
            raise InputError(f"anchors: expected an AnchorSet, an Anchor or a .npz/.npy path, "
                             f"got {type(anchors).__name__}")
        if anchors.notes:
            info["notes"] = list(anchors.notes)
        info.update(year=anchors.year if anchors.year is not None else info["date"] and int(info["date"][:4]),
                    coverage=round(float(anchors.coverage), 4), count=int(anchors.size))
        if not anchors.mask.any():
            info["notes"] = [*info.get("notes", []), "every anchor is masked (no AEF data): TLM not applied"]
            return None, info
        return anchors, info

    def prepare(self, image: str | Path | SarImage, question: str, *, task: str | None = None,
                scale: str = "auto", label: str | None = None, band: int | None = None) -> Request:
        """Read the image into the model's chip and patches, and build the chat sequence.

        The prompt follows the bundle's ``prompt_style`` (``tasks.build_prompt``): imported
        FUSAR-GPT checkpoints get the question as the reference sends it; ``label`` with
        ``task="detect"`` builds the reference detection prompt for that object class.
        ``band``: the GeoTIFF band to read (default: band 1). The text is checked first: a
        prompt that fills the model's context is refused before the image is read.
        """
        cfg = self.config
        _check_text("question", question)
        if label is not None:
            _check_text("label", label)
        task = task or tasks.infer_task(question)
        if label is not None and task != "detect":  # it would be silently unused
            raise InputError(f"label: applies to detection (task 'detect'); this question is task {task!r}")
        prompt = tasks.build_prompt(task, question, label=label, style=cfg.prompt_style)
        if not prompt:
            raise InputError("question: nothing left to ask once '<image>' and whitespace are removed")
        grasp_len = cfg.grasp.prompt_len if self.stages.has_grasp else 0
        seq = build_sequence(self.tokenizer, prompt, cfg.num_visual_tokens, grasp_len, cfg.system_prompt)
        _check_prompt_fits(cfg.context_length, len(seq.input_ids), len(seq.question_ids))
        img = self._image(image, scale, band)
        chip = to_chip(img, cfg.chip_size)
        pixels, grid_thw = chip_to_patches(chip, int(cfg.vision.get("patch_size", 14)),
                                           int(cfg.vision.get("spatial_merge_size", 2)),
                                           int(cfg.vision.get("temporal_patch_size", 2)))
        positions, next_pos = mrope_positions(len(seq.input_ids), seq.layout.image_start, cfg.token_grid)
        return Request(img, pixels, grid_thw, seq, positions, next_pos, task,
                       label or tasks.extract_label(question), prompt)

    def anchor_tensors(self, anchors, img: SarImage, bbox=None, date=None, no_anchors: bool = False):
        """The image's anchors (looked up in the tile store when there is one) as the vision
        stage's ``(features, positions, mask)``, or None; plus the answer's ``anchor`` report."""
        anchor_set, info = self._anchors(anchors, img, bbox, date, no_anchors)
        return (anchor_set.arrays() if anchor_set is not None else None), info

    def _require_tlm_anchors(self, anchor_tensors, info: dict[str, Any], img: SarImage, no_anchors: bool) -> None:
        """Record whether TLM ran (``anchor["tlm"]``); refuse to skip it silently.

        The reference raises when an image has no AEF vector; so does this runtime, unless the
        caller asked to answer without anchors (``no_anchors``) or allowed a tile store without
        coverage (``allow_empty_anchors``).
        """
        if not self.stages.has_tlm:
            info["tlm"] = "off"  # the bundle has no TLM: anchors change nothing
            return
        if anchor_tensors is not None:
            info["tlm"] = "applied"
            return
        from_store = info["source"].startswith("tiles:")  # TileStore.lookup's AnchorSet.source
        if no_anchors or (from_store and self.allow_empty_anchors):
            info["tlm"] = "skipped"
            return
        way_out = ("or pass --no-anchors (no_anchors=True) to answer without them, recorded in the answer as "
                   "tlm: skipped")
        if info["count"]:
            raise AnchorError(f"anchors {info['source']}: every anchor is masked (no AEF data for {img.path}), and "
                              f"this bundle's TLM needs at least one valid anchor; give other anchors, {way_out}")
        raise MissingAnchorsError(f"{img.path}: this bundle applies TLM, which needs AEF anchors, and none were given: pass "
                          f"--anchors FILE or --tiles DIR (anchors=... / tiles=...), {way_out}")

    # -- the question --------------------------------------------------------------------
    @contextmanager
    def _answering(self):
        """One question in flight: refused once the runtime is closed, and counted, so that
        ``close()`` from another thread waits for it instead of pulling the model from under it."""
        with self._in_flight_changed:
            if self.closed:
                raise FusarError("runtime: closed; open another with Runtime.open(...)")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify_all()

    def ask(self, image: str | Path | SarImage, question: str, anchors=None, *, task: str | None = None,
            bbox: tuple[float, float, float, float] | None = None, date=None, scale: str = "auto",
            max_new_tokens: int | None = None, label: str | None = None, no_anchors: bool = False,
            repetition_penalty: float | None = None, band: int | None = None) -> Answer:
        """Answer ``question`` about ``image``.

        ``anchors``: an ``AnchorSet``, a reference NPZ/NPY path, or an ``Anchor`` looked up in the
        runtime's tile store (default: the image's own georeference against the store). A bundle
        whose TLM is on refuses to answer without a valid anchor, as the reference does, unless
        ``no_anchors=True`` (the answer then records ``anchor.tlm == "skipped"``).
        ``label``: the object class for ``task="detect"`` (the reference detection prompt).
        ``repetition_penalty`` overrides the bundle's ``generation_config.json``. ``band``: the
        GeoTIFF band to read (default 1; the answer's ``image`` records ``band`` and ``bands``).
        ``max_new_tokens`` must fit the model's context after the prompt (the bundle's default is
        cut to fit).
        """
        with self._answering():
            return self._ask(image, question, anchors, task=task, bbox=bbox, date=date, scale=scale,
                             max_new_tokens=max_new_tokens, label=label, no_anchors=no_anchors,
                             repetition_penalty=repetition_penalty, band=band)

    def _ask(self, image, question, anchors, *, task, bbox, date, scale, max_new_tokens, label, no_anchors,
             repetition_penalty, band) -> Answer:
        if not isinstance(question, str) or not question.strip():
            raise InputError("question: expected a non-empty string")
        for token in self.tokenizer.special_tokens:
            if token in question:  # it would be encoded as the control token itself: a prompt injection
                raise InputError(f"question: contains the control token {token!r}, which would change the chat's "
                                 "structure; remove it")
        if bbox is not None:
            try:
                bbox = tuple(float(v) for v in bbox)
            except (TypeError, ValueError):
                bbox = ()  # not four numbers: refused below
            if len(bbox) != 4:
                raise InputError("bbox: expected four numbers (lon_min, lat_min, lon_max, lat_max)")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool)
                                           or not isinstance(max_new_tokens, (int, np.integer))):
            raise InputError(f"max_new_tokens: expected an integer, got {max_new_tokens!r}")
        if task is not None and task not in tasks.TASKS:
            raise InputError(f"task: expected one of {', '.join(tasks.TASKS)}, got {task!r}")
        if label is not None and (not isinstance(label, str) or not label.strip()):
            raise InputError(f"label: expected a non-empty object class such as 'ship', got {label!r}")
        if isinstance(date, str):
            date = parse_date(date)
        limit = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        context = self.config.context_length
        if limit < 1 or (context and limit > context):
            bound = f"1..{context} (the model's context)" if context else "a positive integer"
            raise InputError(f"max_new_tokens: expected {bound}, got {limit}")
        generation = self.generation.with_penalty(repetition_penalty)
        cfg, stages, timer = self.config, self.stages, _Timer()
        t_total = time.perf_counter()

        with timer.stage("preprocess"):
            req = self.prepare(image, question, task=task, scale=scale, label=label.strip() if label else None,
                               band=band)
            img, seq, task = req.image, req.sequence, req.task
        room = context and context - int(seq.input_ids.size)
        if room and limit > room:
            if max_new_tokens is not None:
                raise InputError(f"max_new_tokens: {limit} exceeds the {room} tokens the model's context of {context} "
                                 f"leaves after the {context - room}-token prompt")
            limit = room  # the bundle's default, cut to fit
        with timer.stage("anchors"):
            anchor_tensors, anchor_info = self.anchor_tensors(anchors, img, bbox, date, no_anchors)
            self._require_tlm_anchors(anchor_tensors, anchor_info, img, no_anchors)
        with timer.stage("vision"):
            if self.vision_batcher is not None:
                job = self.vision_batcher.vision(req.pixels, req.grid_thw, anchor_tensors)
                visual, timer.vision_batch = job.tokens, job.batch_size
            else:
                visual = stages.vision(req.pixels, req.grid_thw, anchor_tensors)
        with timer.stage("fusion"):
            embeds, grasp_w = stages.fusion(seq.input_ids, seq.layout, visual, seq.question_ids)
        picker = GreedyPicker(generation, seq.input_ids.tolist(), self.tokenizer.stop_ids)
        ids, decode_ms = self._generate(embeds, req.positions, req.next_position, limit, timer, picker,
                                         prefix_len=req.sequence.layout.image_start)
        text = self.tokenizer.decode(ids).strip()
        with timer.stage("parse"):
            parsed = tasks.parse_answer(task, text, chip_size=cfg.chip_size, image_size=(img.height, img.width),
                                        label=req.label)
        timer.ms["decode_per_token"] = round(sum(decode_ms) / len(decode_ms), 3) if decode_ms else 0.0
        timer.ms["total"] = round((time.perf_counter() - t_total) * 1e3, 3)
        return Answer(
            answer=parsed.to_json()["value"], text=text, task=task, question=question, anchor=anchor_info,
            timings_ms=timer.ms, parse_error=parsed.parse_error, flags=list(parsed.flags),
            image={"path": img.path, "height": img.height, "width": img.width, "kind": img.kind,
                   "band": img.band, "bands": img.bands, "chip_size": cfg.chip_size},
            model={"source": self.source, "preset": cfg.name, "weights": self.weights, "backend": self.backend,
                   **({"untrained": True} if cfg.untrained else {}),
                   **({"decode_batch": timer.batch} if timer.batch else {}),
                   **({"vision_batch": timer.vision_batch} if timer.vision_batch else {}),
                   "prompt_tokens": int(seq.input_ids.size), "new_tokens": len(ids), "max_new_tokens": limit, "prompt_style": cfg.prompt_style,
                   "prompt": req.prompt, "generation": generation.record(),
                   **({"onnx": self.stages.dir.name} if hasattr(self.stages, "dir") else {}),
                   **({"prompt_graph": "int8 (decoder-prefill.onnx)"}
                      if getattr(self.stages, "prefill_session", None) is not None else {})},
            grasp_weights=[round(float(w), 6) for w in grasp_w] if grasp_w is not None else None,
            token_ids=ids,
        )

    def enable_batching(self, max_batch: int = 8, window_ms: float = 5.0) -> "Runtime":
        """Run concurrent ``ask`` calls together (``batching``): up to ``max_batch`` images per
        vision call (``VisionBatcher``) and sequences of one length per prefill and decode step
        (``DecodeBatcher``), each gathered for up to ``window_ms``. More throughput from many
        threads; a batched answer can differ from the unbatched one at a greedy near-tie
        (last-bit rounding), so it is off by default."""
        from .batching import DecodeBatcher, VisionBatcher

        _check_positive_int("max_batch", max_batch)
        if isinstance(window_ms, bool) or not isinstance(window_ms, (int, float)) or not 0 <= window_ms < 10_000:
            raise InputError(f"window_ms: expected milliseconds in [0, 10000), got {window_ms!r}")
        if self.closed:
            raise FusarError("runtime: closed; open another with Runtime.open(...)")
        if self.batcher is None:
            self.vision_batcher = VisionBatcher(self.stages, max_batch=max_batch, window_s=window_ms / 1e3)
            self.batcher = DecodeBatcher(self.stages, max_batch=max_batch, window_s=window_ms / 1e3)
            self._batching = (int(max_batch), float(window_ms))
        elif self._batching != (int(max_batch), float(window_ms)):  # the running batchers keep theirs
            raise InputError(f"enable_batching: already on with max_batch {self._batching[0]}, window_ms "
                             f"{self._batching[1]:g}; batching settings are fixed once enabled (open another runtime)")
        return self

    def _generate(self, embeds, positions: np.ndarray, next_pos: int, limit: int,
                  timer: _Timer, picker: GreedyPicker, prefix_len: int = 0) -> tuple[list[int], list[float]]:
        """Greedy decoding over the KV cache, each step through ``picker`` (the bundle's logits
        settings, then argmax). ``prefix_len``: the prompt's shared text head (its KV rows may be
        reused, ``OnnxStages.prefill_batch``)."""
        if self.batcher is not None:
            job = self.batcher.generate(embeds, positions, next_pos, limit, picker, prefix_len)
            timer.ms["prefill"] = round(job.prefill_ms, 3)
            timer.ms["decode"] = round(sum(job.decode_ms), 3)
            timer.batch = job.batch_size  # how many sequences shared this request's steps
            return job.ids, job.decode_ms
        stages = self.stages
        with timer.stage("prefill"):
            logits, state = stages.prefill(embeds, positions, prefix_len)  # this request's own KV cache
            token = picker(logits)
        ids, decode_ms = [], []
        while not picker.is_stop(token):
            ids.append(token)
            if len(ids) >= limit:
                break
            t0 = time.perf_counter()
            logits, state = stages.step(token, next_pos, state)
            next_pos += 1
            token = picker(logits)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
        timer.ms["decode"] = round(sum(decode_ms), 3)
        return ids, decode_ms
