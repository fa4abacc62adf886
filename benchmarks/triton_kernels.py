"""Kernel benchmark: fused Triton TLM / GRASP vs the eager torch reference vs torch.compile of it.

At the 7B shapes (C = 3584, T = 324 visual tokens, S = 256 anchors; GRASP N = 4 blocks,
h = 512, L = 1), batch 1 and 32, on the CUDA device:
  * time per call (CUDA events, warm-up excluded, median of repeated runs),
  * achieved GB/s of the fused TLM (bytes it must move: read x, write y, read A/gamma/beta)
    against the device's copy bandwidth measured in the same run,
  * kernel launches per GRASP call (torch.profiler), fused vs eager.
Writes benchmarks/results/kernels-<gpu>.json with the device name and versions.

Needs a CUDA GPU and Triton: it says so and exits with code 2 otherwise (CPU runs of the
kernels are correctness checks in tests/, not benchmarks).

    python benchmarks/triton_kernels.py [--dtype bfloat16] [--batches 1 32] [--out FILE]

Not named kernels.py: a script's folder comes first on sys.path, and transformers imports the
hub's ``kernels`` package whenever one is importable, so a benchmarks/kernels.py broke every
other script here that builds a model (ImportError: CUDAProperties).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
C, T, S = 3584, 324, 256  # Qwen2.5-VL-7B width, 18 x 18 merged tokens of a 504-px chip, 16 x 16 anchors
N, H, L = 4, 512, 1  # GRASP 2 x 2 blocks, projection width, prompt tokens


def cuda_time_ms(fn, warmup: int = 10, iters: int = 50, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time per call of ``iters`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def count_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench_tlm(batch: int, dtype: torch.dtype, copy_gbs: float) -> dict:
    from fusar_edge.kernels import tlm_modulate, tlm_modulate_reference

    x = torch.randn(batch, T, C, device="cuda", dtype=dtype)
    a = torch.rand(batch, T, S, device="cuda", dtype=torch.float32)
    a = a / a.sum(-1, keepdim=True)
    gamma = torch.randn(batch, S, C, device="cuda", dtype=dtype) * 0.1
    beta = torch.randn(batch, S, C, device="cuda", dtype=dtype) * 0.1
    esize = x.element_size()
    nbytes = 2 * x.numel() * esize + a.numel() * 4 + 2 * gamma.numel() * esize
    fused = cuda_time_ms(lambda: tlm_modulate(x, a, gamma, beta, backend="triton"))
    eager = cuda_time_ms(lambda: tlm_modulate_reference(x, a, gamma, beta))
    compiled_fn = torch.compile(tlm_modulate_reference)
    compiled = cuda_time_ms(lambda: compiled_fn(x, a, gamma, beta))
    err = rel_err(tlm_modulate(x, a, gamma, beta, backend="triton"), tlm_modulate_reference(x, a, gamma, beta))
    gbs = nbytes / (fused * 1e-3) / 1e9
    return {"batch": batch, "fused_ms": round(fused, 4), "eager_ms": round(eager, 4),
            "compile_ms": round(compiled, 4), "speedup_vs_eager": round(eager / fused, 2),
            "speedup_vs_compile": round(compiled / fused, 2), "bytes": nbytes, "fused_GBps": round(gbs, 1),
            "fraction_of_copy_bw": round(gbs / copy_gbs, 3), "rel_err": err}


def bench_grasp(batch: int, dtype: torch.dtype, selector: str) -> dict:
    from fusar_edge.kernels import grasp_fuse, grasp_fuse_reference

    q = torch.randn(batch, H, device="cuda", dtype=dtype)
    keys = torch.randn(batch, N, H, device="cuda", dtype=dtype)
    prompts = torch.randn(N, L, C, device="cuda", dtype=dtype) * 0.02
    fused_call = lambda: grasp_fuse(q, keys, prompts, selector, 2, backend="triton")  # noqa: E731
    eager_call = lambda: grasp_fuse_reference(q, keys, prompts, selector, 2)  # noqa: E731
    compiled_ref = torch.compile(grasp_fuse_reference)
    fused = cuda_time_ms(fused_call)
    eager = cuda_time_ms(eager_call)
    compiled = cuda_time_ms(lambda: compiled_ref(q, keys, prompts, selector, 2))
    (p1, w1), (p2, w2) = fused_call(), eager_call()
    return {"batch": batch, "selector": selector, "fused_ms": round(fused, 4), "eager_ms": round(eager, 4),
            "compile_ms": round(compiled, 4), "speedup_vs_eager": round(eager / fused, 2),
            "launches_fused": count_launches(fused_call), "launches_eager": count_launches(eager_call),
            "rel_err_prompt": rel_err(p1, p2), "rel_err_weights": rel_err(w1, w2)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def machine() -> dict:
    from fusar_edge.bench.machine import machine_info

    return machine_info()  # GPUs under "gpus", Triton under "versions"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py: no CUDA GPU visible; the kernel benchmark needs one "
              "(on CPU, tests/test_kernels_*.py check the kernels through Triton's interpreter)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/triton_kernels.py: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    info = machine()
    copy_gbs = copy_bandwidth_gbs()
    results = {"machine": info, "dtype": args.dtype, "copy_bandwidth_GBps": round(copy_gbs, 1),
               "shapes": {"C": C, "T": T, "S": S, "N": N, "h": H, "L": L}, "tlm": [], "grasp": []}
    for b in args.batches:
        results["tlm"].append(bench_tlm(b, dtype, copy_gbs))
        print("tlm", results["tlm"][-1], file=sys.stderr)
        for selector in ("topk", "entmax15"):
            results["grasp"].append(bench_grasp(b, dtype, selector))
            print("grasp", results["grasp"][-1], file=sys.stderr)
    big = max(results["tlm"], key=lambda r: r["batch"])
    results["goals"] = {
        "tlm_85pct_copy_bw_at_max_batch": big["fraction_of_copy_bw"] >= 0.85,
        "tlm_3x_eager_at_max_batch": big["speedup_vs_eager"] >= 3,
        "grasp_one_launch": all(r["launches_fused"] == 1 for r in results["grasp"]),
        "grasp_3x_eager": all(r["speedup_vs_eager"] >= 3 for r in results["grasp"]),
    }
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = args.out or ROOT / "benchmarks" / "results" / f"kernels-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
