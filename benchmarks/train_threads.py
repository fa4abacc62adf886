"""How long does the demo recipe take at one thread and at two? Each training phase timed both ways.

    python benchmarks/train_threads.py --run runs/demo --data data/synth16k
    python benchmarks/train_threads.py --run runs/demo --data data/synth16k --phases "warm-up,stage 2"

The issue asks for a demo that learns on 2 CPU cores in under an hour; the recipe's published
times come from two runs side by side (the AEF run and its no-AEF twin) at one thread each. This
runs each phase of ``scripts/train_demo.py``'s recipe (stage 0's dense warm-up, stage 0's main
loop, stage 1, stage 2) for ``--seconds`` at ``--threads`` 1 and then 2, alternating, each time
alone on the machine, reads the steps done from the progress bar, and projects each phase's
whole length from its steps per second (measured after the first ``--settle`` seconds, so start-up
and the first slow steps are left out). ``--run`` is a finished run of the recipe: stage 0's main
loop starts from its ``s0/dense-warmup.pt`` and stages 1-2 from its ``s0/base`` / ``s1``. Nothing
is written there; the timed runs live in a temporary folder. Each timed run records how many cores
were busy just before it and warns when the machine was not idle: a two-thread run beside another
busy process was measured ~40x slower (stage 1: 0.13 steps/s beside the test suite, 5.30 alone;
its threads wait on each other), not 1.3x faster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("warm-up", "stage 0", "stage 1", "stage 2")
_BAR = re.compile(r"(?P<label>vision warm-up|train):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[(?P<elapsed>[\d:]+)<")


def _recipe():
    """scripts/train_demo.py's recipe constants: the timed phases are the recipe's own."""
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "scripts" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def busy_cores(window: float = 2.0) -> float:
    """Cores busy over the next ``window`` seconds (from /proc/stat; 0.0 where it cannot be read).
    Not the load average: its minute-long memory would still count the previous timed run."""
    def ticks():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = ticks()
        time.sleep(window)
        busy1, total1 = ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def _refuse(message: str):
    """Bad input: one line on stderr, exit 2 (as fusar-edge's own commands do)."""
    print(f"train_threads: {message}", file=sys.stderr)
    raise SystemExit(2)


def _seconds(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def bar_samples(text: str, label: str) -> list[tuple[int, int, int]]:
    """(steps done, total, elapsed s) of every progress-bar refresh of ``label`` in ``text``."""
    return [(int(m["n"]), int(m["total"]), _seconds(m["elapsed"]))
            for m in _BAR.finditer(text.replace("\r", "\n")) if m["label"] == label]


def rate(samples: list[tuple[int, int, int]], settle: int) -> tuple[float, int]:
    """Steps per second between the first refresh after ``settle`` s and the last; and the total."""
    later = [s for s in samples if s[2] >= settle]
    if len(later) < 2 or later[-1][2] == later[0][2]:
        raise SystemExit(f"train_threads: too few progress refreshes after {settle} s; raise --seconds")
    (n0, total, t0), (n1, _, t1) = later[0], later[-1]
    return (n1 - n0) / (t1 - t0), total


def timed(argv: list[str], seconds: float, log: Path) -> str:
    """Run ``fusar-edge argv`` for ``seconds``, then stop it (its whole process group); its stderr.
    A command that fails before then (say, a warm-up checkpoint of other settings) is refused with
    its own last line, not timed."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fusar_edge.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, cwd=ROOT)
        try:
            code = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            code = 0
    text = log.read_text(errors="replace")
    if code != 0:
        last = next((line for line in reversed(text.replace("\r", "\n").splitlines()) if line.strip()), "")
        _refuse(f"`fusar-edge {shlex.join(argv[:3])} ...` failed (exit {code}): {last.strip()}")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished run of scripts/train_demo.py (with anchors)")
    p.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    p.add_argument("--seconds", type=float, default=180,
                   help="wall time of each timed run (default 180: stage 0 and 2 spend ~100 s reading synth16k first)")
    p.add_argument("--phases", default=",".join(PHASES), help="which phases, comma-separated (default: all)")
    p.add_argument("--settle", type=int, default=15, help="seconds left out at the start of each (default 15)")
    p.add_argument("--out", type=Path, help="write the JSON report here too; phases already in it and not timed "
                                              "again are kept (time the phases in several sittings)")
    p.add_argument("--recipe-args", default="",
                   help="scripts/train_demo.py options of the run's own recipe variant, e.g. \"--dense-warmup-epochs 8\" "
                        "for a run trained so (stage 0 reuses the run's warm-up, which must match them)")
    a = p.parse_args()
    recipe, d, r = _recipe(), a.data, a.run
    for need in (r / "s0" / "dense-warmup.pt", r / "s0" / "base", r / "s1", d / "scenes.jsonl"):
        if not need.exists():
            _refuse(f"{need} is missing (expected a finished recipe run and its dataset)")
    # the recipe's own commands for this run (stages 1-2 start from its s0 / s1); --out and --threads are set per timed run
    try:
        extra = shlex.split(a.recipe_args)
    except ValueError as e:  # unbalanced quotes
        _refuse(f"--recipe-args {a.recipe_args!r}: {e}")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:  # argparse's usage lines: kept to one line below
            recipe_args = recipe.parser().parse_args(["--out", str(r), "--data", str(d), *extra])
    except SystemExit:
        why = said.getvalue().strip().splitlines()[-1:] or [""]
        _refuse(f"--recipe-args {a.recipe_args!r}: {why[0].split('error: ')[-1]} (options of scripts/train_demo.py)")
    steps = {stage: argv for stage, (argv, _) in recipe.training_steps(recipe_args).items()}
    phases = {  # name (in PHASES order): (argv, progress-bar label, whether the warm-up is reused)
        "warm-up": (steps["s0"], "vision warm-up", False),
        "stage 0": (steps["s0"], "train", True),
        "stage 1": (steps["s1"], "train", False),
        "stage 2": (steps["s2"], "train", False),
    }
    wanted = [name.strip() for name in a.phases.split(",")]
    if unknown := set(wanted) - set(phases):
        _refuse(f"--phases: unknown {sorted(unknown)}; expected some of {list(phases)}")
    phases = {name: phases[name] for name in wanted}
    report = {"recipe": {"STAGE0": recipe.STAGE0, "STAGE1": recipe.STAGE1, "STAGE2": recipe.STAGE2},
              "seconds": a.seconds, "settle": a.settle, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
              "commands": [shlex.join(["python", "benchmarks/train_threads.py", *sys.argv[1:]])], "phases": {}}
    with tempfile.TemporaryDirectory(prefix="train-threads-") as tmp:
        for name, (argv, label, reuse_warmup) in phases.items():
            row = {}
            for threads in (1, 2):  # alternating, each alone: the two share the same machine state
                out = Path(tmp) / f"{name.replace(' ', '')}-{threads}"
                out.mkdir()
                if reuse_warmup:
                    shutil.copy(r / "s0" / "dense-warmup.pt", out / "dense-warmup.pt")
                load = busy_cores()  # another busy process skews the two-thread run most (threads wait on each other)
                if load > 0.3:
                    print(f"train_threads: warning: {load:.1f} cores busy before timing {name} at {threads} "
                          "thread(s); the machine is not idle, so the numbers are not", file=sys.stderr, flush=True)
                text = timed(recipe.override(argv, {"--out": str(out), "--threads": str(threads)}), a.seconds,
                             out.with_suffix(".log"))
                steps_per_s, total = rate(bar_samples(text, label), a.settle)
                row[str(threads)] = {"steps_per_s": round(steps_per_s, 3), "steps": total, "load_before": round(load, 2),
                                     "projected_min": round(total / steps_per_s / 60, 1)}
                print(f"{name}, {threads} thread(s): {steps_per_s:.2f} steps/s, {total} steps -> "
                      f"{total / steps_per_s / 60:.1f} min", flush=True)
            row["speedup"] = round(row["2"]["steps_per_s"] / row["1"]["steps_per_s"], 2)
            report["phases"][name] = row
    if a.out and a.out.is_file():  # earlier sittings' phases, unless timed again now
        before = json.loads(a.out.read_text())
        earlier = before.get("phases", {})
        report["commands"] = before.get("commands", []) + report["commands"]
        merged = earlier | report["phases"]
        report["phases"] = {name: merged[name] for name in PHASES if name in merged}
    for threads in ("1", "2"):  # of the phases in the report
        report[f"total_min_{threads}_thread"] = round(sum(v[threads]["projected_min"] for v in report["phases"].values()), 1)
    print(json.dumps(report, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
