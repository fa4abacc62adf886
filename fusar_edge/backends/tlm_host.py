"""TLM's anchor matrix ``a`` in numpy, for the ONNX Runtime backend's host side (no torch).

The reference is ``kernels.tlm.tlm_weights`` (torch, DESIGN.md's definition): Gaussian
weights of each anchor over the patch grid, normalised over anchors, masked anchors
zeroed, then each anchor's map resized to the token grid by bilinear interpolation
(``F.interpolate(..., align_corners=False)``). Bilinear resizing is separable and linear, so
here it is two small interpolation matrices; ``tests/test_tlm_host.py`` compares the two.
"""

from __future__ import annotations

import numpy as np

from ..errors import AnchorError, InputError


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``R [n_out, n_in]``: one axis of torch's bilinear resize with ``align_corners=False``
    (source index ``(dst + 0.5) * n_in / n_out - 0.5``, clamped at 0; no antialiasing)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    r = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(r, (rows, i0), 1.0 - lam)
    np.add.at(r, (rows, i1), lam)
    return r


def tlm_weights_numpy(positions, mask, patch_grid: tuple[int, int], token_grid: tuple[int, int],
                      sigma: float, eps: float = 1e-6) -> np.ndarray:
    """``positions [S, 2]`` (normalised y, x), ``mask [S]`` -> ``a [h*w, S]`` float32."""
    pos = np.asarray(positions, dtype=np.float64)
    valid = np.asarray(mask).astype(np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise InputError(f"tlm_weights: positions: expected [S, 2] (normalised y, x), got {list(pos.shape)}")
    if valid.shape != pos.shape[:1]:
        raise InputError(f"tlm_weights: mask: expected [S] = {list(pos.shape[:1])}, got {list(valid.shape)}")
    if not (valid != 0).any():
        none = " (there are none: S = 0)" if pos.shape[0] == 0 else ""
        raise AnchorError(f"anchor mask: every anchor is masked out{none}; TLM needs at least one valid AEF vector")
    (hp, wp), (h, w) = patch_grid, token_grid
    yy, xx = np.meshgrid(np.arange(hp, dtype=np.float64), np.arange(wp, dtype=np.float64), indexing="ij")
    d2 = (pos[:, 0, None] * (hp - 1) - yy.ravel()) ** 2 + (pos[:, 1, None] * (wp - 1) - xx.ravel()) ** 2
    wts = np.exp(-d2 / (2.0 * float(sigma) ** 2))  # [S, hp*wp]
    wts = wts / (wts.sum(axis=0, keepdims=True) + eps)
    wts = wts * valid[:, None]
    wts = wts / (wts.sum(axis=0, keepdims=True) + eps)
    maps = wts.reshape(-1, hp, wp)
    resized = np.einsum("yi,sij,xj->syx", bilinear_matrix(hp, h), maps, bilinear_matrix(wp, w))
    return np.ascontiguousarray(resized.reshape(-1, h * w).T, dtype=np.float32)
