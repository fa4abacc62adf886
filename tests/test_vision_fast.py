"""The fast vision forwards (model/vision_fast.py) against transformers' own, on fresh inputs.

Chip sizes where every window has the same length (224: one batched call) and where the edge
windows are shorter (280, 168: several lengths, gathered and scattered back), one image and a
batch of images of different sizes, forward values and the gradients of every vision parameter.
"""

import numpy as np
import pytest
import torch

from fusar_edge.config import preset
from fusar_edge.model.bundle import build_random
from fusar_edge.model.preprocess import chip_to_patches
from fusar_edge.model.vision_fast import BatchedWindowAttention, LinearPatchEmbed, use_fast_vision


def _model(chip: int):
    cfg = preset("demo")
    cfg.chip_size = chip
    cfg.tlm.enabled = False
    return build_random(cfg, seed=11)


def _images(sizes: list[int], seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    out = []
    for size in sizes:
        chip = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels, grid = chip_to_patches(chip, 14, 2, 2)
        out.append((torch.from_numpy(pixels), torch.from_numpy(grid), None))
    return out


def _run(model, images, fast: bool):
    use_fast_vision(model.visual, fast)
    model.zero_grad(set_to_none=True)
    tokens = model.vision_many(images)
    # a loss that weighs every output element differently, so a misplaced row shows in the gradients
    weights = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in tokens]
    sum((t * w).sum() for t, w in zip(tokens, weights)).backward()
    grads = {n: p.grad.clone() for n, p in model.visual.named_parameters() if p.grad is not None}
    return [t.detach() for t in tokens], grads


@pytest.mark.parametrize("sizes", [[224], [224] * 3, [280], [168, 224, 280]])
def test_fast_vision_matches_transformers(sizes):
    model = _model(max(sizes))
    images = _images(sizes, seed=len(sizes) * 1000 + sizes[0])
    ref_tokens, ref_grads = _run(model, images, fast=False)
    fast_tokens, fast_grads = _run(model, images, fast=True)
    for r, f in zip(ref_tokens, fast_tokens):
        assert r.shape == f.shape
        scale = float(r.abs().max())
        assert float((r - f).abs().max()) <= 1e-5 * scale + 1e-6
    assert ref_grads.keys() == fast_grads.keys() and len(ref_grads) > 10
    for name, g in ref_grads.items():
        scale = float(g.abs().max()) + 1e-12
        assert float((g - fast_grads[name]).abs().max()) <= 1e-4 * scale, name


def test_the_switch_changes_classes_not_weights():
    model = _model(224)
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    assert isinstance(model.visual.patch_embed, LinearPatchEmbed)  # FusarModel turns them on
    assert all(isinstance(b.attn, BatchedWindowAttention) for b in model.visual.blocks)
    use_fast_vision(model.visual, False)
    assert type(model.visual.patch_embed) is not LinearPatchEmbed
    assert not any(isinstance(b.attn, BatchedWindowAttention) for b in model.visual.blocks)
    after = model.visual.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_other_attention_implementations_keep_transformers_forward(monkeypatch):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    calls = []
    reference = Qwen2_5_VLVisionAttention.forward
    monkeypatch.setattr(Qwen2_5_VLVisionAttention, "forward", lambda self, *a, **k: calls.append(1) or reference(self, *a, **k))
    model = _model(224)
    images = _images([224], seed=5)
    with torch.no_grad():
        model.vision_many(images)
        assert calls == []  # SDPA: the batched forward
        model.visual.config._attn_implementation = "eager"
        model.vision_many(images)
    assert len(calls) == len(model.visual.blocks)  # eager: transformers' own, once per block
