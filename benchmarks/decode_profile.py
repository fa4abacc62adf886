"""Where a CPU decode step of an exported decoder goes: time per ONNX op type, and the read
bandwidth of the 4-bit matmuls alone against the machine's read ceiling.

    python benchmarks/decode_profile.py --bundle EXPORTED_BUNDLE [--form onnx-int4] [--threads 2]
        [--prompt 141] [--steps 64] [--rounds 5]

EXPORTED_BUNDLE: `fusar-edge export small --out DIR --gptq4`. Each round, taking turns so that
load from other work falls on all alike: the read ceiling (`bench.bandwidth`: 512 MiB, memory's
bandwidth) and a read of a buffer the size of the decoder's weights (where they fit the CPU's
cache, as `small`'s 49 MB do on a Xeon with a large L3, the step is judged against that), ``--steps``
greedy decode steps as `ask` runs them (``OnnxStages``), and the same steps on a second decoder
session with ONNX Runtime's profiler on (same graph, threads and spinning). The profiler's kernel
times give each op type's share of a step; its own bookkeeping makes a profiled step slower, so
the shares are read off the profiled steps and the step time off the plain ones. Bytes per op
type are the initializers its nodes read (4-bit weights, scales, biases), so the matmuls' read
bandwidth is their bytes over their kernel time. Writes
benchmarks/results/decode-profile-<preset>-<host>.json and prints a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def initializer_bytes_by_op(path: Path) -> dict[str, int]:
    """Bytes of the initializers each op type's nodes read (an initializer read by several op
    types counts for each; none is, in our decoder graphs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        sizes[init.name] = n * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    out: dict[str, int] = collections.Counter()
    for node in model.graph.node:
        out[node.op_type] += sum(sizes.get(name, 0) for name in node.input)
    return dict(out)


def profiled_session(stages, threads: int, prefix: str):
    """A second decoder session like ``stages``' own (threads, spinning), profiling every run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if stages.decoder_spins else "0")
    if stages.decoder_spins:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.enable_profiling = True
    opts.profile_file_prefix = prefix
    path = stages.dir / stages.spec["stages"]["decoder"]["file"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def decode_seconds(stages, sessions: dict, embeds, positions: np.ndarray, steps: int) -> float:
    """Seconds per greedy decode step after a prefill (the prefill runs on ``stages``' own session)."""
    from fusar_edge.backends.onnxruntime import decode_step

    logits, state = stages.prefill(embeds, positions)
    token, start = int(np.argmax(logits)), positions.shape[-1]
    t0 = time.perf_counter()
    for i in range(steps):
        token = int(np.argmax(decode_step(sessions, state, [token], start + i)[0]))
    return (time.perf_counter() - t0) / steps


def kernel_us_by_op(trace: Path, steps_total: int) -> dict[str, dict]:
    """Per op type: kernel microseconds and node count per step, from one profile of decode runs."""
    events = json.loads(trace.read_text())
    time_us: dict[str, float] = collections.Counter()
    calls: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            time_us[op] += e["dur"]
            calls[op] += 1
    return {op: {"us_per_step": time_us[op] / steps_total, "nodes": calls[op] // steps_total} for op in time_us}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="an exported bundle (fusar-edge export ...)")
    ap.add_argument("--form", default="onnx-int4", help="the bundle's export folder (default onnx-int4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=141, help="prompt tokens before decoding (default 141)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    import torch

    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.bench.bandwidth import cache_note, read_ceiling_gbs, same_size_ceiling_gbs
    from fusar_edge.bench.machine import machine_info

    torch.set_num_threads(a.threads)  # the ceiling reads with the decoder's thread count
    stages = OnnxStages(a.bundle / a.form, threads=a.threads)
    decoder_file = stages.dir / stages.spec["stages"]["decoder"]["file"]
    op_bytes = initializer_bytes_by_op(decoder_file)
    weight_bytes = sum(op_bytes.values())
    ids = (np.arange(a.prompt, dtype=np.int64) % 500 + 5).reshape(1, -1)  # plain text ids of any vocabulary
    embeds = stages.embed(ids)
    positions = np.broadcast_to(np.arange(a.prompt, dtype=np.int64), (3, 1, a.prompt)).copy()

    with tempfile.TemporaryDirectory() as tmp:
        profiled = {"embed": stages.sessions["embed"],
                    "decoder": profiled_session(stages, a.threads, str(Path(tmp) / "decoder"))}
        plain = {"embed": stages.sessions["embed"], "decoder": stages.sessions["decoder"]}
        decode_seconds(stages, plain, embeds, positions, 8)  # warm-up (not profiled)
        ceilings, same_size, plain_s, profiled_s = [], [], [], []
        for r in range(a.rounds):
            ceilings.append(read_ceiling_gbs())
            same_size.append(same_size_ceiling_gbs(weight_bytes))
            plain_s.append(decode_seconds(stages, plain, embeds, positions, a.steps))
            profiled_s.append(decode_seconds(stages, profiled, embeds, positions, a.steps))
            print(f"round {r + 1}/{a.rounds}: ceiling {ceilings[-1]:.1f} GB/s (same-size read "
                  f"{same_size[-1]:.1f}), step {plain_s[-1] * 1e3:.2f} ms "
                  f"({profiled_s[-1] * 1e3:.2f} ms profiled)", file=sys.stderr)
        # the profiled session ran decode steps only (each prefill ran on the plain session)
        per_op = kernel_us_by_op(Path(profiled["decoder"].end_profiling()), a.rounds * a.steps)

    ceiling = statistics.median(ceilings)
    same = statistics.median(same_size)
    step_s = statistics.median(plain_s)
    kernel_total = sum(v["us_per_step"] for v in per_op.values())
    ops = {}
    for op, v in sorted(per_op.items(), key=lambda kv: -kv[1]["us_per_step"]):
        entry = {"nodes_per_step": v["nodes"], "kernel_us_per_step": round(v["us_per_step"], 1),
                 "share_of_kernels": round(v["us_per_step"] / kernel_total, 3),
                 "weight_mb": round(op_bytes.get(op, 0) / 1e6, 2)}
        if op_bytes.get(op, 0) > 0.01 * weight_bytes:  # a read bandwidth only where the op reads weights
            gbs = op_bytes[op] / (v["us_per_step"] * 1e-6) / 1e9
            entry.update(read_gb_s=round(gbs, 2), of_ceiling=round(gbs / ceiling, 3),
                         of_same_size_ceiling=round(gbs / same, 3))
        ops[op] = entry
    step_gbs = weight_bytes / step_s / 1e9
    result = {
        "bundle": str(a.bundle), "form": a.form, "threads": a.threads, "prompt_tokens": a.prompt,
        "decode_steps": a.steps, "rounds": a.rounds,
        "read_ceiling_gb_s": {"median": round(ceiling, 2), "all": ceilings},
        "same_size_read_ceiling_gb_s": {"median": round(same, 2), "all": same_size},
        "decode_step_ms": {"median": round(step_s * 1e3, 3), "all": [round(s * 1e3, 3) for s in plain_s],
                           "profiled_median": round(statistics.median(profiled_s) * 1e3, 3)},
        "decoder_weight_mb": round(weight_bytes / 1e6, 2),
        "decode_read_gb_s": round(step_gbs, 2), "decode_of_ceiling": round(step_gbs / ceiling, 3),
        "decode_of_same_size_ceiling": round(step_gbs / same, 3),
        "kernels_us_per_step": round(kernel_total, 1), "ops": ops,
        "machine": machine_info(),
        "command": "python benchmarks/decode_profile.py " + " ".join(sys.argv[1:]),
    }
    out = a.out or ROOT / "benchmarks" / "results" / f"decode-profile-{stages.spec.get('preset', 'model')}-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"decode step {step_s * 1e3:.2f} ms ({1 / step_s:.0f} tok/s): {weight_bytes / 1e6:.1f} MB read per token, "
          f"{step_gbs:.1f} GB/s = {step_gbs / ceiling:.0%} of the {ceiling:.1f} GB/s read ceiling, "
          f"{step_gbs / same:.0%} of a same-size read ({same:.1f} GB/s)")
    note = cache_note(weight_bytes / 1e6, round(ceiling, 1), round(same, 1))
    if note:
        print("note: " + note)
    print(f"{'op type':34s} {'nodes':>5s} {'us/step':>8s} {'share':>6s} {'MB':>7s} {'GB/s':>6s} {'ceiling':>7s} "
          f"{'same-size':>9s}")
    for op, e in ops.items():
        bw = f"{e['read_gb_s']:6.1f} {e['of_ceiling']:7.0%} {e['of_same_size_ceiling']:9.0%}" if "read_gb_s" in e else ""
        print(f"{op:34s} {e['nodes_per_step']:5d} {e['kernel_us_per_step']:8.1f} {e['share_of_kernels']:6.1%} "
              f"{e['weight_mb']:7.2f} {bw}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
