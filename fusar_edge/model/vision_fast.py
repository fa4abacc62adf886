"""Faster forwards for two pieces of transformers' Qwen2.5-VL vision tower, same weights, same math.

transformers' own forwards stay the reference (``use_fast_vision(visual, False)`` puts them back;
tests/test_vision_fast.py compares the two on fresh inputs, several chip sizes and batches):

- **Patch embedding.** Qwen2.5-VL embeds each ``3 x 2 x 14 x 14`` patch with a ``Conv3d`` whose
  kernel equals its stride: exactly a linear map of the flattened patch. oneDNN's convolution is
  slow for that shape on a CPU (37 ms forward + 34 ms backward for a warm-up batch of 16 demo
  chips, against ~5 ms each for the same product as one matrix multiply), so ``LinearPatchEmbed``
  multiplies by the conv weight viewed as a matrix (the parameter is the same tensor: checkpoints,
  export and import see no difference). The ONNX export already writes it this way
  (``export/onnx_stages.py``).
- **Window attention.** transformers' SDPA path runs one ``scaled_dot_product_attention`` per
  window (or per image in the full-attention blocks): 160 small calls per warm-up batch, each
  with its Python and dispatch overhead. ``BatchedWindowAttention`` stacks the windows of equal
  length (every window of a 224-px chip; the edge windows of other sizes form their own groups)
  and runs one call per length. Implementations other than SDPA (flash attention's varlen kernel
  is already one call; eager) keep transformers' forward.

Measured on the demo's stage-0 warm-up (one thread, 2-core Xeon VM, batches of 16 cached chips):
2.41 -> 2.93 steps/s with the linear patch embedding, 3.11 -> 3.25 with the batched windows on top
(interleaved runs; ``benchmarks/train_threads.py`` times the whole recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
)


class LinearPatchEmbed(Qwen2_5_VisionPatchEmbed):
    """``Qwen2_5_VisionPatchEmbed`` with its kernel-equals-stride Conv3d done as one matrix multiply."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight  # [embed_dim, 3, t, p, p]: flattened in the patch's own order
        flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
        return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


class BatchedWindowAttention(Qwen2_5_VLVisionAttention):
    """``Qwen2_5_VLVisionAttention`` with the segments of ``cu_seqlens`` (windows, or whole images)
    of equal length attended in one batched SDPA call per length."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        if self.config._attn_implementation != "sdpa":
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        out = torch.empty_like(q)  # [n, heads, head_dim]
        starts = cu_seqlens[:-1].tolist()
        for length in sorted(set(lengths)):
            group = [s for s, ln in zip(starts, lengths) if ln == length]
            if len(group) == len(lengths):  # one length (every window of a 224-px chip): views, no gather
                rows = slice(0, n)
            else:
                rows = torch.cat([torch.arange(s, s + length, device=q.device) for s in group])
            # [segments, length, heads, dim] -> [segments, heads, length, dim]
            qs, ks, vs = (t[rows].reshape(len(group), length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling)
            out[rows] = o.transpose(1, 2).reshape(-1, self.num_heads, o.shape[-1])
        return self.proj(out.reshape(n, -1))


_FAST = {Qwen2_5_VisionPatchEmbed: LinearPatchEmbed, Qwen2_5_VLVisionAttention: BatchedWindowAttention}
_REFERENCE = {fast: ref for ref, fast in _FAST.items()}


def use_fast_vision(visual: torch.nn.Module, fast: bool = True) -> torch.nn.Module:
    """Switch ``visual``'s patch embedding and attention modules to the fast forwards (``fast``)
    or back to transformers' own, in place. Only the class changes: parameters, buffers, state
    dict keys and ``isinstance`` checks stay as they are. -> ``visual``."""
    table = _FAST if fast else _REFERENCE
    for module in visual.modules():
        swap = table.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return visual
