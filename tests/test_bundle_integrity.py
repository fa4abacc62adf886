"""Bundles checked against their manifest, configs bounded before anything is built.

Every fault is reproduced on a private copy of a tiny bundle and must give exit code 2 with
one `fusar-edge: error:` line naming the file (and key / tensor), print nothing on stdout
and never build the model.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line
from fusar_edge.cli import main
from fusar_edge.config import builtin_bundle, load_backbone_json, preset
from fusar_edge.errors import BundleError
from fusar_edge.model import manifest as manifest_mod
from fusar_edge.model.bundle import build_random, describe, load_bundle, open_model, save_bundle, write_manifest
from fusar_edge.tokenizer import TextTokenizer

UNHASHED = "unhashed (no manifest.json)"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_bundle(build_random(preset("tiny"), seed=5), TextTokenizer.tiny(),
                       tmp_path_factory.mktemp("integrity") / "tiny-bundle")


@pytest.fixture
def bundle(saved, tmp_path):
    """A private copy to break."""
    return shutil.copytree(saved, tmp_path / "bundle")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "chip.npy"
    np.save(path, np.random.default_rng(0).gamma(1.0, 1.0, (64, 64)).astype(np.float32))
    return str(path)


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if the backbone is ever loaded (every check below must come before)."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_backbone called: the model was built before the fault was found")

    monkeypatch.setattr("fusar_edge.model.bundle.load_backbone", refuse)


def content_id(bundle):
    """The weights id as bundle.py documents it, computed here from the files themselves."""
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    lines = "".join(f"{hashlib.sha256((bundle / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def cli_error(capsys, argv, *words):
    """`fusar-edge ARGV` exits 2 with nothing on stdout and exactly one error line naming WORDS."""
    assert main([str(a) for a in argv]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = [line for line in cap.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fusar-edge: error: "), cap.err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def verify_fails(capsys, bundle):
    """`fusar-edge verify` exits 2: one problem per stdout line, then exactly one error line."""
    assert main(["verify", str(bundle)]) == 2
    cap = capsys.readouterr()
    err = [line for line in cap.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"fusar-edge: error: {bundle}: "), cap.err
    return cap.out.strip().splitlines(), err[0]


def ask(image, bundle, *flags):
    return [str(a) for a in ("ask", image, "How many ships are there?", "--bundle", bundle, "--no-anchors",
                             "--max-new-tokens", "2", *flags)]


def flip_byte(path, offset=-1):
    """Damage a file without changing its size (the cheap check cannot see it; verify can)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path, keys, value):
    data = json.loads(path.read_text(encoding="utf-8"))
    d = data
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value
    path.write_text(json.dumps(data), encoding="utf-8")


# --- the weights id ---------------------------------------------------------------------------

def test_weights_id_is_the_content_hash(saved, bundle):
    _, _, weights = open_model(saved)
    assert weights == content_id(saved) == describe(saved)["weights"]
    # the manifest's formatting does not matter, only the records
    records = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(records))
    assert describe(bundle)["weights"] == weights
    # new content (hashed into a new manifest): a new id
    _edit_json(bundle / "fusar.json", ["system_prompt"], "You are a SAR analyst.")
    write_manifest(bundle)
    assert describe(bundle)["weights"] == content_id(bundle) != weights
    assert open_model("tiny")[2] == "random" and describe("tiny")["weights"] == "random (preset)"


def test_the_shipped_demo_bundle_opens_and_verifies(capsys):
    demo = builtin_bundle()
    assert describe(demo)["weights"] == content_id(demo)
    assert main(["verify", str(demo)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "OK" in out[0] and content_id(demo) in out[0] and "7 files" in out[0]


def test_bundle_without_manifest_opens_and_says_so(bundle, image, capsys):
    (bundle / "manifest.json").unlink()
    assert open_model(bundle)[2] == UNHASHED
    assert describe(bundle)["weights"] == UNHASHED
    assert main(ask(image, bundle) + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["weights"] == UNHASHED
    cli_error(capsys, ["verify", bundle], bundle / "manifest.json", "missing")
    cli_error(capsys, ask(image, bundle, "--verify"), bundle / "manifest.json", "missing")


# --- sizes at every open ------------------------------------------------------------------------

SIZE_FAULTS = {
    # name: (how to break the copy, the file the message names, other words)
    "weights truncated": (lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors", ["999 bytes", "expected 1"]),
    "weights grown": (lambda b: (b / "fusar_modules.safetensors").open("ab").write(b"\0" * 8),
                      "fusar_modules.safetensors", ["bytes", "expected"]),
    "config edited": (lambda b: _edit_json(b / "config.json", ["text_config", "hidden_size"], 8192),
                      "config.json", ["bytes", "expected"]),
    "file deleted": (lambda b: (b / "tokenizer_config.json").unlink(), "tokenizer_config.json", ["missing"]),
    "weight file not listed": (lambda b: shutil.copy(b / "model.safetensors", b / "model-00002-of-00002.safetensors"),
                               "model-00002-of-00002.safetensors", ["not listed", "manifest.json"]),
    "onnx file not listed": (lambda b: (b / "onnx").mkdir() or (b / "onnx" / "decoder.onnx").write_bytes(b"x"),
                             "onnx/decoder.onnx", ["not listed"]),
}


@pytest.mark.parametrize("case", list(SIZE_FAULTS))
def test_every_open_checks_the_manifest(bundle, image, capsys, never_built, case):
    breaker, name, words = SIZE_FAULTS[case]
    breaker(bundle)
    for opener in (load_bundle, open_model, describe):
        with pytest.raises(BundleError) as exc:
            opener(bundle)
        one_line(exc, bundle / name, *words)
    cli_error(capsys, ask(image, bundle), bundle / name, *words)
    cli_error(capsys, ["info", bundle], bundle / name, *words)


def test_unlisted_other_files_are_fine_at_open_but_not_for_verify(bundle, capsys):
    (bundle / "notes.txt").write_text("mine")
    describe(bundle)
    load_bundle(bundle)
    out, err = verify_fails(capsys, bundle)
    assert out == [f"{bundle / 'notes.txt'}: not listed in manifest.json"] and "1 problem(s)" in err


@pytest.mark.parametrize("bad, words", [
    ({"files": []}, ["files"]),
    ({"files": {"../outside.bin": {"sha256": "0" * 64, "bytes": 1}}}, ["../outside.bin", "inside the bundle"]),
    ({"files": {"/etc/passwd": {"sha256": "0" * 64, "bytes": 1}}}, ["/etc/passwd", "inside the bundle"]),
    ({"files": {"config.json": {"sha256": "xyz", "bytes": 1}}}, ["files.config.json", "sha256"]),
    ({"files": {"config.json": {"sha256": "0" * 64, "bytes": True}}}, ["files.config.json", "bytes"]),
])
def test_malformed_manifest_is_one_line(bundle, capsys, bad, words):
    (bundle / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle)
    one_line(exc, bundle / "manifest.json", *words)
    cli_error(capsys, ["verify", bundle], bundle / "manifest.json", *words)
    (bundle / "manifest.json").write_text("{")
    cli_error(capsys, ["info", bundle], bundle / "manifest.json", "JSON")


# --- full verification --------------------------------------------------------------------------

def test_verify_ok_is_one_line_and_json(saved, capsys):
    assert main(["verify", str(saved)]) == 0
    cap = capsys.readouterr()
    lines = cap.out.strip().splitlines()
    n = len(json.loads((saved / "manifest.json").read_text())["files"])
    size = sum(p.stat().st_size for p in saved.iterdir() if p.name != "manifest.json")
    assert len(lines) == 1 and lines[0] == (f"{saved}: OK, {n} files, {size} bytes match manifest.json; "
                                            f"weights {content_id(saved)}")
    assert main(["verify", str(saved), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"bundle": str(saved), "ok": True, "files": n, "bytes": size, "weights": content_id(saved),
                      "problems": []}


def test_verify_lists_every_problem_then_one_error(bundle, capsys):
    flip_byte(bundle / "model.safetensors")  # same size: only the hash can tell
    (bundle / "tokenizer_config.json").unlink()
    shutil.copy(bundle / "fusar_modules.safetensors", bundle / "extra.safetensors")
    (bundle / "config.json").write_text((bundle / "config.json").read_text() + " ")
    out, err = verify_fails(capsys, bundle)
    assert len(out) == 4
    assert any(line.startswith(f"{bundle / 'model.safetensors'}: sha256 ") and "manifest.json records" in line
               for line in out)
    assert f"{bundle / 'tokenizer_config.json'}: missing (listed in manifest.json)" in out
    assert f"{bundle / 'extra.safetensors'}: not listed in manifest.json" in out
    assert any(line.startswith(f"{bundle / 'config.json'}: size ") for line in out)
    assert err.startswith(f"fusar-edge: error: {bundle}: 4 problem(s)")
    assert main(["verify", str(bundle), "--json"]) == 2
    cap = capsys.readouterr()
    report = json.loads(cap.out)
    assert not report["ok"] and report["weights"] is None  # a listed file is missing: no id at all
    assert sorted(p["problem"] for p in report["problems"]) == ["missing", "sha256", "size", "unexpected"]


def test_damage_of_the_same_size_is_found_by_verify_never_reported_as_the_good_id(saved, bundle, image, capsys):
    good = content_id(saved)
    flip_byte(bundle / "model.safetensors")
    assert open_model(bundle)[2] == good  # sizes only: the cheap check cannot see it (documented)
    result = manifest_mod.verify(bundle)
    assert not result.ok and result.weights == content_id(bundle) != good  # computed from what is on disk
    with pytest.raises(BundleError) as exc:
        open_model(bundle, verify=True)
    one_line(exc, bundle / "model.safetensors", "sha256", "fusar-edge verify")
    from fusar_edge.runtime import Runtime

    with pytest.raises(BundleError):
        Runtime.open(bundle, verify=True, device="cpu")
    cli_error(capsys, ask(image, bundle, "--verify"), bundle / "model.safetensors", "sha256")
    out, err = verify_fails(capsys, bundle)
    assert len(out) == 1 and out[0].startswith(f"{bundle / 'model.safetensors'}: sha256 ") and out[0] in err


def test_ask_verify_on_a_good_bundle_gives_the_same_id(saved, image, capsys):
    from fusar_edge.runtime import Runtime

    assert Runtime.open(saved, verify=True, device="cpu").weights == content_id(saved)
    assert main(ask(image, saved, "--verify", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["model"]["weights"] == content_id(saved)
    cli_error(capsys, ask(image, "tiny", "--verify"), "tiny", "preset", "nothing to verify")
    cli_error(capsys, ["verify", "tiny"], "tiny", "not a directory")


def test_verify_shows_progress_for_large_bundles(saved, capsys, monkeypatch):
    monkeypatch.setattr(manifest_mod, "LARGE_BUNDLE", 0)
    assert main(["verify", str(saved)]) == 0
    cap = capsys.readouterr()
    assert "verifying" in cap.err and len(cap.out.strip().splitlines()) == 1


# --- config.json and fusar.json: types and ranges ------------------------------------------------

CONFIG_FAULTS = {
    # name: (file, key path, value, words the line must hold besides file and key)
    "hidden not a number": ("config.json", ["text_config", "hidden_size"], "big", ["1..16384", "'big'"]),
    "hidden a list": ("config.json", ["text_config", "hidden_size"], [64], ["1..16384", "[64]"]),
    "heads a bool": ("config.json", ["text_config", "num_attention_heads"], True, ["1..256", "True"]),
    "a million layers": ("config.json", ["text_config", "num_hidden_layers"], 10**6, ["1..256", "1000000"]),
    "vocab of 10**9": ("config.json", ["text_config", "vocab_size"], 10**9, ["1..1000000"]),
    "huge mlp": ("config.json", ["text_config", "intermediate_size"], 10**7, ["1..131072"]),
    "context of 10**8": ("config.json", ["text_config", "max_position_embeddings"], 10**8, ["1..1048576"]),
    "kv heads not dividing": ("config.json", ["text_config", "num_key_value_heads"], 3, ["divisor", "4"]),
    "vit depth a string": ("config.json", ["vision_config", "depth"], "2", ["1..256"]),
    "vit width absurd": ("config.json", ["vision_config", "hidden_size"], 10**6, ["1..16384"]),
    "legacy flat key": ("config.json", ["hidden_size"], "big", ["1..16384"]),
    "token id outside the vocabulary": ("config.json", ["image_token_id"], 10**7, ["0..1023"]),
    "10**9 new tokens": ("fusar.json", ["max_new_tokens"], 10**9, ["1..1048576"]),
    "more new tokens than context": ("fusar.json", ["max_new_tokens"], 5000, ["4096", "max_position_embeddings"]),
    "chip of 10**6 px": ("fusar.json", ["chip_size"], 10**6, ["1..8192"]),
    "chip a string": ("fusar.json", ["chip_size"], "224", ["1..8192", "'224'"]),
    "chip a bool": ("fusar.json", ["chip_size"], True, ["1..8192"]),
    "sigma a string": ("fusar.json", ["tlm", "sigma"], "2", ["tlm.sigma"]),
    "hidden_mult absurd": ("fusar.json", ["tlm", "hidden_mult"], 10**6, ["tlm.hidden_mult", "1..64"]),
    "grasp grid of one": ("fusar.json", ["grasp", "grid"], [2], ["grasp.grid", "[rows, cols]"]),
    "grasp proj absurd": ("fusar.json", ["grasp", "proj_dim"], 10**7, ["grasp.proj_dim", "1..16384"]),
    "years a string": ("fusar.json", ["aef_years"], "2020", ["aef_years"]),
    "untrained a string": ("fusar.json", ["untrained"], "yes", ["untrained", "true or false"]),
}


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_config_values_are_checked_before_anything_is_built(bundle, image, capsys, never_built, case):
    name, keys, value, words = CONFIG_FAULTS[case]
    _edit_json(bundle / name, keys, value)
    write_manifest(bundle)  # the bundle was written so: the manifest agrees, the value is wrong
    key = keys[-1]
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle)
    one_line(exc, bundle / name, key, *words)
    cli_error(capsys, ask(image, bundle), bundle / name, key, *words)
    cli_error(capsys, ["info", bundle], bundle / name, key, *words)


def test_ask_max_new_tokens_is_bounded_by_the_context(image, capsys):
    cli_error(capsys, ["ask", image, "How many?", "--bundle", "tiny", "--no-anchors", "--max-new-tokens", 10**9],
              "max_new_tokens", "1..4096", "1000000000")


# Qwen/Qwen2.5-VL-72B-Instruct's config.json (flat legacy layout), the largest of the family.
QWEN_72B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 29568, "max_position_embeddings": 128000,
    "max_window_layers": 80, "model_type": "qwen2_5_vl", "num_attention_heads": 64, "num_hidden_layers": 80,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3456,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 8192, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_real_qwen_configs_are_within_the_ranges(tmp_path):
    from fusar_edge.config import FusarConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN_72B))
    backbone = load_backbone_json(path)
    assert backbone["text_config"]["hidden_size"] == 8192 and backbone["text_config"]["num_hidden_layers"] == 80
    cfg = FusarConfig(name="72b", backbone=backbone, max_new_tokens=2048)
    cfg.validate()
    for name in ("qwen2.5-vl-3b", "qwen2.5-vl-7b"):
        preset(name).validate()


# --- tensor shapes from the headers, before allocation ---------------------------------------------

def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_config_claiming_a_bigger_model_fails_from_the_headers(bundle, image, capsys, never_built):
    """A 1 MB bundle whose config.json claims hidden 8192: refused before anything is allocated
    (building it would take ~1.5 GB)."""
    _edit_json(bundle / "config.json", ["text_config", "hidden_size"], 8192)
    _edit_json(bundle / "config.json", ["vision_config", "out_hidden_size"], 8192)
    write_manifest(bundle)
    assert sum(p.stat().st_size for p in bundle.iterdir()) < 2 << 20
    measured = _peak_rss_reset()
    before = _peak_rss_mb() if measured else 0.0
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle)
    msg = one_line(exc, bundle / "model.safetensors", bundle / "config.json", "mismatched")
    assert re.search(r"\[\d+, 64\] in the file, \[\d+, 8192\] expected", msg), msg
    if measured:
        assert _peak_rss_mb() - before < 300, "the claimed model was allocated"
    cli_error(capsys, ask(image, bundle), bundle / "model.safetensors", "8192]", "mismatched")


def test_fusar_module_shapes_are_checked_from_the_header(bundle, never_built):
    _edit_json(bundle / "fusar.json", ["grasp", "proj_dim"], 16)
    write_manifest(bundle)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle)
    one_line(exc, bundle / "fusar_modules.safetensors", "grasp.", "[32", "[16", "fusar.json")
