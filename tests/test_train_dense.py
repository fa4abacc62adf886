"""Stage 0's dense supervision: cell labels from the ground truth, the warm-up, resume, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from fusar_edge.cli import main
from fusar_edge.data.synth import synth
from fusar_edge.errors import InputError
from fusar_edge.train.dense import (IGNORE, LABELS, DenseHead, DenseSettings, cell_boxes, cell_density, cell_digits,
                                     cell_labels, load_truth, warmup)
from fusar_edge.train.loop import TrainSettings
from fusar_edge.train.recipe import StageArgs, run_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-data")
    synth(root / "ds", 6, seed=5, chip=224, per_region=2)
    rows = [json.loads(s) for s in (root / "ds" / "stage2-train.jsonl").read_text().splitlines()]
    first_of_scene = {}
    for r in rows:
        first_of_scene.setdefault(r["scene"], r)
    small = root / "ds" / "few.jsonl"  # one row of each training scene
    small.write_text("".join(json.dumps(r) + "\n" for r in first_of_scene.values()))
    return root / "ds", small


def test_cell_labels_count_per_label_and_box_of_a_single_centre():
    targets = [
        {"label": "ship", "box": [0, 0, 10, 6]},  # centre (5, 3): cell (0, 0)
        {"label": "ship", "box": [10, 10, 20, 20]},  # centre (15, 15): cell (0, 0) too
        {"label": "ship", "box": [12, 2, 14, 8]},  # a third: the count class stops at "2 or more"
        {"label": "rock", "box": [56, 28, 70, 42]},  # centre (63, 35): cell row 1, col 2
        {"label": "oil tank", "box": [214, 214, 224, 224]},  # centre (219, 219): the last cell
        {"label": "unknown thing", "box": [100, 100, 110, 110]},  # not a label the head knows: ignored
    ]
    counts, boxes, has_box = cell_labels(targets, 224, (8, 8))
    assert counts.shape == (64, len(LABELS)) and boxes.shape == (64, 4)
    assert counts[0, LABELS.index("ship")] == 2 and not has_box[0]  # three centres: no single box to learn
    rock = 1 * 8 + 2
    assert counts[rock, LABELS.index("rock")] == 1 and has_box[rock]
    assert torch.allclose(boxes[rock], torch.tensor([63 / 28 - 2, 35 / 28 - 1, 14 / 28, 14 / 28]))
    assert counts[63, LABELS.index("oil tank")] == 1 and has_box[63]
    assert int(counts.sum()) == 2 + 1 + 1 and int(has_box.sum()) == 2


def test_the_head_learns_a_fixed_image(data):
    # the loss is minimisable: a head alone on fixed tokens fits its labels
    torch.manual_seed(0)
    visual = torch.randn(64, 32)
    labels = cell_labels([{"label": "ship", "box": [30, 30, 40, 36]}, {"label": "building", "box": [100, 0, 120, 8]}],
                         224, (8, 8))
    head = DenseHead(32)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    first = float(head.loss(visual, labels).detach())
    for _ in range(150):
        opt.zero_grad()
        head.loss(visual, labels).backward()
        opt.step()
    assert float(head.loss(visual, labels).detach()) < 0.05 * first


def test_stage0_with_dense_warmup_trains_the_vision_and_resumes_without_repeating_it(data, tmp_path, monkeypatch):
    ds, small = data
    out = tmp_path / "s0"
    args = dict(stage=0, data=[str(small)], out=out, settings=TrainSettings(epochs=2, lr=3e-3, grad_accum=1, seed=1),
                dense=DenseSettings(ds / "scenes.jsonl", weight=1.0, warmup_epochs=12, batch=2))
    summary = run_stage(StageArgs(**args), show_progress=False)
    saved = torch.load(out / "dense-warmup.pt", weights_only=True)
    losses = saved["losses"]
    images = len(small.read_text().splitlines())
    assert len(losses) == 12 * -(-images // 2)  # batches of 2 images
    assert float(losses[-3:].mean()) < 0.8 * float(losses[:3].mean())
    assert summary["dense"]["warmup_epochs"] == 12 and summary["dense"]["truth"].endswith("scenes.jsonl")
    assert summary["dense"]["warmup"]["steps"] == len(losses) and summary["dense"]["warmup"]["seconds"] > 0
    assert (out / "base" / "model.safetensors").is_file()  # the head is training-only: not in the base
    from safetensors.torch import load_file

    assert not any("dense" in k for k in load_file(str(out / "base" / "model.safetensors")))

    def must_not_run(*a, **k):
        raise AssertionError("the warm-up ran again")

    monkeypatch.setattr("fusar_edge.train.recipe.warmup", must_not_run)
    again = run_stage(StageArgs(**args), show_progress=False)  # resumes: the warm-up is read back
    assert again["steps"] == summary["steps"]
    assert again["dense"]["warmup"]["steps"] == len(losses)
    # a warm-up made with other settings is refused, not mixed in
    other = dict(args, dense=DenseSettings(ds / "scenes.jsonl", weight=1.0, warmup_epochs=3, batch=2))
    with pytest.raises(InputError, match="different run"):
        run_stage(StageArgs(**other), show_progress=False)


def test_freeze_vision_keeps_the_warmed_up_tower_and_trains_the_rest(data, tmp_path):
    from safetensors.torch import load_file

    ds, small = data
    out = tmp_path / "s0"
    run_stage(StageArgs(stage=0, data=[str(small)], out=out, freeze_vision=True,
                        settings=TrainSettings(epochs=1, lr=3e-3, grad_accum=1, seed=1),
                        dense=DenseSettings(ds / "scenes.jsonl", weight=1.0, warmup_epochs=2, batch=2)),
              show_progress=False)
    warmed = torch.load(out / "dense-warmup.pt", weights_only=True)
    base = load_file(str(out / "base" / "model.safetensors"))
    visual = {k: v for k, v in base.items() if ".visual." in f".{k}"}
    assert len(visual) == len(warmed["visual"])
    for name, value in warmed["visual"].items():  # every tensor of the tower as the warm-up left it
        saved = next(v for k, v in visual.items() if k.endswith("visual." + name))
        assert torch.equal(saved, value), name
    # the language model did train: its weights moved from the same seed's initial ones
    from fusar_edge.config import preset
    from fusar_edge.model.bundle import build_random

    initial = build_random(preset("demo"), seed=1).backbone.state_dict()
    lm = [k for k in base if "visual" not in k and k in initial]
    assert lm and any(not torch.equal(base[k], initial[k]) for k in lm)


def test_freeze_vision_needs_the_dense_warmup(tmp_path, capsys):
    assert main(["train", "--stage", "0", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o"),
                 "--freeze-vision"]) == 2
    assert "--freeze-vision: only with --dense-truth" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dense_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys):
    ds, small = data
    bad = tmp_path / "scenes.jsonl"
    bad.write_text('{"id": "s0"}\n')
    with pytest.raises(InputError, match="line 1"):
        load_truth(bad)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "not-this-one", "targets": []}) + "\n")
    cases = [
        (["--stage", "0", "--dense-truth", str(other)], "not in --dense-truth"),
        (["--stage", "0", "--dense-truth", str(tmp_path / "missing.jsonl")], "cannot be read"),
        (["--stage", "0", "--dense-truth", str(ds / "scenes.jsonl"), "--dense-warmup-epochs", "-1"],
         "--dense-warmup-epochs"),
        (["--stage", "1", "--base", str(tmp_path), "--dense-truth", str(ds / "scenes.jsonl")], "stage 0"),
        (["--stage", "0", "--dense-truth", str(ds / "scenes.jsonl"), "--dense-pos-weight", "0"],
         "--dense-pos-weight"),
    ]
    for i, (argv, words) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main(["train", *argv, "--data", str(small), "--out", str(out), "--json"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
        assert not out.exists()


def test_warmup_batches_many_images_in_one_vit_call(data):
    # the batched ViT call gives each image the tokens it gets alone
    from fusar_edge.config import preset
    from fusar_edge.model.bundle import build_random
    from fusar_edge.tokenizer import TextTokenizer
    from fusar_edge.train.samples import SampleBuilder, read_manifest

    ds, _ = data
    cfg = preset("demo")
    model = build_random(cfg, seed=0).eval()
    builder = SampleBuilder(cfg, TextTokenizer.demo())
    rows = read_manifest(ds / "stage1-train.jsonl")[:3]
    inputs = [builder.image_inputs(r) for r in rows]
    with torch.no_grad():
        together = model.vision_many(inputs)
        for (px, grid, anchors), tokens in zip(inputs, together):
            alone = model.vision(px, grid, anchors)
            assert torch.allclose(tokens, alone, atol=1e-4, rtol=1e-4)


def test_flip_image_moves_chip_anchors_and_truth_together():
    import numpy as np

    from fusar_edge.config import preset
    from fusar_edge.model.preprocess import chip_to_patches
    from fusar_edge.train.dense import flip_image

    cfg = preset("demo")
    chip = np.zeros((224, 224, 3), dtype=np.uint8)
    chip[10:20, 30:50] = 255  # a bright target, box [30, 10, 50, 20]: centre (40, 15), cell row 0, col 1
    targets = [{"label": "ship", "box": [30, 10, 50, 20]}]
    anchors = (torch.zeros(2, 64), torch.tensor([[0.1, 0.2], [0.5, 0.75]]), torch.ones(2, dtype=torch.bool))
    ship = LABELS.index("ship")
    # flip -> (flipped chip, expected cell of the ship, expected anchor positions)
    cases = {0: (chip, 0 * 8 + 1, [[0.1, 0.2], [0.5, 0.75]]),
             1: (chip[:, ::-1], 0 * 8 + 6, [[0.1, 0.8], [0.5, 0.25]]),
             2: (chip[::-1], 7 * 8 + 1, [[0.9, 0.2], [0.5, 0.75]]),
             3: (chip[::-1, ::-1], 7 * 8 + 6, [[0.9, 0.8], [0.5, 0.25]])}
    for flip, (want_chip, cell, positions) in cases.items():
        pixels, grid, got_anchors, (counts, boxes, has_box, density, digits) = flip_image(chip, anchors, targets,
                                                                                          flip, cfg)
        want_pixels, want_grid = chip_to_patches(np.ascontiguousarray(want_chip))
        assert torch.equal(pixels, torch.from_numpy(want_pixels)) and torch.equal(grid, torch.from_numpy(want_grid))
        assert torch.allclose(got_anchors[1], torch.tensor(positions)), flip
        assert got_anchors[0] is anchors[0] and got_anchors[2] is anchors[2]
        assert int(counts[:, ship].sum()) == 1 and counts[cell, ship] == 1 and has_box[cell], flip
        assert density[cell, ship] == 1 and float(density.sum()) == 1, flip  # the box lies in that one cell
        assert torch.allclose(boxes[cell, 2:], torch.tensor([20 / 28, 10 / 28]))  # the size is kept
        x1, y1 = 224 - 50 if flip & 1 else 30, 224 - 20 if flip & 2 else 10  # the flipped box's top-left corner
        assert digits[cell].tolist() == [x1 // 100, x1 // 10 % 10, x1 % 10, y1 // 100, y1 // 10 % 10, y1 % 10,
                                         (x1 + 20) // 100, (x1 + 20) // 10 % 10, (x1 + 20) % 10,
                                         (y1 + 10) // 100, (y1 + 10) // 10 % 10, (y1 + 10) % 10], flip
    assert torch.allclose(anchors[1], torch.tensor([[0.1, 0.2], [0.5, 0.75]]))  # the input is not changed


def test_dense_augment_flag_trains_on_flips_and_is_its_own_warmup(data, tmp_path, monkeypatch, capsys):
    import fusar_edge.train.recipe as recipe

    ds, small = data
    seen = []
    real_flip = recipe.flip_image

    def counting_flip(*a, **k):
        seen.append(a[3])
        return real_flip(*a, **k)

    monkeypatch.setattr(recipe, "flip_image", counting_flip)
    out = tmp_path / "s0"
    argv = ["train", "--stage", "0", "--data", str(small), "--out", str(out), "--epochs", "0.5", "--grad-accum", "1",
            "--dense-truth", str(ds / "scenes.jsonl"), "--dense-warmup-epochs", "4", "--json", "--seed", "1"]
    assert main([*argv, "--dense-augment"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dense"]["augment"] is True and summary["dense"]["warmup"]["steps"] > 0
    assert seen and set(seen) <= {1, 2, 3}  # flip 0 reuses the cached image
    # the same run without flips is another warm-up: refused on that folder, not mixed in
    assert main(argv) == 2
    assert "different run" in capsys.readouterr().err


def test_density_image_count_and_digit_terms_train_through_stage0_and_are_their_own_warmup(data, tmp_path, capsys):
    ds, small = data
    out = tmp_path / "s0"
    argv = ["train", "--stage", "0", "--data", str(small), "--out", str(out), "--epochs", "0.5", "--grad-accum", "1",
            "--dense-truth", str(ds / "scenes.jsonl"), "--dense-warmup-epochs", "2", "--json", "--seed", "1"]
    # with --dense-augment too: flipped images carry their densities (the terms' labels) as well
    assert main([*argv, "--dense-density", "0.5", "--dense-image-count", "2", "--dense-digits", "0.25",
                 "--dense-augment"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dense"]["density"] == 0.5 and summary["dense"]["image_count"] == 2.0
    assert summary["dense"]["digits"] == 0.25
    assert summary["dense"]["warmup"]["steps"] > 0 and summary["steps"] > 0
    head = torch.load(out / "dense-warmup.pt", weights_only=True)["head"]
    assert head["density.weight"].shape[0] == len(LABELS) and head["image_count.weight"].shape[0] == len(LABELS) * 8
    assert head["digits.weight"].shape[0] == 12 * 10
    params = torch.load(out / "checkpoint" / "state.pt", weights_only=True)["params"]
    assert "dense_head.density.weight" in params and "dense_head.image_count.weight" in params  # kept in the main loop
    # the same folder without the terms, or with the digits of ships alone, is another warm-up: refused
    assert main([*argv, "--dense-augment"]) == 2
    assert "different run" in capsys.readouterr().err
    assert main([*argv, "--dense-density", "0.5", "--dense-image-count", "2", "--dense-digits", "0.25",
                 "--dense-digit-labels", "ship", "--dense-augment"]) == 2
    assert "different run" in capsys.readouterr().err
    assert main([*argv, "--dense-density", "-1"]) == 2
    assert "--dense-density: expected a number >= 0, got -1.0" in capsys.readouterr().err
    assert main([*argv, "--dense-image-count", "-2"]) == 2
    assert "--dense-image-count: expected a number >= 0, got -2.0" in capsys.readouterr().err
    assert main([*argv, "--dense-digits", "-1"]) == 2
    assert "--dense-digits: expected a number >= 0, got -1.0" in capsys.readouterr().err
    assert main([*argv, "--dense-digit-labels", "ship"]) == 2
    assert "--dense-digit-labels: only with --dense-digits" in capsys.readouterr().err
    assert main([*argv, "--dense-digits", "1", "--dense-digit-labels", "ship,boat"]) == 2
    assert "--dense-digit-labels: unknown label 'boat'" in capsys.readouterr().err


def test_train_demo_script_stops_at_a_failed_step_with_its_exit_code_and_one_line(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"
    data = tmp_path / "not-a-dataset"
    data.mkdir()
    (data / "dataset.json").write_text("{}")  # looks made, so the data step is skipped and stage 0 fails
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "o"), "--data", str(data)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "stage1-train.jsonl" in proc.stderr  # the step's own one-line error names the missing file
    assert "train_demo: step `fusar-edge train` failed (exit 2)" in proc.stderr


def test_train_demo_script_passes_its_recipe_overrides(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"
    spec = importlib.util.spec_from_file_location("train_demo_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(mod, "step", lambda argv, done=None: calls.append(argv))

    def stage0(extra):
        calls.clear()
        monkeypatch.setattr(sys, "argv", ["train_demo.py", "--out", str(tmp_path / "o"), *extra])
        mod.main()
        return next(c for c in calls if c[:3] == ["train", "--stage", "0"])

    default = stage0([])
    assert "--dense-augment" not in default and "--dense-weight" not in default
    assert default[default.index("--dense-warmup-epochs") + 1] == "6" and default[default.index("--epochs") + 1] == "0.5"
    assert default[default.index("--dense-pos-weight") + 1] == "5"
    changed = stage0(["--dense-augment", "--dense-warmup-epochs", "20", "--dense-weight", "3", "--stage0-epochs", "3",
                      "--dense-pos-weight", "1", "--dense-density", "0.5"])
    assert "--dense-augment" in changed and changed[changed.index("--dense-weight") + 1] == "3"
    assert "--dense-density" not in default and changed[changed.index("--dense-density") + 1] == "0.5"
    assert changed.count("--dense-pos-weight") == 1 and changed[changed.index("--dense-pos-weight") + 1] == "1"
    assert changed[changed.index("--dense-warmup-epochs") + 1] == "20" and changed[changed.index("--epochs") + 1] == "3"
    assert mod.STAGE0[mod.STAGE0.index("--dense-warmup-epochs") + 1] == "6"  # the recipe itself is unchanged


def test_pos_weight_counts_the_occupied_cells_more_and_one_is_the_plain_loss():
    torch.manual_seed(0)
    visual = torch.randn(64, 32)
    labels = cell_labels([{"label": "ship", "box": [30, 30, 40, 36]}, {"label": "rock", "box": [100, 0, 120, 8]}],
                         224, (8, 8))
    plain, one, five = DenseHead(32), DenseHead(32, pos_weight=1.0), DenseHead(32, pos_weight=5.0)
    one.load_state_dict(plain.state_dict())
    five.load_state_dict(plain.state_dict())
    assert torch.equal(plain.loss(visual, labels), one.loss(visual, labels))
    # the count term: a mean over the 64 x 5 cell-label pairs, the 2 occupied ones counted 5 times
    counts = labels[0].reshape(-1)
    out = plain.proj(visual)
    per = torch.nn.functional.cross_entropy(out[:, :len(LABELS) * 3].reshape(-1, 3), counts, reduction="none")
    box = plain.loss(visual, labels) - per.mean()
    want = (per.sum() + 4 * per[counts > 0].sum()) / per.numel() + box
    assert torch.allclose(five.loss(visual, labels), want, atol=1e-6)
    with pytest.raises(InputError, match="--dense-pos-weight"):
        DenseSettings(Path("x"), pos_weight=0).check()


def test_position_term_teaches_each_token_its_row_and_column_and_is_off_by_default():
    torch.manual_seed(0)
    labels = cell_labels([{"label": "ship", "box": [30, 30, 40, 36]}], 224, (8, 8))
    plain, where = DenseHead(32), DenseHead(32, position_grid=(8, 8))
    where.proj.load_state_dict(plain.proj.state_dict())
    assert plain.position is None and "position.weight" not in plain.state_dict()
    # tokens that are exactly their one-hot (row, column): a head reading them perfectly has ~0 position loss
    idx = torch.arange(64)
    visual = torch.cat([torch.nn.functional.one_hot(idx // 8, 8), torch.nn.functional.one_hot(idx % 8, 8),
                        torch.zeros(64, 16)], dim=1).float()
    with torch.no_grad():
        where.position.weight.zero_()
        where.position.bias.zero_()
        where.position.weight[:16, :16] = 50 * torch.eye(16)
    assert float(where.position_loss(visual)) < 1e-6
    assert torch.allclose(where.loss(visual, labels), plain.loss(visual, labels), atol=1e-5)
    # with the columns' weights swapped for the rows' the loss is large: it is the token's own place that counts
    with torch.no_grad():
        where.position.weight[8:16, :16] = 50 * torch.eye(16)[:8]
    assert float(where.position_loss(visual)) > 10
    with pytest.raises(ValueError, match="8x8 grid"):
        where.position_loss(visual[:60])


def test_cell_boxes_decodes_what_cell_labels_encodes():
    ships = [{"label": "ship", "box": [30, 30, 40, 36]}, {"label": "ship", "box": [150.5, 200, 171, 209]}]
    counts, boxes, has_box = cell_labels(ships + [{"label": "rock", "box": [100, 0, 120, 8]}], 224, (8, 8))
    decoded = cell_boxes(counts[:, LABELS.index("ship")] > 0, boxes, 224, (8, 8))
    assert len(decoded) == 2 and bool(has_box.sum() == 3)
    for got, want in zip(decoded, ships):  # raster order = reading order here
        assert got == pytest.approx(want["box"], abs=1e-4)


def test_cell_density_splits_each_object_by_area_and_sums_to_the_count():
    ship, rock = LABELS.index("ship"), LABELS.index("rock")
    targets = [
        {"label": "ship", "box": [0, 0, 10, 6]},  # inside cell (0, 0)
        {"label": "ship", "box": [18, 0, 38, 10]},  # across the border x = 28: 10 px left, 10 px right
        {"label": "ship", "box": [20, 20, 36, 36]},  # across four cells: 8x8 px in each
        {"label": "rock", "box": [210, 210, 230, 230]},  # past the chip's edge: the part inside counts as a whole
        {"label": "unknown thing", "box": [100, 100, 110, 110]},  # not a label the head knows: ignored
    ]
    d = cell_density(targets, 224, (8, 8))
    assert d.shape == (64, len(LABELS))
    assert torch.allclose(d.sum(0), torch.tensor([3.0, 0, 0, 0, 1.0]))
    assert d[0, ship] == pytest.approx(1 + 0.5 + 0.25) and d[1, ship] == pytest.approx(0.5 + 0.25)
    assert d[8, ship] == pytest.approx(0.25) and d[9, ship] == pytest.approx(0.25)
    assert d[63, rock] == pytest.approx(1.0) and float(d[:, rock].sum()) == pytest.approx(1.0)
    assert cell_density([], 224, (8, 8)).abs().sum() == 0


def _head_with_term(targets: list[dict], layer: str, **term) -> tuple:
    """-> (labels with densities, a plain head, a head with ``term`` on and the same count layer, tokens),
    after checking that the plain head has no ``layer`` (the term is off by default)."""
    torch.manual_seed(0)
    labels = (*cell_labels(targets, 224, (8, 8)), cell_density(targets, 224, (8, 8)))
    plain, head = DenseHead(32), DenseHead(32, **term)
    head.proj.load_state_dict(plain.proj.state_dict())
    assert getattr(plain, layer) is None and f"{layer}.weight" not in plain.state_dict()
    return labels, plain, head, torch.randn(64, 32)


def _zero_then_fit(layer: torch.nn.Linear, loss, steps: int) -> float:
    """Zero ``layer``, return ``loss()`` there, then fit ``layer`` alone to it with Adam."""
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    at_zero = float(loss().detach())
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return at_zero


def test_density_term_is_off_by_default_and_fits_the_counts_when_on():
    targets = [{"label": "ship", "box": [18, 0, 38, 10]}, {"label": "rock", "box": [100, 0, 120, 8]}]
    labels, plain, dense, visual = _head_with_term(targets, "density", density_weight=2.0)
    extra = dense.loss(visual, labels) - plain.loss(visual, labels)
    assert torch.allclose(extra, 2.0 * dense.density_loss(visual, labels[3]), atol=1e-5)
    # a squared error; at all-zero densities: per token (0.5^2 + 0.5^2 for the ship, 0.6^2 + 0.4^2 for
    # the rock) / 5 labels, plus the counts' (1^2 + 1^2) / 5
    at_zero = _zero_then_fit(dense.density, lambda: dense.density_loss(visual, labels[3]), 200)
    assert at_zero == pytest.approx((0.5 + 0.52) / 5 + 2 / 5)
    sums = dense.density(visual).sum(0)
    assert torch.allclose(sums, labels[3].sum(0), atol=0.05)  # the tokens' sum reads the counts
    with pytest.raises(InputError, match="--dense-density"):
        DenseSettings(Path("x"), density=-1).check()


def test_image_count_term_teaches_every_token_the_whole_image_counts():
    targets = [{"label": "ship", "box": [18, 0, 38, 10]}, {"label": "ship", "box": [150, 150, 160, 160]},
               {"label": "rock", "box": [100, 0, 120, 8]}]
    labels, plain, counted, visual = _head_with_term(targets, "image_count", image_count_weight=0.5)
    extra = counted.loss(visual, labels) - plain.loss(visual, labels)
    assert torch.allclose(extra, 0.5 * counted.image_count_loss(visual, labels[3]), atol=1e-5)
    # a head at zero guesses uniformly over the 8 count classes: cross-entropy ln 8 for every token and label
    at_zero = _zero_then_fit(counted.image_count, lambda: counted.image_count_loss(visual, labels[3]), 100)
    assert at_zero == pytest.approx(math.log(8), rel=1e-5)
    # the counts are the image's, whichever token reads them: 2 ships, 1 rock, none of the rest
    assert counted.read_image_counts(visual).tolist() == [2, 0, 0, 0, 1]
    many = [{"label": "ship", "box": [20 * i, 100, 20 * i + 8, 108]} for i in range(9)]  # 9 ships: the 7+ class
    assert counted.image_count_loss(visual, cell_density(many, 224, (8, 8))).isfinite()
    with pytest.raises(InputError, match="--dense-image-count"):
        DenseSettings(Path("x"), image_count=-1).check()


def test_cell_digits_spell_each_single_objects_corners_as_the_answer_writes_them():
    targets = [
        {"label": "ship", "box": [102.6, 29.4, 131.2, 40]},  # centre (116.9, 34.7): cell row 1, col 4
        {"label": "ship", "box": [0, 0, 10, 6]},  # two centres in cell (0, 0): no digits there
        {"label": "rock", "box": [2, 2, 8, 8]},
        {"label": "oil tank", "box": [210, 212, 230, 229]},  # past the chip: clipped to 224 as the answer's box
    ]
    d = cell_digits(targets, 224, (8, 8))
    assert d.shape == (64, 12) and d.dtype == torch.long
    assert d[1 * 8 + 4].tolist() == [1, 0, 3, 0, 2, 9, 1, 3, 1, 0, 4, 0]  # 103, 29, 131, 40
    assert d[63].tolist() == [2, 1, 0, 2, 1, 2, 2, 2, 4, 2, 2, 4]  # 210, 212, 224, 224
    assert (d[0] == IGNORE).all()
    has_box = cell_labels(targets, 224, (8, 8))[2]
    assert torch.equal((d != IGNORE).all(1), has_box) and torch.equal((d == IGNORE).all(1), ~has_box)


def test_digit_term_is_off_by_default_and_its_reading_recovers_the_corners_when_fitted():
    targets = [{"label": "ship", "box": [30, 30, 40, 36]}, {"label": "ship", "box": [150, 200, 171, 209]},
               {"label": "rock", "box": [100, 0, 120, 8]}]
    torch.manual_seed(0)
    labels = (*cell_labels(targets, 224, (8, 8)), cell_density(targets, 224, (8, 8)),
              cell_digits(targets, 224, (8, 8)))
    plain, head = DenseHead(32), DenseHead(32, digits_weight=0.5)
    head.proj.load_state_dict(plain.proj.state_dict())
    assert plain.digits is None and "digits.weight" not in plain.state_dict()
    visual = torch.randn(64, 32)
    extra = head.loss(visual, labels) - plain.loss(visual, labels)
    assert torch.allclose(extra, 0.5 * head.digits_loss(visual, labels[4]), atol=1e-5)
    at_zero = _zero_then_fit(head.digits, lambda: head.digits_loss(visual, labels[4]), 150)
    assert at_zero == pytest.approx(math.log(10), rel=1e-5)  # ten equally likely digits
    read = head.read_digits(visual)
    has_box = labels[2]
    assert sorted(read[has_box].tolist()) == sorted([[30, 30, 40, 36], [150, 200, 171, 209], [100, 0, 120, 8]])
    with pytest.raises(InputError, match="--dense-digits"):
        DenseSettings(Path("x"), digits=-1).check()


def test_digit_labels_keep_only_those_objects_cells_and_an_image_without_one_adds_nothing():
    targets = [{"label": "ship", "box": [30, 30, 40, 36]}, {"label": "oil tank", "box": [150, 200, 171, 209]},
               {"label": "ship", "box": [100, 0, 120, 8]}, {"label": "rock", "box": [104, 2, 118, 6]}]
    every, ships = cell_digits(targets, 224, (8, 8)), cell_digits(targets, 224, (8, 8), ("ship",))
    kept = (ships != IGNORE).all(1)
    assert kept.sum() == 1 and ships[kept].tolist() == [[0, 3, 0, 0, 3, 0, 0, 4, 0, 0, 3, 6]]
    assert (every != IGNORE).all(1).sum() == 2  # the oil tank's cell too; the ship beside a rock in neither
    assert torch.equal(ships[kept], every[kept])
    # no ship in the image: the digit term adds nothing (not the NaN of a mean over no cells)
    no_ship = [{"label": "oil tank", "box": [10, 10, 30, 30]}]
    labels = (*cell_labels(no_ship, 224, (8, 8)), cell_density(no_ship, 224, (8, 8)),
              cell_digits(no_ship, 224, (8, 8), ("ship",)))
    plain, head = DenseHead(32), DenseHead(32, digits_weight=1.0)
    head.proj.load_state_dict(plain.proj.state_dict())
    visual = torch.randn(64, 32)
    assert torch.allclose(head.loss(visual, labels), plain.loss(visual, labels))
    with pytest.raises(InputError, match="--dense-digit-labels: unknown label 'ships'"):
        DenseSettings(Path("x"), digits=1, digit_labels=("ships",)).check()


def test_a_loss_that_is_no_longer_finite_stops_the_warm_up_before_the_weights_take_it():
    from fusar_edge.errors import DivergedError

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.tlm = torch.nn.Linear(4, 32), None

        def vision_many(self, images):
            return [self.visual(torch.full((64, 4), float("inf")) * image[0]) for image in images]

    targets = [{"label": "ship", "box": [30, 30, 40, 36]}]
    labels = (*cell_labels(targets, 224, (8, 8)), cell_density(targets, 224, (8, 8)), cell_digits(targets, 224, (8, 8)))
    model = Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DivergedError, match="at step 1 of 2; try a lower --dense-warmup-lr"):
        warmup(model, DenseHead(32), [(torch.ones(1), None, None, labels)] * 2, 1.0, 1e-3, batch=1, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
