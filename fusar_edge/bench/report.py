"""The benchmark's outputs: an aligned terminal table, the JSON document, a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import write_text_atomic

ROWS = [  # (key in stages, label)
    ("preprocess", "preprocess"),
    ("anchors", "AEF lookup"),
    ("vision", "vision + TLM"),
    ("fusion", "fusion + GRASP"),
    ("prefill", "prefill"),
    ("decode_per_token", "decode, per token"),
    ("other", "other"),
    ("ttft", "time to first token"),
    ("end_to_end", "end-to-end"),
]
PLOT_STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill", "decode", "other")


def _num(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _label(name: str) -> str:
    return "baseline (transformers)" if name == "baseline" else name


def format_table(result: dict) -> str:
    """The report as aligned text: stage percentiles per backend, then totals and ratios."""
    s, m = result["settings"], result["machine"]
    backends = result["backends"]
    names = list(backends)
    gpu = ", ".join(g["name"] for g in m.get("gpus") or []) or "no GPU"
    v = m.get("versions", {})
    weights = {e["weights"] for e in backends.values()}
    if weights:
        wtxt = "random weights" if weights == {"random"} else ", ".join(sorted(w[:12] for w in weights))
    else:
        wtxt = "weights not loaded" if Path(s["model"]).is_dir() else "random weights"
    lines = [
        f"fusar-edge bench: {s['model']} ({wtxt}) | batch {s['batch']} | {s['new_tokens']} new tokens | "
        f"{s['runs']} runs after {s['warmup']} warm-up",
        f"machine: {m['cpu']}, {m['cores']} cores (torch {m['torch_threads']} threads"
        + (f"; reads {m['read_ceiling_gbs']} GB/s at most" if m.get("read_ceiling_gbs") else "") + f") | {gpu}"
        + "".join(f" (reads {gbs} GB/s at most)" for gbs in m.get("device_read_ceiling_gbs", {}).values()) + " | "
        f"torch {v.get('torch', '?')}" + (f" | onnxruntime {v['onnxruntime']}" if "onnxruntime" in v else "")
        + (f" | commit {m['commit'][:12]}" if m.get("commit") else ""),
    ]
    if not names:
        lines.append("no backend ran")
    else:
        w0, wc = 22, 9
        head = " " * w0 + "".join(f"  {_label(n)[:3 * wc]:<{3 * wc}}" for n in names)
        sub = f"{'stage (ms)':<{w0}}" + "".join(f"  {'p50':>{wc}}{'p90':>{wc}}{'p99':>{wc}}" for _ in names)
        lines += ["", head, sub]
        for key, label in ROWS:
            cells = []
            for n in names:
                st = backends[n]["stages"].get(key)
                cells.append("".join(f"{_num(st[p]) if st else '-':>{wc}}" for p in ("p50_ms", "p90_ms", "p99_ms")))
            lines.append(f"{label:<{w0}}" + "".join(f"  {c}" for c in cells))
        lines.append("")
        summary = [
            ("decode tokens/s", lambda e: _num(e.get("decode_tokens_per_s"))),
            ("decode weights MB", lambda e: _num(e.get("decode_weight_mb"))),
            ("decode read GB/s", lambda e: _num(e.get("decode_read_gbs"))),
            ("  of read ceiling", lambda e: f"{100 * e['decode_read_of_ceiling']:.0f} %"
             if e.get("decode_read_of_ceiling") else "-"),
            ("  of a same-size read", lambda e: f"{100 * e['decode_read_of_same_size_ceiling']:.0f} %"
             if e.get("decode_read_of_same_size_ceiling") else "-"),
            ("peak host MB", lambda e: _num(e["peak_mem_mb"]["host"])),
            ("peak device MB", lambda e: _num(e["peak_mem_mb"]["device"])),
            ("model size MB", lambda e: _num(e["model_size_mb"])),
            ("device / dtype", lambda e: f"{e.get('device')} {e.get('dtype')}"),
            ("startup s", lambda e: _num(e.get("open_s"))),
        ]
        for label, get in summary:
            lines.append(f"{label:<{w0}}" + "".join(f"  {get(backends[n]):>{3 * wc}}" for n in names))
        ratios = [n for n in names if backends[n].get("vs_baseline")]
        if ratios:
            lines += ["", f"{'x faster than baseline':<{w0}}" + "".join(f"  {n:>{3 * wc}}" for n in ratios)]
            for key, label in (("ttft", "time to first token"), ("decode_tokens_per_s", "decode tokens/s"),
                               ("end_to_end", "end-to-end")):
                lines.append(f"{label:<{w0}}" + "".join(
                    f"  {str(backends[n]['vs_baseline'].get(key, '-')) + 'x':>{3 * wc}}" for n in ratios))
    notes = [f"{n}: {e['variant']}" for n, e in backends.items() if e.get("variant")]
    notes += [f"{n}: {note}" for n, e in backends.items() for note in e.get("notes", [])]
    notes += sorted({n for e in backends.values() for n in e.get("anchor", {}).get("notes", [])})
    notes += result.get("notes", [])
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    for name, why in result.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    """Write atomically (``fsutil.atomic_writer``): an interrupted run never leaves half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory")
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return path


def have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(result: dict, path: str | Path) -> Path:
    """Stacked bars of the mean time per stage, one bar per backend (means add up to the run)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    backends = result["backends"]
    names = list(backends)
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.7 * max(1, len(names))))
    left = [0.0] * len(names)
    colors = plt.get_cmap("tab10")
    for i, stage in enumerate(PLOT_STAGES):
        widths = []
        for n in names:
            runs = backends[n]["runs_ms"]
            widths.append(sum(r.get(stage, 0.0) for r in runs) / len(runs))
        if any(widths):
            ax.barh([_label(n) for n in names], widths, left=left, label=stage, color=colors(i))
            left = [a + b for a, b in zip(left, widths)]
    s = result["settings"]
    ax.set_xlabel("mean ms per request (stages stacked)")
    ax.set_title(f"{s['model']}: batch {s['batch']}, {s['new_tokens']} new tokens, {result['machine']['cpu']}"
                 + (f", {result['machine']['gpus'][0]['name']}" if result["machine"].get("gpus") else ""),
                 fontsize=9)
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
