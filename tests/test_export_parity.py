"""The export's parity checks gate publishing: a failed check writes nothing unless --force.

The fp32 ONNX stages of `tiny` are exported once for the module (the slow part, ~20 s) and
copied into each export, so every test runs the real GPTQ, the real 4-bit packing and the
real parity checks in a few seconds.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import fusar_edge.export.int4_onnx as int4_onnx  # noqa: E402
import fusar_edge.export.onnx_stages as onnx_stages  # noqa: E402
from conftest import one_line  # noqa: E402
from fusar_edge.cli import main  # noqa: E402
from fusar_edge.errors import FusarError  # noqa: E402
from fusar_edge.export.bundle_export import export_bundle  # noqa: E402
from fusar_edge.hashing import sha256_file  # noqa: E402

GPTQ4 = ["--gptq4", "--calib", "2", "--group-size", "64"]  # tiny's layers are 64 wide


@pytest.fixture(scope="module")
def tiny_stages(tmp_path_factory):
    from fusar_edge.model.bundle import open_model

    model, _, _ = open_model("tiny", dtype=torch.float32, device="cpu")  # what `export tiny` loads
    return onnx_stages.export_stages(model.eval(), tmp_path_factory.mktemp("tiny_stages") / "onnx")


@pytest.fixture
def reuse_stages(monkeypatch, tiny_stages):
    src = tiny_stages["config"].parent

    def export_stages(model, out_dir, progress=None):
        shutil.copytree(src, out_dir)
        return {k: Path(out_dir) / v.name for k, v in tiny_stages.items() if isinstance(v, Path)}

    monkeypatch.setattr(onnx_stages, "export_stages", export_stages)


@pytest.fixture
def wrong_scales(monkeypatch):
    """A packing bug: one layer's scales 5% off in every graph the packer writes."""
    real = int4_onnx.quantize_onnx_model

    def packer(model, weights, *args, **kwargs):
        name = sorted(weights)[0]
        bad = dict(weights, **{name: dataclasses.replace(weights[name], scales=weights[name].scales * 1.05)})
        return real(model, bad, *args, **kwargs)

    monkeypatch.setattr(int4_onnx, "quantize_onnx_model", packer)


def test_correct_packing_passes_and_each_error_is_reported(tmp_path, reuse_stages, capsys):
    out = tmp_path / "int4"
    assert main(["export", "tiny", "--out", str(out), *GPTQ4]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert report["failed_checks"] == []
    int4 = report["artifacts"]["onnx-int4"]
    packing = int4["packing_check"]
    assert packing["ok"] and packing["gates_export"] and packing["accuracy_level"] == 0
    assert packing["tolerance"] == 1e-4 and packing["max_rel_err"]["prefill_logits"] < 1e-5
    level4, quant = int4["accuracy_level_4_vs_dequantised"], int4["quantisation_vs_fp32"]
    prefill8 = int4["int8_prefill_vs_dequantised"]
    for measured in (level4, quant, prefill8):  # measurements, not verdicts
        assert "ok" not in measured and not measured["gates_export"] and measured["what"]
    # each measures something real: far above what the packing itself adds
    assert level4["max_rel_err"]["prefill_logits"] > 100 * packing["max_rel_err"]["prefill_logits"]
    assert quant["max_rel_err"]["prefill_logits"] > 100 * packing["max_rel_err"]["prefill_logits"]
    # prompts on the int8 graph: a different error than level 4's (other kernels, per-token activations),
    # of the same order, and the greedy answers agree as level 4's do
    assert prefill8["max_rel_err"]["prefill_logits"] != level4["max_rel_err"]["prefill_logits"]
    assert prefill8["max_rel_err"]["prefill_logits"] < 3 * level4["max_rel_err"]["prefill_logits"]
    # tiny's random weights leave near-ties that either error can flip (the trained demo's answers:
    # benchmarks/results/eval-demo-vm.md, the 4-bit export's rows)
    assert prefill8["greedy"]["token_agreement"] >= 0.5
    assert "onnx-int4: the same with prompts on the int8 prefill graph (measured only): worst relative error" in said
    stages = json.loads((out / "onnx-int4" / "stages.json").read_text())
    assert stages["stages"]["decoder_prefill"]["file"] == "decoder-prefill.onnx"
    assert "decoder-prefill.onnx" in stages["files"] and "decoder_prefill" in stages["weights"]
    assert "onnx: parity ok: worst relative error" in said
    assert "onnx-int4: packing check (accuracy level 0 vs dequantised torch) ok: " in said
    assert "onnx-int4: accuracy level 4 + 8-bit LM head vs dequantised torch (measured only): worst relative error" in said
    assert "onnx-int4: 4-bit quantisation vs fp32 torch (measured only): worst relative error" in said
    assert "--force" not in said
    assert not (out / "onnx-int4-qdq").exists()  # the TensorRT QDQ form is retired (Edge-LLM builds the LLM)
    for folder in ("onnx", "onnx-int4"):  # each stages.json describes its own files
        records = json.loads((out / folder / "stages.json").read_text())["files"]
        assert {name: sha256_file(out / folder / name) for name in records} == {
            name: r["sha256"] for name, r in records.items()}, folder
    # the level-0 graph was only for the check
    assert not [p for p in out.rglob("*") if "packing-check" in p.name]
    assert not [f for f in json.loads((out / "manifest.json").read_text())["files"] if "packing-check" in f]
    assert not [p for p in out.rglob("*") if "activation-probe" in str(p)]  # the smoothing's probe graph neither


def test_no_int8_prefill_leaves_the_prompt_graph_out(tmp_path, reuse_stages, capsys):
    out = tmp_path / "int4"
    assert main(["export", "tiny", "--out", str(out), *GPTQ4, "--no-int8-prefill"]) == 0
    assert "int8 prefill" not in capsys.readouterr().out
    int4 = json.loads((out / "export.json").read_text())["artifacts"]["onnx-int4"]
    assert "int8_prefill_vs_dequantised" not in int4 and int4["accuracy_level_4_vs_dequantised"]
    stages = json.loads((out / "onnx-int4" / "stages.json").read_text())
    assert "decoder_prefill" not in stages["stages"] and not (out / "onnx-int4" / "decoder-prefill.onnx").exists()


def test_wrong_packing_fails_the_export_and_writes_nothing(tmp_path, reuse_stages, wrong_scales):
    with pytest.raises(FusarError) as exc:
        export_bundle("tiny", tmp_path / "int4", gptq4=True, calib=2, group_size=64, parity_prompts=2)
    one_line(exc, "4-bit packing check", "accuracy level 0", "above 0.0001", "--force", "nothing written")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the work folder


def test_force_writes_a_failed_packing_and_records_it(tmp_path, reuse_stages, wrong_scales, capsys):
    out = tmp_path / "int4"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    assert main(["export", "tiny", "--out", str(out), *GPTQ4, "--force"]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "export.json").read_text())
    assert not (out / "keep.txt").exists() and (out / "onnx-int4" / "decoder.onnx").is_file()
    assert not report["artifacts"]["onnx-int4"]["packing_check"]["ok"]
    assert report["artifacts"]["onnx"]["parity"]["ok"]  # only the 4-bit packing was broken
    assert len(report["failed_checks"]) == 1 and "4-bit packing check" in report["failed_checks"][0]
    assert "packing check (accuracy level 0 vs dequantised torch) FAILED: " in said
    assert "WRITTEN WITH --force DESPITE: 4-bit packing check" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int4"]


def _failed_parity(*args, **kwargs):
    return {"dtype": "float32", "tolerance": 1e-4, "ok": False,
            "max_rel_err": {"vision": 1e-7, "prefill_logits": 3.2e-3, "decode_logits": 2e-3},
            "greedy": {"identical_sequences": 2, "of": 3, "token_agreement": 0.9375}}


def test_fp32_onnx_parity_failure_fails_the_export(tmp_path, monkeypatch, reuse_stages):
    """The fp32 graphs' own check gates too, before GPTQ runs (the parity is stubbed: the gate is tested)."""
    monkeypatch.setattr(onnx_stages, "parity_report", _failed_parity)
    out = tmp_path / "onnx"
    with pytest.raises(FusarError) as exc:
        export_bundle("tiny", out, onnx=True, gptq4=True, calib=2, group_size=64)
    one_line(exc, "onnx/ parity check", "3.20e-03 (prefill_logits, above 0.0001)", "2/3 prompts", "94%", "--force")
    assert list(tmp_path.iterdir()) == []
    report = export_bundle("tiny", out, onnx=True, force=True)
    assert report["failed_checks"] and "onnx/ parity check" in report["failed_checks"][0]
    assert json.loads((out / "export.json").read_text())["artifacts"]["onnx"]["parity"]["ok"] is False
