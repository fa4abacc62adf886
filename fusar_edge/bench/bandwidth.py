"""Achieved memory-read bandwidth of decoding, against the machine's measured ceiling, and
notes on a noisy run.

At batch 1 a decode step reads every weight of the language model once, so
``decoder weight bytes x tokens/s`` is the read bandwidth the decoder achieves; as gpt-fast
prints it, set against what this machine can read (``read_ceiling_gbs``) it says how far a
backend is from memory-bound. A benchmark on a shared box can also be disturbed by other
work: ``noise_notes`` says so when the load average or the spread of the runs is high.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

NOISY_SPREAD = 1.25  # end-to-end p90 / p50 above this: the runs were disturbed
LOADED = 0.5  # 1-minute load average per core above this at the start: other work was running
CEILING_MIB = 512  # the memory ceiling's buffer: past any CPU's last-level cache we have met (480 MB)
CACHED = 1.25  # a same-size read this much faster than memory's: the weights live in the cache


def decoder_weight_bytes(rt) -> int:
    """Bytes of the weights one decode step reads: the language model and its LM head."""
    if rt.model is None:  # exported: the decoder graph's files (graph + external data)
        d: Path = rt.stages.dir
        stem = Path(rt.stages.spec["stages"]["decoder"]["file"]).stem
        return sum(p.stat().st_size for p in d.iterdir() if p.is_file() and p.name.startswith(stem))
    modules = (rt.model.language_model, rt.model.lm_head)
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if p.data_ptr() not in seen:  # tied embeddings are read once
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def read_ceiling_gbs(mib: int = CEILING_MIB, repeats: int = 3, device: str = "cpu") -> float:
    """The best of ``repeats`` full reads (a sum) of a ``mib`` MiB buffer, in GB/s: on the CPU with
    torch's threads (what the decode threads could read at most), on a CUDA device its memory's
    (a decoder on the GPU reads its weights from there, not from host memory)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        mib = max(mib, 2048)  # well past the GPU's L2 (60 MB on an H200), so HBM is what is read
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=dev)  # touched: every page is resident
    best = float("inf")
    for _ in range(repeats + cuda):  # on the GPU the first sum also loads the kernel: one more
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        float(x.sum())  # float(): waits for the GPU's result
        best = min(best, time.perf_counter() - t0)
    del x
    return round(mib * 2**20 / best / 1e9, 2)


def same_size_ceiling_gbs(weight_bytes: int, repeats: int = 5, memory_gbs: float | None = None) -> float:
    """What this CPU reads from a buffer the size of the decoder's weights, in GB/s.

    The main ceiling reads 512 MiB, past the last-level cache, so it is the memory's bandwidth.
    A decoder whose weights fit the cache (``small``'s 49 MB on a Xeon with a large L3: a same-size
    read ran 57 GB/s where memory gave 27-32) reads much of them from the cache, and set against
    memory alone it looks closer to the ceiling than it is; this one holds it to the same working set.
    Weights larger than the memory ceiling's buffer read from memory anyway: the buffer stays at that
    size (a 7B's 28 GB of fp32 weights must not be allocated a second time to learn it), and that
    read is the memory ceiling itself: ``memory_gbs``, when the caller has measured it, is returned.
    """
    mib = min(CEILING_MIB, max(1, -(-int(weight_bytes) // 2**20)))
    if mib == CEILING_MIB and memory_gbs is not None:
        return memory_gbs
    return read_ceiling_gbs(mib=mib, repeats=repeats)


def cache_note(weight_mb: float, memory_gbs: float, same_size_gbs: float) -> str | None:
    """A note when the weights' working set reads much faster than memory (it fits the cache)."""
    if same_size_gbs > CACHED * memory_gbs:
        return (f"the decoder's {weight_mb:.0f} MB of weights fit this CPU's caches: a read of that size runs "
                f"{same_size_gbs} GB/s against memory's {memory_gbs}; judge the decode bandwidth against the former")
    return None


def bandwidth_entry(weight_bytes: int, tokens_per_s: float | None, batch: int) -> dict:
    """``decode_weight_mb`` and ``decode_read_gbs`` (batch 1 only: a batch reads the weights once
    for several sequences)."""
    out: dict = {"decode_weight_mb": round(weight_bytes / 2**20, 2)}
    if tokens_per_s and batch == 1:
        out["decode_read_gbs"] = round(weight_bytes * tokens_per_s / 1e9, 2)
    return out


def noise_notes(result: dict) -> list[str]:
    """Warnings for a run that other work may have disturbed."""
    notes = []
    m = result.get("machine", {})
    load, cores = m.get("loadavg"), m.get("cores") or os.cpu_count() or 1
    if load and load[0] > LOADED * cores:
        notes.append(f"noisy: the 1-minute load average was {load[0]} on {cores} cores when the run started "
                     "(other work competes for the cores; compare backends in one run, interleaved)")
    for name, entry in result.get("backends", {}).items():
        e2e = entry.get("stages", {}).get("end_to_end")
        if e2e and e2e.get("p50_ms") and e2e["p90_ms"] / e2e["p50_ms"] > NOISY_SPREAD:
            notes.append(f"noisy: {name} end-to-end p90 is {e2e['p90_ms'] / e2e['p50_ms']:.2f}x its p50 "
                         "(more --runs, or a quieter machine)")
    return notes
