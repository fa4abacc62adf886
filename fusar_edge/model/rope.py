"""M-RoPE position ids, computed on the host (numpy, so the torch-free runtime shares them).

Qwen2.5-VL gives text tokens one position shared by its three rotary axes (t, h, w) and
image tokens a (t, h, w) grid position. For a still image starting at text position ``p``
the merged token at (row, col) gets ``(p, p + row, p + col)``; text after the image
resumes at ``p + max(h, w)``. Same rule as transformers' ``get_rope_index``; a test
compares the two. Exported graphs take these ids as inputs, so they keep static shapes.
"""

from __future__ import annotations

import numpy as np


def mrope_positions(seq_len: int, image_start: int, token_grid: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Positions int64 ``[3, 1, seq_len]`` for one sequence with one image; returns also the next position.

    ``image_start`` is the index of the first image token; the image spans ``h*w`` tokens.
    """
    h, w = token_grid
    n_img = h * w
    if image_start < 0 or image_start + n_img > seq_len:
        raise ValueError(f"image tokens [{image_start}, {image_start + n_img}) do not fit a sequence of {seq_len}")
    pos = np.empty((3, seq_len), dtype=np.int64)
    pos[:, :image_start] = np.arange(image_start)
    rows = np.repeat(np.arange(h), w)
    cols = np.tile(np.arange(w), h)
    p = image_start
    pos[0, p:p + n_img] = p
    pos[1, p:p + n_img] = p + rows
    pos[2, p:p + n_img] = p + cols
    after = p + max(h, w)
    rest = seq_len - (p + n_img)
    pos[:, p + n_img:] = np.arange(after, after + rest)
    return pos[:, None, :], after + rest


def text_positions(start: int, length: int) -> np.ndarray:
    """Positions int64 ``[3, 1, length]`` for text tokens continuing at ``start`` (decode steps)."""
    return np.ascontiguousarray(np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, 1, length)))


def rotary_rows(positions: np.ndarray, inv_freq: np.ndarray, mrope_section, scaling: float = 1.0,
                dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE ``cos, sin`` ``[L, d/2]`` for positions ``[3, L]`` (one sequence).

    Frequency ``f`` turns with the t, h or w position by ``mrope_section`` (consecutive
    blocks of frequencies), as transformers' Qwen2.5-VL rotary embedding; the decoder
    graph's attention op applies the rows rotate-half style to both halves of a head.
    """
    pos = np.asarray(positions).reshape(3, -1)
    inv = np.asarray(inv_freq, dtype=np.float32)
    axis = np.repeat(np.arange(3), np.asarray(mrope_section, dtype=np.int64))
    if axis.size != inv.size:
        raise ValueError(f"mrope_section {list(mrope_section)} does not cover {inv.size} frequencies")
    # float32 angles, as transformers computes them (position * inv_freq in float32)
    angles = pos[axis].T.astype(np.float32) * inv  # [L, d/2]
    cos, sin = np.cos(angles), np.sin(angles)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)
