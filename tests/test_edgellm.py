"""`export --edgellm`: the checkpoint TensorRT Edge-LLM reads, our fp16 graphs, the join rule, refusals.

The model here is `tiny` with a 128-wide language model (Edge-LLM's INT4 GEMM needs in features
in multiples of 128): seconds on a CPU. The one test that runs Edge-LLM's own exporter uses the
`small` preset and skips, saying why, when tensorrt-edgellm is not installed.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fusar_edge.cli import main  # noqa: E402
from fusar_edge.config import preset  # noqa: E402
from fusar_edge.export import edgellm, edgellm_llm  # noqa: E402
from fusar_edge.export.edgellm_graphs import GRASP, VISION, check_graphs, export_graphs  # noqa: E402
from fusar_edge.export.gptq import quantize_rtn  # noqa: E402
from fusar_edge.model.bundle import build_random, save_bundle  # noqa: E402


def wide_tiny_config():
    cfg = preset("tiny")
    cfg.name = "tiny-128"
    cfg.backbone["vision_config"]["out_hidden_size"] = 128
    cfg.backbone["text_config"].update({"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
                                        "num_key_value_heads": 2,
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                            "mrope_section": [4, 6, 6]}})
    return cfg


@pytest.fixture(scope="module")
def wide():
    return build_random(wide_tiny_config()).eval()


@pytest.fixture(scope="module")
def written(wide, tiny_tokenizer, tmp_path_factory):
    """edgellm/ of the wide model with RTN weights, Edge-LLM's exporter left out."""
    out = tmp_path_factory.mktemp("edgellm") / "edgellm"
    weights = quantize_rtn(wide, 128)
    mp = pytest.MonkeyPatch()
    mp.setattr(edgellm_llm, "installed_version", lambda: None)
    try:
        report = edgellm.export_edgellm(wide, tiny_tokenizer, weights, out, max_anchors=32, progress=lambda m: None)
    finally:
        mp.undo()
    return out, weights, report


def test_checkpoint_reads_back_as_transformers_gptq_and_matches_the_weights(written, wide):
    from transformers import AutoConfig, GPTQConfig

    from fusar_edge.export.gptq_format import load_gptq_checkpoint

    out, weights, report = written
    ckpt = out / "checkpoint"
    config = AutoConfig.from_pretrained(ckpt)
    assert config.model_type == "qwen2_5_vl" and config.architectures == ["Qwen2_5_VLForConditionalGeneration"]
    q = GPTQConfig.from_dict(config.quantization_config)  # transformers' own parsing of the block
    assert (q.bits, q.group_size, q.sym, q.desc_act) == (4, 128, True, False)
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "float16"
    back = load_gptq_checkpoint(ckpt)
    assert set(back) == set(weights) and report["checkpoint"]["quantized_linears"] == len(weights)
    for name, w in weights.items():  # the bundle's dequantised weights, exactly
        assert torch.equal(back[name].dequantize(), w.dequantize()), name
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        floats = {f.get_tensor(k).dtype for k in keys if not k.endswith((".qweight", ".qzeros", ".g_idx"))}
    assert floats == {torch.float16}  # scales, norms, embeddings, lm_head, biases
    assert not [k for k in keys if k.startswith("model.visual.")]  # vision.onnx carries the tower
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        assert (ckpt / name).is_file(), name
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["min_pixels"] == pre["max_pixels"] == wide.config.chip_size ** 2


def test_chat_template_renders_the_sequence_we_build(tiny_tokenizer, wide):
    import jinja2

    from fusar_edge.tokenizer import build_sequence

    text = jinja2.Template(edgellm.chat_template(wide.config.system_prompt)).render(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many ships?"}]}],
        add_generation_prompt=True)
    seq = build_sequence(tiny_tokenizer, "How many ships?", 1, 0, wide.config.system_prompt)
    assert tiny_tokenizer.encode(text) == seq.input_ids.tolist()  # one image placeholder, no GRASP slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vision_and_grasp_graphs_match_torch(tiny_model, tiny_tokenizer, tmp_path, dtype):
    import onnx

    export_graphs(tiny_model, tmp_path, dtype, max_anchors=32)
    for name in (VISION, GRASP):
        graph = onnx.load(str(tmp_path / name))
        assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # no plugins, no contrib ops
        for value in graph.graph.input:  # fixed shapes
            assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim), (name, value.name)
        floats = {t.data_type for t in graph.graph.initializer if t.data_type in (1, 10)}
        assert floats <= {1 if dtype == torch.float32 else 10, 1}
    report = check_graphs(tiny_model, tiny_tokenizer, tmp_path, dtype)
    assert report["ok"], report
    errs = report["max_rel_err"]
    if dtype == torch.float32:
        assert max(errs.values()) < 1e-5
    else:  # fp16 storage: far from exact, far from wrong
        assert 1e-5 < errs["vision"] < 5e-3 and errs["grasp_prompt"] < 5e-3


def test_trained_demo_without_grasp(tmp_path):
    """The built-in demo (trained weights, TLM on, GRASP off): vision.onnx alone, fp16 close to torch."""
    from fusar_edge.model.bundle import open_model

    model, tokenizer, _ = open_model(None, dtype=torch.float32)
    assert model.grasp is None and model.tlm is not None
    assert set(export_graphs(model.eval(), tmp_path, torch.float16)) == {VISION}
    report = check_graphs(model, tokenizer, tmp_path, torch.float16)
    assert report["ok"] and report["max_rel_err"]["vision"] < 2e-3, report
    assert edgellm.check_join(model, tokenizer)["ok"]  # no GRASP slots: image rows only


def test_graph_check_catches_a_wrong_norm(tiny_model, tiny_tokenizer, tmp_path):
    """grasp.onnx must apply the final norm to Edge-LLM's pre-norm states: without it, it fails."""
    from fusar_edge.export import edgellm_graphs

    class NoNorm(edgellm_graphs.GraspStage):
        def __init__(self, model):
            super().__init__(model)
            self.norm = torch.nn.Identity()

    mp = pytest.MonkeyPatch()
    mp.setattr(edgellm_graphs, "GraspStage", NoNorm)
    try:
        export_graphs(tiny_model, tmp_path, torch.float32, max_anchors=32)
    finally:
        mp.undo()
    report = check_graphs(tiny_model, tiny_tokenizer, tmp_path, torch.float32)
    assert not report["ok"] and report["max_rel_err"]["vision"] < 1e-5


def test_join_rule_and_manifest(written, wide):
    out, _, report = written
    assert report["join_check"]["ok"] and report["parity"]["ok"]
    spec = json.loads((out / edgellm.MANIFEST_NAME).read_text())
    seq = spec["sequence"]
    cfg = wide.config
    assert seq["visual_tokens"] == cfg.num_visual_tokens and seq["grasp_slots"] == cfg.grasp.prompt_len
    assert seq["vocab_size"] == cfg.text["vocab_size"]
    assert spec["edgellm"]["version"] == "0.11.0" and spec["llm"] is None
    assert spec["engines"][VISION]["inputs"][0]["shape"] == [cfg.patch_grid[0] * cfg.patch_grid[1], 3 * 2 * 14 * 14]
    assert spec["anchors"]["max_anchors"] == 32 and spec["mrope"]["mrope_section"] == [4, 6, 6]
    assert "pip install" in report["llm_note"] and "edgellm_llm" in report["llm_note"]
    layout = type("L", (), {"image_start": 2, "image_len": 3, "prompt_start": 6, "prompt_len": 1})
    ids = edgellm.join_reference(np.arange(10), layout, 1000)
    assert ids.tolist() == [0, 1, 1000, 1001, 1002, 5, 1003, 7, 8, 9]


def test_cli_refuses_what_edgellm_cannot_run(tmp_path, capsys):
    assert main(["export", "tiny", "--out", str(tmp_path / "a"), "--edgellm", "--group-size", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--group-size 64" in err and "128" in err and len(err.splitlines()) == 1
    assert main(["export", "tiny", "--out", str(tmp_path / "b"), "--edgellm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # from the config, before the model loads
    assert len(err) == 1 and err[0].startswith("fusar-edge: error: tiny: the q/o projections")
    assert "[64 out, 64 in]" in err[0] and "multiple of 128" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_the_loaded_model_is_checked_too():
    """The config check assumes the usual linears; the loaded model's own shapes are checked again,
    naming the first linear Edge-LLM cannot run, and a model it can run passes."""
    from fusar_edge.errors import InputError

    with pytest.raises(InputError, match=r"tiny: .*q_proj is \[64 out, 64 in\].*multiple of 128"):
        edgellm.check_shapes(build_random(preset("tiny")))
    edgellm.check_shapes(build_random(wide_tiny_config()))


def test_cli_export_end_to_end_without_edgellm(tiny_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(edgellm_llm, "installed_version", lambda: None)
    src = tmp_path / "wide"
    save_bundle(build_random(wide_tiny_config()), tiny_tokenizer, src)
    out = tmp_path / "jetson"
    assert main(["export", str(src), "--out", str(out), "--edgellm", "--calib", "1"]) == 0
    said = capsys.readouterr().out
    assert "edgellm: vision.onnx / grasp.onnx fp16 vs torch ok" in said and "llm/ not written" in said
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"edgellm/vision.onnx", "edgellm/grasp.onnx", "edgellm/fusar_edgellm.json",
            "edgellm/checkpoint/model.safetensors"} <= set(manifest)
    assert not (out / "onnx").exists()  # --edgellm alone writes no ONNX Runtime stages
    assert main(["info", str(out), "--json"]) == 0
    assert "edgellm" in json.loads(capsys.readouterr().out)["backends"]
    # exporting that export again takes its GPTQ weights instead of quantising again
    again = tmp_path / "again"
    assert main(["export", str(out), "--out", str(again), "--edgellm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["artifacts"]["edgellm"]["gptq"] == "the source bundle's " \
                                                                                   "edgellm/checkpoint/"
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "edgellm" / "checkpoint" / "model.safetensors")) for d in (again, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(edgellm_llm.installed_version() is None,
                    reason="tensorrt-edgellm is not installed (pip install 'fusar-edge[torch,edgellm]')")
def test_small_exports_through_edgellm(tmp_path, tiny_tokenizer):
    """Edge-LLM's exporter on the `small` checkpoint: one INT4 GEMM plugin per quantised linear,
    one attention plugin per layer, the hidden_states output; via the by-hand command."""
    from fusar_edge.model.bundle import write_manifest

    model = build_random(preset("small")).eval()
    weights = quantize_rtn(model, 128)
    bundle = tmp_path / "small"
    bundle.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setattr(edgellm_llm, "installed_version", lambda: None)
    try:
        edgellm.write_checkpoint(model, tiny_tokenizer, weights, bundle / "edgellm" / "checkpoint")
        spec = edgellm.manifest(model, tiny_tokenizer, {}, {"dir": "checkpoint", "quantized_linears": len(weights)},
                                256, 256)
    finally:
        mp.undo()
    (bundle / "edgellm" / edgellm.MANIFEST_NAME).write_text(json.dumps(spec))
    write_manifest(bundle)
    assert edgellm_llm.main([str(bundle)]) == 0
    spec = json.loads((bundle / "edgellm" / edgellm.MANIFEST_NAME).read_text())
    graph = spec["llm"]["graph"]
    assert graph["plugins"][edgellm_llm.INT4_GEMM] == len(weights) == 56
    assert graph["plugins"][edgellm_llm.ATTENTION] == 8
    assert graph["hidden_states"] == ["physical_tokens", 1024]
    assert edgellm_llm.check_graph(graph, 56, 8) == []
    check = spec["llm"]["weights_check"]  # what its loader made of our checkpoint, linear by linear
    assert check["ok"] and check["linears"] == check["packed_weights_compared"] == 56
    name = "model.language_model.layers.3.mlp.down_proj"  # one code off by one step: found
    bad = dataclasses.replace(weights[name], q=weights[name].q.clone())
    bad.q[5, 7] = 7 if int(bad.q[5, 7]) != 7 else 6
    found = edgellm_llm.check_weights(bundle / "edgellm" / "llm", {name: bad})["problems"]
    assert "layers.3.mlp.down_proj: packed INT4 weights differ from our codes" in found
    assert (bundle / "edgellm" / "llm" / edgellm_llm.LOG).is_file()
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert "edgellm/llm/model.onnx" in files
