"""Presets: the real presets have the official architectures; fusar.json round-trips."""

import json

import pytest
import torch

from fusar_edge.config import TINY_SPECIAL_TOKENS, FusarConfig, preset
from fusar_edge.errors import BundleError
from fusar_edge.tokenizer import TextTokenizer

# Parameter counts of the official checkpoints (Qwen/Qwen2.5-VL-{3B,7B}-Instruct).
OFFICIAL_PARAMS = {"qwen2.5-vl-3b": 3_754_622_976, "qwen2.5-vl-7b": 8_292_166_656}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_real_presets_have_official_parameter_counts(name):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = preset(name)
    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2_5_VLForConditionalGeneration(cfg.backbone_config())
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]
    assert cfg.chip_size == 504 and cfg.patch_grid == (36, 36) and cfg.token_grid == (18, 18)


def test_tiny_is_small_and_matches_its_tokenizer():
    from fusar_edge.model.bundle import build_random

    model = build_random(preset("tiny"))
    assert sum(p.numel() for p in model.parameters()) * 4 < 8 * 2**20  # a few MB in fp32
    tok = TextTokenizer.tiny()
    for name, idx in TINY_SPECIAL_TOKENS.items():
        assert tok.ids.get(name, idx) == idx
    assert tok.vocab_size <= preset("tiny").text["vocab_size"]
    assert tok.decode(tok.encode("How many ships? 12 ✓")) == "How many ships? 12 ✓"


def test_fusar_json_round_trip():
    cfg = preset("tiny")
    data = json.loads(json.dumps(cfg.to_fusar_json()))
    back = FusarConfig.from_fusar_json(data, cfg.backbone)
    assert back.to_fusar_json() == cfg.to_fusar_json()


@pytest.mark.parametrize("field,value,msg", [
    ("chip_size", 100, "chip_size"),
    ("format", "other", "format"),
    ("token_grid", [3, 3], "token_grid"),
])
def test_fusar_json_rejects_bad_fields(field, value, msg):
    cfg = preset("tiny")
    data = cfg.to_fusar_json()
    data[field] = value
    with pytest.raises(BundleError, match=msg):
        FusarConfig.from_fusar_json(data, cfg.backbone)


def test_grasp_config_validation():
    cfg = preset("tiny")
    data = cfg.to_fusar_json()
    data["grasp"]["k"] = 5
    with pytest.raises(BundleError, match="grasp.k"):
        FusarConfig.from_fusar_json(data, cfg.backbone)
    data["grasp"]["k"], data["grasp"]["selector"] = 2, "softmax"
    with pytest.raises(BundleError, match="grasp.selector"):
        FusarConfig.from_fusar_json(data, cfg.backbone)


def test_unknown_preset():
    with pytest.raises(BundleError, match="tiny"):
        preset("qwen9")


def test_demo_preset_and_its_tokenizer():
    import importlib.util
    from pathlib import Path

    from fusar_edge.model.bundle import count_parameters
    from fusar_edge.tokenizer import TextTokenizer

    cfg = preset("demo")
    tok = TextTokenizer.demo()
    assert all(tok.ids[name] == TINY_SPECIAL_TOKENS[name] for name in tok.ids)
    assert tok.vocab_size <= cfg.text["vocab_size"]
    assert [tok._tok.decode([i]) for i in tok.encode("[117, 8]")][1:4] == ["1", "1", "7"]  # one token per digit
    assert cfg.chip_size == 224 and cfg.prompt_style == "reference" and not cfg.grasp.enabled
    assert 2e6 < count_parameters(cfg) < 4e6  # ~11 MB of fp32 weights: under the 25 MB the repo allows
    script = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_demo_tokenizer", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build().to_str() == tok._tok.to_str()  # the shipped file is what the script builds


def test_demo_wide_is_the_demo_with_a_wider_language_model_and_the_demo_tokenizer():
    from fusar_edge.model.bundle import count_parameters, open_model

    demo, wide = preset("demo"), preset("demo-wide")
    assert wide.text["hidden_size"] == wide.vision["out_hidden_size"] == 256 and wide.text["num_hidden_layers"] == 6
    assert wide.text["hidden_size"] // wide.text["num_attention_heads"] == 32  # head_dim as the demo's
    assert wide.text["rope_parameters"] == demo.text["rope_parameters"] and wide.chip_size == demo.chip_size
    assert {k: v for k, v in wide.vision.items() if k != "out_hidden_size"} == \
        {k: v for k, v in demo.vision.items() if k != "out_hidden_size"}
    assert count_parameters(wide) * 4 < 24e6  # fp32 weights: the bundle stays under the 25 MB the repo allows
    _, tok, _ = open_model("demo-wide")  # stage 0 and open_model pick the demo tokenizer by its vocabulary
    assert tok.vocab_size <= wide.text["vocab_size"] and tok.vocab_size == TextTokenizer.demo().vocab_size


def test_demo_deep_differs_from_the_demo_only_in_its_language_model_depth():
    demo, deep = preset("demo"), preset("demo-deep")
    assert deep.text["num_hidden_layers"] == 6 and demo.text["num_hidden_layers"] == 4
    assert {k: v for k, v in deep.text.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in demo.text.items() if k != "num_hidden_layers"}
    assert deep.vision == demo.vision  # a demo run's dense warm-up (vision tower, TLM) loads into it


def test_demo_vit192_differs_from_the_demo_only_in_its_vision_width():
    from fusar_edge.model.bundle import count_parameters

    demo, wide = preset("demo"), preset("demo-vit192")
    assert (wide.vision["hidden_size"], wide.vision["intermediate_size"], wide.vision["num_heads"]) == (192, 384, 6)
    changed = {"hidden_size", "intermediate_size", "num_heads"}
    assert {k: v for k, v in wide.vision.items() if k not in changed} == \
        {k: v for k, v in demo.vision.items() if k not in changed}  # same patches, windows, merger output
    assert wide.text == demo.text and wide.chip_size == demo.chip_size
    assert count_parameters(wide) * 4 < 24e6  # fp32 weights: the bundle stays under the 25 MB the repo allows


def test_saved_config_reads_without_transformers_as_transformers_reads_it(tmp_path, tiny_model, tiny_tokenizer):
    """A config.json transformers wrote is taken as it is (the edge runtime has no transformers);
    that must equal transformers' own normalisation of the file, on every bundle we ship or save."""
    import json

    from transformers import Qwen2_5_VLConfig

    from fusar_edge import config as C
    from fusar_edge.model.bundle import save_bundle

    saved = save_bundle(tiny_model, tiny_tokenizer, tmp_path / "tiny") / "config.json"
    for path in (C.builtin_bundle() / "config.json", saved):
        data = json.loads(path.read_text())
        d = Qwen2_5_VLConfig(**{k: v for k, v in data.items()
                                if k not in ("architectures", "transformers_version")}).to_dict()
        want = {"vision_config": C._strip(d["vision_config"]), "text_config": C._strip(d["text_config"]),
                **{k: d[k] for k in C._TOP_KEYS if k in d}}
        assert C._as_saved(data) == want
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 64, "transformers_version": "4.49.0"}
    assert C._as_saved(flat) is None  # a legacy flat config goes through transformers
