"""ONNX export of the three stages, their parity with torch, and the ONNX Runtime backend.

The tiny preset is exported once for the module (random weights, fp32); every test reads
that export.
"""

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from conftest import DecoderGraphRunner, one_line, rel_err  # noqa: E402
from fusar_edge.errors import AnchorError, FusarError, InputError  # noqa: E402
from fusar_edge.export.decoder_graph import LINEARS  # noqa: E402
from fusar_edge.export.onnx_stages import (  # noqa: E402
    FusionStage, STAGE_FILES, VisionStage, export_stages, parity_report, synthetic_anchors, synthetic_chip)
from fusar_edge.model.bundle import save_bundle, write_manifest  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model, tiny_tokenizer):
    root = tmp_path_factory.mktemp("onnx_export")
    bundle = save_bundle(tiny_model, tiny_tokenizer, root / "bundle")
    messages = []
    files = export_stages(tiny_model, bundle / "onnx", progress=messages.append)
    write_manifest(bundle)  # as `fusar-edge export` does last: every open refuses unlisted weights
    return {"bundle": bundle, "onnx": bundle / "onnx", "files": files, "messages": messages}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fusar_edge.geo.synthetic import write_demo_scene

    return write_demo_scene(tmp_path_factory.mktemp("onnx_demo"), size=128, seed=3)


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_files_opset_ops_and_progress(exported):
    files, onnx_dir = exported["files"], exported["onnx"]
    assert set(STAGE_FILES) <= set(files) and files["config"].name == "stages.json"
    assert any("decoder.onnx" in m for m in exported["messages"])
    spec = json.loads((onnx_dir / "stages.json").read_text())
    assert spec["opset"] >= 21 and spec["chip_size"] == 224 and spec["visual_tokens"] == 64
    for name, file in STAGE_FILES.items():
        path = onnx_dir / file
        assert spec["files"][file]["bytes"] == path.stat().st_size
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert {o.domain: o.version for o in model.opset_import}.get("", 0) >= 21
        domains = {n.domain for n in model.graph.node}
        if name == "decoder":  # ONNX Runtime's fused decoder ops (export/decoder_graph.py)
            assert domains == {"", "com.microsoft"}
            assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= {n.op_type for n in model.graph.node}
        else:
            assert domains <= {"", "ai.onnx"}, name  # standard ONNX
        assert not model.functions
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # loads in onnxruntime


def test_io_names_and_shapes(exported, tiny_model):
    cfg = tiny_model.config
    load = lambda n: onnx.load(str(exported["onnx"] / STAGE_FILES[n]), load_external_data=False)  # noqa: E731

    vision = load("vision")
    assert [(i.name, _dims(i)) for i in vision.graph.input] == [
        ("pixel_values", [256, 1176]), ("anchor_weights", [64, 256]), ("anchor_features", [256, 64])]
    assert [(o.name, _dims(o)) for o in vision.graph.output] == [("visual_tokens", [64, cfg.hidden_size])]

    embed = load("embed")
    assert [(i.name, _dims(i)) for i in embed.graph.input] == [("input_ids", ["batch_size", "sequence_length"])]

    fusion = load("fusion")
    assert [i.name for i in fusion.graph.input] == ["text_embeds", "visual_tokens", "image_start",
                                                    "question_hidden", "prompt_start"]
    assert [o.name for o in fusion.graph.output] == ["inputs_embeds", "grasp_weights"]

    dec = load("decoder")
    n = cfg.text["num_hidden_layers"]
    kv = [f"past_key_values.{i}.{w}" for i in range(n) for w in ("key", "value")]
    assert [i.name for i in dec.graph.input] == ["inputs_embeds", "seqlens_k", "total_sequence_length",
                                                 "position_ids", "cos_cache", "sin_cache", *kv]
    present = [f"present.{i}.{w}" for i in range(n) for w in ("key", "value")]
    assert [o.name for o in dec.graph.output] == ["logits", "last_hidden_state", *present]
    shapes = {v.name: _dims(v) for v in [*dec.graph.input, *dec.graph.output]}
    assert shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["seqlens_k"] == ["batch_size"] and shapes["total_sequence_length"] == []
    assert shapes["cos_cache"] == ["rotary_rows", 8]
    # the cache is one buffer bound as past and present: the same shape on both sides
    assert shapes["past_key_values.1.value"] == shapes["present.0.key"] == ["batch_size", 2, "capacity", 16]
    assert shapes["logits"] == ["batch_size", 1, 1024]  # the last position only


def test_decoder_linears_are_named_matmuls_over_transposed_weights(exported, tiny_model):
    from onnx import numpy_helper

    dec = onnx.load(str(exported["onnx"] / "decoder.onnx"))
    inits = {i.name: i for i in dec.graph.initializer}
    matmuls = {n.name: n for n in dec.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    state = tiny_model.backbone.state_dict()
    n = tiny_model.config.text["num_hidden_layers"]
    names = [f"model.language_model.layers.{i}.{s}" for i in range(n) for s in LINEARS] + ["lm_head"]
    assert sorted(matmuls) == sorted(f"{m}/MatMul" for m in names)
    for module in names:
        node = matmuls[f"{module}/MatMul"]
        assert node.input[1] == f"{module}.weight_t"
        w_t = numpy_helper.to_array(inits[node.input[1]])
        assert np.array_equal(w_t, state[f"{module}.weight"].numpy().T)  # [in, out]
    adds = {n.name: n for n in dec.graph.node if n.op_type == "Add" and n.name.endswith("/Add")}
    for i in range(n):
        for p in ("q_proj", "k_proj", "v_proj"):
            module = f"model.language_model.layers.{i}.self_attn.{p}"
            assert adds[f"{module}/Add"].input[1] == f"{module}.bias"


def test_stage_parity_and_greedy_agreement(exported, tiny_model, tiny_tokenizer):
    report = parity_report(tiny_model, tiny_tokenizer, exported["onnx"], n_prompts=3, new_tokens=16)
    assert report["providers"][0] == "CPUExecutionProvider"
    assert set(report["max_rel_err"]) == {"vision", "fusion", "grasp_weights", "prefill_logits", "decode_logits"}
    for stage, err in report["max_rel_err"].items():
        assert err < 1e-4, (stage, err)
    assert report["greedy"] == {"identical_sequences": 3, "of": 3, "token_agreement": 1.0}
    assert report["ok"] and report["prompts"] == 3 and report["new_tokens"] == 16
    assert [p["anchors"] for p in report["per_prompt"]] == [True, False, True]
    json.dumps(report)  # export.json material


def test_no_anchors_is_the_plain_tower_and_padding_is_masking(exported, tiny_model):
    """A = 0 gives the un-modulated tower; padded anchor columns change nothing."""
    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.model.preprocess import chip_to_patches

    stages = OnnxStages(exported["onnx"], device="cpu")
    pixels, grid = chip_to_patches(synthetic_chip(224, 7))
    with torch.no_grad():
        plain = tiny_model.vision(pixels, grid)
        anchors = synthetic_anchors(20, 5, masked=4)
        tlm = tiny_model.vision(pixels, grid, anchors)
    assert rel_err(torch.from_numpy(stages.vision(pixels, grid).numpy()), plain) < 1e-5
    assert rel_err(torch.from_numpy(stages.vision(pixels, grid, anchors).numpy()), tlm) < 1e-5
    a, f = stages.anchor_inputs(anchors)
    assert a.shape == (64, 256) and not a[:, 20:].any() and not a[:, :4].any() and not f[20:].any()
    too_many = synthetic_anchors(300, 1)
    with pytest.raises(AnchorError) as e:
        stages.vision(pixels, grid, too_many)
    one_line(e, "300", "256")


@pytest.mark.parametrize("tokens, anchors", [(64, 256), (64, 7), (1, 300)])
def test_tlm_fields_reassociated_equal_the_reference_order(tiny_model, tokens, anchors):
    """``(A @ H) W2^T + rowsum(A) b2`` (vision.onnx when T < S) = ``A @ film(F)`` (the torch model),
    for any A: rows that sum to anything, zero rows, masked (zero) columns."""
    gen = torch.Generator().manual_seed(tokens + anchors)
    a = torch.rand(tokens, anchors, generator=gen) * 3
    a[0] = 0
    a[:, ::5] = 0
    features = torch.randn(anchors, tiny_model.tlm.vec_dim, generator=gen)
    with torch.no_grad():
        gamma, beta = tiny_model.tlm.film(features)
        g, b = VisionStage(tiny_model)._anchor_fields_reassociated(a, features)
    assert rel_err(g, a @ gamma) < 1e-5 and rel_err(b, a @ beta) < 1e-5
    assert not g[0].any() and not b[0].any()


def test_runtime_onnxruntime_answers_like_torch(exported, demo):
    from fusar_edge.runtime import Runtime

    bundle = exported["bundle"]
    rt_torch = Runtime.open(bundle, device="cpu")  # fp32, like the CPU graphs
    rt_onnx = Runtime.open(bundle, backend="onnxruntime", device="cpu")
    assert rt_onnx.model is None and rt_onnx.backend == "onnxruntime" and rt_onnx.weights == rt_torch.weights
    assert rt_onnx.placement() == rt_torch.placement() == {"device": "cpu", "dtype": "float32"}  # what eval records
    for anchors in (demo["anchors"], None):
        kw = dict(anchors=anchors, no_anchors=anchors is None, max_new_tokens=12)
        a = rt_torch.ask(demo["scene_tif"], "How many ships are there?", **kw)
        b = rt_onnx.ask(demo["scene_tif"], "How many ships are there?", **kw)
        assert b.text == a.text and b.answer == a.answer and b.anchor == a.anchor
        assert b.token_ids == a.token_ids and a.anchor["tlm"] == ("applied" if anchors else "skipped")
        assert b.model["new_tokens"] == a.model["new_tokens"] and b.model["backend"] == "onnxruntime"
        assert np.allclose(b.grasp_weights, a.grasp_weights, atol=1e-5)
        for stage in ("preprocess", "anchors", "vision", "fusion", "prefill", "decode", "decode_per_token",
                      "parse", "total"):
            assert stage in b.timings_ms, stage
    # anchors looked up in a tile store (the default 16 x 16 grid = the export's 256 anchors)
    tiles_torch = Runtime.open(bundle, tiles=demo["tiles"])
    tiles_onnx = Runtime.open(bundle, tiles=demo["tiles"], backend="onnxruntime", device="cpu")
    a = tiles_torch.ask(demo["scene_tif"], "Detect the ships.", max_new_tokens=8)
    b = tiles_onnx.ask(demo["scene_tif"], "Detect the ships.", max_new_tokens=8)
    assert a.anchor["count"] == 256 and b.text == a.text
    with pytest.raises(InputError) as e:  # a finer grid than the export's S anchors: refused at open
        Runtime.open(bundle, tiles=demo["tiles"], backend="onnxruntime", anchor_grid=(17, 17))
    one_line(e, "289", "256")


def test_missing_onnx_export_is_one_clear_line(exported, tmp_path):
    from fusar_edge.runtime import Runtime

    plain = tmp_path / "plain"
    shutil.copytree(exported["bundle"], plain, ignore=shutil.ignore_patterns("onnx"))
    write_manifest(plain)  # consistent bundles: what is missing is the export itself
    with pytest.raises(FusarError) as e:
        Runtime.open(plain, backend="onnxruntime")
    one_line(e, str(plain / "onnx" / "stages.json"), "missing", f"fusar-edge export {plain} --out DIR --onnx")

    partial = tmp_path / "partial"
    shutil.copytree(exported["bundle"], partial)
    (partial / "onnx" / "decoder.onnx").unlink()
    write_manifest(partial)
    with pytest.raises(FusarError) as e:
        Runtime.open(partial, backend="onnxruntime")
    one_line(e, str(partial / "onnx" / "decoder.onnx"), "--onnx")

    with pytest.raises(FusarError) as e:
        Runtime.open("tiny", backend="onnxruntime")
    one_line(e, "onnxruntime", "fusar-edge export tiny --out DIR --onnx")
    with pytest.raises(FusarError) as e:  # the built-in demo ships torch weights only
        Runtime.open(None, backend="onnxruntime")
    one_line(e, "demo-bundle", "onnxruntime", "--out DIR --onnx")


# --- the wrappers' semantics beyond the tiny preset's settings (torch only, no export) ---------

def test_wrappers_match_the_model_for_other_settings(tiny_tokenizer, tmp_path):
    """Entmax GRASP, no TLM, MHA (no GQA), a 280 px chip (10 x 10 tokens: ViT windows of 4, 4, 2
    tokens a side, GRASP blocks of uneven size): the export wrappers compute what the model does."""
    from fusar_edge.config import preset
    from fusar_edge.model.bundle import build_random
    from fusar_edge.model.preprocess import chip_to_patches
    from fusar_edge.model.rope import mrope_positions
    from fusar_edge.tokenizer import build_sequence

    cfg = preset("tiny")
    cfg.tlm.enabled = False
    cfg.grasp.selector, cfg.grasp.grid, cfg.grasp.prompt_len = "entmax15", (3, 3), 2
    cfg.backbone["text_config"]["num_key_value_heads"] = 4
    cfg.chip_size = 280
    model = build_random(cfg, seed=11)
    pixels, grid = (torch.from_numpy(a) for a in chip_to_patches(synthetic_chip(280, 2)))
    seq = build_sequence(tiny_tokenizer, "How many ships?", cfg.num_visual_tokens, 2, cfg.system_prompt)
    lay = seq.layout
    with torch.no_grad():
        vis = model.vision(pixels, grid)
        assert rel_err(VisionStage(model)(pixels), vis) < 1e-5
        embeds, w = model.fusion(seq.input_ids, lay, vis, seq.question_ids)
        text = model.language_model.embed_tokens(torch.from_numpy(seq.input_ids)[None])
        q_ids = torch.from_numpy(seq.question_ids)[None]
        n = q_ids.shape[1]
        dec = DecoderGraphRunner(model, tmp_path)
        qpos = np.broadcast_to(np.arange(n), (3, 1, n))
        q_hidden, _ = dec(model.language_model.embed_tokens(q_ids), qpos)
        got, got_w = FusionStage(model)(text, vis, torch.tensor([lay.image_start]), torch.from_numpy(q_hidden),
                                        torch.tensor([lay.prompt_start]))
        assert rel_err(got_w, w) < 1e-5 and rel_err(got, embeds) < 1e-5
        pos, _ = mrope_positions(len(seq.input_ids), lay.image_start, cfg.token_grid)
        ref, cache = model.decoder(embeds, torch.from_numpy(pos))
        _, logits = dec(embeds, pos)
        assert rel_err(torch.from_numpy(logits[:, -1]), ref[:, -1]) < 1e-5
        length = embeds.shape[1]
        assert rel_err(torch.from_numpy(dec.state.buffers[0].numpy()[:, :, :length]), cache.layers[0].keys) < 1e-5


def test_onnx_stages_decode_past_the_cache_capacity(exported, tiny_model, monkeypatch):
    """OnnxStages' cache grows mid-decode (its IO binding follows the new buffers) and every step's
    logits stay the torch model's; a batch of two steps like each sequence alone."""
    from fusar_edge.backends import onnxruntime as ort_backend
    from fusar_edge.backends.torch_stages import TorchStages
    from fusar_edge.model.rope import mrope_positions

    monkeypatch.setattr(ort_backend, "MIN_CAPACITY", 3)
    stages, ref = ort_backend.OnnxStages(exported["onnx"], device="cpu"), TorchStages(tiny_model)
    embeds = torch.randn(2, 70, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    pos, nxt = mrope_positions(70, 2, tiny_model.config.token_grid)
    lo, state_o = stages.prefill_batch(embeds.numpy(), pos)
    lt, state_t = ref.prefill_batch(embeds, pos)
    assert state_o.capacity == 73
    toks = [int(t) for t in lt.argmax(-1)]
    for step in range(8):
        assert rel_err(torch.from_numpy(lo), lt) < 1e-5, step
        lo, state_o = stages.step_batch(toks, nxt + step, state_o)
        lt, state_t = ref.step_batch(toks, nxt + step, state_t)
        toks = [int(t) for t in lt.argmax(-1)]
    assert state_o.capacity > 73 and state_o.length == 78
    alone, _ = stages.prefill(embeds[1:].numpy(), pos)
    batch, _ = stages.prefill_batch(embeds.numpy(), pos)
    assert np.abs(alone - batch[1]).max() <= 1e-5 * np.abs(batch[1]).max()


def test_a_reused_prompt_head_gives_the_full_prefill(exported, tiny_model, monkeypatch):
    """prefill(prefix_len=P): a miss computes the head once, a hit copies its rows; the logits and
    the following steps equal a full prefill's (and torch's), also once the cache grows past the
    head; a batch of two runs whole (GroupQueryAttention continues one sequence at a time)."""
    from fusar_edge.backends import onnxruntime as ort_backend
    from fusar_edge.backends.torch_stages import TorchStages
    from fusar_edge.model.rope import mrope_positions

    monkeypatch.setattr(ort_backend, "MIN_CAPACITY", 2)
    stages, ref = ort_backend.OnnxStages(exported["onnx"], device="cpu"), TorchStages(tiny_model)
    gen = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 90, tiny_model.config.hidden_size, generator=gen) * 0.5
    embeds[1, :11] = embeds[0, :11]  # both sequences share an 11-token head
    pos, nxt = mrope_positions(90, 11, tiny_model.config.token_grid)
    for i in range(2):  # each sequence: sequence 0 misses, sequence 1 (same head) hits
        full, _ = stages.prefill(embeds[i:i + 1].numpy(), pos)
        lo, state_o = stages.prefill(embeds[i:i + 1].numpy(), pos, prefix_len=11)
        assert (stages.prefixes.misses, stages.prefixes.hits) == (1, i)
        assert np.abs(lo - full).max() <= 1e-5 * np.abs(full).max() and state_o.length == 90
    lt, state_t = ref.prefill(embeds[1:], pos)
    for step in range(4):  # past the first capacity (MIN_CAPACITY 2): the head's rows move along
        assert rel_err(torch.from_numpy(lo), lt) < 1e-5, step
        token = int(lt.argmax())
        lo, state_o = stages.step(token, nxt + step, state_o)
        lt, state_t = ref.step(token, nxt + step, state_t)
    assert state_o.capacity > 92
    other = torch.randn(1, 90, tiny_model.config.hidden_size, generator=gen) * 0.5  # another head: a miss
    lo, _ = stages.prefill(other.numpy(), pos, prefix_len=11)
    assert rel_err(torch.from_numpy(lo), ref.prefill(other, pos)[0]) < 1e-5 and stages.prefixes.misses == 2
    both, _ = stages.prefill_batch(embeds.numpy(), pos, prefix_len=11)
    assert rel_err(torch.from_numpy(both), ref.prefill_batch(embeds, pos)[0]) < 1e-5
    assert (stages.prefixes.misses, stages.prefixes.hits) == (2, 1)
    monkeypatch.setattr(ort_backend, "PREFIX_MAX_BYTES", 1024)  # a head too long to keep: runs whole
    stages.prefill(embeds[:1].numpy(), pos, prefix_len=11)
    assert (stages.prefixes.misses, stages.prefixes.hits) == (2, 1)


def test_a_bound_decode_step_equals_the_general_call(exported, monkeypatch):
    """decode_step (everything bound once per state, CPU) against embed + run_decoder rebinding each
    call, from one prefill, across a cache growth; a wrong token count is refused."""
    from fusar_edge.backends import onnxruntime as ort_backend
    from fusar_edge.model.rope import mrope_positions

    monkeypatch.setattr(ort_backend, "MIN_CAPACITY", 3)
    stages = ort_backend.OnnxStages(exported["onnx"], device="cpu")
    embeds = np.random.default_rng(5).standard_normal((2, 70, 64)).astype(np.float32) * 0.5
    pos, nxt = mrope_positions(70, 2, (8, 8))
    first, bound = stages.prefill_batch(embeds, pos)
    _, general = stages.prefill_batch(embeds, pos)
    assert bound.on_host
    tokens = [int(t) for t in first.argmax(-1)]
    for step in range(7):
        fast = ort_backend.decode_step(stages.sessions, bound, tokens, nxt + step)
        ids = stages.embed(np.asarray(tokens, np.int64).reshape(-1, 1))
        want = ort_backend.run_decoder(stages.sessions["decoder"], general, ids,
                                       np.full((3, 2, 1), nxt + step, np.int64), ["logits"])[0].numpy()[:, -1]
        assert np.abs(fast - want).max() <= 1e-6 * np.abs(want).max(), step
        tokens = [int(t) for t in want.argmax(-1)]
    assert bound.capacity > 73 and bound.length == general.length == 77
    with pytest.raises(ValueError, match="1 token"):
        ort_backend.decode_step(stages.sessions, bound, [tokens[0]], nxt + 7)


def test_an_older_export_and_a_bad_spin_setting_are_one_line(exported, demo, tmp_path, capsys, monkeypatch):
    """ask --backend onnxruntime: a v1 export (before decoder_graph) and FUSAR_ORT_SPIN=sometimes each
    exit 2 with one line, and the export is left as it was."""
    from fusar_edge.cli import main

    old = tmp_path / "old"
    shutil.copytree(exported["bundle"], old)
    spec_path = old / "onnx" / "stages.json"
    spec = json.loads(spec_path.read_text())
    spec["format"] = "fusar-edge-onnx-v1"
    spec_path.write_text(json.dumps(spec))
    write_manifest(old)  # a consistent bundle: what is wrong is the export's age
    before = spec_path.read_bytes()
    args = ["ask", str(demo["scene_tif"]), "How many ships?", "--bundle", str(old),
            "--backend", "onnxruntime", "--no-anchors"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fusar-edge-onnx-v1" in err[0] and "export the bundle again" in err[0], err
    assert spec_path.read_bytes() == before

    monkeypatch.setenv("FUSAR_ORT_SPIN", "sometimes")
    args[4] = str(exported["bundle"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FUSAR_ORT_SPIN: expected auto, 0, 1 or decoder, got 'sometimes'" in err[0], err
