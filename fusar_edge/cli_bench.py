"""``fusar-edge bench``: the command line of ``fusar_edge.bench``."""

from __future__ import annotations

import argparse
import sys

from .cli import nonnegative_int, positive_int
from .config import resolve_model
from .errors import InputError

DESCRIPTION = """\
Time every stage of a FUSAR request (AEF lookup, preprocessing, vision + TLM, fusion + GRASP,
prefill, per-token decode) on one or more backends, beside plain transformers
Qwen2_5_VLForConditionalGeneration.generate on the same weights and inputs (the baseline),
and report p50/p90/p99 per stage, time to first token, decode tokens/s, peak host and device
memory and model size. Warm-up runs are not counted; every run generates exactly
--new-tokens tokens per sequence (end-of-sequence ignored), so all runs do the same work."""

EPILOG = """\
examples:
  fusar-edge bench                                    # the built-in demo, torch + baseline, built-in scene
  fusar-edge bench --preset qwen2.5-vl-7b --runs 5    # random weights at true size: profile a GPU before you have weights
  fusar-edge export tiny --out bundles/tiny-int4 --gptq4 --group-size 64
  fusar-edge bench --bundle bundles/tiny-int4 --backend torch,onnxruntime --json bench.json --plot bench.png
  fusar-edge bench --image scene.tif --tiles store/ --batch 4 --new-tokens 64

Without --image the built-in synthetic scene runs, with its own AEF tile store (so the lookup
is timed). Backends that cannot run here (unknown, not installed, bundle not exported for
them) are reported and skipped; the others still run. onnxruntime runs a bundle's 4-bit
graphs (onnx-int4/) when it has them; FUSAR_ONNX_VARIANT=onnx times the fp32 ones instead.

exit status: 0 every requested backend ran; 1 some could not (see "skipped"); 2 bad input."""


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="latency of every stage and backend, beside a transformers baseline",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = b.add_mutually_exclusive_group()
    model.add_argument("--bundle", metavar="DIR", help="bundle directory (exported ones also run onnxruntime; "
                                                       "default: the built-in demo)")
    model.add_argument("--preset", metavar="NAME",
                       help="random weights at a preset's true size: tiny, small, demo, qwen2.5-vl-3b, "
                            "qwen2.5-vl-7b")
    b.add_argument("--backend", default="torch", metavar="LIST",
                   help="comma-separated: torch, onnxruntime (default: torch)")
    b.add_argument("--no-baseline", action="store_true", help="skip the transformers generate baseline")
    b.add_argument("--image", metavar="FILE", help="SAR image (default: the built-in synthetic scene)")
    b.add_argument("--tiles", metavar="DIR", help="AEF tile store for the lookup (default with the built-in "
                                                  "scene: its own store; otherwise no anchors)")
    b.add_argument("--question", default=None, help="the question (default: a counting question)")
    b.add_argument("--runs", type=positive_int, default=10, metavar="N", help="timed runs per backend (default 10)")
    b.add_argument("--warmup", type=nonnegative_int, default=2, metavar="N", help="untimed runs first (default 2)")
    b.add_argument("--new-tokens", type=positive_int, default=32, metavar="N",
                   help="tokens generated per sequence, exactly (default 32; at most the model's context)")
    b.add_argument("--batch", type=positive_int, default=1, metavar="N",
                   help="sequences per request: images are preprocessed, looked up, encoded and fused one by one, "
                        "the decoder runs them as one batch (default 1)")
    b.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:N")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="torch weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch and onnxruntime (default: the "
                                                            "physical cores this process may use, within any "
                                                            "container CPU quota, less those busy at start)")
    b.add_argument("--json", metavar="FILE", help="write the full result (machine, settings, every backend) here")
    b.add_argument("--plot", metavar="FILE.png", help="write a PNG of the stage breakdown per backend (matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")


class _Progress:
    """One tqdm bar per backend on stderr."""

    def __init__(self):
        self.bar, self.label = None, None

    def __call__(self, label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if label != self.label:
            self.close()
            self.bar = tqdm(total=total, desc=f"{label:>11s}", unit="run", file=sys.stderr, dynamic_ncols=True,
                            leave=False)
            self.label = label
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = self.label = None


def check_bench_inputs(args) -> None:
    """What ``ask`` would refuse, refused before any model loads (not reported later as a skipped
    backend, exit 1): the model's name, the question, the token budget, the image, the tile
    store, the device and the backend list."""
    from pathlib import Path

    from .config import PRESETS, model_config
    from .geo.sar import SUFFIXES

    if args.preset and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset}: expected one of {', '.join(PRESETS)}")
    name = args.bundle or args.preset or resolve_model(None)
    cfg = model_config(name)
    if cfg.context_length and args.new_tokens > cfg.context_length:
        raise InputError(f"--new-tokens: expected 1..{cfg.context_length} (the model's context), got {args.new_tokens}")
    if args.question is not None and not args.question.strip():
        raise InputError("--question: expected a non-empty question")
    if args.image and Path(args.image).suffix.lower() not in SUFFIXES:
        raise InputError(f"--image {args.image}: expected one of {', '.join(SUFFIXES)}")
    if args.tiles and not Path(args.tiles).is_dir():
        raise InputError(f"--tiles {args.tiles}: not a directory (expected an AEF tile store)")
    if not (args.device in ("auto", "cpu", "cuda") or (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise InputError(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
    if not [b for b in args.backend.split(",") if b.strip()]:
        raise InputError("--backend: expected a comma-separated list such as torch,onnxruntime")


def run(args) -> int:
    from pathlib import Path

    from .bench import report
    from .bench.runner import QUESTION, BenchSettings, run_bench
    from .threads import resolve_threads

    if args.plot and not report.have_matplotlib():
        raise InputError("--plot needs matplotlib (pip install 'fusar-edge[bench]' or pip install matplotlib)")
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value and not Path(value).resolve().parent.is_dir():
            raise InputError(f"{flag} {value}: directory {Path(value).resolve().parent} does not exist")
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        raise InputError(f"--plot {args.plot}: expected a .png file name")
    if args.bundle and not Path(args.bundle).is_dir():
        raise InputError(f"--bundle {args.bundle}: not a directory (for random weights use --preset NAME)")
    check_bench_inputs(args)
    settings = BenchSettings(model=args.bundle or args.preset or resolve_model(None), backends=args.backend.split(","),
                             image=args.image, tiles=args.tiles, question=args.question or QUESTION,
                             runs=args.runs, warmup=args.warmup, new_tokens=args.new_tokens, batch=args.batch,
                             device=args.device, dtype=args.dtype, threads=resolve_threads(args.threads),
                             baseline=not args.no_baseline)
    progress = None if args.quiet else _Progress()
    say = None if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    try:
        result = run_bench(settings, progress=progress, status=say)
    finally:
        if progress:
            progress.close()
    print(report.format_table(result))
    if args.json:
        print(f"wrote {report.write_json(result, args.json)}")
    if args.plot:
        print(f"wrote {report.write_plot(result, args.plot)}")
    if not result["backends"]:
        return 1
    return 1 if result["skipped"] else 0
