"""Fused ops for the FUSAR modules (installed as ``fusar_edge.kernels``).

Each op sits in its own file beside its torch reference (Liger-Kernel style) and takes
``backend="auto"|"triton"|"torch"`` (see ``_backend``): on CUDA tensors ``auto`` runs the
Triton kernel, elsewhere the reference, so the model's stages call these without a flag
(except ``grasp_fuse``, whose ``auto`` runs the reference until its fix has passed on a GPU:
``grasp.AUTO_RUNS_KERNEL``).

- ``tlm_modulate(x, a, gamma, beta)``: ``y = x * (1 + a @ gamma) + a @ beta`` in one pass over x
- ``tlm_weights(positions, mask, patch_grid, token_grid, sigma)``: the matrix ``a`` of DESIGN.md
- ``grasp_fuse(q, keys, prompts, selector, k)``: scores, sparse selection, weighted prompt sum
"""

from ._backend import BACKENDS, resolve_backend, triton_available
from .grasp import grasp_fuse, grasp_fuse_reference
from .tlm import tlm_modulate, tlm_modulate_reference, tlm_weights

__all__ = ["tlm_modulate", "tlm_modulate_reference", "tlm_weights", "grasp_fuse", "grasp_fuse_reference",
           "BACKENDS", "resolve_backend", "triton_available"]
