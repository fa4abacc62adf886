"""Fused ops for the FUSAR modules (installed as ``fusar_edge.kernels``).

Each op has a torch reference beside it; the model calls the op, and the op picks an
implementation. The Triton kernels arrive with issue 4; until then every op runs its
torch reference, so callers need not change when they land.
"""

from __future__ import annotations

import torch


def tlm_modulate(x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``y = x * (1 + a @ gamma) + a @ beta`` for ``x[T, C]``, ``a[T, S]``, ``gamma/beta[S, C]``."""
    from fusar_edge.model.tlm import modulate_reference

    return modulate_reference(x, a, gamma, beta)


__all__ = ["tlm_modulate"]
