"""`import-fusar-gpt`: a checkpoint in the FUSAR-GPT reference formats -> a bundle with the same outputs.

The checkpoints are built here exactly as the reference code writes them: a Hugging Face
Qwen2.5-VL folder, a PEFT LoRA adapter (r=8, alpha=32, LLM linears; the ViT MLPs share the
names, as in the legacy stage-1 vision LoRA) saved with ``save_pretrained``, and
``torch.save({"film_mlp": state_dict})`` + ``tlm_config.json``.
"""

import copy
import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import one_line, rel_err
from fusar_edge.cli import main
from fusar_edge.config import preset
from fusar_edge.errors import BundleError
from fusar_edge.model.bundle import build_random, describe, load_bundle
from fusar_edge.model.fusar import FusarModel
from fusar_edge.model.import_fusar_gpt import import_fusar_gpt
from fusar_edge.model.rope import mrope_positions
from fusar_edge.tokenizer import TextTokenizer
from test_model import make_inputs, random_anchors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIGMA = 1.5  # not the default 2.0, so a sigma that does not reach the bundle changes the logits
TLM_FORMAT = "tlm_original_train_patch_resize_v1"
FUSAR_MODULES = "fusar_modules.safetensors"


class NotWeights:
    """A pickled custom object: torch.load(weights_only=True) must refuse it."""

    def __init__(self):
        self.film_mlp = {"0.weight": torch.zeros(2)}


class Payload:
    """A pickle that runs code when unpickled: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def reference_film_mlp(c, hidden_mult=4, seed=0):
    """The reference's MLP: Linear(64, max(128, 4C)) -> SiLU -> Linear(hidden, 2C), non-trivial weights."""
    hidden = max(128, hidden_mult * c)
    mlp = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, 2 * c))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return mlp


def write_tlm(directory, film_state, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"film_mlp": film_state}, directory / "vec64_film.pt")
    cfg = {"format": TLM_FORMAT, "sigma": SIGMA, "hidden_mult": 4, "image_size": 224, "vec_dim": 64, **overrides}
    (directory / "tlm_config.json").write_text(json.dumps(cfg), encoding="utf-8")


def fusar_config():
    """What the checkpoint means for us: tiny backbone, TLM on (SIGMA, 224-px chip), GRASP off."""
    cfg = preset("tiny")
    cfg.tlm.sigma = SIGMA
    cfg.grasp.enabled = False
    return cfg


def with_film(backbone, film_state):
    model = FusarModel(fusar_config(), backbone=backbone)
    model.tlm.film_mlp.load_state_dict(film_state)
    return model.eval()


def outputs(model, tok):
    """(visual tokens, logits) of one vision + fusion + decoder pass on fixed inputs with anchors."""
    pixels, grid, seq = make_inputs(model, tok, seed=7)
    anchors = random_anchors(12, torch.Generator().manual_seed(8), masked=3)
    with torch.no_grad():
        vis = model.vision(pixels, grid, anchors)
        embeds, _ = model.fusion(seq.input_ids, seq.layout, vis, seq.question_ids)
        pos, _ = mrope_positions(embeds.shape[1], seq.layout.image_start, model.config.token_grid)
        logits, _ = model.decoder(embeds, pos)
    return vis, logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusar-gpt")
    cfg = preset("tiny")
    cfg.tlm.enabled = cfg.grasp.enabled = False
    base = build_random(cfg, seed=21).backbone
    base.save_pretrained(root / "base")
    tok = TextTokenizer.tiny()
    tok.save(root / "base")

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(22)
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 7 + 2 * 3  # 2 LLM layers x 7 linears, 2 ViT blocks x 3 MLP linears
    with torch.no_grad():  # PEFT initialises B to zero: the adapter would be a no-op
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.eval()
    peft_model.save_pretrained(root / "lora")

    film = reference_film_mlp(64, seed=23).state_dict()
    write_tlm(root / "tlm", film)
    return SimpleNamespace(root=root, base=root / "base", lora=root / "lora", tlm=root / "tlm", tok=tok,
                           base_model=base, peft_model=peft_model, film=film)


@pytest.fixture(scope="module")
def imported(ckpt):
    steps = []
    out = import_fusar_gpt(ckpt.base, ckpt.lora, ckpt.tlm, ckpt.root / "out", progress=steps.append)
    return out, steps


@pytest.fixture(scope="module")
def before(ckpt):
    """The unmerged PEFT model inside a FusarModel with the reference film weights."""
    return outputs(with_film(ckpt.peft_model.base_model.model, ckpt.film), ckpt.tok)


@pytest.fixture
def scratch(ckpt, tmp_path):
    """Private copies of BASE / LORA / TLM to break, and an output path."""
    return SimpleNamespace(**{name: shutil.copytree(getattr(ckpt, name), tmp_path / name)
                              for name in ("base", "lora", "tlm")}, out=tmp_path / "out")


# --- faithfulness -------------------------------------------------------------------------

def test_imported_bundle_matches_the_unmerged_peft_model(ckpt, imported, before):
    out, _ = imported
    model, tok = load_bundle(out)
    vis_before, logits_before = before
    vis_after, logits_after = outputs(model, tok)
    assert rel_err(vis_after, vis_before) < 1e-5  # the ViT half of the LoRA
    assert rel_err(logits_after, logits_before) < 1e-5

    # The test can fail: without the LoRA (or without the film weights) the outputs differ.
    vis_plain, logits_plain = outputs(with_film(ckpt.base_model, ckpt.film), ckpt.tok)
    assert rel_err(vis_plain, vis_before) > 1e-3  # 100x the tolerance above
    assert rel_err(logits_plain, logits_before) > 1e-2
    other_film = reference_film_mlp(64, seed=99).state_dict()
    _, logits_other = outputs(with_film(ckpt.peft_model.base_model.model, other_film), ckpt.tok)
    assert rel_err(logits_other, logits_before) > 1e-2


def test_imported_bundle_config_and_files(ckpt, imported):
    out, steps = imported
    assert [s[:5] for s in steps] == ["[1/3]", "[2/3]", "[3/3]"]
    fusar = json.loads((out / "fusar.json").read_text(encoding="utf-8"))
    assert fusar["chip_size"] == 224 and fusar["token_grid"] == [8, 8]
    assert fusar["tlm"]["enabled"] and fusar["tlm"]["sigma"] == SIGMA and fusar["tlm"]["hidden_mult"] == 4
    assert not fusar["grasp"]["enabled"]
    assert fusar["name"] == "fusar-gpt:base"
    assert set(load_file(str(out / "fusar_modules.safetensors"))) == {f"tlm.film_mlp.{k}" for k in ckpt.film}
    assert not any(p.suffix in (".pt", ".bin", ".pth") for p in out.iterdir())  # no pickle in the bundle
    backbone = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in backbone)  # merged, not carried along
    assert set(backbone) == set(load_file(str(ckpt.base / "model.safetensors")))
    assert describe(out)["tlm"]["sigma"] == SIGMA


def test_legacy_adapter_key_layout_imports_the_same(ckpt, imported, scratch):
    """Adapters saved with transformers < 4.52 name the modules `model.layers.*` and `visual.*`."""
    path = scratch.lora / "adapter_model.safetensors"
    state = load_file(str(path))
    legacy = {k.replace("base_model.model.model.language_model.", "base_model.model.model.")
               .replace("base_model.model.model.visual.", "base_model.model.visual."): v for k, v in state.items()}
    assert set(legacy) != set(state)
    save_file(legacy, str(path), metadata={"format": "pt"})
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    ref = load_file(str(imported[0] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def _legacy_keys(state):
    return {k.replace("base_model.model.model.language_model.", "base_model.model.model.")
             .replace("base_model.model.model.visual.", "base_model.model.visual."): v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_adapter_listing_full_module_names_imports_the_same(ckpt, imported, scratch, layout):
    """The reference saves target_modules as full module names (train_tlm.py); the released legacy
    Stage-1 adapter lists them in the old layout (`model.layers.*`, `visual.*`) and needs the same
    remapping as its keys."""
    path = scratch.lora / "adapter_model.safetensors"
    state = load_file(str(path))
    if layout == "legacy":
        state = _legacy_keys(state)
        save_file(state, str(path), metadata={"format": "pt"})
    names = sorted({k.removeprefix("base_model.model.").split(".lora_")[0] for k in state})
    assert any(n.startswith("visual.blocks.") for n in names) == (layout == "legacy")
    assert any(n.startswith("model.layers.") for n in names) == (layout == "legacy")
    cfg_path = scratch.lora / "adapter_config.json"
    _edit_json(cfg_path, target_modules=names)
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    ref = load_file(str(imported[0] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_legacy_module_name_remapping():
    from fusar_edge.model.import_fusar_gpt import remap_legacy_module_name as remap

    assert remap("model.layers.3.self_attn.q_proj") == "model.language_model.layers.3.self_attn.q_proj"
    assert remap("visual.blocks.0.mlp.gate_proj") == "model.visual.blocks.0.mlp.gate_proj"
    for unchanged in ("q_proj", "down_proj", "model.language_model.layers.0.mlp.up_proj",
                      "model.visual.blocks.1.mlp.down_proj", "lm_head"):
        assert remap(unchanged) == unchanged


def test_generation_config_is_copied_and_checked(ckpt, scratch):
    gen = {"bos_token_id": 0, "eos_token_id": [2, 0], "do_sample": True, "repetition_penalty": 1.05,
           "temperature": 0.1, "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0"}
    text = json.dumps(gen, indent=3)
    (scratch.base / "generation_config.json").write_text(text)
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    assert (out / "generation_config.json").read_text() == text  # copied, not re-serialised
    assert "generation_config.json" in json.loads((out / "manifest.json").read_text())["files"]
    fusar = json.loads((out / "fusar.json").read_text())
    assert fusar["max_new_tokens"] == 2048 and fusar["prompt_style"] == "reference"
    # a setting the runtime cannot honour is refused at import, naming the file
    (scratch.base / "generation_config.json").write_text(json.dumps({**gen, "num_beams": 3}))
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out, overwrite=True)
    one_line(exc, scratch.base / "generation_config.json", "num_beams=3")


def test_tlm_files_inside_the_adapter_folder(ckpt, imported, scratch):
    """The reference often writes vec64_film.pt / tlm_config.json next to the adapter."""
    for name in ("vec64_film.pt", "tlm_config.json"):
        shutil.copy(scratch.tlm / name, scratch.lora / name)
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.lora, scratch.out)
    ref, got = load_file(str(imported[0] / FUSAR_MODULES)), load_file(str(out / FUSAR_MODULES))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)



def test_legacy_checkpoint_without_tlm_config_needs_sigma(scratch):
    (scratch.tlm / "tlm_config.json").unlink()
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    one_line(exc, scratch.tlm / "tlm_config.json", "--legacy-sigma")
    assert not scratch.out.exists()
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out, legacy_sigma=2.0)
    model, _ = load_bundle(out)
    assert model.config.tlm.sigma == 2.0
    assert model.config.chip_size == 504  # the reference's chip when the JSON is absent
    assert torch.equal(model.tlm.film_mlp[2].weight, load_file(str(out / FUSAR_MODULES))["tlm.film_mlp.2.weight"])


def test_existing_output_needs_overwrite(ckpt, scratch):
    scratch.out.mkdir()
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    one_line(exc, scratch.out, "exists")
    import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out, overwrite=True)
    assert (scratch.out / "manifest.json").is_file()


# --- bad checkpoints ----------------------------------------------------------------------

def _edit_json(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def _rewrite(path, fn):
    state = load_file(str(path))
    save_file(fn(state), str(path), metadata={"format": "pt"})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _with_nan(state):
    """``state`` with one NaN in its first floating tensor (what a diverged run leaves)."""
    out = dict(state)
    key = next(k for k, v in out.items() if v.is_floating_point())
    out[key] = out[key].clone()
    out[key].view(-1)[0] = float("nan")
    return out


def _rename_adapter_keys(state):
    return {k.replace(".layers.", ".blocks_x."): v for k, v in state.items()}


REFUSED = "refused: not a weights-only checkpoint (it holds pickled Python objects"

BAD = {
    # name: (how to break the scratch copy, which file the message names, other words it must contain)
    "tlm_config wrong format": (lambda s: _edit_json(s.tlm / "tlm_config.json", format="tlm_v0"),
                                "tlm/tlm_config.json", ["format", "tlm_v0", TLM_FORMAT]),
    "tlm_config wrong vec_dim": (lambda s: _edit_json(s.tlm / "tlm_config.json", vec_dim=32),
                                 "tlm/tlm_config.json", ["vec_dim", "32"]),
    "tlm_config bad sigma": (lambda s: _edit_json(s.tlm / "tlm_config.json", sigma=-1),
                             "tlm/tlm_config.json", ["sigma", "-1"]),
    "tlm_config image size no ViT takes": (lambda s: _edit_json(s.tlm / "tlm_config.json", image_size=100),
                                           "tlm/tlm_config.json", ["image_size", "multiple of 28", "100"]),
    "tlm_config malformed": (lambda s: (s.tlm / "tlm_config.json").write_text("{"), "tlm/tlm_config.json", ["JSON"]),
    "tlm_config not an object": (lambda s: (s.tlm / "tlm_config.json").write_text("[2.0]"),
                                 "tlm/tlm_config.json", ["object"]),
    "missing tlm_config.json": (lambda s: (s.tlm / "tlm_config.json").unlink(),
                                "tlm/tlm_config.json", ["missing", "--legacy-sigma"]),
    "missing vec64_film.pt": (lambda s: (s.tlm / "vec64_film.pt").unlink(), "tlm/vec64_film.pt", ["missing"]),
    "pickled object": (lambda s: torch.save({"film_mlp": NotWeights()}, s.tlm / "vec64_film.pt"),
                       "tlm/vec64_film.pt", [REFUSED, "NotWeights"]),
    "pickled object only": (lambda s: torch.save(NotWeights(), s.tlm / "vec64_film.pt"),
                            "tlm/vec64_film.pt", [REFUSED, "NotWeights"]),
    "pickled torch module": (lambda s: torch.save(reference_film_mlp(64), s.tlm / "vec64_film.pt"),
                             "tlm/vec64_film.pt", [REFUSED, "torch.nn.modules"]),
    "garbage vec64_film.pt": (lambda s: (s.tlm / "vec64_film.pt").write_bytes(b"not a torch file"),
                              "tlm/vec64_film.pt", ["weights-only"]),
    "bare state_dict": (lambda s: torch.save(reference_film_mlp(64).state_dict(), s.tlm / "vec64_film.pt"),
                        "tlm/vec64_film.pt", ["film_mlp"]),
    "film_mlp of the wrong width": (
        lambda s: torch.save({"film_mlp": reference_film_mlp(32).state_dict()}, s.tlm / "vec64_film.pt"),
        "tlm/vec64_film.pt", ["film_mlp", "hidden size 64", "size mismatch"]),
    "film_mlp with the wrong hidden_mult": (lambda s: _edit_json(s.tlm / "tlm_config.json", hidden_mult=2),
                                            "tlm/vec64_film.pt", ["film_mlp", "hidden_mult 2"]),
    "no adapter_config.json": (lambda s: (s.lora / "adapter_config.json").unlink(),
                               "lora/adapter_config.json", ["missing"]),
    "adapter_config.json malformed": (lambda s: (s.lora / "adapter_config.json").write_text("{"),
                                      "lora/adapter_config.json", []),
    "not a LoRA adapter": (lambda s: _edit_json(s.lora / "adapter_config.json", peft_type="IA3"),
                           "lora/adapter_config.json", ["peft_type", "IA3"]),
    "no adapter weights": (lambda s: (s.lora / "adapter_model.safetensors").unlink(),
                           "lora/adapter_model.safetensors", ["missing"]),
    "truncated adapter weights": (lambda s: _truncate(s.lora / "adapter_model.safetensors"),
                                  "lora/adapter_model.safetensors", []),
    "NaN in the adapter": (lambda s: _rewrite(s.lora / "adapter_model.safetensors", _with_nan),
                           "lora", ["holds NaN or Inf"]),
    "NaN in the film MLP": (lambda s: torch.save({"film_mlp": _with_nan(reference_film_mlp(64).state_dict())},
                                                 s.tlm / "vec64_film.pt"), "tlm/vec64_film.pt", ["tlm.", "NaN"]),
    "adapter of another rank": (lambda s: _edit_json(s.lora / "adapter_config.json", r=4),
                                "lora/adapter_model.safetensors", ["size mismatch"]),
    "adapter for another model": (lambda s: _rewrite(s.lora / "adapter_model.safetensors", _rename_adapter_keys),
                                  "lora/adapter_model.safetensors", ["missing", "unexpected", "blocks_x"]),
    "base without config.json": (lambda s: (s.base / "config.json").unlink(), "base/config.json", ["missing"]),
    "base config of other sizes": (lambda s: _edit_json(s.base / "config.json", text_config={
        **json.loads((s.base / "config.json").read_text())["text_config"], "intermediate_size": 96}),
        "base/model.safetensors", ["base/config.json", "mismatched", "mlp.down_proj.weight", "[64, 96]"]),
    "base tensor missing": (lambda s: _rewrite(s.base / "model.safetensors",
                                               lambda st: {k: v for k, v in st.items() if "layers.1.mlp.up" not in k}),
                            "base/model.safetensors", ["missing", "layers.1.mlp.up_proj.weight"]),
    "base weights truncated": (lambda s: _truncate(s.base / "model.safetensors"), "base/model.safetensors", []),
    "base weights missing": (lambda s: (s.base / "model.safetensors").unlink(), "base/model*.safetensors",
                             ["missing"]),
    "base without tokenizer": (lambda s: (s.base / "tokenizer.json").unlink(), "base/tokenizer.json", ["missing"]),
    "BASE not a directory": (lambda s: shutil.rmtree(s.base), "base", ["BASE", "directory"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_names_the_file(scratch, case):
    breaker, where, words = BAD[case]
    breaker(scratch)
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    root = scratch.out.parent
    one_line(exc, root / where, *words)
    assert not scratch.out.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary bundle left


# --- the CLI ------------------------------------------------------------------------------

def test_cli_import_then_info(ckpt, imported, tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = ["import-fusar-gpt", str(ckpt.base), str(ckpt.lora), str(ckpt.tlm), "--out", str(out)]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == f"wrote bundle {out}"
    assert "[1/3]" in cap.err and "[3/3]" in cap.err and "Traceback" not in cap.err
    # The same checkpoint gives the same bundle, byte for byte.
    assert describe(out)["weights"] == describe(imported[0])["weights"]

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fusar-gpt:base" in text and describe(out)["weights"] in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tlm"]["sigma"] == SIGMA and info["grasp"]["enabled"] is False and info["chip_size"] == 224

    assert main(argv) == 2  # exists
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fusar-edge: error: {out}: already exists (pass overwrite=True / --force to replace it)"]
    assert main(argv + ["--force"]) == 0
    capsys.readouterr()


def test_cli_legacy_sigma(scratch, capsys):
    (scratch.tlm / "tlm_config.json").unlink()
    argv = ["import-fusar-gpt", str(scratch.base), str(scratch.lora), str(scratch.tlm), "--out", str(scratch.out)]
    for bad in ("-1", "nan", "inf"):  # a bundle that nothing could open is refused, not written
        assert main(argv + ["--legacy-sigma", bad]) == 2
        assert "--legacy-sigma" in capsys.readouterr().err
    assert main(argv + ["--legacy-sigma", "2"]) == 0
    capsys.readouterr()
    assert json.loads((scratch.out / "fusar.json").read_text())["tlm"]["sigma"] == 2.0
    # --force never replaces an input: OUT as the base folder would delete the base download
    for victim in (scratch.base, scratch.tlm):
        assert main(argv[:-1] + [str(victim), "--legacy-sigma", "2", "--force"]) == 2
        assert "--force would delete it" in capsys.readouterr().err
    assert (scratch.base / "config.json").is_file()


def test_a_tlm_config_sigma_that_no_bundle_opens_is_refused(scratch, capsys):
    cfg = json.loads((scratch.tlm / "tlm_config.json").read_text())
    argv = ["import-fusar-gpt", str(scratch.base), str(scratch.lora), str(scratch.tlm), "--out", str(scratch.out)]
    for key, value in (("sigma", float("nan")), ("sigma", float("inf")), ("sigma", True), ("hidden_mult", 4.7)):
        (scratch.tlm / "tlm_config.json").write_text(json.dumps({**cfg, key: value}))
        assert main(argv) == 2, (key, value)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"tlm_config.json: {key}" in err[0], err
    assert not scratch.out.exists()


@pytest.mark.parametrize("case", ["tlm_config wrong format", "missing tlm_config.json", "pickled object",
                                  "film_mlp of the wrong width", "no adapter_config.json", "adapter for another model",
                                  "base tensor missing"])
def test_cli_bad_checkpoint_is_one_error_line(scratch, case, capsys):
    breaker, where, words = BAD[case]
    breaker(scratch)
    argv = ["import-fusar-gpt", str(scratch.base), str(scratch.lora), str(scratch.tlm), "--out", str(scratch.out)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert "Traceback" not in cap.err
    lines = [line for line in cap.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fusar-edge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0]  # progress lines may come before it, nothing after
    assert str(scratch.out.parent / where) in errors[0]
    assert all(str(w) in errors[0] for w in words)
    assert not scratch.out.exists()


# --- pickles that carry code --------------------------------------------------------------

def _write_payload(scratch, target, writer):
    """Replace vec64_film.pt or the adapter's weights by a pickle whose loading would create a marker."""
    marker = scratch.out.parent / "PWNED"
    if target == "vec64_film.pt":
        path, obj = scratch.tlm / target, {"film_mlp": Payload(marker)}
    else:  # an old PEFT adapter: adapter_model.bin instead of .safetensors
        (scratch.lora / "adapter_model.safetensors").unlink()
        path, obj = scratch.lora / target, {"base_model.model.lm_head.lora_A.weight": Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path, marker


@pytest.mark.parametrize("writer", ["torch.save", "plain pickle"])
@pytest.mark.parametrize("target", ["vec64_film.pt", "adapter_model.bin"])
def test_pickled_code_is_refused_in_our_words_and_never_runs(scratch, capsys, target, writer):
    path, marker = _write_payload(scratch, target, writer)
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    msg = one_line(exc, path, REFUSED, "io.open", "fusar-edge never unpickles code")
    assert msg.startswith(f"{path}: refused:") and "weights_only" not in msg  # not torch's advice
    assert not marker.exists() and not scratch.out.exists()

    argv = ["import-fusar-gpt", str(scratch.base), str(scratch.lora), str(scratch.tlm), "--out", str(scratch.out)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = [line for line in cap.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fusar-edge: error:")]
    assert errors == [lines[-1]] and errors[0] == f"fusar-edge: error: {msg}"  # progress lines may come first
    assert not marker.exists() and not scratch.out.exists()


def test_pickled_adapter_of_plain_tensors_still_imports(ckpt, imported, scratch):
    """Old PEFT adapters (adapter_model.bin) holding only tensors pass the check and import the same."""
    st = scratch.lora / "adapter_model.safetensors"
    torch.save(load_file(str(st)), scratch.lora / "adapter_model.bin")
    st.unlink()
    out = import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    ref, got = load_file(str(imported[0] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_pickled_adapter_must_be_a_state_dict(scratch):
    (scratch.lora / "adapter_model.safetensors").unlink()
    torch.save([torch.zeros(2)], scratch.lora / "adapter_model.bin")
    with pytest.raises(BundleError) as exc:
        import_fusar_gpt(scratch.base, scratch.lora, scratch.tlm, scratch.out)
    one_line(exc, scratch.lora / "adapter_model.bin", "state dict", "list")
    assert not scratch.out.exists()
