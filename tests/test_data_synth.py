"""`fusar-edge data synth`: determinism, label consistency, splits, and the reference manifest format."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from fusar_edge.cli import main
from fusar_edge.data.synth import prototypes, synth
from fusar_edge.errors import InputError
from fusar_edge.tiles.store import TileStore
from fusar_edge.tasks import DETECT_PROMPT, GRID_CELLS

CHIP = 112


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    info = synth(out, 12, seed=5, chip=CHIP, per_region=2)
    return out, info


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(ds, tmp_path):
    out, info = ds
    again = synth(tmp_path / "again", 12, seed=5, chip=CHIP, per_region=2)
    assert again == info
    a, b = tree_hashes(out), tree_hashes(tmp_path / "again")
    assert set(a) == set(b) and len(a) > 40
    # the tile store's manifest names its generation; everything the user reads is identical
    differ = sorted(k for k in a if a[k] != b[k] and not k.startswith("tiles/"))
    assert differ == []
    other = synth(tmp_path / "other", 12, seed=6, chip=CHIP, per_region=2)
    assert tree_hashes(tmp_path / "other")["scenes.jsonl"] != a["scenes.jsonl"] and other["n"] == 12


def test_splits_never_share_a_scene_or_an_area(ds):
    out, info = ds
    truth = read_jsonl(out / "scenes.jsonl")
    assert {t["split"] for t in truth} == {"train", "val", "test"}
    region_split = {}
    for t in truth:
        assert region_split.setdefault(t["region"], t["split"]) == t["split"]
    boxes = {sp: [t["bounds"] for t in truth if t["split"] == sp] for sp in ("train", "val", "test")}
    for a in ("train", "val", "test"):
        for b in ("train", "val", "test"):
            if a < b:
                for x in boxes[a]:
                    for y in boxes[b]:  # footprints of different splits do not overlap
                        assert x[2] <= y[0] or y[2] <= x[0] or x[3] <= y[1] or y[3] <= x[1]
    for split in ("train", "val", "test"):
        scenes = {t["id"] for t in truth if t["split"] == split}
        for stage in (1, 2):
            rows = read_jsonl(out / f"stage{stage}-{split}.jsonl")
            assert rows and {r["scene"] for r in rows} <= scenes


def test_every_counted_ship_lies_on_water_inside_its_box(ds):
    """Checked through the data itself: the AEF vector under each ship is water's, its pixels are bright."""
    out, _ = ds
    store = TileStore.open(out / "tiles")
    protos = prototypes()
    truth = read_jsonl(out / "scenes.jsonl")
    n_ships = 0
    for t in truth:
        with rasterio.open(out / t["tif"]) as src:
            amp = src.read(1).astype(np.float64)
            transform, crs = src.transform, src.crs
        sea_level = np.median(amp)
        for target in t["targets"]:
            x1, y1, x2, y2 = target["box"]
            assert 0 <= x1 < x2 <= CHIP and 0 <= y1 < y2 <= CHIP
            inside = amp[y1:y2, x1:x2]
            assert inside.max() > 3 * sea_level  # the target is in its box
            if target["label"] != "ship":
                continue
            n_ships += 1
            assert target["cover"] == "water"
            from rasterio.warp import transform as warp

            e, nn = transform @ ((x1 + x2) / 2, (y1 + y2) / 2)
            (lon,), (lat,) = warp(crs, "EPSG:4326", [e], [nn])
            year = int(t["date"][:4])
            feats, mask = store.lookup_points(np.array([lon]), np.array([lat]), year)
            assert mask[0]
            assert int(np.argmax(protos @ feats[0])) == 0  # water's prototype is the nearest
        assert t["counts"]["ship"] == sum(x["label"] == "ship" for x in t["targets"])
    assert n_ships >= 5


def test_answers_agree_with_the_ground_truth(ds):
    out, _ = ds
    truth = {t["id"]: t for t in read_jsonl(out / "scenes.jsonl")}
    rows = [r for sp in ("train", "val", "test") for r in read_jsonl(out / f"stage2-{sp}.jsonl")]
    tasks = {r["task"] for r in rows}
    assert {"count", "detect", "classify"} <= tasks
    for r in rows:
        t = truth[r["scene"]]
        if r["id"].endswith("count-ship"):
            assert r["answer"] == str(t["counts"]["ship"])
        if r["task"] == "detect":
            assert r["question"] == DETECT_PROMPT.replace("{label}", "ship")
            # in reading order: top to bottom, then left to right
            ships = sorted((x["box"] for x in t["targets"] if x["label"] == "ship"), key=lambda b: (b[1], b[0]))
            assert r["answer"] == ("None" if not ships else json.dumps([{"bbox_2d": b, "label": "ship"} for b in ships]))
        if r["task"] == "classify":
            box = json.loads(r["question"][r["question"].index("["):r["question"].index("]") + 1])
            assert any(x["box"] == box and x["label"] == r["answer"] for x in t["targets"])
        assert r["group"] == t["group"]


def test_grid_rows_name_what_lies_in_each_cell(ds):
    """Stage 0's grid rows, one per scene, agree with the truth: each target named in its box centre's cell."""
    out, _ = ds
    truth = {t["id"]: t for t in read_jsonl(out / "scenes.jsonl")}
    for split in ("train", "val", "test"):
        rows = read_jsonl(out / f"stage0-grid-{split}.jsonl")
        assert sorted(r["scene"] for r in rows) == sorted(k for k, t in truth.items() if t["split"] == split)
        for r in rows:
            cells = dict(part.split(": ") for part in r["answer"].split("; "))
            assert list(cells) == [c for row in GRID_CELLS for c in row]  # every cell, in reading order
            named = 0
            for content in cells.values():
                for name in content.split(", "):
                    if name != "nothing":
                        n, _, label = name.partition(" ")
                        named += int(n) if n.isdigit() else 1
            assert named == len(truth[r["scene"]]["targets"]) and r["task"] == "grid"


def test_grid_answer_on_hand_made_targets():
    from fusar_edge.data.questions import grid_answer, grid_cells
    from fusar_edge.data.scene import Target

    ts = [Target("ship", (10, 10, 20, 14), "water"), Target("ship", (30, 5, 36, 9), "water"),
          Target("rock", (200, 100, 210, 110), "land"), Target("building", (150, 150, 160, 158), "urban")]
    assert grid_answer(ts, 224, 1.0) == ("top-left: 2 ships; top: nothing; top-right: nothing; left: nothing; "
                                         "center: nothing; right: rock; bottom-left: nothing; bottom: nothing; "
                                         "bottom-right: building")
    assert grid_answer(ts, 112, 0.5).startswith("top-left: 2 ships;")  # boxes scaled into the chip first
    cells = grid_cells(grid_answer(ts, 224, 1.0))
    assert len(cells) == 9 and cells["top-left"] == "2 ships" and cells["bottom-right"] == "building"
    assert grid_cells("Top-Left: Ship; middle: rock; garbage") == {"top-left": "ship"}  # unknown cells dropped


def test_rows_load_as_the_reference_reads_them(ds):
    """data.TripletDataset / load_aef semantics: required keys, coordinate_size, relative paths, NPZ anchors."""
    out, info = ds
    for split in ("train", "val", "test"):
        for stage in ("1", "2", "0-grid"):
            for r in read_jsonl(out / f"stage{stage}-{split}.jsonl"):
                assert all(k in r for k in ("image", "aef", "question", "answer"))
                assert r["coordinate_size"] == CHIP and isinstance(r["answer"], str)
                image, aef = out / r["image"], out / r["aef"]
                assert image.suffix == ".png" and image.is_file() and aef.is_file()
                with np.load(aef, allow_pickle=False) as npz:
                    f, p = npz["features"].astype(np.float32), npz["positions"].astype(np.float32)
                assert f.shape == (256, 64) and p.shape == (256, 2)
                assert np.isfinite(f).all() and (p >= 0).all() and (p <= 1).all()
    assert info["rows"]["stage2-train"] == len(read_jsonl(out / "stage2-train.jsonl"))


def test_bad_arguments_and_existing_output(tmp_path, capsys):
    with pytest.raises(InputError, match="--chip"):
        synth(tmp_path / "a", 6, chip=100)
    with pytest.raises(InputError, match="--n"):
        synth(tmp_path / "a", 2, chip=112)
    assert not (tmp_path / "a").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--n", "3", "--chip", "56", "--per-region", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--n", "3", "--chip", "56"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fusar-edge: error: {tmp_path / 'b'}: already exists (pass --force to replace it)"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_seeds_and_chips_out_of_range_are_one_line(tmp_path, capsys):
    for argv, words in ((["data", "synth", "--out", str(tmp_path / "c"), "--n", "3", "--seed", "-1"], ["--seed", ">= 0"]),
                        (["data", "synth", "--out", str(tmp_path / "c"), "--n", "3", "--chip", "28000"],
                         ["--chip", "1008"]),
                        (["sample", str(tmp_path / "s"), "--seed", "-1"], ["--seed", ">= 0"])):
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and all(w in err[0] for w in words), (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_a_large_sample_gets_a_coarser_aef_layer_and_its_anchors(tmp_path):
    """Past 1024 px the sample's AEF layer takes 2 scene pixels per AEF pixel (memory: a 4096 px
    sample at full resolution needed ~30 GB); its anchors still cover the scene."""
    import rasterio

    from fusar_edge.data.synth import PIXEL_M, sample_scene
    from fusar_edge.geo.anchors import AnchorSet

    paths = sample_scene(tmp_path / "big", seed=1, size=1036)
    tiles = sorted((tmp_path / "big" / "tiles").rglob("*.aef"))
    assert tiles
    anchors = AnchorSet.load(paths["anchors"])
    assert anchors.size == 256 and anchors.coverage == 1.0
    with rasterio.open(paths["scene_tif"]) as ds:
        assert ds.width == 1036 and ds.res == (PIXEL_M, PIXEL_M)
