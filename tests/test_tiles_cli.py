"""`fusar-edge tiles info|lookup` and `ask --tiles` / `Runtime.open(tiles=...)` end to end."""

import json

import numpy as np
import pytest

from fusar_edge.cli import main
from fusar_edge.errors import AnchorError, FusarError
from fusar_edge.geo.anchors import Anchor, AnchorSet
from fusar_edge.geo.synthetic import write_demo_scene
from fusar_edge.tiles.store import TileStore

from conftest import one_line


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_scene(tmp_path_factory.mktemp("demo"), size=128, seed=2)


@pytest.fixture(scope="module")
def runtime(demo):
    from fusar_edge.runtime import Runtime

    return Runtime.open(tiles=demo["tiles"])


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusar-edge: error: "), err
    return err[0]


def test_lookup_bbox_writes_the_reference_npz(demo, tmp_path, capsys):
    out = tmp_path / "a.npz"
    b = demo["bounds"]
    assert main(["tiles", "lookup", "--store", demo["tiles"], "--bbox", *map(str, b), "--date", demo["date"],
                 "--grid", "4", "6", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 24 and summary["year"] == int(demo["date"][:4]) and summary["crs"] == "EPSG:32631"
    with np.load(out) as npz:
        assert {"features", "positions", "mask", "year"} <= set(npz.files)
        assert npz["features"].shape == (24, 64) and npz["features"].dtype == np.float32
        assert npz["positions"].dtype == np.float32 and npz["mask"].dtype == bool
        want = TileStore.open(demo["tiles"]).lookup(Anchor(tuple(b), demo["date"]), grid=(4, 6))
        np.testing.assert_array_equal(npz["features"], want.features)
        np.testing.assert_array_equal(npz["mask"], want.mask)
    assert AnchorSet.load(out).size == 24


def test_lookup_from_geotiff_takes_its_date(demo, tmp_path, capsys):
    out = tmp_path / "b.npz"
    assert main(["tiles", "lookup", "--store", demo["tiles"], "--image", demo["scene_tif"], "--out", str(out)]) == 0
    assert "256 anchors" in capsys.readouterr().out
    aset = AnchorSet.load(out)
    assert aset.year == int(demo["date"][:4])
    assert 0.5 < aset.coverage < 1.0  # the demo tile has a no-data hole under the scene
    assert not aset.features[~aset.mask].any()


def test_lookup_bad_input(demo, tmp_path, capsys):
    b = list(map(str, demo["bounds"]))
    assert main(["tiles", "lookup", "--store", demo["tiles"], "--bbox", *b, "--out", str(tmp_path / "x.npz")]) == 2
    assert "--date" in error_line(capsys)
    assert main(["tiles", "lookup", "--store", str(tmp_path / "none"), "--bbox", *b, "--date", "2023-01-01",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "none" in error_line(capsys)
    assert main(["tiles", "lookup", "--store", demo["tiles"], "--bbox", "10", "10", "10.1", "10.1", "--date",
                 "2023-01-01", "--out", str(tmp_path / "x.npz")]) == 2
    line = error_line(capsys)
    assert "no AEF data" in line and "tiles lookup --allow-empty" in line and "--allow-no-coverage" not in line
    assert main(["tiles", "lookup", "--store", demo["tiles"], "--bbox", *b, "--date", "2015-01-01",
                 "--out", str(tmp_path / "x.npz")]) == 2
    assert "2017" in error_line(capsys)
    assert not (tmp_path / "x.npz").exists()


def test_info(demo, capsys):
    assert main(["tiles", "info", "--store", demo["tiles"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tiles"] == 1 and info["years"] == [int(demo["date"][:4])]
    assert main(["tiles", "info", "--store", demo["tiles"]]) == 0
    assert "EPSG:32631" in capsys.readouterr().out


def test_ask_with_tiles_reports_the_lookup(demo, capsys):
    assert main(["ask", demo["scene_tif"], "How many ships are there?", "--tiles", demo["tiles"], "--json",
                 "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    a = res["anchor"]
    assert a["source"] == f"tiles:{demo['tiles']}" and a["crs"] == "EPSG:32631"
    assert a["year"] == int(demo["date"][:4]) and a["count"] == 256 and 0.5 < a["coverage"] < 1.0
    assert a["date"] == demo["date"]


def test_ask_with_tiles_uses_nearest_year_and_says_so(demo, runtime):
    ans = runtime.ask(demo["scene_tif"], "Describe the image.", date="2021-06-01", max_new_tokens=2)
    assert ans.anchor["year"] == int(demo["date"][:4]) and "nearest" in ans.anchor["notes"][0]


def test_ask_anchor_object_and_errors(demo, runtime):
    anchor = Anchor(demo["bounds"], demo["date"])
    ans = runtime.ask(demo["scene_png"], "Describe the image.", anchors=anchor, max_new_tokens=2)
    assert ans.anchor["count"] == 256 and ans.anchor["source"].startswith("tiles:")
    # a PNG has no georeference: the store cannot be used without a footprint
    with pytest.raises(AnchorError) as e:
        runtime.ask(demo["scene_png"], "Describe the image.", max_new_tokens=2)
    one_line(e, "scene.png", "--bbox")
    # with a bbox it works, and a bbox outside the store is a clear error
    ans = runtime.ask(demo["scene_png"], "Describe.", bbox=demo["bounds"], date=demo["date"], max_new_tokens=2)
    assert ans.anchor["coverage"] > 0.5
    with pytest.raises(AnchorError) as e:
        runtime.ask(demo["scene_png"], "Describe.", bbox=(10, 10, 10.1, 10.1), date=demo["date"], max_new_tokens=2)
    one_line(e, "no AEF data", "--allow-no-coverage")  # names the way out


def test_ask_allow_no_coverage(demo, capsys):
    assert main(["ask", demo["scene_png"], "Describe.", "--tiles", demo["tiles"], "--bbox", "10", "10", "10.1",
                 "10.1", "--date", demo["date"], "--allow-no-coverage", "--json", "--max-new-tokens", "2"]) == 0
    a = json.loads(capsys.readouterr().out)["anchor"]
    assert a["coverage"] == 0.0 and "TLM not applied" in a["notes"][-1]


def test_anchor_without_store_and_exclusive_flags(demo, capsys):
    from fusar_edge.runtime import Runtime

    rt = Runtime.open("tiny")
    with pytest.raises(FusarError) as e:
        rt.ask(demo["scene_png"], "Describe.", anchors=Anchor(demo["bounds"], demo["date"]), max_new_tokens=2)
    one_line(e, "tiles")
    assert main(["ask", demo["scene_tif"], "q", "--tiles", demo["tiles"], "--anchors", demo["anchors"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusar-edge: error: ") and "not allowed with" in err[0]


def test_verify_of_a_damaged_store_exits_2(demo, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(demo["tiles"], store)
    tile = next(store.rglob("*.aef"))
    data = bytearray(tile.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tile.write_bytes(bytes(data))
    assert main(["tiles", "verify", "--store", str(store)]) == 2
    assert "problem:" in capsys.readouterr().out
