"""`fusar-edge export`: refuses to overwrite, leaves nothing behind on failure, writes a hashed bundle."""

import json

import pytest

from fusar_edge.cli import main
from fusar_edge.model.bundle import sha256


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    assert main(["export", "tiny", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "previous export"


def test_failed_export_leaves_nothing(tmp_path, monkeypatch, capsys):
    import fusar_edge.export.onnx_stages as stages

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of the export")

    monkeypatch.setattr(stages, "export_stages", boom)
    with pytest.raises(RuntimeError):
        main(["export", "tiny", "--out", str(tmp_path / "out"), "--json"])
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp directory


def test_failed_forced_export_keeps_the_old_one(tmp_path, monkeypatch):
    import fusar_edge.export.onnx_stages as stages

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    monkeypatch.setattr(stages, "export_stages", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        main(["export", "tiny", "--out", str(out), "--force", "--json"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "keep.txt").read_text() == "previous export"


def test_export_tiny_end_to_end(tmp_path, capfd):
    out = tmp_path / "tiny-onnx"
    assert main(["export", "tiny", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    report = json.loads((out / "export.json").read_text())
    # progress names the output, never the temporary work folder; no exporter registry noise
    said = captured.out + captured.err
    assert f"to {out}/onnx" in said and ".export-" not in said and "torchvision" not in said
    parity = report["artifacts"]["onnx"]["parity"]
    assert parity["ok"] and parity["greedy"]["token_agreement"] == 1.0
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert {"onnx/decoder.onnx", "onnx/vision.onnx", "export.json", "model.safetensors"} <= set(manifest)
    for rel, entry in manifest.items():  # every file hashed, sub-folders included
        assert sha256(out / rel) == entry["sha256"]
    assert json.loads((out / "export.json").read_text())["artifacts"]["onnx"]["parity"]["ok"]
    # the same export again is the same model: no file records how long its run took
    again = tmp_path / "tiny-onnx-again"
    assert main(["export", "tiny", "--out", str(again)]) == 0
    from fusar_edge.model.manifest import check_bundle

    assert check_bundle(again) == check_bundle(out)


class _Spy:
    """An ONNX Runtime session that counts its IO-binding runs."""

    def __init__(self, session):
        self.session, self.runs = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run_with_iobinding(self, io):
        self.runs += 1
        return self.session.run_with_iobinding(io)


def test_export_gptq4_writes_every_form_and_runs_4bit(tmp_path, capsys, monkeypatch):
    from fusar_edge.geo.synthetic import write_demo_scene
    from fusar_edge.runtime import Runtime
    from fusar_edge.export.gptq_format import load_gptq_checkpoint

    out = tmp_path / "tiny-int4"
    # tiny's layers are 64 wide: a group of 128 is refused before any work, and with no
    # --group-size the export picks 64
    assert main(["export", "tiny", "--out", str(out), "--gptq4", "--group-size", "128"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--group-size 128" in err[0] and "use --group-size 64" in err[0], err
    assert not out.exists()
    assert main(["export", "tiny", "--out", str(out), "--gptq4", "--calib", "4", "--json"]) == 0
    arts = json.loads(capsys.readouterr().out)["artifacts"]
    assert arts["gptq"]["group_size"] == 64
    assert set(arts) == {"onnx", "gptq", "onnx-int4"}  # no TensorRT QDQ decoder any more
    assert arts["onnx-int4"]["quantized_layers"] == arts["gptq"]["summary"]["linears"] > 0
    assert arts["onnx-int4"]["packing_check"]["ok"]  # fp32 compute: the packing matches the dequantised model
    parity = arts["onnx-int4"]["accuracy_level_4_vs_dequantised"]
    assert parity["greedy"]["token_agreement"] >= 0.9  # MatMulNBits accuracy level 4: int8 activations
    weights = load_gptq_checkpoint(out / "gptq")
    assert len(weights) == arts["gptq"]["summary"]["linears"]
    scene = write_demo_scene(tmp_path / "scene", size=64, seed=3)
    ans = Runtime.open(out, backend="onnxruntime").ask(scene["scene_tif"], "How many ships?", max_new_tokens=4,
                                                     anchors=scene["anchors"])
    assert ans.model["onnx"] == "onnx-int4"
    # the prompt ran on the int8 prefill graph (CPU), the decode steps on the 4-bit one; without it, the same
    # export still runs (and so does an export made with --no-int8-prefill: no such file, no such stage).
    # Forced: by default only CPUs with VNNI or AMX take it (int8_gemm_kind), and CI's may have neither
    monkeypatch.setenv("FUSAR_ORT_PREFILL", "int8")
    rt = Runtime.open(out, backend="onnxruntime")
    assert rt.stages.prefill_session is not None
    spy = rt.stages.prefill_session = _Spy(rt.stages.prefill_session)
    again = rt.ask(scene["scene_tif"], "How many ships?", max_new_tokens=4, anchors=scene["anchors"])
    assert spy.runs >= 1 and again.model["prompt_graph"] == "int8 (decoder-prefill.onnx)"
    # a prompt's numbers do not depend on its batch (activations quantised per token): alone = in a batch of 2
    import numpy as np

    from fusar_edge.model.rope import text_positions

    embeds = rt.stages.to_numpy(rt.stages.embed(np.arange(5, 25)[None]))
    alone, _ = rt.stages.prefill_batch(embeds, text_positions(0, 20))
    pair, _ = rt.stages.prefill_batch(np.concatenate([embeds, embeds * 0.5]), text_positions(0, 20))
    np.testing.assert_allclose(pair[0], alone[0], rtol=1e-5, atol=1e-5 * np.abs(alone).max())
    monkeypatch.setenv("FUSAR_ORT_PREFILL", "int4")
    plain = Runtime.open(out, backend="onnxruntime")
    assert plain.stages.prefill_session is None
    assert "prompt_graph" not in plain.ask(scene["scene_tif"], "How many ships?", max_new_tokens=4,
                                           anchors=scene["anchors"]).model
    from fusar_edge.backends.onnxruntime import OnnxStages
    from fusar_edge.errors import FusarError

    assert OnnxStages(out / "onnx-int4", device="cpu", int8_prefill=False).prefill_session is None
    # `info` says what can run the exported bundle
    assert main(["info", str(out), "--json"]) == 0
    backends = json.loads(capsys.readouterr().out)["backends"]
    assert set(backends) == {"torch", "onnx", "onnx-int4", "gptq"}
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnx-int4: onnxruntime (GPTQ 4-bit, MatMulNBits)" in text and "{" not in text.split("files")[-1]
    (out / "onnx-int4" / "decoder-prefill.onnx").unlink()  # listed in stages.json, gone: one clear line
    with pytest.raises(FusarError, match="decoder-prefill.onnx: missing"):
        OnnxStages(out / "onnx-int4", device="cpu")


def test_tensorrt_engine_build_is_retired(tmp_path, capsys):
    """--tensorrt built engines from our own QDQ decoder; Edge-LLM builds the LLM now (--edgellm)."""
    assert main(["export", "tiny", "--out", str(tmp_path / "trt"), "--tensorrt"]) == 2
    assert "unrecognized arguments: --tensorrt" in capsys.readouterr().err
    assert main(["ask", "x.png", "q", "--backend", "tensorrt"]) == 2
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_relative_out_and_the_report(tmp_path, monkeypatch, capsys):
    """`export --out rel` from any directory: the report's file names are relative strings.

    The ONNX export and its parity check are stubbed (the full export runs above); what is
    tested is the bookkeeping around them, which a relative --out used to break after the
    whole export had run."""
    import fusar_edge.export.onnx_stages as stages

    def export_stages(model, out_dir, progress=None):
        out_dir.mkdir(parents=True)
        (out_dir / "vision.onnx").write_bytes(b"graph")
        return {"vision": out_dir / "vision.onnx"}

    monkeypatch.setattr(stages, "export_stages", export_stages)
    monkeypatch.setattr(stages, "parity_report", lambda *a, **k: {"ok": True})
    monkeypatch.chdir(tmp_path)
    assert main(["export", "tiny", "--out", "rel", "--onnx", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifacts"]["onnx"]["files"] == {"vision": "onnx/vision.onnx"}
    from fusar_edge.export.report_json import without_timings

    # the file is the printed report less its timings (they would make two exports two weights ids)
    assert json.loads((tmp_path / "rel" / "export.json").read_text()) == without_timings(report)
    assert "seconds" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel"]


def test_gptq_flags_without_gptq_are_refused(tmp_path, capsys):
    for flag, value in (("--calib", "4"), ("--group-size", "64")):
        assert main(["export", "tiny", "--out", str(tmp_path / "x"), flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag}: only with --gptq4 or --edgellm" in err[0], err
    assert list(tmp_path.iterdir()) == []
    assert main(["info", "--json"]) == 0  # no argument: the built-in demo
    assert json.loads(capsys.readouterr().out)["kind"] == "bundle"


def test_no_int8_prefill_only_with_gptq4(tmp_path, capsys):
    assert main(["export", "tiny", "--out", str(tmp_path / "x"), "--no-int8-prefill"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-int8-prefill: only with --gptq4" in err[0], err
    assert not (tmp_path / "x").exists()
