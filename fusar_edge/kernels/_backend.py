"""Which implementation an op runs: the Triton kernel or its torch reference.

``backend="auto"`` (the default everywhere) runs Triton when every tensor is on a CUDA
device and Triton imports, else the torch reference: the model calls the ops without a
flag and gets the fused path on a GPU. ``"triton"`` forces the kernel (on CPU tensors that
works only under ``TRITON_INTERPRET=1``, which is how the tests run it); ``"torch"`` forces
the reference.
"""

from __future__ import annotations

import functools
import os

import torch

from fusar_edge.errors import InputError

BACKENDS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on the CPU through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str) -> str:
    """-> ``"triton"`` or ``"torch"`` for these inputs (see the module docstring)."""
    if backend not in BACKENDS:
        raise InputError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise InputError(f"{op}: backend='triton' but Triton is not installed (pip install triton)")
    if not on_cuda and not interpreting():
        raise InputError(f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernel "
                         "on the CPU through Triton's interpreter")
    return "triton"
