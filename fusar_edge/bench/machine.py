"""What a benchmark ran on: CPU, memory, GPU, library versions and the code's commit.

Shared by ``fusar-edge bench`` and the scripts in ``benchmarks/`` so every result file
describes its machine the same way.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("fusar-edge", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "triton",
            "tensorrt", "tensorrt-edgellm", "numpy")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    """Total host memory (Linux /proc/meminfo)."""
    value = meminfo_kb("MemTotal")
    return round(value / 2**20, 1) if value else None


def meminfo_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the checkout this code runs from (``-dirty`` with local changes), None outside git."""
    repo = repo or Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty.strip() else "")) if rev else None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def gpus() -> list[dict]:
    """The CUDA devices torch sees (name, memory, compute capability), with the driver version."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                    "capability": f"{p.major}.{p.minor}", "driver": driver, "cuda": torch.version.cuda})
    return out


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "host": socket.gethostname().split(".")[0],
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": memory_gb(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "commit": git_commit(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
