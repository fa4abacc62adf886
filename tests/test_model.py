"""The FUSAR model's stages, TLM and GRASP semantics, and faithfulness to transformers."""

import math

import numpy as np
import pytest
import torch

from conftest import rel_err
from fusar_edge.config import TINY_SPECIAL_TOKENS, preset
from fusar_edge.errors import AnchorError
from fusar_edge.model.bundle import build_random
from fusar_edge.model.grasp import GRASP, entmax15, sincos_2d, topk_softmax
from fusar_edge.model.preprocess import chip_to_patches
from fusar_edge.model.rope import mrope_positions
from fusar_edge.model.tlm import TLM, anchor_weights
from fusar_edge.tokenizer import build_sequence


def random_anchors(s, gen, masked=0):
    f = torch.nn.functional.normalize(torch.randn(s, 64, generator=gen), dim=1)
    p = torch.rand(s, 2, generator=gen)
    m = torch.ones(s, dtype=torch.bool)
    m[:masked] = False
    return f, p, m


def make_inputs(model, tok, question="How many ships are there?", seed=0):
    cfg = model.config
    rng = np.random.default_rng(seed)
    chip = rng.integers(0, 256, (cfg.chip_size, cfg.chip_size, 3), dtype=np.uint8)
    pixels, grid = (torch.from_numpy(a) for a in chip_to_patches(chip))  # the host makes numpy; tests compare tensors
    plen = cfg.grasp.prompt_len if model.grasp is not None else 0
    seq = build_sequence(tok, question, cfg.num_visual_tokens, plen, cfg.system_prompt)
    return pixels, grid, seq


# --- stages ------------------------------------------------------------------------------

def test_stage_shapes(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    pixels, grid, seq = make_inputs(tiny_model, tiny_tokenizer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        vis = tiny_model.vision(pixels, grid, random_anchors(9, gen))
        assert vis.shape == (cfg.num_visual_tokens, cfg.hidden_size)
        embeds, w = tiny_model.fusion(seq.input_ids, seq.layout, vis, seq.question_ids)
        assert embeds.shape == (1, len(seq.input_ids), cfg.hidden_size)
        assert w.shape == (4,)
        pos, _ = mrope_positions(len(seq.input_ids), seq.layout.image_start, cfg.token_grid)
        logits, cache = tiny_model.decoder(embeds, pos)
        assert logits.shape == (1, len(seq.input_ids), cfg.text["vocab_size"])
        assert cache.get_seq_length() == len(seq.input_ids)


def test_fusion_splices_visual_tokens_and_prompt(tiny_model, tiny_tokenizer):
    pixels, grid, seq = make_inputs(tiny_model, tiny_tokenizer)
    with torch.no_grad():
        vis = tiny_model.vision(pixels, grid)
        embeds, w = tiny_model.fusion(seq.input_ids, seq.layout, vis, seq.question_ids)
    lay = seq.layout
    assert torch.equal(embeds[0, lay.image_start:lay.image_start + lay.image_len], vis)
    expected_prompt = torch.einsum("n,nlc->lc", w, tiny_model.grasp.prompts)
    got = embeds[0, lay.prompt_start:lay.prompt_start + lay.prompt_len]
    assert rel_err(got, expected_prompt) < 1e-6
    assert seq.input_ids[lay.prompt_start - 1] == TINY_SPECIAL_TOKENS["<|vision_end|>"]


def test_split_stages_match_transformers_forward(tiny_tokenizer):
    """Without TLM/GRASP our three stages must equal Qwen2.5-VL's own forward (M-RoPE, splice)."""
    cfg = preset("tiny")
    cfg.tlm.enabled = False
    cfg.grasp.enabled = False
    model = build_random(cfg, seed=3)
    pixels, grid, seq = make_inputs(model, tiny_tokenizer, seed=4)
    ids = torch.from_numpy(seq.input_ids)[None]
    mm = (ids == cfg.backbone["image_token_id"]).int()
    with torch.no_grad():
        ref = model.backbone(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=mm).logits
        embeds, _ = model.fusion(seq.input_ids, seq.layout, model.vision(pixels, grid))
        pos, _ = mrope_positions(ids.shape[1], seq.layout.image_start, cfg.token_grid)
        ours, _ = model.decoder(embeds, pos)
    assert rel_err(ours, ref) < 1e-5


def test_mrope_positions_match_transformers(tiny_model, tiny_tokenizer):
    _, grid, seq = make_inputs(tiny_model, tiny_tokenizer)
    ids = torch.from_numpy(seq.input_ids)[None]
    mm = (ids == tiny_model.config.backbone["image_token_id"]).int()
    ref, delta = tiny_model.backbone.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
    ours, next_pos = mrope_positions(ids.shape[1], seq.layout.image_start, tiny_model.config.token_grid)
    assert ours.dtype == np.int64 and torch.equal(torch.from_numpy(ours), ref)
    assert next_pos == ids.shape[1] + int(delta)


def test_chip_to_patches_matches_qwen_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    chip = np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[chip], return_tensors="pt")
    ours, grid = chip_to_patches(chip)
    assert torch.equal(torch.from_numpy(grid), ref["image_grid_thw"])
    assert rel_err(torch.from_numpy(ours), ref["pixel_values"]) < 1e-6


def test_cached_greedy_decoding_matches_full_recompute(tiny_model, tiny_tokenizer):
    pixels, grid, seq = make_inputs(tiny_model, tiny_tokenizer)
    cfg = tiny_model.config
    with torch.no_grad():
        embeds, _ = tiny_model.fusion(seq.input_ids, seq.layout, tiny_model.vision(pixels, grid), seq.question_ids)
        pos, nxt = mrope_positions(embeds.shape[1], seq.layout.image_start, cfg.token_grid)
        logits, cache = tiny_model.decoder(embeds, pos)
        full_e, full_p = embeds, torch.from_numpy(pos)
        for step in range(5):
            tok = logits[0, -1].argmax()
            e = tiny_model.language_model.embed_tokens(tok.view(1, 1))
            p = torch.full((3, 1, 1), nxt + step)
            logits, cache = tiny_model.decoder(e, p, cache)
            full_e, full_p = torch.cat([full_e, e], 1), torch.cat([full_p, p], 2)
            ref, _ = tiny_model.decoder(full_e, full_p)
            assert rel_err(logits[0, -1], ref[0, -1]) < 1e-5


# --- TLM ---------------------------------------------------------------------------------

def test_tlm_is_identity_when_last_layer_is_zero():
    tlm = TLM(channels=16)
    torch.nn.init.zeros_(tlm.film_mlp[2].weight)
    torch.nn.init.zeros_(tlm.film_mlp[2].bias)
    x = torch.randn(16, 16)
    f, p, m = random_anchors(5, torch.Generator().manual_seed(0))
    assert torch.equal(tlm(x, f, p, m, (8, 8), (4, 4)), x)


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """1-D align_corners=False bilinear resize weights [dst, src], from the textbook formula."""
    m = np.zeros((dst, src))
    scale = src / dst
    for i in range(dst):
        x = max((i + 0.5) * scale - 0.5, 0.0)
        x0 = min(int(math.floor(x)), src - 1)
        x1 = min(x0 + 1, src - 1)
        t = x - x0
        m[i, x0] += 1 - t
        m[i, x1] += t
    return m


@pytest.mark.parametrize("s,masked,grid", [(1, 0, (8, 8)), (7, 2, (8, 8)), (20, 5, (12, 12))])
def test_tlm_matches_per_token_formula(s, masked, grid):
    """The reference module against a direct per-token evaluation of DESIGN.md's formula."""
    gen = torch.Generator().manual_seed(s)
    c, sigma, eps = 12, 2.0, 1e-6
    tlm = TLM(channels=c, sigma=sigma).double()
    f, p, m = random_anchors(s, gen, masked)
    hp, wp = grid
    h, w = hp // 2, wp // 2
    x = torch.randn(h * w, c, generator=gen, dtype=torch.float64)
    y = tlm(x, f.double(), p.double(), m, grid, (h, w))

    gamma, beta = (t.detach().numpy() for t in tlm.film(f.double()))
    pn, mn = p.double().numpy(), m.numpy()
    # Gaussian weights on the pre-merge patch grid, normalised over anchors, masked, renormalised.
    wts = np.zeros((s, hp, wp))
    for i in range(s):
        for r in range(hp):
            for q in range(wp):
                d2 = (pn[i, 0] * (hp - 1) - r) ** 2 + (pn[i, 1] * (wp - 1) - q) ** 2
                wts[i, r, q] = math.exp(-d2 / (2 * sigma**2))
    wts /= wts.sum(0, keepdims=True) + eps
    wts *= mn[:, None, None]
    wts /= wts.sum(0, keepdims=True) + eps
    g_field = np.einsum("srq,sc->rqc", wts, gamma)
    b_field = np.einsum("srq,sc->rqc", wts, beta)
    ry, rx = bilinear_matrix(hp, h), bilinear_matrix(wp, w)
    g = np.einsum("ir,jq,rqc->ijc", ry, rx, g_field).reshape(h * w, c)
    b = np.einsum("ir,jq,rqc->ijc", ry, rx, b_field).reshape(h * w, c)
    expected = x.numpy() * (1 + g) + b
    assert rel_err(y.detach(), torch.from_numpy(expected)) < 1e-6  # A is built in float32


def test_anchor_weights_ignore_masked_anchors():
    gen = torch.Generator().manual_seed(0)
    f, p, m = random_anchors(6, gen, masked=3)
    a = anchor_weights(p, m, (8, 8), (4, 4), 2.0)
    assert a.shape == (16, 6)
    assert torch.all(a[:, :3] == 0)
    assert torch.allclose(a.sum(1), torch.ones(16), atol=1e-4)  # partition of unity over valid anchors


def test_tlm_rejects_all_masked_and_bad_width():
    tlm = TLM(channels=8)
    x = torch.randn(16, 8)
    f, p, m = random_anchors(3, torch.Generator().manual_seed(0), masked=3)
    with pytest.raises(AnchorError, match="masked"):
        tlm(x, f, p, m, (8, 8), (4, 4))
    with pytest.raises(AnchorError, match=r"\[S, 64\]"):
        tlm(x, torch.randn(3, 32), p, torch.ones(3, dtype=torch.bool), (8, 8), (4, 4))


# --- GRASP -------------------------------------------------------------------------------

def entmax15_bisect(z: np.ndarray) -> np.ndarray:
    """Independent 1.5-entmax: bisection on tau for sum([z/2 - tau]_+^2) = 1."""
    x = z / 2.0
    lo, hi = x.max() - 1.0, x.max()
    for _ in range(200):
        tau = (lo + hi) / 2
        if (np.clip(x - tau, 0, None) ** 2).sum() > 1:
            lo = tau
        else:
            hi = tau
    return np.clip(x - (lo + hi) / 2, 0, None) ** 2


@pytest.mark.parametrize("n,seed", [(1, 0), (2, 1), (4, 2), (9, 3), (33, 4)])
def test_entmax15_exact_sums_to_one_and_sparse(n, seed):
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    p = entmax15(z)
    assert abs(float(p.sum()) - 1) < 1e-5
    assert torch.all(p >= 0)
    assert rel_err(p, torch.from_numpy(entmax15_bisect(z.numpy()))) < 1e-5
    if n >= 9:
        assert int((p == 0).sum()) > 0  # spread-out scores leave some blocks with exactly zero weight


def test_entmax15_ties_and_scale():
    p = entmax15(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(p, torch.full((4,), 0.25))
    p = entmax15(torch.tensor([10.0, 0.0, -3.0]))
    assert torch.equal(p, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_topk_keeps_exactly_k(k):
    s = torch.tensor([0.3, -1.0, 2.0, 0.9])
    w = topk_softmax(s, k)
    assert int((w > 0).sum()) == k
    top = torch.topk(s, k).indices
    assert torch.allclose(w[top], torch.softmax(s[top], 0))
    assert abs(float(w.sum()) - 1) < 1e-6
    with pytest.raises(ValueError):
        topk_softmax(s, 5)


def test_grasp_forward_matches_formula():
    torch.manual_seed(0)
    g = GRASP(channels=16, grid=(2, 2), proj_dim=8, prompt_len=3, selector="topk", k=2)
    tokens, q = torch.randn(36, 16), torch.randn(16)
    prompt, w = g(tokens, (6, 6), q)
    fmap = tokens.T.reshape(16, 6, 6)
    blocks = torch.stack([fmap[:, r * 3:(r + 1) * 3, c * 3:(c + 1) * 3].mean((1, 2)) for r in range(2) for c in range(2)])
    blocks = blocks + sincos_2d(2, 2, 16)
    s = g.w_k(blocks) @ g.w_q(q) / math.sqrt(8)
    ref_w = topk_softmax(s, 2)
    assert rel_err(w, ref_w) < 1e-6
    assert prompt.shape == (3, 16)
    assert rel_err(prompt, torch.einsum("n,nlc->lc", ref_w, g.prompts)) < 1e-6
