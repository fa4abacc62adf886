"""Decode benchmark: time to first token and decode tokens/s, torch fp32 eager vs ONNX Runtime
fp32 vs ONNX Runtime 4-bit (GPTQ -> MatMulNBits), on the random-weight presets.

For each preset the bundle is exported once into a temporary directory
(``export_bundle(preset, out, onnx=True, gptq4=True, calib=8, group_size=...)``), then every
variant answers the same question about the same synthetic scene with a fixed token budget:
warm-up runs are dropped, the median of the timed runs is reported.

- ttft_ms: everything before the first token (preprocess + anchors + vision + fusion + prefill)
  = ``timings_ms.total - decode - parse``.
- decode_tok_s: 1000 / ``timings_ms.decode_per_token`` (per decode step, the first token comes
  from the prefill).
- decoder_bytes: decoder weights on disk: the language model + lm_head tensors of
  ``model.safetensors`` for torch, ``decoder.onnx`` (+ external data) for ONNX.

    python benchmarks/decode.py                       # tiny and small, 5 runs, 32 tokens
    python benchmarks/decode.py --presets small --runs 3 --tokens 32

Writes ``benchmarks/results/decode-<host>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # fusar_edge from this checkout

GROUP_SIZE = {"tiny": 64, "small": 128}
QUESTION = "How many ships are in this image?"
VARIANTS = [  # (name, backend, FUSAR_ONNX_VARIANT)
    ("torch-fp32", "torch", None),
    ("ort-fp32", "onnxruntime", "onnx"),
    ("ort-int4", "onnxruntime", "onnx-int4"),
]


def safetensors_bytes(path: Path, keep) -> int:
    """Bytes of the tensors of a safetensors file whose names pass ``keep`` (reads the header only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and keep(k))


def decoder_bytes(bundle: Path, variant: str | None) -> int:
    if variant is None:
        return safetensors_bytes(bundle / "model.safetensors",
                                 lambda k: "visual" not in k and ("language_model" in k or "lm_head" in k
                                                                   or k.startswith("model.")))
    d = bundle / variant
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.name.startswith("decoder"))


def measure(bundle: Path, backend: str, variant: str | None, image: str, tokens: int, warmup: int, runs: int):
    from fusar_edge.runtime import Runtime

    if variant is None:
        os.environ.pop("FUSAR_ONNX_VARIANT", None)
    else:
        os.environ["FUSAR_ONNX_VARIANT"] = variant
    try:
        t0 = time.perf_counter()
        rt = Runtime.open(str(bundle), backend=backend, device="cpu")
        open_s = time.perf_counter() - t0
    finally:
        os.environ.pop("FUSAR_ONNX_VARIANT", None)
    samples, texts, new_tokens = [], set(), []
    for i in range(warmup + runs):
        a = rt.ask(image, QUESTION, max_new_tokens=tokens, no_anchors=True)  # decode timing: TLM is not measured here
        if i >= warmup:
            t = a.timings_ms
            samples.append({"ttft_ms": t["total"] - t.get("decode", 0.0) - t.get("parse", 0.0),
                            "prefill_ms": t["prefill"], "decode_per_token_ms": t["decode_per_token"]})
            new_tokens.append(a.model["new_tokens"])
            texts.add(a.text)
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    per_tok = med["decode_per_token_ms"]
    return {
        "backend": backend, "onnx_variant": getattr(rt.stages, "dir", None) and rt.stages.dir.name,
        "open_s": round(open_s, 2),
        "ttft_ms": round(med["ttft_ms"], 1), "prefill_ms": round(med["prefill_ms"], 1),
        "decode_ms_per_token": round(per_tok, 2),
        "decode_tok_s": round(1000.0 / per_tok, 2) if per_tok else None,
        "ttft_ms_runs": [round(s["ttft_ms"], 1) for s in samples],
        "decode_ms_per_token_runs": [round(s["decode_per_token_ms"], 2) for s in samples],
        "new_tokens": new_tokens, "stopped_early": any(n < tokens for n in new_tokens),
        "distinct_answers": len(texts), "answer": sorted(texts)[0][:80],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--tokens", type=int, default=32, help="max_new_tokens (EOS may stop earlier: reported)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/decode-<host>.json)")
    args = ap.parse_args(argv)


    from fusar_edge.export.bundle_export import export_bundle
    from fusar_edge.bench.machine import machine_info
    from fusar_edge.geo.synthetic import write_demo_scene

    host = socket.gethostname().split(".")[0]
    result = {
        "benchmark": "decode",
        "machine": {**machine_info(), "loadavg_at_start": list(os.getloadavg())},
        "settings": {"question": QUESTION, "max_new_tokens": args.tokens, "runs": args.runs,
                     "warmup": args.warmup, "calib": args.calib, "group_size": GROUP_SIZE, "statistic": "median"},
        "presets": {},
    }
    with tempfile.TemporaryDirectory(prefix="fusar-decode-") as tmp:
        scene = write_demo_scene(Path(tmp) / "scene")
        image = scene["scene_tif"]
        for name in args.presets:
            out = Path(tmp) / f"bundle-{name}"
            print(f"[{name}] exporting (onnx + gptq4, calib {args.calib}, group {GROUP_SIZE.get(name, 128)})",
                  flush=True)
            t0 = time.perf_counter()
            report = export_bundle(name, out, onnx=True, gptq4=True, calib=args.calib,
                                   group_size=GROUP_SIZE.get(name, 128))
            export_s = time.perf_counter() - t0
            print(f"[{name}] export {export_s:.1f} s", flush=True)
            entry = {"export_s": round(export_s, 1), "export_report_seconds": report.get("seconds"),
                     "parity_ok": report["artifacts"].get("onnx", {}).get("parity", {}).get("ok"),
                     "variants": {}}
            for label, backend, variant in VARIANTS:
                r = measure(out, backend, variant, image, args.tokens, args.warmup, args.runs)
                r["decoder_bytes"] = decoder_bytes(out, variant)
                entry["variants"][label] = r
                print(f"[{name}] {label:11s} ttft {r['ttft_ms']:9.1f} ms  decode {r['decode_tok_s']:8.2f} tok/s  "
                      f"({r['decode_ms_per_token']:.2f} ms/tok, tokens {r['new_tokens']})", flush=True)
            v = entry["variants"]
            entry["ratio_decode_ort_int4_over_torch_fp32"] = round(
                v["ort-int4"]["decode_tok_s"] / v["torch-fp32"]["decode_tok_s"], 2)
            entry["ratio_decode_ort_int4_over_ort_fp32"] = round(
                v["ort-int4"]["decode_tok_s"] / v["ort-fp32"]["decode_tok_s"], 2)
            entry["ratio_decode_ort_fp32_over_torch_fp32"] = round(
                v["ort-fp32"]["decode_tok_s"] / v["torch-fp32"]["decode_tok_s"], 2)
            result["presets"][name] = entry
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    if "small" in result["presets"]:
        ratio = result["presets"]["small"]["ratio_decode_ort_int4_over_torch_fp32"]
        result["goal"] = {"target": "ort-int4 decode >= 4x torch-fp32 eager on the mid-size preset (small)",
                          "ratio": ratio, "met": ratio >= 4.0}

    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"decode-{host}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    print()
    print(f"{'preset':7s} {'variant':11s} {'ttft ms':>9s} {'decode tok/s':>13s} {'ms/tok':>8s} {'decoder MB':>11s}")
    for name, entry in result["presets"].items():
        for label, r in entry["variants"].items():
            print(f"{name:7s} {label:11s} {r['ttft_ms']:9.1f} {r['decode_tok_s']:13.2f} "
                  f"{r['decode_ms_per_token']:8.2f} {r['decoder_bytes'] / 2**20:11.1f}")
        print(f"{name:7s} ort-int4 / torch-fp32 decode: {entry['ratio_decode_ort_int4_over_torch_fp32']}x  "
              f"(export {entry['export_s']} s)")
    if "goal" in result:
        print(f"goal (>= 4x on small): {'MET' if result['goal']['met'] else 'NOT MET'} ({result['goal']['ratio']}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
