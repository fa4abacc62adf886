"""`fusar-edge ask` / `info` / `sample` end to end on the tiny preset, and every bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fusar_edge.cli import main
from fusar_edge.geo.synthetic import write_demo_scene

ASK_KEYS = {"answer", "text", "task", "question", "anchor", "timings_ms", "parse_error", "flags", "image", "model",
            "grasp_weights", "token_ids"}
ANCHOR_KEYS = {"source", "crs", "bounds", "date", "year", "coverage", "count"}
STAGES = {"preprocess", "anchors", "vision", "fusion", "prefill", "decode", "decode_per_token", "parse", "total"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_scene(tmp_path_factory.mktemp("demo"), size=128, seed=1)


def ask_json(capsys, *argv):
    """`ask --json` on the tiny preset (random weights) unless argv names a bundle."""
    if "--bundle" not in argv:
        argv = (*argv, "--bundle", "tiny")
    assert main(["ask", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, "ask --json must print exactly one line"
    return json.loads(out[0])


def test_ask_json_schema_with_anchors(demo, capsys):
    res = ask_json(capsys, demo["scene_tif"], "How many ships are there?", "--anchors", demo["anchors"])
    assert set(res) == ASK_KEYS
    assert res["task"] == "count"
    assert res["answer"] is None or isinstance(res["answer"], int)
    assert isinstance(res["text"], str)
    assert set(res["anchor"]) >= ANCHOR_KEYS
    a = res["anchor"]
    assert a["source"].startswith("file:") and a["count"] == 64 and a["crs"] == "EPSG:32631"
    assert a["year"] == 2023 and 0.9 < a["coverage"] < 1.0
    assert a["bounds"] == pytest.approx(list(demo["bounds"]))
    assert a["tlm"] == "applied"
    assert len(res["token_ids"]) == res["model"]["new_tokens"] and all(isinstance(t, int) for t in res["token_ids"])
    assert res["model"]["generation"]["repetition_penalty"] == 1.0  # a preset has no generation_config.json
    assert res["model"]["prompt_style"] == "templates" and res["model"]["prompt"].startswith("This is a SAR image.")
    assert set(res["timings_ms"]) == STAGES and all(v >= 0 for v in res["timings_ms"].values())
    assert res["model"]["weights"] == "random" and res["model"]["new_tokens"] <= res["model"]["max_new_tokens"]
    assert len(res["grasp_weights"]) == 4 and abs(sum(res["grasp_weights"]) - 1) < 1e-5


def test_tlm_bundle_without_anchors_refuses_and_names_the_way_out(demo, capsys):
    """The reference raises when AEF is missing; so do we, unless asked to skip TLM."""
    assert main(["ask", demo["scene_png"], "Detect the ships"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusar-edge: error: ") and "--no-anchors" in err[0]
    assert "scene.png" in err[0] and "--anchors" in err[0] and "--tiles" in err[0]

    res = ask_json(capsys, demo["scene_png"], "Detect the ships", "--no-anchors")
    assert res["task"] == "detect"
    assert res["anchor"]["source"] == "none" and res["anchor"]["count"] == 0
    assert res["anchor"]["tlm"] == "skipped" and "no_anchors" in res["anchor"]["notes"][0]
    assert res["answer"] is None or isinstance(res["answer"], list)
    # --no-anchors and an anchor source contradict each other
    assert main(["ask", demo["scene_png"], "q", "--no-anchors", "--anchors", demo["anchors"]]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_every_anchor_masked_is_refused_unless_no_anchors(demo, tmp_path):
    from fusar_edge.errors import AnchorError
    from fusar_edge.geo.anchors import AnchorSet
    from fusar_edge.runtime import Runtime

    full = AnchorSet.load(demo["anchors"])
    masked = AnchorSet(full.features, full.positions, np.zeros(full.size, dtype=bool))
    rt = Runtime.open("tiny")
    with pytest.raises(AnchorError) as exc:
        rt.ask(demo["scene_tif"], "How many ships?", anchors=masked, max_new_tokens=2)
    assert "every anchor is masked" in str(exc.value) and "--no-anchors" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_anchors_change_the_answer_path_and_runs_are_deterministic(demo, capsys):
    from fusar_edge.runtime import Runtime

    rt = Runtime.open("tiny")
    with_a = rt.ask(demo["scene_tif"], "Describe the image.", anchors=demo["anchors"], max_new_tokens=8)
    again = rt.ask(demo["scene_tif"], "Describe the image.", anchors=demo["anchors"], max_new_tokens=8)
    assert with_a.text == again.text and with_a.model["new_tokens"] <= 8
    import torch

    from fusar_edge.geo.anchors import AnchorSet
    from fusar_edge.geo.chip import to_chip
    from fusar_edge.geo.sar import read_sar
    from fusar_edge.model.preprocess import chip_to_patches

    pixels, grid = chip_to_patches(to_chip(read_sar(demo["scene_tif"]), rt.config.chip_size))
    with torch.no_grad():
        plain = rt.model.vision(pixels, grid)
        tlm = rt.model.vision(pixels, grid, AnchorSet.load(demo["anchors"]).to_torch())
    assert not torch.allclose(plain, tlm)  # the anchors reach the visual tokens


def test_task_flag_bbox_and_date_for_plain_png(demo, capsys):
    res = ask_json(capsys, demo["scene_png"], "What is in the image?", "--task", "count", "--bbox", "3.0", "54.0",
                   "3.1", "54.1", "--date", "2021-06-01", "--max-new-tokens", "3", "--no-anchors")
    assert res["task"] == "count"
    assert res["anchor"]["bounds"] == [3.0, 54.0, 3.1, 54.1] and res["anchor"]["date"] == "2021-06-01"
    assert res["model"]["new_tokens"] <= 3


def test_detections_are_mapped_to_original_pixels(tmp_path, monkeypatch):
    """The runtime hands the original image size to the parser: a 300x150 image, chip 224."""
    from fusar_edge.runtime import Runtime

    img = tmp_path / "wide.npy"
    np.save(img, np.random.default_rng(0).random((150, 300)).astype(np.float32) + 0.1)
    rt = Runtime.open("tiny")
    monkeypatch.setattr(rt.tokenizer, "decode", lambda ids: '[{"bbox_2d": [0, 112, 112, 224], "label": "ship"}]')
    ans = rt.ask(img, "Detect the ships", max_new_tokens=2, no_anchors=True)
    assert ans.answer == [{"bbox_2d": [0.0, 75.0, 150.0, 150.0], "bbox_chip": [0, 112, 112, 224], "label": "ship"}]


def test_text_output_and_info(demo, capsys):
    assert main(["ask", demo["scene_tif"], "How many ships are there?", "--max-new-tokens", "2", "--bundle", "tiny",
                 "--anchors", demo["anchors"]]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("answer: ") and "task: count" in out.out
    assert "not meaningful" in out.err
    assert main(["info", "tiny", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["chip_size"] == 224 and info["visual_tokens"] == 64


def test_a_folder_named_like_a_preset_says_it_hides_the_preset(tmp_path, capsys, monkeypatch):
    (tmp_path / "demo").mkdir()  # what `fusar-edge sample demo` makes in the quick start
    monkeypatch.chdir(tmp_path)
    assert main(["info", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "demo/fusar.json: missing" in err and "not the preset" in err
    assert main(["info", str(tmp_path / "demo")]) == 2  # a path, not a bare name: no preset meant
    assert "not the preset" not in capsys.readouterr().err


def test_sample_writes_demo(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "d"), "--size", "64"]) == 0
    assert (tmp_path / "d" / "scene.tif").is_file() and (tmp_path / "d" / "anchors.npz").is_file()


def test_console_script_version_and_help():
    exe = [sys.executable, "-m", "fusar_edge.cli"]
    assert subprocess.run([*exe, "--version"], capture_output=True, text=True).stdout.startswith("fusar-edge ")
    helptext = subprocess.run([*exe, "ask", "--help"], capture_output=True, text=True).stdout
    assert "--anchors" in helptext and "examples:" in helptext and "not meaningful" in helptext


# --- bad input: one line, exit code 2, no traceback --------------------------------------

def _bad_inputs(tmp_path, demo):
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(open(demo["scene_tif"], "rb").read()[:300])
    zero = tmp_path / "zero.npy"
    np.save(zero, np.zeros((0, 4), np.float32))
    nan = tmp_path / "nan.npy"
    arr = np.ones((32, 32), np.float32)
    arr[3, 4] = np.nan
    np.save(nan, arr)
    big = tmp_path / "big.npy"
    np.save(big, np.ones((64, 300), np.float32))
    txt = tmp_path / "image.txt"
    txt.write_text("not an image")
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, features=np.ones((4, 32), np.float32), positions=np.zeros((4, 2), np.float32))
    no_bundle = tmp_path / "empty_bundle"
    no_bundle.mkdir()
    tif, q = demo["scene_tif"], "How many ships?"
    return {
        "missing image": ([str(tmp_path / "nope.tif"), q], "nope.tif"),
        "truncated": ([str(truncated), q], "cut.tif"),
        "unsupported": ([str(txt), q], "image.txt"),
        "zero-size": ([str(zero), q], "zero.npy"),
        "nan pixels": ([str(nan), q], "nan.npy"),
        "too large": ([str(big), q, "--max-image-side", "128"], "128"),
        "malformed anchors": ([tif, q, "--anchors", str(bad_npz)], "bad.npz"),
        "missing anchors": ([tif, q, "--anchors", str(tmp_path / "none.npz")], "none.npz"),
        "bundle missing files": ([tif, q, "--bundle", str(no_bundle)], "fusar.json"),
        "bundle not found": ([tif, q, "--bundle", str(tmp_path / "nob")], "nob"),
        "bad date": ([tif, q, "--date", "2021-13-45"], "2021-13-45"),
        "empty question": ([tif, "  "], "question"),
        "zero new tokens": ([tif, q, "--max-new-tokens", "0"], "max_new_tokens"),
        "tiles not yet": ([tif, q, "--tiles", str(tmp_path)], "tile store"),
        "backend not yet": ([tif, q, "--backend", "onnxruntime"], "onnxruntime"),
    }


def test_bad_inputs_give_one_clear_line(tmp_path, demo, capsys):
    for name, (argv, must_mention) in _bad_inputs(tmp_path, demo).items():
        code = main(["ask", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert len(err) == 1 and err[0].startswith("fusar-edge: error: "), (name, err)
        assert must_mention in err[0], (name, err[0])
        assert "Traceback" not in err[0]


def test_debug_shows_traceback(tmp_path, demo):
    from fusar_edge.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", "ask", str(tmp_path / "nope.tif"), "q"])
    with pytest.raises(InputError):  # after the command, where people type it
        main(["ask", str(tmp_path / "nope.tif"), "q", "--debug"])


def test_threads_flag_sets_the_pools_and_keeps_the_answer(demo, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        one = ask_json(capsys, demo["scene_tif"], "How many ships?", "--threads", "1", "--anchors", demo["anchors"],
                       "--bundle", str(demo_bundle()))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    default = ask_json(capsys, demo["scene_tif"], "How many ships?", "--anchors", demo["anchors"],
                       "--bundle", str(demo_bundle()))
    assert one["token_ids"] == default["token_ids"]


def demo_bundle():
    from fusar_edge.config import builtin_bundle

    return builtin_bundle()


def test_device_and_dtype_flags(demo, capsys):
    res = ask_json(capsys, demo["scene_tif"], "How many ships?", "--device", "cpu", "--dtype", "bfloat16",
                   "--max-new-tokens", "2", "--anchors", demo["anchors"])
    assert res["task"] == "count"
    assert main(["ask", demo["scene_tif"], "q", "--device", "tpu7"]) == 2
    assert "device" in capsys.readouterr().err


def test_builtin_default_is_the_trained_demo(demo, capsys, tmp_path):
    from fusar_edge.config import builtin_bundle

    assert (builtin_bundle() / "model.safetensors").is_file()
    res = json.loads(json.dumps(ask_json(capsys, demo["scene_tif"], "How many ships are there?", "--anchors",
                                         demo["anchors"], "--bundle", str(builtin_bundle()))))
    assert main(["ask", demo["scene_tif"], "How many ships are there?", "--anchors", demo["anchors"], "--json"]) == 0
    cap = capsys.readouterr()
    default = json.loads(cap.out)
    assert default["model"]["source"] == "built-in demo" and "untrained" not in default["model"]
    assert default["token_ids"] == res["token_ids"] and default["model"]["weights"] == res["model"]["weights"]
    assert default["model"]["prompt_style"] == "reference" and "not meaningful" not in cap.err


def test_untrained_weights_say_so_even_when_exported(demo, capsys, tmp_path):
    from fusar_edge.model.bundle import build_random, save_bundle
    from fusar_edge.config import preset
    from fusar_edge.tokenizer import TextTokenizer

    model = build_random(preset("tiny"))
    model.config.untrained = True  # what open_model marks for a preset
    save_bundle(model, TextTokenizer.tiny(), tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "fusar.json").read_text())["untrained"] is True
    assert main(["ask", demo["scene_tif"], "How many ships?", "--bundle", str(tmp_path / "copy"), "--anchors",
                 demo["anchors"], "--max-new-tokens", "2", "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["model"]["untrained"] is True and "not meaningful" in cap.err


@pytest.mark.parametrize("flags, words", [
    (["--label", " "], ["label"]),
    (["--repetition-penalty", "0"], ["repetition_penalty", "0"]),
    (["--repetition-penalty", "-1.5"], ["repetition_penalty", "-1.5"]),
    (["--repetition-penalty", "nan"], ["repetition_penalty", "nan"]),
    (["--threads", "0"], ["--threads", "positive integer", "'0'"]),
    (["--threads", "two"], ["--threads", "'two'"]),
])
def test_new_ask_flags_reject_bad_values_in_one_line(demo, capsys, flags, words):
    assert main(["ask", demo["scene_tif"], "How many ships?", "--anchors", demo["anchors"], "--bundle", "tiny",
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusar-edge: error:") and all(w in err[0] for w in words), err


def test_sample_bad_size_and_existing_files(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "s"), "--size", "20"]) == 2
    assert "--size" in capsys.readouterr().err and not (tmp_path / "s" / "scene.tif").exists()
    assert main(["sample", str(tmp_path / "t"), "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "ground truth:" in out and (tmp_path / "t" / "tiles").is_dir()
    before = (tmp_path / "t" / "scene.tif").read_bytes()
    assert main(["sample", str(tmp_path / "t"), "--size", "64", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert (tmp_path / "t" / "scene.tif").read_bytes() == before  # the old sample is untouched
    assert [p.name for p in (tmp_path / "t").iterdir() if p.name.startswith(".")] == []


def _two_band(demo, path):
    """The demo scene as a VV/VH pair: band 2 is band 1 mirrored."""
    import rasterio

    with rasterio.open(demo["scene_tif"]) as src:
        profile, vv, tags = src.profile, src.read(1), src.tags()
    profile.update(count=2)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([vv, vv[:, ::-1]]))
        dst.update_tags(**tags)
    return str(path)


def test_band_flag_and_the_image_record(demo, tmp_path, capsys):
    tif = _two_band(demo, tmp_path / "vv_vh.tif")
    args = (tif, "How many ships?", "--anchors", demo["anchors"], "--max-new-tokens", "2")
    image = ask_json(capsys, *args)["image"]
    assert (image["band"], image["bands"]) == (1, 2)
    assert ask_json(capsys, *args, "--band", "2")["image"]["band"] == 2
    assert main(["ask", *args, "--bundle", "tiny", "--band", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--band" in err[0] and "vv_vh.tif" in err[0] and "2 band" in err[0]


def test_bbox_takes_negative_numbers_and_refuses_non_finite(demo, capsys):
    from fusar_edge.cli import _parser

    for spelled, value in (("-1e-3", -0.001), ("-.5", -0.5), ("-2E1", -20.0), ("-3", -3.0)):
        args = _parser().parse_args(["ask", "x.tif", "q", "--bbox", spelled, "53.9", "3.0", "54.0"])
        assert args.bbox[0] == pytest.approx(value)
    for bad in ("-inf", "inf", "nan", "-Infinity"):
        assert main(["ask", demo["scene_tif"], "q", "--bbox", bad, "53.9", "3.0", "54.0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--bbox" in err[0] and "finite" in err[0], err


def test_os_errors_name_the_output_not_a_hidden_work_folder(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["sample", str(afile / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"fusar-edge: error: {afile}: is a file, where a directory was expected", err
    from fusar_edge.cli import _shown_path

    assert _shown_path("/data/.scene.sample-123-abcd1234/tiles/x.aef") == "/data/scene"
    assert _shown_path("/data/.ds.synth-0a1b2c3d") == "/data/ds"
    assert _shown_path("/data/plain/file") == "/data/plain/file"


def test_a_reader_that_goes_away_is_not_an_error_line():
    """`fusar-edge info B | head -1`: the pipe's reader closed; no 'error: Broken pipe' line."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    proc = subprocess.run([sys.executable, "-m", "fusar_edge.cli", "info", "tiny"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
