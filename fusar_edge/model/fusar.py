"""The FUSAR model: transformers' Qwen2.5-VL with TLM and GRASP, split into three stages.

- ``vision(pixel_values, grid_thw, anchors)``: ViT + patch merger + TLM -> visual tokens ``[T, C]``.
- ``fusion(input_ids, layout, visual_tokens, question_ids)``: token embeddings, the visual
  tokens spliced over the image placeholders, and (GRASP) the global prompt over its slots
  right after ``<|vision_end|>`` -> ``inputs_embeds [1, L, C]``.
- ``decoder(inputs_embeds, position_ids, cache)``: the language model + LM head -> logits.

The three are the unit of export (ONNX / TensorRT); everything data-dependent (M-RoPE
positions, ViT window indices) stays on the host. The backbone is an unmodified
``Qwen2_5_VLForConditionalGeneration`` so real checkpoints load through transformers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..config import FusarConfig
from ..tokenizer import SequenceLayout  # noqa: F401  (defined beside the sequence it describes; callers import it here)
from .grasp import GRASP
from .rope import text_positions
from .tlm import TLM
from .vision_fast import use_fast_vision


def as_tensor(x, device=None, dtype=None) -> torch.Tensor:
    """The host side (preprocessing, tokenizer, M-RoPE, anchors) hands numpy arrays to the
    stages; the model takes those or tensors alike (no copy for a tensor already in place)."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        t = torch.from_numpy(x if x.flags.writeable else x.copy())  # a broadcast view is read-only
    else:
        t = torch.as_tensor(x)
    return t.to(device=device, dtype=dtype) if device is not None or dtype is not None else t


class FusarModel(nn.Module):
    def __init__(self, config: FusarConfig, backbone: nn.Module | None = None):
        super().__init__()
        from transformers import Qwen2_5_VLForConditionalGeneration

        config.validate()
        self.config = config
        self.backbone = backbone if backbone is not None else Qwen2_5_VLForConditionalGeneration(config.backbone_config())
        use_fast_vision(self.visual)  # same weights and math, fewer and larger kernels (vision_fast.py)
        c = config.hidden_size
        t, g = config.tlm, config.grasp
        self.tlm = TLM(c, t.vec_dim, t.hidden_mult, t.sigma, t.eps) if t.enabled else None
        self.grasp = GRASP(c, g.grid, g.proj_dim, g.prompt_len, g.selector, g.k) if g.enabled else None

    # -- pieces of the backbone ------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.backbone.model.visual

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def fusar_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the FUSAR modules only (the backbone saves through transformers)."""
        state = {}
        for name, module in (("tlm", self.tlm), ("grasp", self.grasp)):
            if module is not None:
                state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return state

    # -- stage 1: vision -----------------------------------------------------------------
    def vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
               anchors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """ViT + merger (+ TLM when anchors are given) -> ``[T, C]`` in raster order."""
        return self.vision_many([(pixel_values, grid_thw, anchors)])[0]

    def vision_many(self, images: list[tuple[torch.Tensor, torch.Tensor, tuple | None]]) -> list[torch.Tensor]:
        """``vision`` of several ``(pixel_values, grid_thw, anchors)`` with one ViT call (the ViT
        attends within each image); TLM then runs per image. -> one ``[T, C]`` per image."""
        images = [(as_tensor(p), as_tensor(g), _anchor_tensors(a)) for p, g, a in images]
        pixels = torch.cat([p for p, _, _ in images]).to(device=self.device, dtype=self.visual.dtype)
        grids = torch.cat([g for _, g, _ in images]).to(self.device)
        out = self.visual(pixels, grid_thw=grids)
        tokens = out.pooler_output if hasattr(out, "pooler_output") else out
        merge = int(self.config.vision.get("spatial_merge_size", 2))
        per_image = tokens.split([int(g.prod(dim=-1).sum()) // merge**2 for _, g, _ in images])
        if self.tlm is None:
            return list(per_image)
        cfg = self.config
        return [self.tlm(t, *a, cfg.patch_grid, cfg.token_grid) if a is not None else t
                for t, (_, _, a) in zip(per_image, images)]

    # -- stage 2: fusion ------------------------------------------------------------------
    def question_vector(self, question_ids: torch.Tensor) -> torch.Tensor:
        """GRASP's ``q``: mean final hidden state over the question tokens, text-only pass.

        No gradient: GRASP reads the frozen LLM's view of the question; training moves the
        prompts and projections, not the question encoding (and skips a backward pass).
        """
        ids = as_tensor(question_ids, self.device).view(1, -1)
        with torch.no_grad():
            out = self.language_model(input_ids=ids, position_ids=as_tensor(text_positions(0, ids.shape[1]), self.device),
                                      use_cache=False)
        return out.last_hidden_state[0].mean(dim=0)

    def fusion(self, input_ids: torch.Tensor, layout: SequenceLayout, visual_tokens: torch.Tensor,
               question_ids: torch.Tensor | None = None,
               question_vector: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> ``(inputs_embeds [1, L, C], grasp block weights [N] or None)``.

        ``question_vector``: GRASP's ``q`` when the caller has it already (a cache); else it is
        computed from ``question_ids``."""
        ids = as_tensor(input_ids, self.device).view(1, -1)
        embeds = self.language_model.embed_tokens(ids).clone()
        s, n = layout.image_start, layout.image_len
        if visual_tokens.shape[0] != n:
            raise ValueError(f"fusion: {visual_tokens.shape[0]} visual tokens for {n} image placeholders")
        embeds[0, s:s + n] = visual_tokens.to(embeds.dtype)
        weights = None
        if self.grasp is not None and layout.prompt_len:
            if question_ids is None and question_vector is None:
                raise ValueError("fusion: GRASP needs the question's token ids")
            q = self.question_vector(question_ids) if question_vector is None else question_vector
            prompt, weights = self.grasp(visual_tokens, self.config.token_grid, q)
            p = layout.prompt_start
            embeds[0, p:p + layout.prompt_len] = prompt.to(embeds.dtype)
        return embeds, weights

    # -- stage 3: decoder -----------------------------------------------------------------
    def decoder(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache=None, *,
                last_only: bool = False):
        """Language model + LM head -> ``(logits [B, L, V] float32, cache)``.

        ``last_only``: the LM head runs on the last position alone (``[B, 1, V]``): what greedy
        decoding needs, and for a 7B prefill it saves L x 152k x 3584 multiply-adds and the copy.
        """
        out = self.language_model(inputs_embeds=inputs_embeds, position_ids=as_tensor(position_ids, self.device),
                                  cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        return self.lm_head(hidden).float(), out.cache


def _anchor_tensors(anchors):
    """``(features, positions, mask)`` as tensors (numpy from ``AnchorSet.arrays()``), or None."""
    return None if anchors is None else tuple(as_tensor(x) for x in anchors)
