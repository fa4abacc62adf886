"""CPU micro-benchmark: a stack of eight 2048 x 2048 GEMVs (batch 1), 4-bit vs float32.

The same random 4-bit weights (symmetric, block 128, ``export/quant_types.Int4Weight``) run as
  * ONNX Runtime ``com.microsoft.MatMulNBits`` at accuracy level 4 (int8 activations; the
    fast CPU path) and at level 0 (float32 activations),
  * ONNX Runtime float32 ``MatMul`` with the dequantised weights,
  * torch float32 eager (``F.linear`` x 8) with the dequantised weights.
Time per call of the whole stack: median (and min) over repeats of the mean of back-to-back
calls, the variants taking turns, warm-up excluded. Writes
benchmarks/results/int4-gemv-<host>.json with machine info. (Results written before the INT4
QDQ form was retired, e.g. int4-gemv-vm.json, also hold an ``ort_qdq_int4`` row.)

    python benchmarks/int4_gemv.py [--threads 1 2] [--iters 50] [--repeats 15] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from fusar_edge.export.int4_onnx import quantize_onnx_model
from fusar_edge.export.quant_types import Int4Weight

ROOT = Path(__file__).resolve().parents[1]
D, LAYERS, BLOCK = 2048, 8, 128


def machine() -> dict:
    from fusar_edge.bench.machine import machine_info

    return {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def timed_ms(fns: dict, warmup: int, iters: int, repeats: int) -> dict:
    """Per function: the mean time per call of ``iters`` back-to-back calls, ``repeats`` times,
    the functions taking turns (round robin), so load from other processes hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    means: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            means[k].append((time.perf_counter() - t0) / iters * 1e3)
    out = {}
    for k, m in means.items():
        m.sort()
        out[k] = {"median_ms": round(m[len(m) // 2], 4), "min_ms": round(m[0], 4), "max_ms": round(m[-1], 4),
                  "iters": iters, "repeats": repeats}
    return out


def float_stack(weights: list[Int4Weight]) -> onnx.ModelProto:
    """x [1, D] -> MatMul with W_i^T [in, out] (the export of nn.Linear without bias), x 8."""
    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.dequantize().numpy().T.copy(), f"layers.{i}.weight_t"))
        out = "y" if i == len(weights) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [cur, f"layers.{i}.weight_t"], [out], name=f"/layers.{i}/MatMul"))
        cur = out
    g = helper.make_graph(nodes, "gemv_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                    help="intra-op thread counts to run (ORT and torch), each a separate run")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"int4-gemv-{platform.node()}.json")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    weights = []
    for i in range(LAYERS):
        q = torch.randint(-8, 8, (D, D), dtype=torch.int8, generator=gen)
        # scales ~ 1 / (sqrt(D) * 4.6) keep the activations O(1) through the stack
        s = (torch.rand(D, D // BLOCK, generator=gen) * 0.5 + 0.75) / (4.6 * D ** 0.5)
        weights.append(Int4Weight(f"layers.{i}", q, s, BLOCK))
    wmap = {w.name: w for w in weights}
    x = torch.randn(1, D, generator=gen)
    xn = x.numpy()

    fmodel = float_stack(weights)
    variants = {
        "ort_matmulnbits_acc4": quantize_onnx_model(fmodel, wmap, form="matmulnbits", accuracy_level=4).model,
        "ort_matmulnbits_acc0": quantize_onnx_model(fmodel, wmap, form="matmulnbits", accuracy_level=0).model,
        "ort_fp32": fmodel,
    }
    results: dict = {"machine": machine(), "shape": {"layers": LAYERS, "in": D, "out": D, "batch": 1,
                                                     "block_size": BLOCK}}
    with torch.no_grad():
        ref = x
        for w in weights:
            ref = torch.nn.functional.linear(ref, w.dequantize())
        ref = ref.numpy()
    dense = [w.dequantize() for w in weights]

    def torch_stack():
        with torch.no_grad():
            h = x
            for w in dense:
                h = torch.nn.functional.linear(h, w)
            return h

    errors, sizes = {}, {}
    results["runs"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in variants.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            onnx.save_model(model, str(paths[name]))
            sizes[name] = paths[name].stat().st_size
        for threads in args.threads:
            torch.set_num_threads(threads)
            fns = {}
            for name, path in paths.items():
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                feed = {"x": xn}
                y = sess.run(None, feed)[0]
                errors[name] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                fns[name] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
            fns["torch_fp32_eager"] = torch_stack
            load0 = os.getloadavg()[0]
            timings = timed_ms(fns, 10, args.iters, args.repeats)
            base, bmin = timings["ort_matmulnbits_acc4"]["median_ms"], timings["ort_matmulnbits_acc4"]["min_ms"]
            results["runs"][str(threads)] = {
                "threads": threads, "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "timings": timings,
                "times_slower_than_matmulnbits_acc4_median": {k: round(v["median_ms"] / base, 2)
                                                              for k, v in timings.items()},
                "times_slower_than_matmulnbits_acc4_min": {k: round(v["min_ms"] / bmin, 2)
                                                           for k, v in timings.items()}}
            for k, v in timings.items():
                print(f"threads {threads} {k}: median {v['median_ms']:.3f} ms, min {v['min_ms']:.3f} ms"
                      + (f", rel err {errors[k]:.1e}" if k in errors else ""), file=sys.stderr)
    results["rel_err_vs_torch_fp32"] = errors
    results["model_bytes"] = sizes
    results["note"] = ("batch-1 GEMV is memory-bound: 4-bit weights move 8x fewer bytes than float32 "
                       f"({LAYERS * D * D * 4 / 2**20:.0f} MiB -> {LAYERS * D * D / 2 / 2**20:.0f} MiB + scales); "
                       "a non-zero load average means other processes shared the cores")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
