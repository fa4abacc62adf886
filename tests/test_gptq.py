"""GPTQ / RTN 4-bit (export/gptq.py) and the Hugging Face GPTQ checkpoint format (export/gptq_format.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusar_edge import tasks
from fusar_edge.export import gptq, gptq_format
from fusar_edge.export.quant_types import Int4Weight

GS = 32


def _llama(seed=0, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(seed=0):
    """Qwen2 has biases on q/k/v: exercises Int4Weight.bias through the checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.1)
    return model


def _ids(n=8, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (length,), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def llama_quant(llama):
    calib = _ids()
    stats = {}
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    g = gptq.quantize_gptq(llama, calib, group_size=GS, stats=stats)
    after = llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "inplace=False must leave the model unchanged"
    r = gptq.quantize_rtn(llama, group_size=GS)
    return calib, g, r, stats


# -- the grid ------------------------------------------------------------------------------

def test_group_scales_signed_uses_the_full_int4_range():
    w = torch.tensor([[0.7, -0.7], [0.7, -0.8], [-1.6, 0.05], [0.0, 0.0]])
    s = gptq.group_scales(w)
    expected = torch.tensor([0.1, 0.1, 0.2, 1.0]).half().float()  # max(max/7, -min/8); all-zero -> 1
    assert torch.equal(s, expected)
    q = gptq.quantize_codes(w, s[:, None])
    assert q.tolist() == [[7, -7], [7, -8], [-8, 0], [0, 0]]
    assert torch.equal(s, s.half().float())  # float16-representable


def test_group_scales_gptq_mode_and_errors():
    w = torch.tensor([[1.5, -0.3]])
    assert torch.allclose(gptq.group_scales(w, "gptq"), torch.tensor([0.2]).half().float())
    with pytest.raises(ValueError, match="scale_method"):
        gptq.group_scales(w, "asym")
    with pytest.raises(ValueError, match="float16"):
        gptq.group_scales(torch.tensor([[1e6, 0.0]]))


def test_rtn_matrix_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, s = gptq.rtn_matrix(w, GS)
    assert q.dtype == torch.int8 and s.shape == (16, 2)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    deq = Int4Weight("w", q, s, GS).dequantize()
    step = s.repeat_interleave(GS, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())  # "signed" never clips


def _obq_reference(w, h, group_size, damp=0.01):
    """GPTQ written the slow way (the paper's Eq. 2-3, float64): quantise column j, spread its error
    over the remaining columns through the current inverse Hessian, then eliminate j from it."""
    w = w.double().clone()
    h = h.double() + damp * torch.diagonal(h).double().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            s = gptq.group_scales(w[:, j:j + group_size]).double()
        q[:, j] = gptq.quantize_codes(w[:, j], s)
        err = (w[:, j] - q[:, j] * s) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q


def test_gptq_matrix_matches_the_slow_reference():
    g = torch.Generator().manual_seed(0)
    # correlated inputs of uneven scale, like LLM activations: where GPTQ's error feedback pays
    x = torch.randn(512, 24, generator=g) @ torch.randn(24, 96, generator=g) + 0.3 * torch.randn(512, 96, generator=g)
    x = x * torch.linspace(0.2, 3, 96)
    w = torch.randn(24, 96, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    q, s, _ = gptq.gptq_matrix(w, h, GS)  # float32, Cholesky, blocks of 128 (= one block of 3 groups here)
    ref = _obq_reference(w, h, GS)
    assert float((q.double() == ref).double().mean()) > 0.98  # float32 vs float64: rare rounding flips only
    # and it beats round-to-nearest on the output error it minimises
    qr, sr = gptq.rtn_matrix(w, GS)
    out_err = lambda qq, ss: float((x @ (w - Int4Weight("w", qq, ss, GS).dequantize()).t()).norm())  # noqa: E731
    assert out_err(q, s) < 0.7 * out_err(qr, sr)


# -- GPTQ on a generic transformers causal LM ------------------------------------------------

def test_gptq_generic_llama_shapes_and_range(llama, llama_quant):
    _, g, r, stats = llama_quant
    linears = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert list(g) == linears == list(r)  # every decoder linear, in order; never lm_head or embeddings
    for name, w in g.items():
        mod = llama.get_submodule(name)
        assert w.shape == tuple(mod.weight.shape)
        assert w.q.dtype == torch.int8 and int(w.q.min()) >= -8 and int(w.q.max()) <= 7
        assert w.scales.shape == (mod.out_features, mod.in_features // GS) and w.group_size == GS
        assert torch.equal(w.scales, w.scales.half().float())
        assert stats[name]["tokens"] == 8 * 32


def test_gptq_reduces_layer_output_error_vs_rtn(llama, llama_quant):
    calib, g, r, _ = llama_quant
    eg = gptq.layer_output_errors(llama, g, calib)
    er = gptq.layer_output_errors(llama, r, calib)
    for name in g:
        assert eg[name] < er[name], (name, eg[name], er[name])
    assert sum(eg.values()) < 0.8 * sum(er.values())


def test_gptq_act_order_static_groups_and_non_sequential(llama, llama_quant):
    calib, _, r, _ = llama_quant
    er = sum(gptq.layer_output_errors(llama, r, calib).values())
    for kwargs in ({"act_order": True}, {"true_sequential": False}):
        w = gptq.quantize_gptq(llama, calib, group_size=GS, **kwargs)
        assert sum(gptq.layer_output_errors(llama, w, calib).values()) < er, kwargs


def test_gptq_layer_selection_and_errors(llama):
    calib = _ids(n=2, length=16)
    only = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    w = gptq.quantize_gptq(llama, calib, group_size=GS, layers=only)
    assert set(w) == set(only)
    w = gptq.quantize_gptq(llama, calib, group_size=GS, layers=lambda n: n.endswith("o_proj"))
    assert list(w) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match="not linears"):
        gptq.quantize_gptq(llama, calib, group_size=GS, layers=["lm_head"])
    with pytest.raises(ValueError, match="does not divide"):
        gptq.quantize_gptq(llama, calib, group_size=48)
    w = gptq.quantize_gptq(llama, calib, group_size=128, indivisible="skip")
    assert list(w) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]  # in=128 only
    with pytest.raises(ValueError, match="bits=4"):
        gptq.quantize_gptq(llama, calib, bits=8, group_size=GS)
    with pytest.raises(ValueError, match="exactly one"):
        gptq.quantize_gptq(llama, [{"position_ids": torch.arange(4)}], group_size=GS)


def test_gptq_accepts_padded_batches(llama):
    ids = torch.stack(_ids(n=2, length=16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    stats = {}
    w = gptq.quantize_gptq(llama, [{"input_ids": ids, "attention_mask": mask}], group_size=GS, stats=stats)
    assert stats["model.layers.0.mlp.up_proj"]["tokens"] == 16 + 12  # padded tokens left out of H
    assert len(w) == 14


def test_apply_quantized_and_restore(llama, llama_quant):
    calib, g, _, _ = llama_quant
    ids = calib[0][None]
    ref = llama(ids).logits
    originals = gptq.apply_quantized(llama, g)
    try:
        for name, w in g.items():
            assert torch.equal(llama.get_submodule(name).weight, w.dequantize())
        quant = llama(ids).logits
    finally:
        gptq.restore_weights(llama, originals)
    assert torch.equal(llama(ids).logits, ref)
    assert 0 < float((quant - ref).detach().norm() / ref.detach().norm()) < 0.2


# -- GPTQ on the FUSAR decoder with multimodal calibration --------------------------------------

def test_calibration_questions_ask_their_task():
    for task, questions in gptq.CALIB_QUESTIONS.items():
        for q in questions:
            assert tasks.infer_task(q.format(label="ship")) == task, q


def test_gptq_fusar_decoder_multimodal(tiny_model, tiny_tokenizer, tmp_path):
    model, cfg = tiny_model, tiny_model.config
    calib = gptq.fusar_calibration_inputs(model, tiny_tokenizer, n=4, seed=3, scene_size=64, workdir=tmp_path)
    again = gptq.fusar_calibration_inputs(model, tiny_tokenizer, n=1, seed=3, scene_size=64, workdir=tmp_path)
    assert torch.equal(again[0]["inputs_embeds"], calib[0]["inputs_embeds"])  # deterministic
    c = cfg.hidden_size
    for item in calib:
        emb, pos = item["inputs_embeds"], item["position_ids"]
        length = emb.shape[1]
        assert emb.shape == (1, length, c) and pos.shape == (3, 1, length) and length > cfg.num_visual_tokens
        assert not torch.equal(pos[0], pos[1])  # M-RoPE: the image rows/cols differ
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = gptq.quantize_gptq(model, calib, group_size=GS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    n_layers = cfg.text["num_hidden_layers"]
    assert len(g) == 7 * n_layers
    assert all(n.startswith("model.language_model.layers.") for n in g)  # backbone (transformers) key names
    r = gptq.quantize_rtn(model, group_size=GS)
    assert list(r) == list(g)
    eg = gptq.layer_output_errors(model, g, calib)
    er = gptq.layer_output_errors(model, r, calib)
    assert sum(eg.values()) < 0.8 * sum(er.values())
    assert sum(eg[n] < er[n] for n in g) >= len(g) - 1
    # the quantised decoder runs the multimodal prefill
    originals = gptq.apply_quantized(model, g)
    try:
        logits, _ = model.decoder(calib[0]["inputs_embeds"], calib[0]["position_ids"])
    finally:
        gptq.restore_weights(model, originals)
    ref, _ = model.decoder(calib[0]["inputs_embeds"], calib[0]["position_ids"])
    assert 0 < float((logits - ref).detach().norm() / ref.detach().norm()) < 0.2
    # a complete GPTQ checkpoint of the backbone (transformers keys, config.json + quantization_config)
    out = gptq_format.save_gptq_checkpoint(tmp_path / "ckpt", g, model=model)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["quantization_config"]["group_size"] == GS
    keys = set(load_file(str(out / "model.safetensors")))
    assert "model.language_model.layers.0.mlp.up_proj.qweight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("model.visual.") for k in keys) and not any(k.startswith(("tlm.", "grasp.")) for k in keys)
    back = gptq_format.load_gptq_checkpoint(out)
    assert all(torch.equal(back[n].q, w.q) and torch.equal(back[n].scales, w.scales) for n, w in g.items())


# -- the checkpoint format ---------------------------------------------------------------------

def test_pack_nibbles_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])  # element 8k + j at bits 4j
    word = gptq_format.pack_nibbles(codes, 1)
    assert word.dtype == torch.int32 and word.tolist() == [[0xF7654321 - 2 ** 32]]
    assert torch.equal(gptq_format.unpack_nibbles(word, 1), codes)
    assert gptq_format.pack_nibbles(torch.full((1, 8), 7), 1).item() == 0x77777777
    assert gptq_format.pack_nibbles(torch.full((1, 8), 8), 1).item() == 0x88888888 - 2 ** 32
    col = gptq_format.pack_nibbles(codes.t(), 0)  # along dim 0 for qweight
    assert col.shape == (1, 1) and col.item() == word.item()


@pytest.mark.parametrize("fmt", gptq_format.FORMATS)
def test_checkpoint_round_trip(fmt, tmp_path):
    model = _qwen2()
    g = gptq.quantize_gptq(model, _ids(n=4, length=16), group_size=GS)
    assert g["model.layers.0.self_attn.q_proj"].bias is not None
    out = gptq_format.save_gptq_checkpoint(tmp_path / fmt, g, checkpoint_format=fmt, damp=0.01)
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert cfg["bits"] == 4 and cfg["group_size"] == GS and cfg["desc_act"] is False and cfg["sym"] is True
    assert cfg["checkpoint_format"] == fmt and cfg["quant_method"] == "gptq"
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.qweight"].shape == (96 // 8, 64)
    assert tensors[f"{name}.qzeros"].shape == (96 // GS, 64 // 8)
    assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.scales"].shape == (96 // GS, 64)
    assert tensors[f"{name}.g_idx"].dtype == torch.int32 and tensors[f"{name}.g_idx"].tolist() == [i // GS for i in range(96)]
    zero_word = {"gptq": 0x77777777, "gptq_v2": 0x88888888 - 2 ** 32}[fmt]
    assert bool((tensors[f"{name}.qzeros"] == zero_word).all())
    back = gptq_format.load_gptq_checkpoint(out)
    assert list(back) == list(g) or set(back) == set(g)
    for n, w in g.items():
        b = back[n]
        assert torch.equal(b.q, w.q) and torch.equal(b.scales, w.scales) and b.group_size == w.group_size
        assert (b.bias is None) == (w.bias is None) and (b.bias is None or torch.equal(b.bias, w.bias))


def test_full_checkpoint_with_model(tmp_path):
    model = _llama(tie=True)
    g = gptq.quantize_rtn(model, group_size=GS)
    out = gptq_format.save_gptq_checkpoint(tmp_path / "ckpt", g, model=model, checkpoint_format="gptq_v2")
    keys = set(load_file(str(out / "model.safetensors")))
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert "lm_head.weight" not in keys  # tied: written once
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "model.layers.0.self_attn.q_proj.qweight" in keys
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq_v2"
    (out / "quantize_config.json").unlink()  # config.json's quantization_config is read as well
    assert set(gptq_format.load_gptq_checkpoint(out)) == set(g)


def _hand_checkpoint(path, fmt, zero_nibble, g_idx=None):
    """A 2-group [out=8, in=16] linear written bit by bit: u[o, i] = (o + i) % 16, scales 0.5 * (g + 1) + o / 8."""
    path.mkdir()
    out_f, in_f, gs = 8, 16, 8
    qweight = torch.zeros(in_f // 8, out_f, dtype=torch.int64)
    for r in range(in_f // 8):
        for o in range(out_f):
            qweight[r, o] = sum(((o + 8 * r + j) % 16) << (4 * j) for j in range(8))
    zero_word = sum(zero_nibble << (4 * j) for j in range(8))
    qzeros = torch.full((in_f // gs, out_f // 8), zero_word, dtype=torch.int64)
    to32 = lambda t: torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32)  # noqa: E731
    scales = torch.tensor([[0.5 * (g + 1) + o / 8 for o in range(out_f)] for g in range(in_f // gs)], dtype=torch.float16)
    g_idx = torch.tensor([i // gs for i in range(in_f)] if g_idx is None else g_idx, dtype=torch.int32)
    save_file({"layer.qweight": to32(qweight), "layer.qzeros": to32(qzeros), "layer.scales": scales,
               "layer.g_idx": g_idx}, str(path / "model.safetensors"))
    (path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": gs, "desc_act": False, "sym": True, "checkpoint_format": fmt}))
    expected = torch.tensor([[((o + i) % 16 - 8) * (0.5 * (i // gs + 1) + o / 8) for i in range(in_f)]
                             for o in range(out_f)])
    return expected


@pytest.mark.parametrize("fmt,stored", [("gptq", 7), ("gptq_v2", 8)])
def test_hand_built_checkpoint_decodes(fmt, stored, tmp_path):
    expected = _hand_checkpoint(tmp_path / "c", fmt, stored)
    w = gptq_format.load_gptq_checkpoint(tmp_path / "c")["layer"]
    assert w.group_size == 8 and w.shape == (8, 16)
    assert torch.equal(w.dequantize(), expected)


def test_checkpoint_refusals(tmp_path):
    _hand_checkpoint(tmp_path / "v2_as_v1", "gptq", 8)  # v2 zeros, v1 label
    with pytest.raises(ValueError, match="gptq_v2"):
        gptq_format.load_gptq_checkpoint(tmp_path / "v2_as_v1")
    _hand_checkpoint(tmp_path / "actorder", "gptq", 7, g_idx=[i % 2 for i in range(16)])
    with pytest.raises(ValueError, match="g_idx"):
        gptq_format.load_gptq_checkpoint(tmp_path / "actorder")
    _hand_checkpoint(tmp_path / "asym", "gptq", 7)
    cfg = json.loads((tmp_path / "asym" / "quantize_config.json").read_text())
    (tmp_path / "asym" / "quantize_config.json").write_text(json.dumps({**cfg, "sym": False}))
    with pytest.raises(ValueError, match="sym"):
        gptq_format.load_gptq_checkpoint(tmp_path / "asym")
    with pytest.raises(ValueError, match="float16"):
        gptq_format.pack_weight(Int4Weight("x", torch.zeros(8, 8, dtype=torch.int8), torch.full((8, 1), 0.1), 8))
