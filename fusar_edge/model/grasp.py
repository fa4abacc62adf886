"""GRASP: region-aware soft prompts fused by question-guided sparse selection.

Semantics (GRASP, arXiv 2601.17089, as DESIGN.md fixes them; no public code exists):

- The merged visual token grid ``[h, w]`` is average-pooled into ``N = rows x cols`` spatial
  blocks (adaptive pooling, so grids that do not divide evenly still work); a fixed 2-D
  sin-cos code of the block's (row, col) index is added to each block vector.
- Each block owns a learnable prompt ``p_i`` (``[L, C]``: L prompt tokens of LLM width).
- Question vector ``q``: mean of the frozen LLM's final (normed) hidden states over the
  question tokens, from a text-only pass (computed by the fusion stage).
- ``s_i = <W_q q, W_k b_i> / sqrt(h)`` with ``h = proj_dim``; a sparse selector turns scores
  into weights: ``topk`` (softmax over the k largest, zero elsewhere; ties broken by
  lower block index, via a stable sort) or ``entmax15`` (exact 1.5-entmax, Peters et al.
  2019, sort-based). ``GRASP.forward`` runs scores, selection and the weighted sum as one
  fused op (``fusar_edge.kernels.grasp_fuse``: Triton on CUDA, this module's torch otherwise).
- The global prompt ``g = sum_i w_i p_i`` (``[L, C]``) is inserted right after
  ``<|vision_end|>``, i.e. at the vision-language boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def topk_softmax(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the k largest scores of the last dim, exact zeros elsewhere.

    Ties are broken by the lower index: a stable descending sort keeps equal scores in index
    order (``torch.topk`` does not promise that, and its CPU and CUDA choices differ).
    """
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top-k selector: k must be in 1..{n}, got {k}")
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    weights = torch.zeros_like(scores, dtype=torch.float32)
    return weights.scatter(-1, indices[..., :k], torch.softmax(values[..., :k].float(), dim=-1))


def entmax15(scores: torch.Tensor) -> torch.Tensor:
    """Exact 1.5-entmax over the last dim: ``p = [x/2 - tau]_+^2`` with ``sum(p) = 1``.

    Sort-based threshold (Peters, Niculae & Martins, 2019): for the k largest values the
    candidate tau solves ``sum_{j<=k} (x_j/2 - tau)^2 = 1``; the support is the largest k
    whose candidate lies below its k-th value.
    """
    x = scores.float() / 2.0
    x = x - x.max(dim=-1, keepdim=True).values  # shift-invariant; keeps the squares small
    srt, _ = torch.sort(x, dim=-1, descending=True)
    n = x.shape[-1]
    ks = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    mean = srt.cumsum(-1) / ks
    mean_sq = (srt**2).cumsum(-1) / ks
    delta = (1.0 - ks * (mean_sq - mean**2)) / ks
    tau = mean - torch.sqrt(torch.clamp(delta, min=0.0))
    support = (tau <= srt).sum(dim=-1, keepdim=True)  # >= 1 always
    tau_star = tau.gather(-1, support - 1)
    return torch.clamp(x - tau_star, min=0.0) ** 2


def select(scores: torch.Tensor, selector: str, k: int) -> torch.Tensor:
    if selector == "topk":
        return topk_softmax(scores, k)
    if selector == "entmax15":
        return entmax15(scores)
    raise ValueError(f"GRASP selector: expected 'topk' or 'entmax15', got {selector!r}")


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position code ``[rows*cols, dim]`` (MAE style: half rows, half cols)."""
    if dim % 4:
        raise ValueError(f"sin-cos code needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    r, c = r.flatten()[:, None] * omega, c.flatten()[:, None] * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


class GRASP(nn.Module):
    def __init__(self, channels: int, grid: tuple[int, int] = (2, 2), proj_dim: int = 512,
                 prompt_len: int = 1, selector: str = "topk", k: int = 2):
        super().__init__()
        self.grid, self.proj_dim, self.selector, self.k = tuple(grid), proj_dim, selector, k
        n = grid[0] * grid[1]
        self.prompts = nn.Parameter(torch.randn(n, prompt_len, channels) * 0.02)
        self.w_q = nn.Linear(channels, proj_dim)
        self.w_k = nn.Linear(channels, proj_dim)
        self.register_buffer("block_pos", sincos_2d(grid[0], grid[1], channels), persistent=False)

    @property
    def num_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    def blocks(self, tokens: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
        """Pool ``[h*w, C]`` row-major tokens into ``[N, C]`` block vectors (+ position code)."""
        h, w = token_grid
        fmap = tokens.float().T.reshape(1, -1, h, w)
        pooled = F.adaptive_avg_pool2d(fmap, self.grid).reshape(tokens.shape[1], -1).T
        return pooled + self.block_pos.to(pooled.device)

    def project(self, tokens: torch.Tensor, token_grid: tuple[int, int], q: torch.Tensor):
        """-> ``(query [h], keys [N, h])`` in the projection weights' dtype."""
        dtype = self.w_k.weight.dtype
        keys = self.w_k(self.blocks(tokens, token_grid).to(dtype))  # [N, h]
        query = self.w_q(q.to(dtype))  # [h]
        return query, keys

    def scores(self, tokens: torch.Tensor, token_grid: tuple[int, int], q: torch.Tensor) -> torch.Tensor:
        query, keys = self.project(tokens, token_grid, q)
        return keys.float() @ query.float() / math.sqrt(self.proj_dim)

    def forward(self, tokens: torch.Tensor, token_grid: tuple[int, int], q: torch.Tensor):
        """Returns ``(prompt [L, C], weights [N])`` for one image and its question vector.

        Scores, selection and the weighted prompt sum run as one fused op
        (``fusar_edge.kernels.grasp_fuse``: the Triton kernel on CUDA, else the torch reference,
        which is ``scores`` + ``select`` + the fp32 einsum over the prompts).
        """
        from fusar_edge.kernels import grasp_fuse  # lazy: the kernels package imports this module too

        query, keys = self.project(tokens, token_grid, q)
        prompt, weights = grasp_fuse(query, keys, self.prompts, self.selector, self.k)
        return prompt.to(tokens.dtype), weights
