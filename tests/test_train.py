"""`fusar-edge train`: the loss goes down, the reference checkpoint layout imports, runs resume, bad rows stop early."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusar_edge.cli import main
from fusar_edge.data.synth import synth
from fusar_edge.errors import InputError
from fusar_edge.train import loop
from fusar_edge.train.loop import TrainSettings
from fusar_edge.train.recipe import StageArgs, run_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    synth(root / "ds", 6, seed=3, chip=224, per_region=2)
    rows = [json.loads(s) for s in (root / "ds" / "stage2-train.jsonl").read_text().splitlines()]
    small = root / "ds" / "two.jsonl"  # two rows to overfit
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return root / "ds", small


def losses(out: Path) -> list[float]:
    return [json.loads(s)["loss"] for s in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage0(data, tmp_path_factory):
    ds, small = data
    out = tmp_path_factory.mktemp("s0")
    run_stage(StageArgs(stage=0, data=[str(small)], out=out,
                        settings=TrainSettings(epochs=8, lr=3e-3, grad_accum=2, seed=1)), show_progress=False)
    return out


def test_stage0_lowers_the_loss_and_writes_a_base_folder(stage0):
    history = losses(stage0)
    assert len(history) == 8
    assert sum(history[-2:]) / 2 < 0.7 * sum(history[:2]) / 2
    assert (stage0 / "base" / "config.json").is_file() and (stage0 / "base" / "model.safetensors").is_file()
    assert (stage0 / "vec64_film.pt").is_file() and json.loads((stage0 / "tlm_config.json").read_text())["image_size"] == 224


def test_stages_1_2_save_the_reference_layout_and_it_imports(data, stage0, tmp_path):
    ds, small = data
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    settings = TrainSettings(epochs=1, lr=1e-3, grad_accum=2, seed=1)
    run_stage(StageArgs(stage=1, data=[str(ds / "stage1-train.jsonl")], out=s1, base=stage0 / "base",
                        init_tlm=stage0, settings=settings), show_progress=False)
    cfg = json.loads((s1 / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32 and cfg["lora_dropout"] == 0.05
    # PEFT saves train_tlm.py's full-name list shortened to unique suffixes; the weights show what it covers:
    # every LLM q/k/v/o/gate/up/down of the 4 layers, nothing in the vision tower
    modules = {k.split(".lora_")[0] for k in load_file(str(s1 / "adapter_model.safetensors"))}
    assert len(modules) == 4 * 7 and all(".language_model.layers." in m for m in modules)
    film1 = torch.load(s1 / "vec64_film.pt", weights_only=True)["film_mlp"]
    film0 = torch.load(stage0 / "vec64_film.pt", weights_only=True)["film_mlp"]
    assert not torch.equal(film1["0.weight"], film0["0.weight"])  # stage 1 trains the TLM MLP
    run_stage(StageArgs(stage=2, data=[str(small)], out=s2, base=stage0 / "base", init_adapter=s1,
                        settings=settings), show_progress=False)
    film2 = torch.load(s2 / "vec64_film.pt", weights_only=True)["film_mlp"]
    assert all(torch.equal(film2[k], film1[k]) for k in film1)  # stage 2 keeps it frozen
    a1, a2 = load_file(str(s1 / "adapter_model.safetensors")), load_file(str(s2 / "adapter_model.safetensors"))
    assert set(a1) == set(a2) and any(not torch.equal(a1[k], a2[k]) for k in a1)  # the same LoRA, continued

    bundle = tmp_path / "bundle"
    assert main(["import-fusar-gpt", str(stage0 / "base"), str(s2), str(s2), "--out", str(bundle)]) == 0
    from fusar_edge.runtime import Runtime

    row = json.loads(small.read_text().splitlines()[0])
    ans = Runtime.open(bundle).ask(ds / row["image"], row["question"], anchors=ds / row["aef"], max_new_tokens=4)
    assert ans.anchor["tlm"] == "applied" and ans.model["prompt"] == row["question"]


def test_no_aef_variant_imports_without_tlm(data, tmp_path, capsys):
    ds, small = data
    settings = TrainSettings(epochs=1, lr=1e-3, grad_accum=2, seed=1)
    run_stage(StageArgs(stage=0, data=[str(small)], out=tmp_path / "s0", no_aef=True, settings=settings),
              show_progress=False)
    run_stage(StageArgs(stage=1, data=[str(small)], out=tmp_path / "s1", base=tmp_path / "s0" / "base", no_aef=True,
                        settings=settings), show_progress=False)
    assert not (tmp_path / "s0" / "vec64_film.pt").exists() and not (tmp_path / "s1" / "vec64_film.pt").exists()
    base, s1, bundle = tmp_path / "s0" / "base", tmp_path / "s1", tmp_path / "b"
    assert main(["import-fusar-gpt", str(base), str(s1), "--out", str(bundle)]) == 2
    assert "--no-tlm" in capsys.readouterr().err
    assert main(["import-fusar-gpt", str(base), str(s1), "--no-tlm", "--chip", "100", "--out", str(bundle)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chip" in err[0] and "100" in err[0] and not bundle.exists()
    assert main(["import-fusar-gpt", str(base), str(s1), "--no-tlm", "--chip", "224", "--out", str(bundle)]) == 0
    fusar = json.loads((bundle / "fusar.json").read_text())
    assert fusar["tlm"]["enabled"] is False and fusar["chip_size"] == 224


def test_a_killed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    ds, small = data
    settings = TrainSettings(epochs=6, lr=3e-3, grad_accum=2, seed=2, save_every=3)
    whole = tmp_path / "whole"
    run_stage(StageArgs(stage=0, data=[str(small)], out=whole, settings=settings), show_progress=False)

    killed = tmp_path / "killed"
    real, calls = loop.group_loss, {"n": 0}

    def dies_at_the_ninth_sample(model, samples, extra=None):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(model, samples, extra)

    monkeypatch.setattr(loop, "group_loss", dies_at_the_ninth_sample)
    with pytest.raises(KeyboardInterrupt):
        run_stage(StageArgs(stage=0, data=[str(small)], out=killed, settings=settings), show_progress=False)
    assert not (killed / "base").exists() and (killed / "checkpoint" / "state.pt").is_file()
    with open(killed / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut by the kill
    monkeypatch.setattr(loop, "group_loss", real)
    summary = run_stage(StageArgs(stage=0, data=[str(small)], out=killed, settings=settings), show_progress=False)
    assert summary["steps"] == 6 and summary["samples"] == 12
    a, b = load_file(str(whole / "base" / "model.safetensors")), load_file(str(killed / "base" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the log holds each step once: the steps replayed after the checkpoint (step 3) are not repeated
    logged = [json.loads(s) for s in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == [1, 2, 3, 4, 5, 6]
    # a checkpoint of another run is refused, not mixed in
    with pytest.raises(InputError, match="different run"):
        run_stage(StageArgs(stage=0, data=[str(small)], out=killed,
                            settings=TrainSettings(epochs=6, lr=1e-3, grad_accum=2, seed=2)), show_progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage0_on_cuda_follows_the_cpu_run_and_saves_cpu_tensors(data, stage0, tmp_path):
    """The same run on the GPU: same initial weights (built on the CPU), so the first steps' losses
    agree to fp32 accumulation-order noise (TF32 off); the saved weights load on a CPU-only box."""
    ds, small = data
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = tmp_path / "s0-cuda"
    try:
        run_stage(StageArgs(stage=0, data=[str(small)], out=out, device="cuda",
                            settings=TrainSettings(epochs=8, lr=3e-3, grad_accum=2, seed=1)), show_progress=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32  # the next tests' setting
    cpu, gpu = losses(stage0), losses(out)
    assert len(gpu) == len(cpu) == 8
    assert abs(gpu[0] - cpu[0]) < 1e-3 * abs(cpu[0])  # step 1: the same weights on the same rows
    assert sum(gpu[-2:]) / 2 < 0.7 * sum(gpu[:2]) / 2  # and it learns
    film = torch.load(out / "vec64_film.pt", map_location=None, weights_only=True)
    assert all(t.device.type == "cpu" for t in film["film_mlp"].values())


def test_bad_input_stops_before_training(data, tmp_path, capsys):
    ds, small = data
    with pytest.raises(InputError) as exc:
        run_stage(StageArgs(stage=0, data=[str(small)], out=tmp_path / "x", max_length=50,
                            settings=TrainSettings(epochs=1, lr=1e-3)), show_progress=False)
    assert "max_length 50" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "x").exists()  # refused before anything was written
    assert main(["train", "--stage", "2", "--base", str(tmp_path), "--data", str(small), "--out",
                 str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusar-edge: error:")
    assert main(["train", "--stage", "2", "--data", str(small), "--out", str(tmp_path / "y")]) == 2
    assert "--base" in capsys.readouterr().err
    # numbers argparse refuses, and folders that are not what the flag wants: one line each
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (base / name).write_text("{}")
    for argv, words in ((["--stage", "0", "--seed", "-1"], ["--seed", ">= 0"]),
                        (["--stage", "0", "--save-every", "0"], ["--save-every", "positive"]),
                        (["--stage", "0", "--epochs", "inf"], ["--epochs", "finite"]),
                        (["--stage", "0", "--threads", "0"], ["--threads"]),
                        (["--stage", "0", "--oversample", "aircraft"], ["--oversample", "CLASS=K"]),
                        (["--stage", "0", "--oversample", "aircraft=0"], ["--oversample", ">= 1"]),
                        (["--stage", "0", "--device", "gpu0"], ["device", "'gpu0'"]),
                        (["--stage", "1", "--preset", "demo"], ["--preset", "stage 0 only"]),
                        (["--stage", "1", "--base", str(base), "--init-adapter", str(tmp_path)], ["stage 2 only"]),
                        (["--stage", "0", "--grasp-k", "3"], ["--grasp-k", "only with --grasp"]),
                        (["--stage", "0", "--dense-weight", "2"], ["--dense-weight", "only with --dense-truth"]),
                        (["--stage", "2", "--base", str(tmp_path / "nope")], ["--base", "not a directory"]),
                        (["--stage", "2", "--base", str(base), "--init-adapter", str(tmp_path)],
                         ["--init-adapter", "adapter_config.json"])):
        assert main(["train", *argv, "--data", str(small), "--out", str(tmp_path / "y")]) == 2, argv
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
        assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)


def test_bad_manifests_are_one_line_and_write_nothing(data, tmp_path, capsys):
    ds, small = data
    row = json.loads(small.read_text().splitlines()[0])
    cases = {
        "not json": ("{oops\n", ["not valid JSON"]),
        "empty": ("", ["non-empty"]),
        "missing key": (json.dumps({k: v for k, v in row.items() if k != "aef"}) + "\n", ["row 1", "'aef'"]),
        "missing image": (json.dumps({**row, "image": "scenes/nope.png"}) + "\n", ["nope.png"]),
        "other chip": (json.dumps({**row, "coordinate_size": 504}) + "\n", ["coordinate_size 504", "224"]),
    }
    for name, (text, words) in cases.items():
        manifest = ds / f"bad-{name.replace(' ', '_')}.jsonl"  # beside the data: relative paths resolve
        manifest.write_text(text)
        out = tmp_path / name.replace(" ", "_")
        assert main(["train", "--stage", "0", "--data", str(manifest), "--out", str(out), "--json"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fusar-edge: error:"), (name, err)
        assert all(w in err[0] for w in words), (name, err[0])
        assert not out.exists(), name


def test_stage2_grasp_trains_prompts_and_projections_and_imports_on(data, stage0, tmp_path, capsys):
    ds, small = data
    s1, s2, bundle = tmp_path / "s1", tmp_path / "s2", tmp_path / "bundle"
    settings = TrainSettings(epochs=2, lr=1e-2, grad_accum=1, seed=4)
    run_stage(StageArgs(stage=1, data=[str(small)], out=s1, base=stage0 / "base", init_tlm=stage0,
                        settings=TrainSettings(epochs=1, lr=1e-3, grad_accum=2, seed=1)), show_progress=False)
    assert main(["train", "--stage", "2", "--base", str(stage0 / "base"), "--init-adapter", str(s1), "--data",
                 str(small), "--out", str(s2), "--grasp", "--grasp-grid", "2x2", "--grasp-k", "2",
                 "--grasp-proj-dim", "16", "--epochs", "2", "--lr", "1e-2", "--grad-accum", "1", "--seed", "4",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["grasp"].startswith("trained") and summary["steps"] == 4

    # what stage 2 would start from with the same seed: GRASP's fresh initialisation
    from fusar_edge.model.grasp import GRASP

    torch.manual_seed(settings.seed)
    cfg = json.loads((s2 / "grasp_config.json").read_text())
    assert cfg["grid"] == [2, 2] and cfg["k"] == 2 and cfg["proj_dim"] == 16 and cfg["hidden_size"] == 192
    trained = load_file(str(s2 / "grasp.safetensors"))
    assert set(trained) == {"prompts", "w_q.weight", "w_q.bias", "w_k.weight", "w_k.bias"}
    # the projections always learn; the prompts of the k blocks chosen for these rows do
    init = GRASP(192, (2, 2), 16, 1, "topk", 2).state_dict()
    assert not torch.allclose(trained["w_q.weight"], init["w_q.weight"])
    assert not torch.allclose(trained["w_k.weight"], init["w_k.weight"])
    moved = [not torch.allclose(trained["prompts"][i], init["prompts"][i]) for i in range(4)]
    assert sum(moved) >= 2
    film1 = torch.load(s1 / "vec64_film.pt", weights_only=True)["film_mlp"]
    film2 = torch.load(s2 / "vec64_film.pt", weights_only=True)["film_mlp"]
    assert all(torch.equal(film2[k], film1[k]) for k in film1)  # TLM stays frozen in stage 2

    assert main(["import-fusar-gpt", str(stage0 / "base"), str(s2), str(s2), "--out", str(bundle)]) == 0
    fusar = json.loads((bundle / "fusar.json").read_text())
    assert fusar["grasp"]["enabled"] is True and fusar["grasp"]["proj_dim"] == 16
    saved = load_file(str(bundle / "fusar_modules.safetensors"))
    assert torch.allclose(saved["grasp.prompts"].float(), trained["prompts"])
    from fusar_edge.runtime import Runtime

    row = json.loads(small.read_text().splitlines()[0])
    ans = Runtime.open(bundle).ask(ds / row["image"], row["question"], anchors=ds / row["aef"], max_new_tokens=3)
    w = ans.grasp_weights
    assert len(w) == 4 and sum(x > 0 for x in w) == 2 and abs(sum(w) - 1) < 1e-5

    # GRASP belongs to stage 2; a bad grid is named
    assert main(["train", "--stage", "1", "--base", str(stage0 / "base"), "--data", str(small), "--out",
                 str(tmp_path / "x"), "--grasp"]) == 2
    assert "stage 2" in capsys.readouterr().err
    assert main(["train", "--stage", "2", "--base", str(stage0 / "base"), "--init-adapter", str(s1), "--data",
                 str(small), "--out", str(tmp_path / "y"), "--grasp", "--grasp-grid", "2by2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grasp-grid" in err[0] and not (tmp_path / "y").exists()


def test_image_groups_share_one_vision_pass_and_match_row_by_row_gradients(data):
    """The grouped loss (one ViT forward for an image's rows) is the mean of the per-row losses."""
    from fusar_edge.config import preset
    from fusar_edge.model.bundle import build_random
    from fusar_edge.tokenizer import TextTokenizer
    from fusar_edge.train.samples import SampleBuilder, read_manifest

    ds, _ = data
    rows = read_manifest(ds / "stage1-train.jsonl") + read_manifest(ds / "stage2-train.jsonl")
    groups = loop.image_groups(rows)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    assert all(len({rows[i]["image"] for i in g}) == 1 for g in groups) and max(map(len, groups)) > 1
    cfg = preset("demo")
    model = build_random(cfg, seed=5).train()
    build = SampleBuilder(cfg, TextTokenizer.demo())
    group = [build(rows[i]) for i in max(groups, key=len)]
    loop.group_loss(model, group).backward()
    grouped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for s in group:
        (loop.sample_loss(model, s) / len(group)).backward()
    for n, p in model.named_parameters():
        if n in grouped:
            assert torch.allclose(grouped[n], p.grad, rtol=1e-4, atol=1e-6), n


def test_bad_grasp_flags_are_one_line(data, tmp_path, capsys):
    ds, small = data
    base = ["train", "--stage", "2", "--base", str(tmp_path), "--init-adapter", str(tmp_path), "--data", str(small),
            "--out", str(tmp_path / "o"), "--grasp"]
    for extra, words in [(["--grasp-k", "9"], ["--grasp-k", "1..4"]), (["--grasp-prompt-len", "0"], ["--grasp-prompt-len"]),
                         (["--grasp-proj-dim", "-3"], ["--grasp-proj-dim"]), (["--grasp-grid", "0x2"], ["--grasp-grid"])]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), (extra, err)
        assert not (tmp_path / "o").exists()


def test_sample_builder_keeps_a_bounded_number_of_images(data):
    """Memory does not grow with the dataset: only the most recent images stay decoded, and an image
    read again after it was dropped gives the same patches and anchors."""
    from fusar_edge.config import preset
    from fusar_edge.tokenizer import TextTokenizer
    from fusar_edge.train.samples import SampleBuilder, read_manifest

    ds, _ = data
    rows = [r for split in ("train", "val", "test") for r in read_manifest(ds / f"stage1-{split}.jsonl")]
    assert len({r["image"] for r in rows}) >= 3
    build = SampleBuilder(preset("demo"), TextTokenizer.demo(), cached_images=2)
    first = build.image_inputs(rows[0])
    for row in rows:
        build(row)
    assert len(build._images) == 2 and len(build._anchors) == 2
    again = build.image_inputs(rows[0])
    assert again[0] is not first[0]  # read anew, not kept
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert all(torch.equal(a, b) for a, b in zip(again[2], first[2]))


def test_row_check_refuses_what_building_refuses_and_reads_each_file_once(data, tmp_path, monkeypatch):
    """``SampleBuilder.check`` (train's up-front pass over every row) raises the error building the
    sample would (truncated image, broken anchors, over-long, other chip), and reads a file shared
    by several rows once."""
    import shutil

    from fusar_edge.config import preset
    from fusar_edge.tokenizer import TextTokenizer
    from fusar_edge.train import samples
    from fusar_edge.train.samples import SampleBuilder, read_manifest

    ds, _ = data
    rows = read_manifest(ds / "stage2-train.jsonl")
    assert len(rows) > len({r["image"] for r in rows})  # several rows per image
    reads = []
    monkeypatch.setattr(samples, "read_sar", lambda p, _read=samples.read_sar: reads.append(str(p)) or _read(p))
    build = SampleBuilder(preset("demo"), TextTokenizer.demo())
    for row in rows:
        build.check(row)
    assert sorted(reads) == sorted({str(Path(r["_root"]) / r["image"]) for r in rows})  # once each

    broken = tmp_path / "broken"
    shutil.copytree(ds, broken)
    row = read_manifest(broken / "stage2-train.jsonl")[0]
    image, aef = broken / row["image"], broken / row["aef"]
    cases = {
        "truncated image": (lambda: image.write_bytes(image.read_bytes()[:200]), {}, [row["image"].split("/")[-1]]),
        "broken anchors": (lambda: aef.write_bytes(aef.read_bytes()[:100]), {}, ["anchors", aef.name]),
        "over-long": (lambda: None, {"answer": "ship " * 3000}, ["max_length"]),
        "other chip": (lambda: None, {"coordinate_size": 504}, ["coordinate_size 504"]),
    }
    for name, (damage, change, words) in cases.items():
        saved = image.read_bytes(), aef.read_bytes()
        damage()
        bad = {**row, **change}
        errors = []
        for run in (SampleBuilder(preset("demo"), TextTokenizer.demo()).check,
                    SampleBuilder(preset("demo"), TextTokenizer.demo())):
            with pytest.raises(InputError) as exc:
                run(bad)
            errors.append(str(exc.value))
        assert errors[0] == errors[1] and all(w in errors[0] for w in words), (name, errors)
        image.write_bytes(saved[0])
        aef.write_bytes(saved[1])


def test_oversample_repeats_the_samples_that_name_a_class(data):
    """--oversample CLASS=K: a sample (row, or image group) whose question names CLASS is drawn K times
    per epoch; the others once; without it the units and the checkpoint's run id are as before."""
    from dataclasses import asdict

    from fusar_edge.cli_train import oversample_factor
    from fusar_edge.tasks import extract_label

    ds, _ = data
    rows = [json.loads(s) for s in (ds / "stage2-train.jsonl").read_text().splitlines()]
    single = [[i] for i in range(len(rows))]
    named = [u for u in single if extract_label(rows[u[0]]["question"]) == "ship"]
    assert 0 < len(named) < len(single)
    out = loop.oversampled(single, rows, {"ship": 3, "submarine": 5})
    assert out[:len(single)] == single and out[len(single):] == named * 2  # in rounds: all named, then again
    groups = loop.image_groups(rows)  # a group counts once, at the largest factor its rows name
    out = loop.oversampled(groups, rows, {"ship": 2, "building": 4})
    assert len(out) == 2 * len(groups) and out[len(groups):] == groups  # every scene is asked about ships
    assert loop.oversampled(groups, rows, None) is groups
    plain = TrainSettings(epochs=1, lr=1e-3)
    assert plain.identity() == {k: v for k, v in asdict(plain).items() if k != "oversample"}  # old checkpoints resume
    assert TrainSettings(epochs=1, lr=1e-3, oversample={"ship": 2}).identity()["oversample"] == {"ship": 2}
    with pytest.raises(InputError, match="--oversample ship"):
        TrainSettings(epochs=1, lr=1e-3, oversample={"ship": 0}).check()
    assert oversample_factor("Oil  Tank=3") == ("oil tank", 3)


def test_a_loss_that_is_no_longer_finite_stops_training_before_the_weights_take_it(data, tmp_path):
    from fusar_edge.config import preset
    from fusar_edge.errors import DivergedError
    from fusar_edge.model.bundle import build_random
    from fusar_edge.tokenizer import TextTokenizer
    from fusar_edge.train.samples import SampleBuilder, read_manifest

    ds, _ = data
    rows = read_manifest(ds / "stage2-train.jsonl")[:4]
    cfg = preset("demo")
    model = build_random(cfg, seed=5)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(DivergedError, match=r"the loss is nan at sample 1 \(row .+\); try a lower --lr"):
        loop.train(model, params, rows, SampleBuilder(cfg, TextTokenizer.demo()),
                   TrainSettings(epochs=1, lr=1e-3, grad_accum=2), tmp_path, show_progress=False,
                   aux=lambda visual, row: visual.sum() * float("nan"))
    assert all(torch.equal(before[n], p) for n, p in params.items())
    assert not (tmp_path / loop.CHECKPOINT / "state.pt").exists()
