"""Prefill time per prompt length and decode step time of exported 4-bit decoders, interleaved.

    python benchmarks/prefill_rows.py --bundle S-x [--bundle S64-x ...] [--accuracy-levels 4 0]
        [--lengths 12 40 141] [--rounds 10] [--threads 2]

Each bundle's `onnx-int4/` decoder runs as the runtime runs it (prompts on `decoder-prefill.onnx`,
the integer GEMM, when the export has it: `export/int8_prefill.py`), and, beside it, with prompts
on the 4-bit graph too ("prompts 4-bit") and optionally rewritten to other MatMulNBits accuracy
levels (a throwaway copy in a temporary folder, the same 4-bit weights); each runs, every round and taking turns,
a text-only pass over each of ``--lengths`` tokens (as GRASP's question pass and a prompt's prefill
do: `OnnxStages.question_hidden`), then a 141-token prefill and 32 greedy decode steps
(`decode_profile.decode_seconds`: the mean step). Medians over
rounds (the first two dropped). Says where time to first token goes once the decoder is 4-bit: a
prompt token costs the same in every pass, so prefill is bound by the 4-bit matmul over many rows.
Prints a table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def with_accuracy_level(int4_dir: Path, level: int, out: Path) -> Path:
    """A copy of ``int4_dir`` whose decoder's MatMulNBits nodes run at ``level``."""
    import onnx

    shutil.copytree(int4_dir, out)
    decoder = out / "decoder.onnx"
    model = onnx.load(str(decoder))  # external data is read in
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    for f in out.iterdir():
        if f.name.startswith("decoder"):
            f.unlink()
    onnx.save(model, str(decoder), save_as_external_data=True, location="decoder.onnx.data")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", required=True, help="exported bundle (repeatable)")
    ap.add_argument("--accuracy-levels", type=int, nargs="*", default=[],
                    help="also run each bundle's decoder at these MatMulNBits accuracy levels (0, 1, 2, 4)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[12, 40, 141])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    from decode_profile import decode_seconds  # the same timed decode loop as the profile's

    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.bench.machine import machine_info
    from fusar_edge.model.rope import text_positions

    tmp = Path(tempfile.mkdtemp(prefix="prefill-rows-"))
    try:
        stages = {}
        for b in a.bundle:
            stages[f"{b.name}"] = OnnxStages(b / "onnx-int4", device="cpu", threads=a.threads, int8_prefill=True)
            if stages[f"{b.name}"].prefill_session is not None:
                stages[f"{b.name} prompts 4-bit"] = OnnxStages(b / "onnx-int4", device="cpu", threads=a.threads,
                                                               int8_prefill=False)
            for level in a.accuracy_levels:
                d = with_accuracy_level(b / "onnx-int4", level, tmp / f"{b.name}-level{level}")
                stages[f"{b.name} level {level}"] = OnnxStages(d, device="cpu", threads=a.threads, int8_prefill=False)
        ids = (np.arange(max(max(a.lengths), 141)) * 7) % 500 + 5  # plain text ids of any vocabulary
        times = {name: {**{f"pass_{n}": [] for n in a.lengths}, "decode_step": []} for name in stages}
        for r in range(a.rounds + 2):
            for name, st in stages.items():
                for n in a.lengths:
                    t0 = time.perf_counter()
                    st.question_hidden(ids[:n])
                    times[name][f"pass_{n}"].append(time.perf_counter() - t0)
                times[name]["decode_step"].append(
                    decode_seconds(st, st.sessions, st.embed(ids[:141]), text_positions(0, 141), 32))
            print(f"\rround {r + 1}/{a.rounds + 2}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    table = {name: {k: round(statistics.median(v[2:]) * 1e3, 2) for k, v in t.items()} for name, t in times.items()}
    cols = [f"pass_{n}" for n in a.lengths] + ["decode_step"]
    print("| decoder | " + " | ".join(f"{n} tokens ms" for n in a.lengths) + " | decode step ms |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")
    if a.out:
        a.out.write_text(json.dumps({"ms": table, "threads": a.threads, "rounds": a.rounds, "machine": machine_info(),
                                     "command": "python benchmarks/prefill_rows.py " + " ".join(sys.argv[1:])},
                                    indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
