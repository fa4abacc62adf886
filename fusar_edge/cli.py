"""The ``fusar-edge`` command line.

Every user-fixable problem (bad image, malformed anchors, missing bundle file) prints one
line ``fusar-edge: error: ...`` and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import FusarError, InputError

# No hub, ever: model loading stays on local files even if a library would try otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EPILOG_ASK = """examples:
  fusar-edge sample demo/                      # a synthetic SAR scene, anchors and AEF tile store
  fusar-edge ask demo/scene.tif "How many ships are there in this image?" --tiles demo/tiles --json
  fusar-edge ask demo/scene.tif "How many ships are there in this image?" --anchors demo/anchors.npz
  fusar-edge ask demo/scene.png "Where is the ship?" --tiles demo/tiles --bbox 2.983 53.99 3.017 54.01 --date 2020-02-20
  fusar-edge ask chip.png "detect" --bundle bundles/fusar-7b --task detect --label plane --anchors chip.npz

Without --bundle the built-in demo runs: a small model trained here on synthetic SAR scenes
(scripts/train_demo.py; metrics in benchmarks/results/eval-demo-vm.md). Presets such as
`--bundle tiny` have random, untrained weights: their answers are not meaningful.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line, exit code 2, no usage block."""

    # argparse takes "-inf" or "-1e3" for an option (its own pattern knows only -12 and -1.5), so
    # `--bbox -1e3 ...` would fail as "expected 4 arguments"; every float spelling is a value here
    _NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = self._NEGATIVE_NUMBER

    def error(self, message: str):
        self.exit(2, f"fusar-edge: error: {message} (see `{self.prog} --help`)\n")


def add_device_args(parser) -> None:
    """``--device`` and ``--dtype`` for the commands that open a model on torch (onnxruntime takes
    the device alone: its CUDA provider when the device allows it)."""
    parser.add_argument("--device", default="auto", help="auto (GPU if torch sees one), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights/activations dtype on torch (default: bfloat16 on GPU, float32 on CPU)")


def _number_type(convert, accept, expected: str):
    """An argparse type: ``convert`` the text, keep it when ``accept(value)``, else one line
    saying ``expected`` (argparse prints it with the flag's name)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


_finite_float = _number_type(float, math.isfinite, "a finite number")  # coordinates
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
positive_float = _number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")


INFO_EPILOG = """examples:
  fusar-edge info                      # the built-in demo
  fusar-edge info bundles/demo-int4 --json
  fusar-edge info qwen2.5-vl-7b        # a preset: its shapes, random weights
"""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fusar-edge",
        description="Edge inference for SAR vision-language models (FUSAR-GPT: Qwen2.5-VL + AEF anchors + TLM + GRASP).",
    )
    p.add_argument("--version", action="version", version=f"fusar-edge {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors "
                                                        "(before or after the command: fusar-edge ask ... --debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("ask", help="answer a question about a SAR image",
                       description="Answer a question about one SAR image (GeoTIFF, PNG/JPEG or .npy).",
                       epilog=EPILOG_ASK, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("image", help="SAR image: GeoTIFF (georeferenced), PNG/JPEG, or .npy (real or complex)")
    a.add_argument("question", help='the question, e.g. "How many ships are there in this image?"')
    a.add_argument("--bundle", help="bundle directory or preset name (default: the built-in trained demo)")
    a.add_argument("--verify", action="store_true",
                   help="recompute every bundle file's sha256 against its manifest.json before loading (every "
                        "open already checks the files' sizes)")
    source = a.add_mutually_exclusive_group()
    source.add_argument("--anchors", metavar="FILE",
                        help="AEF anchor set: reference NPZ (features, positions) or NPY columns")
    source.add_argument("--tiles", metavar="DIR",
                        help="AEF tile store (`fusar-edge tiles ingest`): anchors are looked up for the image's "
                             "footprint (its georeference, or --bbox) and acquisition year")
    source.add_argument("--no-anchors", action="store_true",
                        help="answer without AEF anchors: TLM is skipped (recorded as tlm: skipped); a bundle "
                             "with TLM otherwise refuses, as the reference does")
    a.add_argument("--grid", nargs=2, type=int, default=[16, 16], metavar=("ROWS", "COLS"),
                   help="anchor grid over the footprint for --tiles (default: 16 16)")
    a.add_argument("--allow-no-coverage", action="store_true",
                   help="with --tiles, answer without anchors when the store has no data for the footprint "
                        "(default: error)")
    a.add_argument("--bbox", nargs=4, type=_finite_float, metavar=("LON_MIN", "LAT_MIN", "LON_MAX", "LAT_MAX"),
                   help="footprint of an image without georeference (overrides the GeoTIFF's)")
    a.add_argument("--date", metavar="YYYY-MM-DD", help="acquisition date (overrides the file's metadata)")
    a.add_argument("--task", choices=["count", "locate", "classify", "detect", "caption"],
                   help="answer type (selects the answer parser); default: inferred from the question")
    a.add_argument("--label", metavar="WORD",
                   help="object class for --task detect: sends FUSAR-GPT's detection prompt for WORD, byte for "
                        "byte (e.g. --task detect --label ship)")
    a.add_argument("--repetition-penalty", type=float, metavar="P",
                   help="override the bundle's generation_config.json repetition_penalty (1.0 = none; "
                        "Qwen2.5-VL-Instruct ships 1.05)")
    a.add_argument("--scale", choices=["auto", "amplitude", "db", "power"], default="auto",
                   help="how to read real-valued pixels (default: auto)")
    a.add_argument("--band", type=int, metavar="N",
                   help="GeoTIFF band to read, 1-based, e.g. 2 for VH in a VV/VH file (default: 1; the answer's "
                        "image record says which band of how many)")
    a.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                   help="torch (default); onnxruntime: the bundle's onnx/ export (fusar-edge export --onnx). "
                        "On a Jetson the language model runs in TensorRT Edge-LLM instead: export --edgellm, "
                        "docs/jetson.md")
    add_device_args(a)
    a.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch and ONNX Runtime (default: the physical cores this process may "
                        "use, within any container CPU quota, less the cores other work keeps busy at start)")
    a.add_argument("--max-new-tokens", type=int, metavar="N", help="bound on generated tokens (default: the bundle's)")
    a.add_argument("--max-image-side", type=int, default=20000, metavar="PX",
                   help="refuse images with a side above this (default: 20000); for a GeoTIFF, the side GDAL "
                        "reads at full resolution, so one with overviews (gdaladdo) may be larger")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    i = sub.add_parser("info", help="describe a bundle or preset",
                       description="What a bundle or preset is, from its configs and manifest alone (no weights are "
                                   "loaded; runs on the edge install): its weights id, which backends can run it "
                                   "(torch, the onnx/ and onnx-int4/ exports, GPTQ, Edge-LLM), the model's shapes, "
                                   "TLM and GRASP settings, generation settings and files.",
                       epilog=INFO_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("bundle", nargs="?", help="bundle directory or preset name (default: the built-in demo)")
    i.add_argument("--json", action="store_true", help="print the description as JSON")

    v = sub.add_parser("verify", help="check every file of a bundle against its manifest.json (sha256)",
                       description="Recompute the sha256 of every file of BUNDLE and compare with manifest.json: "
                                   "prints each changed, missing or unlisted file on its own line and exits 2 "
                                   "if there is any; otherwise one OK line with the weights id.")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--json", action="store_true", help="print one JSON object (files, bytes, weights, problems)")

    m = sub.add_parser("import-fusar-gpt", help="turn a FUSAR-GPT checkpoint into a bundle",
                       description="Merge a FUSAR-GPT checkpoint (base Qwen2.5-VL folder + PEFT LoRA adapter + "
                                   "vec64_film.pt / tlm_config.json) into one safetensors bundle.",
                       epilog="examples:\n"
                              "  fusar-edge import-fusar-gpt Qwen2.5-VL-7B-Instruct ckpt/stage2 ckpt/stage2 --out bundles/fusar-7b\n"
                              "  fusar-edge import-fusar-gpt runs/s0/base runs/s2 runs/s2 --out bundles/demo   # our own training\n"
                              "  fusar-edge import-fusar-gpt base lora --no-tlm --chip 504 --out bundles/no-aef  # trained without AEF\n"
                              "  fusar-edge import-fusar-gpt base old-lora old-lora --legacy-sigma 2.0 --out b  # no tlm_config.json\n\n"
                              "A stage-2 folder trained with --grasp also holds grasp_config.json + grasp.safetensors; GRASP is\n"
                              "then on in the bundle. The reference's generation_config.json is copied; answers follow it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("base", help="base Qwen2.5-VL folder (config.json, *.safetensors, tokenizer.json)")
    m.add_argument("lora", help="PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors)")
    m.add_argument("tlm", nargs="?", help="folder with vec64_film.pt and tlm_config.json (often the adapter folder); "
                                          "omit it with --no-tlm")
    m.add_argument("--no-tlm", action="store_true", help="a checkpoint trained without AEF: no TLM in the bundle")
    m.add_argument("--chip", type=int, default=504, metavar="PX",
                   help="with --no-tlm: the chip size it was trained at (default 504, the reference's)")
    m.add_argument("--out", required=True, help="bundle directory to write")
    m.add_argument("--legacy-sigma", type=float, help="TLM sigma for old checkpoints without tlm_config.json")
    m.add_argument("--force", action="store_true", help="replace --out if it exists")

    x = sub.add_parser("export", help="write deployable artifacts: ONNX stages, GPTQ 4-bit, TensorRT Edge-LLM",
                       description="Export a bundle (or a preset such as `tiny`) into a new bundle DIR with the "
                                   "artifacts inside: onnx/ (fp32 stages), gptq/ + onnx-int4/ (--gptq4), "
                                   "edgellm/ (--edgellm: for TensorRT Edge-LLM on a Jetson, docs/jetson.md). "
                                   "Writes a parity report against the torch model into DIR/export.json. A failed "
                                   "export leaves nothing behind.",
                       epilog="examples:\n"
                              "  fusar-edge export --out bundles/demo-onnx --onnx       # the built-in demo\n"
                              "  fusar-edge ask demo/scene.tif \"How many ships?\" --tiles demo/tiles --bundle bundles/demo-onnx "
                              "--backend onnxruntime\n"
                              "  fusar-edge export bundles/fusar-7b --out bundles/fusar-7b-int4 --gptq4 --calib 64\n"
                              "  fusar-edge export bundles/fusar-7b-int4 --out bundles/fusar-7b-jetson --edgellm"
                              "   # takes its group-128 gptq/\n"
                              "  fusar-edge export small --out bundles/small-jetson --edgellm --calib 4",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("bundle", nargs="?", help="bundle directory or preset name (default: the built-in demo)")
    x.add_argument("--out", required=True, metavar="DIR", help="bundle directory to write")
    x.add_argument("--onnx", action="store_true", help="export the three stages to ONNX (default when nothing "
                                                       "else is asked)")
    x.add_argument("--gptq4", action="store_true", help="GPTQ 4-bit weights for the language model (implies --onnx)")
    x.add_argument("--edgellm", action="store_true",
                   help="edgellm/: the language model as a GPTQ checkpoint TensorRT Edge-LLM builds (group 128, fp16), "
                        "Edge-LLM's own ONNX export of it when tensorrt-edgellm is installed (pip install "
                        "'fusar-edge[torch,edgellm]'; else the command to run later), fp16 vision.onnx (ViT + TLM) and "
                        "grasp.onnx for trtexec, and fusar_edgellm.json saying how a runner joins them")
    x.add_argument("--calib", type=positive_int, metavar="N",
                   help="calibration samples for GPTQ (--gptq4, --edgellm; default 16)")
    x.add_argument("--group-size", type=int, default=None, choices=[64, 128],
                   help="4-bit group size (default: 128 when it divides every decoder input width, else 64; "
                        "--edgellm takes 128 only)")
    x.add_argument("--no-int8-prefill", dest="int8_prefill", action="store_false",
                   help="--gptq4: leave out onnx-int4/decoder-prefill.onnx, the decoder for prompts on the CPU's "
                        "integer GEMM (measured on a Xeon with AMX: prefill 2.3x faster on `small`, 3.2x on a 3B-shaped "
                        "decoder; it costs twice the 4-bit weights' bytes on disk)")
    x.add_argument("--force", action="store_true", help="replace DIR if it exists, and write the export even "
                                                        "when a parity check fails (export.json records it)")
    x.add_argument("--json", action="store_true", help="print the export report as JSON")

    from . import cli_bench, cli_data, cli_eval, cli_scan, cli_serve, cli_tiles, cli_train

    cli_tiles.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_data.add_parser(sub)
    cli_train.add_parser(sub)
    cli_eval.add_parser(sub)
    cli_serve.add_parser(sub)
    cli_scan.add_parser(sub)

    s = sub.add_parser("sample", help="write a synthetic SAR scene, its AEF tile store and anchors to try `ask` on",
                       description="One scene from the same generator as `data synth` (sea or coast, with ships): "
                                   "scene.tif (georeferenced uint16 amplitude with an acquisition date), scene.png, "
                                   "tiles/ (its AEF tile store) and anchors.npz; prints the true ship count.",
                       epilog="examples:\n"
                              "  fusar-edge sample demo && fusar-edge ask demo/scene.tif \"How many ships are there in this image?\" --tiles demo/tiles\n"
                              "  fusar-edge sample demo2 --seed 3            # another scene\n"
                              "  fusar-edge ask demo/scene.png \"Where is the ship?\" --anchors demo/anchors.npz  # a PNG has no georeference",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("out", help="directory to write scene.tif, scene.png, anchors.npz and tiles/ into")
    s.add_argument("--size", type=int, default=224, metavar="PX",
                   help="scene side in pixels at 10 m (default 224, the demo model's chip)")
    s.add_argument("--seed", type=nonnegative_int, default=0, help="which scene (default 0); the same seed, the same scene")
    return p


def _print_answer(ans) -> None:
    print(f"answer: {json.dumps(ans.answer)}")
    if ans.parse_error:
        print(f"parse error: {ans.parse_error}")
    a = ans.anchor
    where = f"{a['count']} points, coverage {a['coverage']:.2f}, year {a['year']}" if a["count"] else "none"  # notes: below
    print(f"task: {ans.task} | anchors: {a['source']} ({where}) | TLM {a.get('tlm', 'off')} | "
          f"{ans.timings_ms['total']:.0f} ms")
    print(f"text: {ans.text!r}")
    for note in a.get("notes", []):
        print(f"note: {note}", file=sys.stderr)


def _check_path(what: str, path: str | None, directory: bool = False) -> None:
    """A missing or unreadable input is named in milliseconds, not after the model has loaded."""
    if path is None:
        return
    p, kind = Path(path), "directory" if directory else "file"
    if not p.exists():
        raise InputError(f"{what} {p}: no such {kind}")
    if p.is_dir() != directory:
        raise InputError(f"{what} {p}: not a {kind}")
    if not os.access(p, os.R_OK | (os.X_OK if directory else 0)):
        raise InputError(f"{what} {p}: not readable (permission denied)")


def check_ask_inputs(args) -> None:
    """``ask``'s input paths, checked before transformers is imported and the model loads."""
    _check_path("image", args.image)
    _check_path("anchors", args.anchors)
    _check_path("tile store", args.tiles, directory=True)


def cmd_ask(args) -> int:
    from .runtime import Runtime

    from .threads import resolve_threads, set_torch_threads

    args.threads = resolve_threads(args.threads)  # the cores we may use, never more (fusar_edge/threads.py)
    if args.backend == "torch":  # onnxruntime takes threads= below; on it torch is not even imported
        set_torch_threads(args.threads)
    rt = Runtime.open(args.bundle, tiles=args.tiles, backend=args.backend, device=args.device, dtype=args.dtype,
                      max_image_side=args.max_image_side, anchor_grid=tuple(args.grid),
                      allow_empty_anchors=args.allow_no_coverage, verify=args.verify, threads=args.threads)
    ans = rt.ask(args.image, args.question, anchors=args.anchors, task=args.task,
                 bbox=tuple(args.bbox) if args.bbox else None, date=args.date, scale=args.scale,
                 max_new_tokens=args.max_new_tokens, label=args.label, no_anchors=args.no_anchors,
                 repetition_penalty=args.repetition_penalty, band=args.band)
    if args.json:
        print(json.dumps(ans.to_json()))
    else:
        _print_answer(ans)
    if rt.config.untrained:
        print(f"note: {rt.config.name!r} has random, untrained weights: the answer is not meaningful",
              file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .config import resolve_model
    from .model.describe import describe

    info = describe(args.bundle or resolve_model(None))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key == "files":
                for i, (path, size) in enumerate(value.items()):
                    print(f"{'files' if i == 0 else '':>16}: {path} ({size:,} bytes)")
            elif key == "backends":
                for i, (backend, what) in enumerate(value.items()):
                    print(f"{'backends' if i == 0 else '':>16}: {backend}: {what}")
            elif isinstance(value, dict):
                print(f"{key:>16}: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in value.items()))
            else:
                print(f"{key:>16}: {json.dumps(value) if isinstance(value, list) else value}")
    return 0


def cmd_verify(args) -> int:
    from .errors import BundleError
    from .model.manifest import verify

    if not Path(args.bundle).is_dir():
        raise BundleError(f"{args.bundle}: not a directory (expected a bundle directory)")
    result = verify(Path(args.bundle))
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        for line in result.lines():
            print(line)
    if not result.ok:
        raise BundleError(result.summary())
    if not args.json:
        print(result.summary())
    return 0


def cmd_import(args) -> int:
    from .model.import_fusar_gpt import import_fusar_gpt

    if (args.tlm is None) != args.no_tlm:
        raise InputError("TLM: give the folder with vec64_film.pt / tlm_config.json, or --no-tlm for a checkpoint "
                         "trained without AEF (not both)")
    out = import_fusar_gpt(args.base, args.lora, args.tlm, args.out, legacy_sigma=args.legacy_sigma, chip_size=args.chip,
                           overwrite=args.force, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"wrote bundle {out}")
    return 0


def cmd_sample(args) -> int:
    from .data.synth import sample_scene

    paths = sample_scene(args.out, seed=args.seed, size=args.size)
    for key, value in paths.items():
        if isinstance(value, (str, Path)):
            print(f"{key}: {value}")
    print(f"ground truth: {paths['counts']['ship']} ships (boxes {paths['ships']})")
    return 0


def cmd_export(args) -> int:
    from .export.bundle_export import describe, export_bundle

    if not args.int8_prefill and not args.gptq4:
        raise InputError("--no-int8-prefill: only with --gptq4 (it leaves a file out of onnx-int4/)")
    if not (args.gptq4 or args.edgellm):  # they tune GPTQ, which only those run: refused, not ignored
        for flag, value in (("--calib", args.calib), ("--group-size", args.group_size)):
            if value is not None:
                raise InputError(f"{flag}: only with --gptq4 or --edgellm (it tunes their GPTQ)")
    onnx = args.onnx or not (args.gptq4 or args.edgellm)
    report = export_bundle(args.bundle, args.out, onnx=onnx, gptq4=args.gptq4, calib=args.calib or 16,
                           group_size=args.group_size, edgellm=args.edgellm, force=args.force,
                           int8_prefill=args.int8_prefill,
                           progress=None if args.json else lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(report))
    else:
        for line in describe(report):
            print(line)
        print(f"wrote {args.out} in {report['seconds']} s")
    return 0


def cmd_bench(args) -> int:
    from . import cli_bench

    return cli_bench.run(args)


def cmd_scan(args) -> int:
    from . import cli_scan

    return cli_scan.run(args)


def cmd_eval(args) -> int:
    from . import cli_eval

    return cli_eval.run(args)


def cmd_train(args) -> int:
    from . import cli_train

    return cli_train.run(args)


def cmd_data(args) -> int:
    from . import cli_data

    return cli_data.run(args)


def cmd_serve(args) -> int:
    from . import cli_serve

    return cli_serve.run(args)


def cmd_tiles(args) -> int:
    from . import cli_tiles

    return cli_tiles.run(args)


COMMANDS = {"ask": cmd_ask, "info": cmd_info, "verify": cmd_verify, "import-fusar-gpt": cmd_import,
            "sample": cmd_sample, "tiles": cmd_tiles, "export": cmd_export, "bench": cmd_bench, "data": cmd_data,
            "train": cmd_train, "eval": cmd_eval, "serve": cmd_serve, "scan": cmd_scan}
PRECHECKS = {"ask": check_ask_inputs}
MODEL_COMMANDS = ("ask", "import-fusar-gpt", "export", "bench", "train", "eval", "serve", "scan")  # the ones that load transformers


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # a main-parser flag, wherever it was typed (argparse wants it first)
        argv = ["--debug", *(a for a in argv if a != "--debug")]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    previous = _terminate_as_interrupt()
    filters = warnings.filters[:]  # restored when the command ends (main() may run in a longer process)
    if not args.debug:
        _quiet_library_warnings()
    try:
        if args.command in PRECHECKS:  # in milliseconds: importing transformers alone takes seconds
            PRECHECKS[args.command](args)
        # the onnxruntime backend never imports transformers (the edge install has none)
        if args.command in MODEL_COMMANDS and getattr(args, "backend", "torch") != "onnxruntime":
            _quiet_transformers(args.debug)
        return COMMANDS[args.command](args)
    except FusarError as exc:
        if args.debug:
            raise
        print(f"fusar-edge: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        if args.debug or root not in TORCH_EXTRA:
            raise
        print(f"fusar-edge: error: {args.command} needs {root}, which this install does not have (the edge install "
              "runs exported bundles: ask/eval/serve/scan --backend onnxruntime, info, verify); "
              "pip install 'fusar-edge[torch]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fusar-edge info B | head -1`): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE  # what a shell reports for a writer stopped by SIGPIPE
    except OSError as exc:  # e.g. disk full: the commands leave their outputs as they were
        if args.debug:
            raise
        print(f"fusar-edge: error: {_os_error(exc, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"fusar-edge: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # 143 / 130, as a shell reports them
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        warnings.filters[:] = filters


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service stop, a job scheduler, ``kill``), raised where Ctrl-C would be."""


def _terminate_as_interrupt():
    """SIGTERM unwinds a command as Ctrl-C does, so its ``finally`` blocks remove work folders and
    temporary files (the default action killed the process where it stood and left them).
    -> the previous handler, restored when the command ends; None where no handler can be set
    (not the main thread). ``serve``'s uvicorn installs its own while it runs."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_interrupt(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_interrupt)


# what `pip install 'fusar-edge[torch]'` brings beside the edge install: a command that imports one
# of them on the edge install says which install it needs instead of a traceback
TORCH_EXTRA = {"torch", "transformers", "peft", "safetensors", "onnx", "onnxscript", "accelerate"}


def _quiet_library_warnings() -> None:
    """Library warnings that only repeat what our own line says, or that the user cannot act on:
    rasterio on a file without georeference (our checks say what was expected of it) and a
    deprecation inside transformers that PEFT calls. ``--debug`` shows them."""
    warnings.filterwarnings("ignore", message="Dataset has no geotransform")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _quiet_transformers(debug: bool) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the edge install: the command itself says what it needs
        return
    if not debug:
        hf_logging.set_verbosity_error()  # keep library chatter off the user's terminal
    # our own progress lines say what is happening; transformers' weight-loading bars would
    # only add noise (and break machine-readable output)
    hf_logging.disable_progress_bar()


# a command's hidden work folder (``fsutil.work_dir`` / ``publishable_mkdtemp``): .NAME.KIND-...
_WORK_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?:sample|synth|export|import|tmp|train|ingest)-[\w-]+$")


def _os_error(exc: OSError, args) -> str:
    """``<path>: <OS reason>``; a write that failed without a file name is blamed on the output.
    A path inside a command's hidden work folder is shown as the output it was becoming, and a
    "file exists" on a path that is a file says that a directory was expected there."""
    paths = [_shown_path(str(f)) for f in (exc.filename, exc.filename2) if f is not None]
    output = getattr(args, "out", None) or getattr(args, "store", None)
    if not paths and output:
        paths = [str(output)]
    reason = " ".join((exc.strerror or str(exc) or type(exc).__name__).split())
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and paths and Path(paths[0]).is_file():
        reason = "is a file, where a directory was expected"
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _shown_path(path: str) -> str:
    parts = Path(path).parts
    for i, part in enumerate(parts):
        m = _WORK_FOLDER.match(part)
        if m:
            return str(Path(*parts[:i], m["name"]))
    return path


if __name__ == "__main__":
    sys.exit(main())
