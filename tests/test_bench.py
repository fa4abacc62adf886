"""`fusar-edge bench`: the result document, stage accounting, skipped backends, batching.

No timing assertions: these tests check what is measured and reported, not how fast.
"""

import json

import pytest
import torch

from fusar_edge.bench.runner import STAGES, BenchSettings, run_bench
from fusar_edge.cli import main

REQUIRED_STAGES = ("preprocess", "anchors", "vision", "fusion", "prefill", "decode_per_token", "ttft", "end_to_end")
BASELINE_STAGES = ("preprocess", "prefill", "decode_per_token", "ttft", "end_to_end")
PERCENTILES = ("p50_ms", "p90_ms", "p99_ms")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run, torch + baseline on the tiny preset, with JSON and plot."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--runs", "3", "--warmup", "1", "--new-tokens", "4",
                 "--quiet", "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")])
    return code, json.loads((out / "bench.json").read_text()), out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fusar_edge.export.bundle_export import export_bundle

    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_bundle("tiny", out, onnx=True, parity_prompts=1)
    return out


def _check_summary(stats):
    assert set(PERCENTILES) <= set(stats)
    assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    assert stats["stdev_ms"] >= 0 and stats["n"] >= 1


def test_json_schema(cli_run):
    code, result, out = cli_run
    assert code == 0
    m = result["machine"]
    assert m["cpu"] and m["cores"] >= 1 and m["torch_threads"] >= 1 and "torch" in m["versions"]
    assert "commit" in m and isinstance(m["gpus"], list)
    assert set(result["backends"]) == {"torch", "baseline"} and result["skipped"] == {}
    for name, entry in result["backends"].items():
        expected = REQUIRED_STAGES if name == "torch" else BASELINE_STAGES
        assert set(expected) <= set(entry["stages"]), name
        for stats in entry["stages"].values():
            _check_summary(stats)
        assert entry["ttft_ms"] == entry["stages"]["ttft"]["p50_ms"] > 0
        assert entry["decode_tokens_per_s"] == pytest.approx(1000 / entry["stages"]["decode_per_token"]["p50_ms"],
                                                             rel=1e-3)
        assert entry["peak_mem_mb"]["host"] > 0 and entry["peak_mem_mb"]["device"] is None  # no GPU here
        assert entry["weights"] == "random" and entry["model_size_mb"] > 0
        assert len(entry["runs_ms"]) == 3 and entry["stages"]["decode_per_token"]["n"] == 3 * 3
        assert [len(t) for t in entry["tokens"]] == [4]
    assert {"vision", "fusion", "anchors"}.isdisjoint(result["backends"]["baseline"]["stages"])
    assert set(result["backends"]["torch"]["vs_baseline"]) >= {"ttft", "decode_tokens_per_s", "end_to_end"}
    assert result["backends"]["torch"]["anchor"]["coverage"] > 0  # the built-in scene's tile store was used
    assert any("random" in n for n in result["notes"])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_bandwidth_is_weight_bytes_times_tokens_per_s(cli_run):
    from fusar_edge.runtime import Runtime

    _, result, _ = cli_run
    model = Runtime.open("tiny").model
    params = {p.data_ptr(): p for m in (model.language_model, model.lm_head) for p in m.parameters()}
    want = sum(p.numel() * p.element_size() for p in params.values())
    ceiling = result["machine"]["read_ceiling_gbs"]
    assert ceiling > 0
    for entry in result["backends"].values():  # ours and the baseline decode the same weights
        assert entry["decode_weight_mb"] == pytest.approx(want / 2**20, abs=0.01)
        assert entry["decode_read_gbs"] == pytest.approx(want * entry["decode_tokens_per_s"] / 1e9, rel=0.01, abs=0.01)
        assert entry["read_ceiling_gbs"] == ceiling  # on the CPU: host memory's
        assert entry["decode_read_of_ceiling"] == pytest.approx(entry["decode_read_gbs"] / ceiling, abs=1e-3)
        same = entry["same_size_read_ceiling_gbs"]  # a read of the weights' own size (tiny's: the cache)
        assert same > 0
        assert entry["decode_read_of_same_size_ceiling"] == pytest.approx(entry["decode_read_gbs"] / same, abs=1e-3)


def test_same_size_read_never_allocates_past_the_memory_ceilings_buffer(monkeypatch):
    from fusar_edge.bench import bandwidth

    asked = []
    monkeypatch.setattr(bandwidth, "read_ceiling_gbs", lambda mib, repeats: asked.append(mib) or 1.0)
    bandwidth.same_size_ceiling_gbs(49 * 2**20 + 1)  # small's decoder: its own size, rounded up
    bandwidth.same_size_ceiling_gbs(28 * 2**30)  # a 7B in fp32: memory's buffer, not 28 GB
    bandwidth.same_size_ceiling_gbs(10)
    assert asked == [50, bandwidth.CEILING_MIB, 1]
    # with memory's ceiling already measured, weights that large reuse it instead of a second read
    assert bandwidth.same_size_ceiling_gbs(28 * 2**30, memory_gbs=27.5) == 27.5
    assert bandwidth.same_size_ceiling_gbs(49 * 2**20, memory_gbs=27.5) == 1.0  # small ones still read
    assert asked == [50, bandwidth.CEILING_MIB, 1, 49]


def test_cache_note_only_when_the_weights_read_faster_than_memory():
    from fusar_edge.bench.bandwidth import cache_note

    assert cache_note(600.0, 30.0, 31.0) is None  # a 600 MB decoder reads from memory
    note = cache_note(49.1, 30.0, 57.3)
    assert note is not None and "49 MB" in note and "57.3" in note and "30.0" in note


def test_noise_notes_name_the_load_and_the_spread():
    from fusar_edge.bench.bandwidth import noise_notes

    calm = {"machine": {"loadavg": [0.2, 0.2, 0.2], "cores": 2},
            "backends": {"torch": {"stages": {"end_to_end": {"p50_ms": 100.0, "p90_ms": 110.0}}}}}
    assert noise_notes(calm) == []
    busy = {"machine": {"loadavg": [3.5, 1.0, 1.0], "cores": 2},
            "backends": {"torch": {"stages": {"end_to_end": {"p50_ms": 100.0, "p90_ms": 180.0}}},
                         "onnxruntime": {"stages": {"end_to_end": {"p50_ms": 50.0, "p90_ms": 52.0}}}}}
    notes = noise_notes(busy)
    assert len(notes) == 2 and "load average was 3.5 on 2 cores" in notes[0]
    assert "torch end-to-end p90 is 1.80x" in notes[1]


def test_stage_times_add_up_to_end_to_end(cli_run):
    _, result, _ = cli_run
    resolution = result["settings"]["timer"]["resolution_ms"]
    for name, entry in result["backends"].items():
        for run in entry["runs_ms"]:
            stages = [run[s] for s in STAGES if s in run]
            # each stage is rounded to 1e-4 ms in the report
            assert abs(sum(stages) - run["end_to_end"]) <= resolution + 1e-4 * (len(stages) + 1), (name, run)


def test_table_shows_every_backend_and_ratio(cli_run, capsys):
    from fusar_edge.bench.report import format_table

    text = format_table(cli_run[1])
    for label in ("AEF lookup", "vision + TLM", "time to first token", "decode tokens/s", "peak host MB",
                  "baseline (transformers)", "x faster than baseline", "random weights"):
        assert label in text


def test_runs_1_and_a_single_token(tmp_path, capsys):
    path = tmp_path / "one.json"
    assert main(["bench", "--runs", "1", "--warmup", "0", "--new-tokens", "1", "--no-baseline", "--quiet",
                 "--json", str(path)]) == 0
    entry = json.loads(path.read_text())["backends"]["torch"]
    assert entry["stages"]["decode_per_token"] is None and entry["decode_tokens_per_s"] is None
    s = entry["stages"]["ttft"]
    assert s["p50_ms"] == s["p90_ms"] == s["p99_ms"] and s["stdev_ms"] == 0 and s["n"] == 1
    assert "decode, per token" in capsys.readouterr().out


def test_missing_and_unknown_backends_are_reported_and_the_others_run(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    path = tmp_path / "r.json"
    code = main(["bench", "--backend", "onnxruntime,warp-drive,torch,tensorrt", "--runs", "1", "--warmup", "0",
                 "--new-tokens", "2", "--no-baseline", "--quiet", "--json", str(path)])
    assert code == 1  # ran, but not everything asked for
    result = json.loads(path.read_text())
    assert list(result["backends"]) == ["torch"]
    skipped = result["skipped"]
    assert "not installed" in skipped["onnxruntime"] and "pip install" in skipped["onnxruntime"]
    assert "unknown backend 'warp-drive'" in skipped["warp-drive"] and "torch, onnxruntime" in skipped["warp-drive"]
    assert "retired" in skipped["tensorrt"] and "Edge-LLM" in skipped["tensorrt"]
    out = capsys.readouterr().out
    assert "skipped onnxruntime" in out and "skipped warp-drive" in out


def test_bundle_without_export_names_the_export_to_run(tmp_path, tiny_model, tiny_tokenizer, capsys):
    from fusar_edge.model.bundle import save_bundle

    bundle = save_bundle(tiny_model, tiny_tokenizer, tmp_path / "plain")
    result = run_bench(BenchSettings(model=str(bundle), backends=["onnxruntime"], runs=1, warmup=0, new_tokens=1,
                                     baseline=False))
    assert result["backends"] == {}
    why = result["skipped"]["onnxruntime"]
    assert "fusar-edge export" in why and str(bundle) in why and "--onnx" in why


def test_preset_too_big_for_memory_is_refused_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr("fusar_edge.bench.machine.meminfo_kb", lambda field: 64 * 1024)  # 64 MiB available
    assert main(["bench", "--preset", "small", "--device", "cpu", "--runs", "1", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "skipped torch: preset 'small'" in out and "GiB" in out and "--dtype bfloat16" in out


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    assert main(["bench", "--runs", "0"]) == 2
    assert "--runs: expected a positive integer" in capsys.readouterr().err
    # what ask refuses is refused before a model loads, not reported as a skipped backend (exit 1)
    for argv, words in ((["--preset", "bogus"], ["--preset bogus"]),
                        (["--preset", "tiny", "--new-tokens", "100000"], ["--new-tokens", "context"]),
                        (["--question", " "], ["--question"]), (["--image", "x.npz"], ["--image x.npz"]),
                        (["--tiles", str(tmp_path / "none")], ["--tiles"]), (["--device", "foo"], ["--device"]),
                        (["--backend", ","], ["--backend"]), (["--plot", str(tmp_path / "p.txt")], [".png"])):
        assert main(["bench", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)
    assert main(["bench", "--image", str(tmp_path / "nope.tif")]) == 2
    assert "nope.tif" in capsys.readouterr().err
    assert main(["bench", "--bundle", str(tmp_path / "missing")]) == 2
    assert "--preset" in capsys.readouterr().err
    monkeypatch.setattr("fusar_edge.bench.report.have_matplotlib", lambda: False)
    assert main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err


def test_backends_and_batches_agree_on_the_tokens(exported):
    """torch and ONNX Runtime generate the same tokens, and every sequence of a batch of 3
    equals the batch-1 sequence (batched decoder against the one-sequence path)."""
    one = run_bench(BenchSettings(model=str(exported), backends=["torch", "onnxruntime"], runs=1, warmup=0,
                                  new_tokens=5, baseline=False))
    three = run_bench(BenchSettings(model=str(exported), backends=["torch", "onnxruntime"], runs=1, warmup=0,
                                    new_tokens=5, batch=3, baseline=False))
    ref = one["backends"]["torch"]["tokens"]
    assert len(ref) == 1 and len(ref[0]) == 5
    assert one["backends"]["onnxruntime"]["tokens"] == ref
    for name in ("torch", "onnxruntime"):
        assert three["backends"][name]["tokens"] == ref * 3, name
    entry = one["backends"]["onnxruntime"]
    assert entry["variant"] == "onnx" and entry["model_size_mb"] > 0 and entry["weights"] != "random"


def test_baseline_matches_ours_when_tlm_and_grasp_are_off(tmp_path, tiny_tokenizer):
    """The baseline gets the same weights and inputs: with no anchors (no tile store) and GRASP
    disabled our pipeline is plain Qwen2.5-VL, so generate must produce our tokens."""
    from fusar_edge.config import preset
    from fusar_edge.geo.synthetic import write_demo_scene
    from fusar_edge.model.bundle import build_random, save_bundle

    cfg = preset("tiny")
    cfg.grasp.enabled = False
    bundle = save_bundle(build_random(cfg, seed=5), tiny_tokenizer, tmp_path / "plain-qwen")
    scene = write_demo_scene(tmp_path / "scene", size=64, seed=2)
    result = run_bench(BenchSettings(model=str(bundle), image=scene["scene_png"], runs=1, warmup=0, new_tokens=6))
    ours, base = result["backends"]["torch"], result["backends"]["baseline"]
    assert ours["anchor"].get("notes") and base["tokens"] == ours["tokens"]


def test_requests_run_without_autograd(monkeypatch):
    """An autograd graph would keep every activation alive (a 3B preset ran out of memory so)."""
    from fusar_edge.backends.torch_stages import TorchStages

    seen = []
    real = TorchStages.prefill_batch

    def spy(self, *args):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return real(self, *args)

    monkeypatch.setattr(TorchStages, "prefill_batch", spy)
    run_bench(BenchSettings(runs=1, warmup=0, new_tokens=1, baseline=False))
    assert seen == [(False, True)]


def test_peak_memory_sees_a_transient_allocation():
    """The peak is the block's own: 256 MiB touched and freed inside it still shows."""
    import numpy as np

    from fusar_edge.bench.clock import PeakMemory

    with PeakMemory() as mem:
        block = np.ones(256 * 2**20, dtype=np.uint8)  # written, so resident
        del block
    assert mem.host_mb - mem.host_start_mb >= 200
    with PeakMemory() as quiet:
        pass
    assert quiet.host_mb - quiet.host_start_mb < 100  # the previous block's peak was reset


def test_baseline_runs_when_torch_is_not_asked_for():
    """--backend onnxruntime on a preset: onnxruntime is skipped (nothing exported), and the
    baseline still loads the weights itself and runs."""
    result = run_bench(BenchSettings(backends=["onnxruntime"], runs=1, warmup=0, new_tokens=2))
    assert "export" in result["skipped"]["onnxruntime"]
    base = result["backends"]["baseline"]
    assert base["peak_mem_mb"]["host"] >= base["peak_mem_mb"]["host_at_start"] > 0
    assert [len(t) for t in base["tokens"]] == [2] and "vs_baseline" not in base
