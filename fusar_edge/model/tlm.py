"""Token-wise Linear Modulation (TLM): AEF anchors modulate the visual tokens.

Reference semantics (FUSAR-GPT, ``tlm.py`` of its public code, format
``tlm_original_train_patch_resize_v1``):

1. A 2-layer MLP ``64 -> max(128, hidden_mult*C) -> 2C`` with SiLU maps each anchor's AEF
   vector to ``(gamma_s, beta_s)``.
2. Gaussian weights (sigma in pre-merge patches) between each anchor's position
   ``(y, x) * (hp - 1, wp - 1)`` and every patch centre of the pre-merge grid ``[hp, wp]``;
   normalised over anchors (+eps), masked, normalised again (+eps).
3. The fields ``W^T gamma`` and ``W^T beta`` on the patch grid are bilinearly resized
   (align_corners=False) to the merged token grid ``[h, w]``.
4. ``y = x * (1 + g) + b``.

Steps 2-3 are linear in the anchors, so they collapse into one matrix ``A[h*w, S]``
(``anchor_weights``) and TLM becomes ``y = x * (1 + A @ gamma) + A @ beta``
(``modulate``); the fused kernel in ``fusar_edge.kernels`` computes the same thing.

Choices where the reference is open: the chip is square, so the merged grid is exactly
``(hp // merge, wp // merge)`` (the reference's sqrt-based shape agrees for square grids);
the MLP runs in its weights' dtype (the reference autocasts to bf16 in bf16 runs only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AnchorError


def anchor_weights(
    positions: torch.Tensor,
    mask: torch.Tensor,
    patch_grid: tuple[int, int],
    token_grid: tuple[int, int],
    sigma: float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The combined Gaussian + bilinear matrix ``A[h*w, S]`` (float32).

    One implementation, shared with the fused path: ``fusar_edge.kernels.tlm_weights``
    (which also takes a batch, and raises ``AnchorError`` when every anchor is masked).
    """
    from ..kernels.tlm import tlm_weights

    return tlm_weights(positions, mask, patch_grid, token_grid, sigma, eps)


def modulate_reference(x: torch.Tensor, a: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``y = x * (1 + A @ gamma) + A @ beta`` in float32, cast back to ``x``'s dtype."""
    g = a.float() @ gamma.float()
    b = a.float() @ beta.float()
    return (x.float() * (1.0 + g) + b).to(x.dtype)


class TLM(nn.Module):
    """The FiLM MLP plus the anchor-weighted modulation of one image's visual tokens."""

    def __init__(self, channels: int, vec_dim: int = 64, hidden_mult: int = 4, sigma: float = 2.0, eps: float = 1e-6):
        super().__init__()
        hidden = max(128, hidden_mult * channels)
        self.vec_dim, self.sigma, self.eps = vec_dim, float(sigma), float(eps)
        # Attribute name and layout match the reference checkpoint (`{"film_mlp": state_dict}`).
        self.film_mlp = nn.Sequential(nn.Linear(vec_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))

    def film(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor ``(gamma, beta)``, each ``[S, C]``."""
        w = self.film_mlp[0].weight
        gamma, beta = self.film_mlp(features.to(device=w.device, dtype=w.dtype)).chunk(2, dim=-1)
        return gamma, beta

    def forward(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        patch_grid: tuple[int, int],
        token_grid: tuple[int, int],
    ) -> torch.Tensor:
        if tokens.shape[0] != token_grid[0] * token_grid[1]:
            raise ValueError(f"TLM: {tokens.shape[0]} visual tokens do not fill the token grid {token_grid}")
        if features.ndim != 2 or features.shape[1] != self.vec_dim:
            raise AnchorError(f"anchor features: expected [S, {self.vec_dim}], got {list(features.shape)}")
        # Raises AnchorError when every anchor is masked out (before the MLP runs).
        a = anchor_weights(positions.to(tokens.device), mask.to(tokens.device), patch_grid, token_grid, self.sigma, self.eps)
        gamma, beta = self.film(features)
        from ..kernels import tlm_modulate  # dispatches to the fused kernel where one exists

        return tlm_modulate(tokens, a, gamma.to(tokens.dtype), beta.to(tokens.dtype))
