"""AEF ingest into the tile store: orientation, cropping, selection, resume, bad inputs."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from aef_fixtures import (
    GCS,
    dequantize,
    expected_vector,
    official_scene,
    pixel_centre_lonlat,
    store_vector,
    tile_array,
    write_aef_zarr,
    write_index_csv,
    write_index_parquet,
    write_official_cog,
)
from conftest import one_line
from fusar_edge.errors import InputError
from fusar_edge.tiles import format as tf
from fusar_edge.tiles import ingest as ti
from fusar_edge.tiles.ingest import ingest
from fusar_edge.tiles.ingest_plan import MARGIN_PX
from fusar_edge.tiles.ingest_zarr import requantize

# a box around the 31N/32N boundary at 6°E, 45°N (inside both zones' synthetic tiles)
BBOX = (5.9985, 44.9985, 6.0015, 45.0012)


@pytest.fixture
def scene(tmp_path):
    return official_scene(tmp_path / "aef")


def by_source(report, cog):
    [rec] = [r for r in report.tiles if json.loads(r.source)["src"] == str(cog.path.resolve())]
    return rec


def assert_matches_source(store, rec, cog):
    """The tile holds the source's pixels, north-up, at the same ground position."""
    t = cog.transform
    col_off = (rec.x0 - t.c) / t.a
    row_off = (t.f - rec.y0) / -t.e
    assert col_off == round(col_off) and row_off == round(row_off)
    assert (rec.dx, rec.dy) == (10.0, 10.0)
    r0, c0 = int(round(row_off)), int(round(col_off))
    want = cog.values[r0:r0 + rec.height, c0:c0 + rec.width]
    np.testing.assert_array_equal(tile_array(store, rec), want)


def test_both_orientations_are_stored_north_up(scene, tmp_path, monkeypatch):
    monkeypatch.setattr(ti, "BLOCK_BYTES", 1)  # one 32-row block at a time: exercises block order
    store = tmp_path / "store"
    assert {c.bottom_up for c in scene} == {True, False}
    import rasterio

    for c in scene:  # the fixture writes the published orientation for real
        with rasterio.open(c.path) as ds:
            assert (ds.transform.e > 0) == c.bottom_up
    reads = []
    real = ti.read_cog_rows
    monkeypatch.setattr(ti, "read_cog_rows", lambda ds, u, r0, r1: (reads.append(r1 - r0), real(ds, u, r0, r1))[1])
    report = ingest([tmp_path / "aef"], store)
    assert max(reads) == 32 and len(reads) == 8  # windowed reads, one source block row each
    assert report.tiles_added == 4 and report.years == [2022, 2023]
    assert report.crs == ["EPSG:32631", "EPSG:32632"]
    for c in scene:
        rec = by_source(report, c)
        assert (rec.year, rec.epsg, rec.width, rec.height) == (c.year, c.epsg, 64, 64)
        assert (rec.x0, rec.y0) == (c.transform.c, c.transform.f)
        assert_matches_source(store, rec, c)
        # points picked in the source, compared through PROJ + the file's own geotransform
        for row, col in ((0, 0), (1, 62), (37, 5), (63, 63), (20, 40)):
            lon, lat = pixel_centre_lonlat(c, row, col)
            want = expected_vector(c, lon, lat)
            [got] = [tile_array(store, rec)[row, col]]
            if want is None:
                assert got[0] == tf.NODATA
            else:
                np.testing.assert_array_equal(got, want)
    gen, records, manifest = tf.read_generation(store)
    assert len(records) == 4 and manifest["dequantise"]
    assert not (store / ".ingest" / "journal.jsonl").exists()


def test_lookup_semantics_at_the_zone_boundary(scene, tmp_path):
    store = tmp_path / "store"
    ingest([tmp_path / "aef"], store, years=2023)
    z31, z32 = [c for c in scene if c.year == 2023]
    # west of 6°E the point's own zone is 31N, east of it 32N: each must come from its zone
    for lon, lat, cog in ((5.9990, 45.0004, z31), (6.0011, 44.9993, z32), (6.0001, 45.0001, z32)):
        want = expected_vector(cog, lon, lat)
        got = store_vector(store, lon, lat, 2023)
        if want is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(dequantize(got), dequantize(want))


def test_tilestore_lookup_reads_what_was_ingested(scene, tmp_path):
    from fusar_edge.tiles.store import TileStore

    store = tmp_path / "store"
    ingest([tmp_path / "aef"], store)
    ts = TileStore.open(store)
    rng = np.random.default_rng(3)
    lon, lat = rng.uniform(5.9950, 6.0048, 300), rng.uniform(44.9972, 45.0027, 300)
    for year in (2022, 2023):
        features, mask = ts.lookup_points(lon, lat, year)
        for i in range(len(lon)):
            cog = [c for c in scene if c.year == year and c.zone == (31 if lon[i] < 6.0 else 32)][0]
            want = expected_vector(cog, lon[i], lat[i])
            if want is None:
                continue  # a hole (or outside its own zone's tile): another zone's tile may answer
            assert mask[i]
            np.testing.assert_array_equal(features[i], dequantize(want))


def test_bbox_crops_to_the_covering_window(scene, tmp_path):
    store = tmp_path / "store"
    report = ingest([tmp_path / "aef"], store, bbox=BBOX, years=[2022])
    assert report.tiles_added == 2 and len(report.skipped) == 2  # the 2023 files
    for c in [c for c in scene if c.year == 2022]:
        rec = by_source(report, c)
        assert rec.width < 64 and rec.height < 64
        assert_matches_source(store, rec, c)
        lo0, la0, lo1, la1 = rec.lonlat_bounds
        # the window covers the bbox where the source does, plus a margin
        src = c.wgs84_bounds()
        assert lo0 <= max(BBOX[0], src[0]) and lo1 >= min(BBOX[2], src[2])
        assert la0 <= BBOX[1] and la1 >= BBOX[3]
        # ... and is no larger than the bbox plus the margin (and one pixel of rounding)
        w_m = (min(BBOX[2], src[2]) - max(BBOX[0], src[0])) * 111320 * math.cos(math.radians(45))
        assert rec.width <= w_m / 10 + 2 * MARGIN_PX + 3
    # every point of the bbox reads the same value as its source
    rng = np.random.default_rng(0)
    for lon, lat in zip(rng.uniform(BBOX[0], BBOX[2], 25), rng.uniform(BBOX[1], BBOX[3], 25)):
        got = store_vector(store, lon, lat, 2022)
        cog = [c for c in scene if c.year == 2022 and c.zone == (31 if lon < 6.0 else 32)][0]
        want = expected_vector(cog, lon, lat)
        if want is not None:
            np.testing.assert_array_equal(got, want)


def test_bbox_outside_one_zone_skips_it(scene, tmp_path):
    report = ingest([tmp_path / "aef"], tmp_path / "store", bbox=(5.9950, 44.998, 5.9960, 44.999))
    assert {r.epsg for r in report.tiles} == {32631}
    assert sum("outside bbox" in s for s in report.skipped) == 2


def test_no_tile_intersecting_bbox_is_an_error(scene, tmp_path):
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "aef"], tmp_path / "store", bbox=(10.0, 10.0, 10.1, 10.1))
    one_line(e, "bbox", "no AEF tile", "outside bbox")
    assert not (tmp_path / "store" / tf.CURRENT).exists()


def test_years_filter(scene, tmp_path):
    store = tmp_path / "store"
    r = ingest([tmp_path / "aef"], store, years=[2023])
    assert r.years == [2023] and r.tiles_added == 2
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "aef"], store, years=[2019])
    one_line(e, "2019", "not asked for")
    # a later ingest of the other year adds to the store
    r = ingest([tmp_path / "aef"], store, years=2022)
    assert r.tiles_added == 2 and r.store_tiles == 4
    assert sorted({rec.year for rec in tf.read_generation(store)[1]}) == [2022, 2023]


def test_year_from_tag_or_single_year_option(tmp_path):
    c = write_official_cog(tmp_path / "flat", 2021, 31, x0=600000, y0=5000000, year_dir=False, tags={"YEAR": "2021"},
                           seed=3, name="tagged.tiff")
    r = ingest([c.path], tmp_path / "s1")
    assert r.years == [2021]
    d = write_official_cog(tmp_path / "flat2", 2020, 31, x0=600000, y0=5000000, year_dir=False, name="noyear.tiff")
    with pytest.raises(InputError) as e:
        ingest([d.path], tmp_path / "s2")
    one_line(e, d.path, "year")
    r = ingest([d.path], tmp_path / "s2", years=[2020])
    assert r.years == [2020]
    assert_matches_source(tmp_path / "s2", r.tiles[0], d)


def test_index_csv_picks_files_by_bbox_and_year(scene, tmp_path):
    root = tmp_path / "aef"
    far = {"path": GCS + "2023/1N/absent-0000000000-0000000000.tiff", "year": 2023, "wgs84_west": -177.0,
           "wgs84_south": 1.0, "wgs84_east": -176.0, "wgs84_north": 2.0}
    index = write_index_csv(root / "aef_index.csv", scene, extra_rows=[far])
    store = tmp_path / "store"
    # a bbox west of the boundary selects only the 31N files; the absent far file is not needed
    r = ingest([index], store, bbox=(5.9950, 44.998, 5.9960, 44.999), years=[2023])
    assert [t.epsg for t in r.tiles] == [32631] and r.sources == 1
    assert_matches_source(store, r.tiles[0], [c for c in scene if c.year == 2023 and c.zone == 31][0])
    # index elsewhere: paths resolve under root
    moved = tmp_path / "elsewhere" / "aef_index.csv"
    moved.parent.mkdir()
    shutil.copy(index, moved)
    r = ingest([moved], tmp_path / "store2", bbox=BBOX, root=root)
    assert r.tiles_added == 4
    # a selected file that is not present locally: one error listing it
    with pytest.raises(InputError) as e:
        ingest([index], tmp_path / "store3", bbox=(-176.8, 1.2, -176.5, 1.5))
    one_line(e, index, "absent-0000000000-0000000000.tiff", "not present locally", "no downloads")
    with pytest.raises(InputError) as e:
        ingest([moved], tmp_path / "store3", bbox=BBOX)  # without root
    one_line(e, moved, "not present locally")


def test_index_crs_mismatch_and_vrt_paths(scene, tmp_path):
    root = tmp_path / "aef"
    index = write_index_csv(root / "aef_index.csv", scene[:1])
    text = index.read_text()
    index.write_text(text.replace("EPSG:32631", "EPSG:32633"))
    with pytest.raises(InputError) as e:
        ingest([index], tmp_path / "store")
    one_line(e, scene[0].path, "EPSG:32633", "EPSG:32631")
    index.write_text(text.replace(".tiff", ".vrt"))  # source.coop also lists the .vrt beside each .tiff
    r = ingest([index], tmp_path / "store")
    assert r.tiles_added == 1


def test_index_parquet(scene, tmp_path):
    pytest.importorskip("pyarrow")
    index = write_index_parquet(tmp_path / "aef" / "aef_index.parquet", scene)
    r = ingest([index], tmp_path / "store", bbox=BBOX, years=[2022])
    assert sorted(t.epsg for t in r.tiles) == [32631, 32632]
    for c in [c for c in scene if c.year == 2022]:
        assert_matches_source(tmp_path / "store", by_source(r, c), c)


def test_index_parquet_without_pyarrow_says_what_to_install(scene, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    index = write_index_parquet(tmp_path / "aef" / "aef_index.parquet", scene)
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(InputError) as e:
        ingest([index], tmp_path / "store")
    one_line(e, index, "pip install pyarrow")


@pytest.mark.parametrize("dtype,bottom_up,zarr_format,crs_attr", [
    ("int8", False, 3, "proj:code"),
    ("float32", True, 3, "proj:epsg"),
    ("int8", True, 2, "crs"),
])
def test_zarr_mosaic(tmp_path, dtype, bottom_up, zarr_format, crs_attr):
    pytest.importorskip("zarr")
    z = write_aef_zarr(tmp_path / "aef_region.zarr", years=(2022, 2023), dtype=dtype, bottom_up=bottom_up,
                       zarr_format=zarr_format, crs_attr=crs_attr)
    store = tmp_path / "store"
    r = ingest([z.path], store)
    assert r.tiles_added == 2 and r.crs == ["EPSG:4326"] and r.years == [2022, 2023]
    for k, year in enumerate(z.years):
        [rec] = [t for t in r.tiles if t.year == year]
        assert (rec.x0, rec.y0, rec.dx) == (z.transform.c, z.transform.f, z.transform.a)
        np.testing.assert_array_equal(tile_array(store, rec), z.values[k])
    # bbox crop + years; lookups agree with the source
    r = ingest([tmp_path], tmp_path / "store2", bbox=(6.0, 44.9995, 6.001, 45.0005), years=[2023])
    [rec] = r.tiles
    assert rec.width < z.values.shape[2] and rec.year == 2023
    for lon, lat in ((6.0003, 45.0001), (6.0008, 44.9999)):
        want = expected_vector(z, lon, lat, 2023)
        got = store_vector(tmp_path / "store2", lon, lat, 2023)
        np.testing.assert_array_equal(got, want)


def test_zarr_georeferencing_from_coordinates(tmp_path):
    pytest.importorskip("zarr")
    z = write_aef_zarr(tmp_path / "ok.zarr", years=(2022,), coords=True)
    r = ingest([z.path], tmp_path / "store")
    assert r.warnings == []
    np.testing.assert_array_equal(tile_array(tmp_path / "store", r.tiles[0]), z.values[0])
    # the whole mosaic's transform copied onto a subset: the coordinate arrays place it
    z = write_aef_zarr(tmp_path / "stale.zarr", years=(2022,), coords=True, mosaic_attrs=True, bottom_up=True)
    r = ingest([z.path], tmp_path / "store2")
    assert len(r.warnings) == 1 and "stale.zarr" in r.warnings[0]
    rec = r.tiles[0]
    assert rec.x0 == pytest.approx(z.transform.c, abs=1e-9) and rec.y0 == pytest.approx(z.transform.f, abs=1e-9)
    np.testing.assert_array_equal(tile_array(tmp_path / "store2", rec), z.values[0])
    # ... and without coordinate arrays it cannot be placed: an error, not a misplaced tile
    z = write_aef_zarr(tmp_path / "lost.zarr", years=(2022,), mosaic_attrs=True)
    with pytest.raises(InputError) as e:
        ingest([z.path], tmp_path / "store3")
    one_line(e, "lost.zarr", "spatial:transform", "larger mosaic")


def test_requantize_inverts_dequantize():
    q = np.arange(-127, 128, dtype=np.int8)
    v = np.tile(dequantize(q)[:, None], (1, 64))
    np.testing.assert_array_equal(requantize(v)[:, 0], q)
    v[3, 5] = np.nan
    out = requantize(v)
    assert (out[3] == -128).all() and (out[4] == q[4]).all()
    assert requantize(np.full((1, 64), 2.0))[0, 0] == 127


def test_zarr_without_dimension_names(tmp_path):
    pytest.importorskip("zarr")
    z = write_aef_zarr(tmp_path / "plain.zarr", years=(2024,), dims=False)
    r = ingest([z.path], tmp_path / "store")
    np.testing.assert_array_equal(tile_array(tmp_path / "store", r.tiles[0]), z.values[0])


def test_zarr_year_from_name_and_errors(tmp_path):
    pytest.importorskip("zarr")
    z = write_aef_zarr(tmp_path / "aef_2021.zarr", years=(2021,), time_coord=False)
    r = ingest([z.path], tmp_path / "store")
    assert r.years == [2021]
    z2 = write_aef_zarr(tmp_path / "two.zarr", years=(2021, 2022), time_coord=False)
    with pytest.raises(InputError) as e:
        ingest([z2.path], tmp_path / "store")
    one_line(e, "two.zarr", "time")


def test_resume_after_a_kill_skips_finished_sources(scene, tmp_path, monkeypatch):
    store = tmp_path / "store"
    first = write_official_cog(tmp_path / "other", 2021, 31, x0=600000, y0=5000000, seed=9)
    ingest([first.path], store)
    before = (store / tf.CURRENT).read_text()
    gen_before, recs_before, _ = tf.read_generation(store)
    names = [c.path.name for c in scene]

    def killer(done, total, message):
        if names[2] in message:  # the third source has started: two are finished
            raise KeyboardInterrupt("kill")

    with pytest.raises(KeyboardInterrupt):
        ingest([tmp_path / "aef"], store, progress=killer)
    # the store reads exactly as before; the finished windows are in the journal
    assert (store / tf.CURRENT).read_text() == before
    gen_after, recs_after, _ = tf.read_generation(store)
    assert gen_after == gen_before and recs_after == recs_before
    journal = (store / ".ingest" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == 2
    assert not list((store / "tiles").rglob("*.tmp"))

    reads = []
    real = ti.read_cog_rows

    def counting(ds, u, r0, r1):
        reads.append(u.source.name)
        return real(ds, u, r0, r1)

    monkeypatch.setattr(ti, "read_cog_rows", counting)
    r = ingest([tmp_path / "aef"], store)
    assert r.tiles_resumed == 2 and r.tiles_added == 2
    assert set(reads) == set(names[2:])  # no re-work for the finished sources
    assert not (store / ".ingest" / "journal.jsonl").exists()
    recs = [tf.TileRecord.from_json(t, "manifest") for t in tf.read_generation(store)[2]["tiles"]]
    assert len(recs) == 5
    for c in scene:
        [rec] = [x for x in recs if json.loads(x.source or "{}").get("src") == str(c.path.resolve())]
        assert_matches_source(store, rec, c)


def test_kill_at_commit_leaves_the_store_and_resumes(scene, tmp_path, monkeypatch):
    store = tmp_path / "store"
    ingest([tmp_path / "aef"], store, years=[2022])
    before = tf.read_generation(store)

    def crash(*a, **k):
        raise OSError("power cut")

    monkeypatch.setattr(tf, "commit", crash)
    with pytest.raises(OSError):
        ingest([tmp_path / "aef"], store, years=[2023])
    assert tf.read_generation(store) == before
    monkeypatch.undo()
    # a tampered tile from the killed run is not trusted: it is read again
    j = [json.loads(x) for x in (store / ".ingest" / "journal.jsonl").read_text().splitlines()]
    with open(store / j[0]["record"]["path"], "r+b") as f:
        f.write(b"\x01\x02")
    r = ingest([tmp_path / "aef"], store, years=[2023])
    assert r.tiles_resumed == 1 and r.tiles_added == 1
    for c in [c for c in scene if c.year == 2023]:
        assert_matches_source(store, by_source(r, c), c)


def test_reingest_is_idempotent(scene, tmp_path):
    store = tmp_path / "store"
    r1 = ingest([tmp_path / "aef"], store, bbox=BBOX)
    current = (store / tf.CURRENT).read_text()
    r2 = ingest([tmp_path / "aef"], store, bbox=BBOX)
    assert r2.tiles_reused == 4 and r2.tiles_added == 0 and r2.generation is None and r2.bytes_read == 0
    assert (store / tf.CURRENT).read_text() == current
    # touched but identical source: re-read, same bytes, same single tile
    c = scene[0]
    os.utime(c.path, ns=(c.path.stat().st_atime_ns, c.path.stat().st_mtime_ns + 10**9))
    r3 = ingest([tmp_path / "aef"], store, bbox=BBOX)
    assert r3.tiles_reused == 4 and r3.bytes_read > 0
    recs = tf.read_generation(store)[1]
    assert len(recs) == 4 and sorted(r.path for r in recs) == sorted(r.path for r in r1.tiles)
    # same file, new content (a re-published year): the tile is replaced, not duplicated
    new = write_official_cog(tmp_path / "aef", c.year, c.zone, True, c.transform.c, c.transform.f, bottom_up=True,
                             seed=555, name=c.path.name)
    r4 = ingest([tmp_path / "aef"], store, bbox=BBOX)
    assert r4.tiles_replaced == 1 and r4.tiles_reused == 3
    recs = tf.read_generation(store)[1]
    assert len(recs) == 4
    assert_matches_source(store, by_source(r4, new), new)
    assert len(list((store / "tiles").rglob("*.aef"))) == 4  # the old file was collected
    # a smaller window of the same source is already in the store; a larger one replaces it
    r5 = ingest([tmp_path / "aef"], store, bbox=(5.9995, 44.9995, 6.0005, 45.0005))
    assert r5.tiles_covered == 4 and r5.generation is None
    r6 = ingest([tmp_path / "aef"], store)
    assert r6.tiles_added == 4 and len(tf.read_generation(store)[1]) == 4


def test_the_same_file_twice_and_a_directory_plus_index(scene, tmp_path):
    index = write_index_csv(tmp_path / "aef" / "aef_index.csv", scene)
    r = ingest([tmp_path / "aef", index, scene[0].path], tmp_path / "store")
    assert r.tiles_added == 4


def test_progress_reports_bytes(scene, tmp_path):
    calls = []
    r = ingest([tmp_path / "aef"], tmp_path / "store", progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls[-1] == (r.bytes_total, r.bytes_total, "done")
    assert r.bytes_total == 4 * 64 * 64 * 64
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and all(t == r.bytes_total for _, t, _ in calls)
    assert r.seconds > 0 and r.mb_per_s > 0
    assert "4 added" in r.summary()
    assert json.loads(json.dumps(r.to_json()))["tiles_added"] == 4


def test_empty_window_is_not_stored(tmp_path):
    vals = np.full((64, 64, 64), -128, np.int8)
    vals[40:, 40:] = 5
    c = write_official_cog(tmp_path / "aef", 2022, 31, x0=600000, y0=5000000, values=vals)
    lon, lat = pixel_centre_lonlat(c, 5, 5)
    r = ingest([c.path], tmp_path / "store", bbox=(lon - 1e-4, lat - 1e-4, lon + 1e-4, lat + 1e-4))
    assert r.tiles_empty == 1 and r.tiles_added == 0 and r.store_tiles == 0
    assert tf.read_generation(tmp_path / "store")[1] == []


def test_stale_temp_files_are_removed_and_ingests_are_exclusive(scene, tmp_path):
    import fcntl

    store = tmp_path / "store"
    stale = store / "tiles" / "2022" / "32631" / ".x.aef.1234abcd.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    ingest([tmp_path / "aef"], store, years=[2022])
    assert not stale.exists()
    with open(store / ".ingest" / "lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(tf.StoreError) as e:
            ingest([tmp_path / "aef"], store, years=[2023])
        one_line(e, "another ingest")


# -- bad inputs: one clear line naming the file -------------------------------------------------


def _write(path, count=64, dtype="int8", crs="EPSG:32631", nodata=-128, descriptions=None):
    import rasterio
    from rasterio.transform import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=count, dtype=dtype, crs=crs,
                       transform=Affine(10, 0, 600000, 0, -10, 5000000), nodata=nodata) as ds:
        ds.write(np.ones((count, 16, 16), dtype=dtype))
        for i, d in enumerate(descriptions or []):
            ds.set_band_description(i + 1, d)
    return path


def test_truncated_cog(tmp_path):
    c = write_official_cog(tmp_path / "aef", 2022, 31, x0=600000, y0=5000000)
    size = c.path.stat().st_size
    with open(c.path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(InputError) as e:
        ingest([c.path], tmp_path / "store")
    one_line(e, c.path, "corrupt or truncated")


def test_corrupt_cog(tmp_path):
    c = write_official_cog(tmp_path / "aef", 2022, 31, x0=600000, y0=5000000)
    size = c.path.stat().st_size
    with open(c.path, "r+b") as f:
        f.seek(size // 3)
        f.write(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError) as e:
        ingest([c.path], tmp_path / "store")
    one_line(e, c.path, "corrupt")
    assert not (tmp_path / "store" / tf.CURRENT).exists()
    assert not list((tmp_path / "store").rglob("*.tmp"))


def test_not_a_tiff(tmp_path):
    p = tmp_path / "2022" / "31N" / "junk.tiff"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not a tiff at all")
    with pytest.raises(InputError) as e:
        ingest([p], tmp_path / "store")
    one_line(e, p, "not a readable GeoTIFF")


@pytest.mark.parametrize("kwargs,words", [
    ({"count": 3}, ["3 bands", "expected 64"]),
    ({"dtype": "int16", "nodata": -128}, ["int16", "int8"]),
    ({"dtype": "uint8", "nodata": 0}, ["uint8", "int8"]),
    ({"crs": None}, ["no CRS"]),
    ({"crs": "EPSG:3857"}, ["EPSG:3857", "UTM"]),
    ({"crs": "EPSG:32632"}, ["31N", "EPSG:32632", "misplaced"]),
    ({"nodata": 0}, ["no-data value 0", "-128"]),
    ({"descriptions": ["B1"] * 64}, ["A00..A63"]),
])
def test_bad_cog_headers(tmp_path, kwargs, words):
    p = _write(tmp_path / "2022" / "31N" / "bad.tiff", **kwargs)
    with pytest.raises(InputError) as e:
        ingest([p], tmp_path / "store")
    one_line(e, p, *words)
    assert not (tmp_path / "store" / tf.CURRENT).exists()


def test_bad_sources(tmp_path):
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "nope.tiff"], tmp_path / "store")
    one_line(e, "nope.tiff", "no such file")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "notes.txt"], tmp_path / "store")
    one_line(e, "notes.txt", "not an AEF source")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "empty"], tmp_path / "store")
    one_line(e, "empty", "without AEF files")
    bad_index = tmp_path / "idx.csv"
    bad_index.write_text("a,b\n1,2\n")
    with pytest.raises(InputError) as e:
        ingest([bad_index], tmp_path / "store")
    one_line(e, bad_index, "path", "year")
    for bbox in [(1, 2, 3), (5, 5, 4, 6), (0, 0, float("nan"), 1)]:
        with pytest.raises(InputError) as e:
            ingest([tmp_path / "empty"], tmp_path / "store", bbox=bbox)
        one_line(e, "bbox")
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "empty"], tmp_path / "store", years=["soon"])
    one_line(e, "years", "soon")


def test_unreadable_zarr(tmp_path):
    pytest.importorskip("zarr")
    bad = tmp_path / "broken.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    with pytest.raises(InputError) as e:
        ingest([bad], tmp_path / "store")
    one_line(e, bad, "not a readable zarr")

    import zarr

    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.create_array("something", shape=(2,), dtype="int8")
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "other.zarr"], tmp_path / "store")
    one_line(e, "other.zarr", "embeddings", "something")

    z = write_aef_zarr(tmp_path / "nocrs.zarr", years=(2022,))
    attrs = dict(zarr.open_group(str(z.path), mode="r").attrs)
    attrs.pop("proj:code")
    g = zarr.open_group(str(z.path), mode="r+")
    g.attrs.clear()
    g.attrs.update(attrs)
    with pytest.raises(InputError) as e:
        ingest([z.path], tmp_path / "store")
    one_line(e, "nocrs.zarr", "no CRS")

    g = zarr.open_group(str(tmp_path / "bands.zarr"), mode="w")
    g.create_array("embeddings", shape=(1, 3, 4, 4), dtype="int8", dimension_names=["time", "band", "y", "x"])
    with pytest.raises(InputError) as e:
        ingest([tmp_path / "bands.zarr"], tmp_path / "store", years=[2022])
    one_line(e, "bands.zarr", "3 bands")

    z = write_aef_zarr(tmp_path / "chunkgone.zarr", years=(2022,))
    chunk = next(p for p in sorted((z.path / "embeddings").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"garbage")
    with pytest.raises(InputError) as e:
        ingest([z.path], tmp_path / "store")
    one_line(e, "chunkgone.zarr", "cannot read")
