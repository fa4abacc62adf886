"""decoder.onnx written with ONNX Runtime's fused ops (export/decoder_graph.py) against the torch
language model: prefill, decode steps over an in-place KV cache that has to grow, batches, M-RoPE
rows, and the 4-bit rewrite that feeds attention packed q/k/v."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import DecoderGraphRunner, rel_err  # noqa: E402
from fusar_edge.config import preset  # noqa: E402
from fusar_edge.export.decoder_graph import build_decoder, decoder_spec  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.model.rope import mrope_positions, rotary_rows, text_positions  # noqa: E402


def _prompt(model, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, model.config.hidden_size, generator=g) * 0.5
    pos, nxt = mrope_positions(length, 3, model.config.token_grid)
    return embeds, pos, nxt


def test_rotary_rows_are_transformers_mrope(tiny_model):
    """cos/sin rows for image and text positions equal the model's own rotary embedding (first half)."""
    spec = decoder_spec(tiny_model)["rope"]
    pos, _ = mrope_positions(90, 7, tiny_model.config.token_grid)
    x = torch.zeros(1, 90, 8)
    cos_t, sin_t = tiny_model.language_model.rotary_emb(x, torch.from_numpy(pos))
    cos, sin = rotary_rows(pos[:, 0], spec["inv_freq"], spec["mrope_section"], spec["attention_scaling"])
    half = cos.shape[1]
    assert np.allclose(cos, cos_t[0, :, :half].numpy(), atol=1e-6)
    assert np.allclose(sin, sin_t[0, :, :half].numpy(), atol=1e-6)
    assert np.allclose(cos_t[0, :, half:].numpy(), cos_t[0, :, :half].numpy())  # rotate-half layout
    with pytest.raises(ValueError):
        rotary_rows(pos[:, 0], spec["inv_freq"][:-1], spec["mrope_section"])


@pytest.mark.parametrize("kv_heads,capacity", [(2, 8), (4, 200)])
def test_prefill_and_steps_match_torch_while_the_cache_grows(tiny_model, tmp_path, kv_heads, capacity):
    """GQA (2 kv heads) and MHA (4); capacity 8 makes the first call and later steps grow the buffers."""
    model = tiny_model
    if kv_heads != 2:
        cfg = preset("tiny")
        cfg.backbone["text_config"]["num_key_value_heads"] = kv_heads
        model = build_random(cfg, seed=5).eval()
    dec = DecoderGraphRunner(model, tmp_path, capacity=capacity)
    embeds, pos, nxt = _prompt(model, 80, seed=kv_heads)
    with torch.inference_mode():
        ref, cache = model.decoder(embeds, torch.from_numpy(pos))
        hidden, logits = dec(embeds, pos)
        assert logits.shape == (1, 1, model.config.text["vocab_size"])  # the last position only
        assert rel_err(torch.from_numpy(logits[:, -1]), ref[:, -1]) < 1e-5
        grown = dec.state.capacity
        assert grown >= 80
        tok = int(ref[0, -1].argmax())
        for step in range(grown - 80 + 3):  # past the capacity: one more growth mid-decode
            e = model.language_model.embed_tokens(torch.tensor([[tok]]))
            ref, cache = model.decoder(e, torch.from_numpy(text_positions(nxt + step, 1)), cache)
            _, logits = dec(e, text_positions(nxt + step, 1), fresh=False)
            assert rel_err(torch.from_numpy(logits[0, -1]), ref[0, -1]) < 1e-5, step
            tok = int(ref[0, -1].argmax())
        assert dec.state.capacity > grown and dec.state.length == 80 + grown - 80 + 3
        keys = dec.state.buffers[0].numpy()[:, :, :dec.state.length]
        assert rel_err(torch.from_numpy(keys), cache.layers[0].keys) < 1e-5


def test_a_batch_of_sequences_matches_each_alone(tiny_model, tmp_path):
    """Two sequences of one layout in one call (micro-batching) give each one's own logits."""
    embeds = torch.cat([_prompt(tiny_model, 75, seed=s)[0] for s in (1, 2)])
    pos, nxt = mrope_positions(75, 3, tiny_model.config.token_grid)
    batch = DecoderGraphRunner(tiny_model, tmp_path, batch=2, capacity=128)
    _, logits = batch(embeds, np.broadcast_to(pos, (3, 2, 75)))
    with torch.inference_mode():
        for b in range(2):
            ref, _ = tiny_model.decoder(embeds[b:b + 1], torch.from_numpy(pos))
            assert rel_err(torch.from_numpy(logits[b, -1]), ref[0, -1]) < 1e-5
    with pytest.raises(ValueError, match="share their positions"):
        other = pos.copy()
        other[:, :, -1] += 1
        batch(embeds, np.concatenate([pos, other], axis=1))


def test_int4_rewrite_packs_qkv_into_attention(tiny_model, tmp_path):
    """The 4-bit rewrite fuses q/k/v and hands attention the packed tensor: no Split before it,
    and the same numbers as the graph that keeps the Split."""
    from fusar_edge.export.bundle_export import _module_of as name_map  # decoder.onnx's W^T names
    from fusar_edge.export.int4_fuse import pack_attention_inputs
    from fusar_edge.export.int4_onnx import quantize_onnx_model

    fp32 = build_decoder(tiny_model)
    packed = quantize_onnx_model(fp32, None, block_size=32, name_map=name_map, fuse_parallel=True).model
    ops = [n.op_type for n in packed.graph.node]
    gqa = [n for n in packed.graph.node if n.op_type == "GroupQueryAttention"]
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and len(gqa) == 2  # qkv, o, gate|up, down per layer; lm_head
    producers = {o: n.op_type for n in packed.graph.node for o in n.output}
    assert all(producers[n.input[0]] == "MatMulNBits" and list(n.input[1:3]) == ["", ""] for n in gqa)

    split = quantize_onnx_model(fp32, None, block_size=32, name_map=name_map, fuse_parallel=False).model
    embeds, pos, nxt = _prompt(tiny_model, 72, seed=9)
    a = DecoderGraphRunner(tiny_model, tmp_path / "a", graph=packed, capacity=96)
    b = DecoderGraphRunner(tiny_model, tmp_path / "b", graph=split, capacity=96)
    for step in range(4):
        e, p = (embeds, pos) if step == 0 else (embeds[:, :1], text_positions(nxt + step, 1))
        la = a(e, p, fresh=step == 0)[1]
        lb = b(e, p, fresh=step == 0)[1]
        assert np.abs(la - lb).max() <= 1e-4 * max(1.0, np.abs(lb).max()), step
    assert pack_attention_inputs(packed) == 0  # nothing left to pack
