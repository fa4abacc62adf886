"""How many threads a backend should use here: never more than the cores this process may use.

torch and ONNX Runtime size their pools from the machine's cores, which oversubscribes inside
a container limited by a CPU quota (``docker --cpus 2`` on a 64-core host) or a CPU affinity
mask (``taskset``), and on hyper-threaded machines a GEMM thread per logical CPU fights its
sibling. So the default is the physical cores among the CPUs this process may run on, capped
by the cgroup CPU quota, less the cores other work keeps busy when we start. Measured on the
2-core VM (``benchmarks/results/threads-vm.json``): the small preset's 4-bit export answers in
306 ms with 2 threads against 454 ms with 1; the demo model is too small to care (57 vs 55 ms on
ONNX Runtime).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")
CGROUP = Path("/sys/fs/cgroup")


def allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], sys_cpu: Path = SYS_CPU) -> int:
    """Distinct (package, core) pairs among ``cpus``; their count when the topology is unreadable."""
    cores = set()
    for cpu in cpus:
        topo = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def default_threads(share: int = 1) -> int:
    """Threads for one of ``share`` concurrent workers: physical cores we may use, within the quota,
    less the cores other work is using right now (``runnable_others``).

    A thread on a core that another process keeps busy makes every parallel op wait for it: beside
    one busy neighbour on the 2-core VM, the small 4-bit decoder ran 241 tok/s with one thread
    against 214 with two, prefill 157 against 182 ms (``benchmarks/decoder_ab.py --threads-b 1``,
    ``benchmarks/results/decoder-ab-vm.json``)."""
    n = physical_cores(allowed_cpus())
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    n -= min(n - 1, runnable_others() or 0)
    return max(1, n // max(1, share))


def resolve_threads(requested: int | None, share: int = 1) -> int:
    return int(requested) if requested else default_threads(share)


def set_torch_threads(n: int) -> None:
    """torch's intra-op pool, when torch is installed (the edge install has none; the torch
    backend then says what to install)."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


LOADAVG = Path("/proc/loadavg")


_LAST_READING: tuple[float, int | None] | None = None  # (monotonic time, runnable_others() of this machine)
READING_VALID_S = 1.0


def runnable_others(samples: int = 5, interval_s: float = 0.01, loadavg: Path = LOADAVG) -> int | None:
    """How many threads of other work want a CPU now: the median over ``samples`` readings of
    ``/proc/loadavg``'s fourth field (threads runnable at that instant, the reader included) less
    one; None when unknown (not Linux).

    A start-up asks twice (default threads, then ONNX Runtime's spin policy): a reading of this
    machine's file is reused for ``READING_VALID_S`` instead of sampling ~40 ms again."""
    import time

    global _LAST_READING
    if loadavg == LOADAVG:
        if _LAST_READING is not None and time.monotonic() - _LAST_READING[0] < READING_VALID_S:
            return _LAST_READING[1]
        others = _sample_runnable(samples, interval_s, loadavg)
        _LAST_READING = (time.monotonic(), others)
        return others
    return _sample_runnable(samples, interval_s, loadavg)


def _sample_runnable(samples: int, interval_s: float, loadavg: Path) -> int | None:
    import time

    counts = []
    for i in range(samples):
        try:
            counts.append(int(loadavg.read_text().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2])


def others_running(samples: int = 5, interval_s: float = 0.01, loadavg: Path = LOADAVG) -> bool | None:
    """Is other work running on this machine now? -> True / False, None when unknown (not Linux).

    Used to decide whether ONNX Runtime's decoder workers may spin (``backends.onnxruntime``):
    spinning wins on idle cores and loses badly on shared ones.
    """
    others = runnable_others(samples, interval_s, loadavg)
    return None if others is None else others > 0
