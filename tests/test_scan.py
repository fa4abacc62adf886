"""`fusar-edge scan`: chips answered, boxes mapped and merged, resumable with byte-identical outputs."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio

from fusar_edge.cli import main
from fusar_edge.data.synth import sample_scene
from fusar_edge.errors import InputError
from fusar_edge.scan.journal import JOURNAL
from fusar_edge.scan.run import OUTPUTS, scan_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 448-px synthetic scene (3 x 3 chips of 224 px at overlap 32) whose 5 ships all lie in
    more than one chip, 2 of them cut by a chip border."""
    return sample_scene(tmp_path_factory.mktemp("scan_scene"), seed=11, size=448)


@dataclass
class _Config:
    chip_size: int = 224
    name: str = "oracle"


@dataclass
class _Answer:
    answer: list
    text: str
    parse_error: None = None
    anchor: dict = field(default_factory=lambda: {"source": "none", "coverage": 0.0, "tlm": "off"})
    timings_ms: dict = field(default_factory=lambda: {"total": 1.0})


class OracleRuntime:
    """Answers each chip with the true ships it sees (clipped to the chip), as a perfect model
    would: what scan does with boxes can then be checked exactly. ``fail_after`` kills the run."""

    config, weights = _Config(), "oracle-weights"

    def __init__(self, ships, fail_after=None):
        self.ships, self.fail_after, self.calls = ships, fail_after, 0

    def ask(self, img, question, task=None, label=None, no_anchors=False, max_new_tokens=None, date=None):
        self.asked = {"max_new_tokens": max_new_tokens, "date": date}
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        x0, y0 = _OFFSETS[img.path]
        boxes = []
        for sx0, sy0, sx1, sy1 in self.ships:
            cx0, cy0 = max(sx0 - x0, 0), max(sy0 - y0, 0)
            cx1, cy1 = min(sx1 - x0, img.width), min(sy1 - y0, img.height)
            if cx1 > cx0 and cy1 > cy0:
                boxes.append({"bbox_2d": [cx0, cy0, cx1, cy1], "bbox_chip": [cx0, cy0, cx1, cy1], "label": "ship"})
        return _Answer(boxes, json.dumps(boxes))


_OFFSETS = {}  # chip image path -> its window's offset in the scene (recorded by the `oracle` fixture)


@pytest.fixture
def oracle(scene, monkeypatch):
    """Record each chip's window so the oracle knows where it is."""
    from fusar_edge.scan import reader as R

    real = R.SceneReader.read

    def read(self, chip):
        img = real(self, chip)
        if img is not None:
            _OFFSETS[img.path] = (chip.x0, chip.y0)
        return img

    monkeypatch.setattr(R.SceneReader, "read", read)
    return lambda **kw: OracleRuntime(scene["ships"], **kw)


def _bytes(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def test_detections_are_mapped_and_merged_across_overlaps(scene, oracle, tmp_path):
    summary = scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=32)
    assert summary["chips"] == 9 and summary["chips_answered"] + summary["chips_nodata"] == 9
    fc = json.loads((tmp_path / "scene" / "detections.geojson").read_text())
    ships = sorted(tuple(b) for b in scene["ships"])
    # every ship once, whole, although chips overlap and cut some of them
    got = sorted(tuple(int(round(v)) for v in f["properties"]["scene_box"]) for f in fc["features"])
    assert got == ships and summary["detections_before_merge"] > len(ships)
    with rasterio.open(scene["scene_tif"]) as ds:
        for f in fc["features"]:
            x0, y0, x1, y1 = f["properties"]["scene_box"]
            ring = np.array(f["geometry"]["coordinates"][0])
            assert (ring[0] == ring[-1]).all() and len(ring) == 5
            # rasterio's own pixel -> CRS -> lon/lat of the box's corners (pixel corners: offset "ul")
            rows, cols = [y0, y0, y1, y1], [x0, x1, x1, x0]
            xs, ys = rasterio.transform.xy(ds.transform, rows, cols, offset="ul")
            lon, lat = rasterio.warp.transform(ds.crs, "EPSG:4326", xs, ys)
            want = sorted(zip(np.round(lon, 7), np.round(lat, 7)))
            assert np.allclose(sorted(map(tuple, ring[:4])), want, atol=2e-7)
    lines = (tmp_path / "scene" / "chips.jsonl").read_text().splitlines()
    assert [json.loads(s)["chip"] for s in lines] == list(range(9))


def test_a_killed_run_resumes_to_byte_identical_outputs(scene, oracle, tmp_path):
    whole = tmp_path / "whole"
    scan_scene(oracle(), Path(scene["scene_tif"]), whole, chip=224, overlap=32)
    for kill_at in (0, 4, 8):
        out = tmp_path / f"killed{kill_at}"
        with pytest.raises(KeyboardInterrupt):
            scan_scene(oracle(fail_after=kill_at), Path(scene["scene_tif"]), out, chip=224, overlap=32)
        assert not (out / "scene" / "detections.geojson").exists()  # nothing half-written
        journal = out / "scene" / JOURNAL
        with open(journal, "a") as f:
            f.write('{"chip": 99, "torn')  # a line cut by the kill
        rt = oracle()
        scan_scene(rt, Path(scene["scene_tif"]), out, chip=224, overlap=32)
        assert rt.calls == 9 - kill_at  # no chip done twice, none lost
        assert _bytes(out / "scene") == _bytes(whole / "scene")


def test_a_folder_of_another_run_is_refused(scene, oracle, tmp_path):
    scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=32)
    with pytest.raises(InputError, match="another setting .*label differs"):
        scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=32, label="aircraft")
    with pytest.raises(InputError, match="overlap differs"):
        scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=0)
    # a damaged journal line is named, not a traceback
    journal = tmp_path / "scene" / JOURNAL
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([*lines[:2], "garbage", *lines[2:]]) + "\n")
    with pytest.raises(InputError, match="journal.jsonl: line 3 is not a chip record"):
        scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=32)


def test_a_resume_with_another_tile_store_is_refused(scene, tmp_path, capsys):
    """The chips answered so far had the first store's anchors: the rest must not get others'."""
    import shutil

    other = tmp_path / "other-tiles"
    shutil.copytree(scene["tiles"], other)
    args = ["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--task", "count", "--overlap", "0",
            "--threads", "1", "--quiet"]
    assert main(args + ["--tiles", str(scene["tiles"])]) == 0
    capsys.readouterr()
    assert main(args + ["--tiles", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "anchors differs" in err[0], err
    assert main(args + ["--tiles", str(scene["tiles"]), "--allow-no-coverage"]) == 2


def test_a_crs_with_no_way_to_lon_lat_is_one_line_and_the_batch_goes_on(scene, tmp_path, capsys):
    local = _rewrite(scene["scene_tif"], tmp_path / "local.tif", crs=rasterio.crs.CRS.from_wkt(
        'LOCAL_CS["arbitrary",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'))
    args = ["--out", str(tmp_path / "o"), "--no-anchors", "--task", "count", "--overlap", "0", "--threads", "1",
            "--quiet"]
    assert main(["scan", str(local), str(scene["scene_tif"]), *args]) == 2
    captured = capsys.readouterr()
    assert "local.tif: its CRS LOCAL_CS cannot be converted to lon/lat" in captured.err
    assert "4 of 4 chips answered" in captured.out  # the other scene finished
    assert main(["ask", str(local), "How many ships?", "--no-anchors", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot be converted to lon/lat" in err[0], err


def test_nodata_chips_are_skipped(tmp_path, oracle, scene):
    with rasterio.open(scene["scene_tif"]) as ds:
        profile, data = ds.profile, ds.read()
        tags = ds.tags()
    data[:, :, :224] = 0  # the swath's zero fill over the left half
    path = tmp_path / "half.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.update_tags(**tags)
    summary = scan_scene(oracle(), path, tmp_path / "out", chip=224, overlap=0)
    assert summary["chips"] == 4 and summary["chips_nodata"] == 2


def test_scan_cli_with_the_built_in_demo(scene, tmp_path, capsys):
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path), "--tiles", str(scene["tiles"]),
                 "--task", "count", "--overlap", "0", "--threads", "1", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "4 of 4 chips answered" in said
    summary = json.loads((tmp_path / "scene" / "summary.json").read_text())
    assert len(summary["count_per_chip"]) == 4 and summary["coordinates"] == "EPSG:4326"
    assert summary["count_sum"] == sum(summary["count_per_chip"].values())


def test_scan_cli_bad_input_is_one_line(tmp_path, capsys, scene):
    assert main(["scan", str(tmp_path / "none.tif"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"fusar-edge: error: scene {tmp_path / 'none.tif'}: no such file"
    # a 1-px stride would make millions of chips of a real scene: refused before any is read
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--chip", "224",
                 "--overlap", "223", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "fusar-edge: error: --overlap 223: at most half of the chip (112 px for --chip 224)"
    assert not (tmp_path / "o").exists()
    for flag, value, says in (("--chip", "0", "--chip: expected a positive integer, got '0'"),
                              ("--overlap", "-1", "--overlap -1: must be at least 0")):
        assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", flag, value,
                     "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "o").exists()
    # a band the scene does not have: one line, nothing written
    assert main(["scan", str(scene["scene_tif"]), "--out", str(tmp_path / "o"), "--no-anchors", "--band", "5",
                 "--threads", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "band 5 out of range" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_cut_off_sliver_from_another_chip_is_dropped_but_one_chips_own_boxes_stay():
    from fusar_edge.scan.merge import Detection, merge_detections

    whole = Detection((100, 100, 120, 140), "ship", chip=0, chip_box=[], margin=30)
    sliver = Detection((100, 100, 120, 106), "ship", chip=1, chip_box=[], margin=0)  # IoU 0.15 with the whole
    assert merge_detections([sliver, whole]) == [whole]
    inner = Detection((104, 110, 110, 116), "ship", chip=0, chip_box=[], margin=30)  # the model's own second box
    assert merge_detections([whole, inner]) == [whole, inner]


def _rewrite(src, dst, **changes):
    """A copy of GeoTIFF ``src`` with profile ``changes`` (another CRS or transform)."""
    with rasterio.open(src) as ds:
        profile, data, tags = ds.profile, ds.read(), ds.tags()
    profile.update(changes)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        out.update_tags(**tags)
    return Path(dst)


def _assert_features_match_rasterio(path, fc):
    with rasterio.open(path) as ds:
        assert fc["features"]
        for f in fc["features"]:
            x0, y0, x1, y1 = f["properties"]["scene_box"]
            xs, ys = rasterio.transform.xy(ds.transform, [y0, y0, y1, y1], [x0, x1, x1, x0], offset="ul")
            lon, lat = rasterio.warp.transform(ds.crs, "EPSG:4326", xs, ys)
            ring = np.array(f["geometry"]["coordinates"][0])
            assert np.allclose(sorted(map(tuple, ring[:4])), sorted(zip(lon, lat)), atol=2e-7)


def test_scenes_in_different_crss_each_map_through_their_own(scene, oracle, tmp_path):
    """A batch mixing CRSs: every scene's GeoJSON is EPSG:4326, each mapped from its own CRS."""
    north = Path(scene["scene_tif"])
    south = _rewrite(north, tmp_path / "south.tif", crs="EPSG:32733",  # UTM 33 south, 10 m pixels
                     transform=rasterio.Affine(10.0, 0.0, 420000.0, 0.0, -10.0, 7000000.0))
    lonlat = _rewrite(north, tmp_path / "lonlat.tif", crs="EPSG:4326",
                      transform=rasterio.Affine(1e-4, 0.0, -70.5, 0.0, -1e-4, -33.0))
    for path in (north, south, lonlat):
        summary = scan_scene(oracle(), path, tmp_path / "out", chip=224, overlap=32)
        assert summary["coordinates"] == "EPSG:4326" and summary["detections"] == len(scene["ships"])
        _assert_features_match_rasterio(path, json.loads((tmp_path / "out" / path.stem / "detections.geojson").read_text()))
    crss = {json.loads((tmp_path / "out" / p.stem / "summary.json").read_text())["georef"]["crs"]
            for p in (north, south, lonlat)}
    assert crss == {"EPSG:32631", "EPSG:32733", "EPSG:4326"}


def test_a_scene_without_georeference_has_null_geometries_and_pixel_boxes(scene, oracle, tmp_path):
    """No CRS, no transform: nothing to put on a map. The detections are still found and merged,
    each with its pixel box, and no pixel coordinates pose as lon/lat."""
    import warnings

    plain = tmp_path / "plain.tif"
    with rasterio.open(scene["scene_tif"]) as ds:
        data = ds.read()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(plain, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                           dtype=data.dtype) as out:
            out.write(data)
    summary = scan_scene(oracle(), plain, tmp_path / "out", chip=224, overlap=32, no_anchors=True)
    assert summary["georef"] == {"kind": "none", "crs": None} and summary["coordinates"].startswith("none")
    fc = json.loads((tmp_path / "out" / "plain" / "detections.geojson").read_text())
    assert all(f["geometry"] is None for f in fc["features"])
    got = sorted(tuple(int(round(v)) for v in f["properties"]["scene_box"]) for f in fc["features"])
    assert got == sorted(tuple(b) for b in scene["ships"])


def test_a_grid_in_metres_labelled_as_degrees_is_refused_before_any_chip(scene, oracle, tmp_path):
    """A common mislabel: the UTM grid kept, the CRS tag set to EPSG:4326. Written through, the
    GeoJSON would hold 500000-degree coordinates; it is one line naming the scene, nothing written."""
    bad = _rewrite(Path(scene["scene_tif"]), tmp_path / "badgeo.tif", crs="EPSG:4326")
    with pytest.raises(InputError, match=r"scene .*badgeo.tif: its corner .* off the Earth: is EPSG:4326 the CRS"):
        scan_scene(oracle(), bad, tmp_path / "out", chip=224, overlap=32)
    assert not (tmp_path / "out").exists()


def test_a_second_scan_into_the_same_folder_is_refused_while_one_runs(scene, oracle, tmp_path):
    from fusar_edge.scan.run import _lock

    folder = tmp_path / "out" / Path(scene["scene_tif"]).stem
    folder.mkdir(parents=True)
    with _lock(folder):  # another scan, running
        with pytest.raises(InputError, match="another scan .* is writing this scene's outputs"):
            scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path / "out", chip=224, overlap=32)
    summary = scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path / "out", chip=224, overlap=32)  # released
    assert summary["chips_answered"] + summary["chips_nodata"] == 9


def test_date_and_token_bound_reach_every_chip_and_the_journal(scene, oracle, tmp_path):
    rt = oracle()
    scan_scene(rt, Path(scene["scene_tif"]), tmp_path / "out", chip=224, overlap=32, max_new_tokens=40,
               date="2021-06-01")
    assert rt.asked == {"max_new_tokens": 40, "date": "2021-06-01"}
    header = json.loads((tmp_path / "out" / "scene" / JOURNAL).read_text().splitlines()[0])
    assert json.dumps(header).count('"max_new_tokens": 40') == 1 and "2021-06-01" in json.dumps(header)
    with pytest.raises(InputError):  # another bound: another run, refused rather than merged
        scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path / "out", chip=224, overlap=32, max_new_tokens=41,
                   date="2021-06-01")


def test_scan_cli_names_what_is_wrong_with_its_inputs(scene, tmp_path, capsys):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    arr = tmp_path / "x.npy"
    np.save(arr, np.zeros((8, 8), np.float32))
    a, b = tmp_path / "d1" / "s.tif", tmp_path / "d2" / "s.tif"
    for src in (a, b):
        src.write_bytes(Path(scene["scene_tif"]).read_bytes())
    cases = [([str(tmp_path / "d1")], "a directory; give the scene files"),
             ([str(arr)], "a .npy image goes to `fusar-edge ask`"),
             ([str(a), str(b)], f"scenes {a} and {b}: both would write OUT/s/"),
             ([str(a), "--date", "2021-13-01"], "expected a calendar date"),
             ([str(a), "--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer"),
             ([str(a), "--device", "gpu0"], "expected auto, cpu, cuda or cuda:N, got 'gpu0'"),
             ([str(a), "--out", str(a)], "is a file, not a folder")]
    for argv, message in cases:
        argv = [*argv, "--out", str(tmp_path / "o")] if "--out" not in argv else argv
        assert main(["scan", *argv, "--no-anchors"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_the_quicklook_shows_the_merged_boxes(scene, oracle, tmp_path):
    from PIL import Image

    scan_scene(oracle(), Path(scene["scene_tif"]), tmp_path, chip=224, overlap=32)
    img = np.asarray(Image.open(tmp_path / "scene" / "quicklook.png").convert("RGB"))
    assert img.shape == (448, 448, 3)  # a 448-px scene is its own overview
    red = (img[..., 0] == 255) & (img[..., 1] == 40) & (img[..., 2] == 40)
    for x0, y0, x1, y1 in scene["ships"]:  # each ship's box outline is drawn...
        cx = (x0 + x1) // 2
        assert red[max(y0 - 2, 0):y0 + 2, cx].any() or red[max(y1 - 2, 0):y1 + 2, cx].any()
    drawn = np.zeros_like(red)
    for x0, y0, x1, y1 in scene["ships"]:
        drawn[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
    assert not (red & ~drawn).any()  # ...and nothing else is


def test_a_full_disk_stops_cleanly_and_the_run_resumes(scene, oracle, tmp_path, monkeypatch):
    import errno

    from fusar_edge.errors import FusarError
    from fusar_edge.scan import journal as J

    whole = tmp_path / "whole"
    scan_scene(oracle(), Path(scene["scene_tif"]), whole, chip=224, overlap=32)
    real, calls = J.Journal.append, []

    def append(self, record):
        calls.append(record["chip"])
        if len(calls) > 3:
            with open(self.path, "a") as f:
                f.write('{"chip": 5, "te')  # the disk filled mid-line
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(J.Journal, "append", append)
    out = tmp_path / "full"
    with pytest.raises(FusarError, match=r"disk full \(No space left on device\) with 3 of 9 chips done; they are kept"):
        scan_scene(oracle(), Path(scene["scene_tif"]), out, chip=224, overlap=32)
    assert not (out / "scene" / "summary.json").exists()
    monkeypatch.setattr(J.Journal, "append", real)  # space freed
    rt = oracle()
    scan_scene(rt, Path(scene["scene_tif"]), out, chip=224, overlap=32)
    assert rt.calls == 6 and _bytes(out / "scene") == _bytes(whole / "scene")


def test_an_unreadable_scene_in_a_batch_is_reported_and_the_others_finish(scene, tmp_path, capsys):
    good = Path(scene["scene_tif"])
    raw = good.read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(raw[: len(raw) // 2])  # a transfer cut half way
    code = main(["scan", str(bad), str(good), "--out", str(tmp_path / "o"), "--no-anchors", "--task", "count",
                 "--overlap", "0", "--threads", "1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2
    assert f"fusar-edge: error: scene {bad}" in err or f"image {bad}" in err
    assert "skipped; the other scenes go on" in err and json.loads(err.strip().splitlines()[-1])["failed"]
    assert "scene.tif: 4 of 4 chips answered" in out and (tmp_path / "o" / "scene" / "summary.json").exists()


def test_chips_outside_the_tile_store_stop_the_scan_or_are_flagged(scene, tmp_path, capsys):
    """Moved 240 px east, this scene's east column of chips lies beyond the tile store (which
    covers the 448-px sample with 8 px to spare) and its west column partly: without
    --allow-no-coverage that is an error naming the flag; with it the uncovered chips are
    answered without anchors and flagged, and the partly covered ones flagged too."""
    with rasterio.open(scene["scene_tif"]) as ds:
        t = ds.transform
    shifted = _rewrite(scene["scene_tif"], tmp_path / "east.tif",
                       transform=rasterio.transform.Affine(t.a, t.b, t.c + 240 * t.a, t.d, t.e, t.f))
    args = ["scan", str(shifted), "--tiles", str(scene["tiles"]), "--task", "count", "--overlap", "0",
            "--threads", "1", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-no-coverage" in err[0], err
    assert main(args + ["--out", str(tmp_path / "flagged"), "--allow-no-coverage"]) == 0
    assert "without AEF anchors" in capsys.readouterr().out
    summary = json.loads((tmp_path / "flagged" / "east" / "summary.json").read_text())
    assert summary["chips_without_anchors"] == [1, 3]  # the east column of the 2 x 2 grid
    assert summary["chips_partly_covered"] == [0, 2]
    rows = [json.loads(s) for s in (tmp_path / "flagged" / "east" / "chips.jsonl").read_text().splitlines()]
    assert [r["anchor"]["tlm"] for r in rows] == ["applied", "skipped", "applied", "skipped"]


def test_a_run_killed_at_random_chips_over_and_over_ends_byte_identical(scene, oracle, tmp_path):
    """Killed again and again at random chips (seeded), the run still ends with the same bytes,
    and across all the attempts no chip is answered twice."""
    import random

    whole = tmp_path / "whole"
    scan_scene(oracle(), Path(scene["scene_tif"]), whole, chip=224, overlap=32)
    rng, out, calls = random.Random(14), tmp_path / "killed", 0
    while not (out / "scene" / "summary.json").exists():
        rt = oracle(fail_after=rng.randint(0, 3))
        try:
            scan_scene(rt, Path(scene["scene_tif"]), out, chip=224, overlap=32)
        except KeyboardInterrupt:
            pass
        calls += rt.calls
    assert calls == 9 and _bytes(out / "scene") == _bytes(whole / "scene")
    # --no-anchors needs no anchor footprint: a scene across lon 180 is answered
    across = _rewrite(scene["scene_tif"], tmp_path / "across.tif", crs="EPSG:4326",
                      transform=rasterio.transform.Affine(1e-4, 0, 179.98, 0, -1e-4, 54.0))
    assert main(["ask", str(across), "How many ships?", "--no-anchors", "--threads", "1"]) == 0


def test_outputs_are_written_from_a_journal_read_chip_by_chip(tmp_path):
    """A 22,500-chip scene whose journal is ~35 MB: writing its outputs holds a few numbers per
    chip, not the records (all of this journal's records at once: 60 MB), and a line torn by a kill, longer
    than the journal's backward read, is dropped whole."""
    import tracemalloc
    from types import SimpleNamespace

    from fusar_edge.scan.grid import chip_grid
    from fusar_edge.scan.journal import Journal
    from fusar_edge.scan.run import _write_outputs

    grid = chip_grid(150 * 224, 150 * 224, 224, 0)
    header = {"identity": {"scene": "big"}, "weights": "w", "preset": "p", "task": "detect", "label": "ship",
              "chip": 224, "overlap": 0, "chips": len(grid), "no_anchors": True, "band": 1, "anchors": None}
    journal = Journal(tmp_path / JOURNAL, header)
    pad = "x" * 1500  # a long answer text, as a chatty model writes
    with open(journal.path, "a", encoding="utf-8") as f:
        for c in reversed(grid):  # finished in another order than the grid's: chips.jsonl is in grid order
            f.write(json.dumps({"chip": c.index, "status": "done" if c.index % 7 else "nodata", "answer": [],
                                "text": pad, "timings": {"total": 1.0}}, sort_keys=True) + "\n")
        f.write('{"chip": 0, "text": "' + "y" * 200_000)  # killed mid-line, longer than one backward read
    assert journal.path.stat().st_size > 35e6
    journal = Journal(journal.path, header)  # reopened as a resumed scan does: the torn line goes
    reader = SimpleNamespace(width=150 * 224, height=150 * 224, date=None, overview=np.zeros((64, 64), np.uint8),
                             georef=SimpleNamespace(kind="none", describe=lambda: {"kind": "none"}))
    tracemalloc.start()
    try:
        summary = _write_outputs(tmp_path, reader, grid, journal, header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 15e6, f"peak {peak / 1e6:.1f} MB"
    assert summary["chips"] == len(grid) and summary["chips_nodata"] == len(range(0, len(grid), 7))
    with open(tmp_path / "chips.jsonl", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            assert r["chip"] == i and "timings" not in r and r["text"] == pad
    assert i == len(grid) - 1


@pytest.mark.parametrize("overviews", [False, True])
def test_the_scene_overview_is_read_in_strips_equal_to_one_read(tmp_path, overviews, monkeypatch):
    """The decimated read behind the stretch and the quick-look goes to GDAL in strips when the
    file has no overviews (all of it is read: Ctrl-C is handled between strips) and gives the
    pixels one call gives (a ratio that is not a whole number: 5003 rows to 2048); with overviews,
    one quick call."""
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    from fusar_edge.scan import reader as R

    path = tmp_path / "wide.tif"
    data = np.random.default_rng(3).gamma(1.0, 900.0, (5003, 2101)).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=2101, height=5003, count=1, dtype="uint16", tiled=True,
                       crs="EPSG:32631", transform=from_origin(500000, 5000000, 10, 10)) as ds:
        ds.write(data, 1)
        if overviews:
            ds.build_overviews([2, 4], Resampling.average)
    calls = []
    with R.SceneReader(path) as scene:
        shape = scene.overview.shape
        real = scene.ds.read
        monkeypatch.setattr(scene.ds, "read", lambda *a, **kw: calls.append(kw) or real(*a, **kw), raising=False)
        strips = scene._decimated(shape)
        whole = real(1, out_shape=shape, resampling=Resampling.average)
    assert shape == (2048, 860) and len(calls) == (1 if overviews else 32)
    np.testing.assert_array_equal(strips, whole)
