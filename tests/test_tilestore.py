import datetime as dt
import json
import threading

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from rasterio.warp import transform as warp

from fusar_edge.errors import AnchorError, InputError
from fusar_edge.geo.anchors import Anchor, AnchorSet
from fusar_edge.tiles.format import CURRENT, StoreError, read_generation, write_store
from fusar_edge.tiles.store import TileStore, dequantise_table, grid_lonlat

from conftest import one_line
from tilestore_fixtures import dequantise, expected_lookup, multi_zone_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiles") / "store"
    return path, multi_zone_store(path)


def test_dequantise_table_matches_formula():
    q = np.arange(-128, 128).astype(np.int8)
    table = dequantise_table()[q.view(np.uint8)]
    np.testing.assert_array_equal(table, dequantise(q))
    assert table[q == 127][0] == pytest.approx((127 / 127.5) ** 2) and table[q == -127][0] < 0


def test_points_match_independent_lookup_across_zones(store):
    path, tiles = store
    ts = TileStore.open(path)
    rng = np.random.default_rng()
    # points around the 31N/32N boundary (6 E), inside and outside the tiles
    lon = rng.uniform(5.85, 6.15, 3000)
    lat = rng.uniform(53.85, 54.02, 3000)
    for year in (2020, 2022):
        got_f, got_m = ts.lookup_points(lon, lat, year)
        want_f, want_m = expected_lookup(tiles, lon, lat, year)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_array_equal(got_f, want_f)
        assert 0.2 < got_m.mean() < 0.95  # partial coverage: some inside, some outside
        assert not got_f[~got_m].any()  # masked points are zero


def test_boundary_points_prefer_their_own_zone(store):
    path, tiles = store
    ts = TileStore.open(path)
    t31, t32 = tiles[0], tiles[1]
    # just west and just east of 6 E: both tiles cover these, each side takes its own zone
    lon = np.array([5.99, 6.01])
    lat = np.array([53.97, 53.97])
    f, m = ts.lookup_points(lon, lat, 2020)
    assert m.all()
    for s, t in ((0, t31), (1, t32)):
        x, y = warp("EPSG:4326", f"EPSG:{t['epsg']}", lon[s:s + 1], lat[s:s + 1])
        row, col = int((t["y0"] - y[0]) // t["dy"]), int((x[0] - t["x0"]) // t["dx"])
        if t["data"][row, col, 0] != -128:
            np.testing.assert_array_equal(f[s], dequantise(t["data"][row, col]))


def test_southern_and_lonlat_tiles(store):
    path, tiles = store
    ts = TileStore.open(path)
    rng = np.random.default_rng()
    for lon_range, lat_range in (((14.78, 14.86), (-29.96, -29.9)), ((-0.06, 0.06), (9.94, 10.06))):
        lon, lat = rng.uniform(*lon_range, 500), rng.uniform(*lat_range, 500)
        got_f, got_m = ts.lookup_points(lon, lat, 2020)
        want_f, want_m = expected_lookup(tiles, lon, lat, 2020)
        np.testing.assert_array_equal(got_m, want_m)
        np.testing.assert_array_equal(got_f, want_f)
        assert got_m.any()


def test_bbox_grid_is_row_major_with_y_southwards(store):
    path, tiles = store
    anchor = Anchor((5.9, 53.9, 5.98, 53.98), "2020-06-01")
    aset = TileStore.open(path).lookup(anchor, grid=(4, 5))
    assert aset.features.shape == (20, 64) and aset.positions.dtype == np.float32
    np.testing.assert_allclose(aset.positions[:5, 0], 0.125)  # first row
    np.testing.assert_allclose(aset.positions[:5, 1], [0.1, 0.3, 0.5, 0.7, 0.9])
    lon, lat = grid_lonlat(anchor, 4, 5)
    assert lat[0] > lat[5] > lat[10] > lat[15]  # rows run southwards
    assert lon[0] < lon[1] and lon[0] == pytest.approx(5.9 + 0.08 * 0.1)
    want_f, want_m = expected_lookup(tiles, lon, lat, 2020)
    np.testing.assert_array_equal(aset.features, want_f)
    np.testing.assert_array_equal(aset.mask, want_m)
    assert aset.year == 2020 and aset.crs == "EPSG:32631+EPSG:32632" and aset.notes == []


def test_year_selection(store):
    ts = TileStore.open(store[0])
    assert ts.years == [2020, 2022]
    assert ts.pick_year("2022-01-01") == (2022, None)
    year, note = ts.pick_year("2021-07-01")  # equidistant: the earlier year
    assert year == 2020 and "2021" in note and "nearest" in note
    assert ts.pick_year("2025-07-01")[0] == 2022
    with pytest.raises(AnchorError) as e:
        ts.pick_year("2016-12-31")
    one_line(e, "2016", "2017")
    future = dt.date.today() + dt.timedelta(days=2)
    with pytest.raises(AnchorError) as e:
        ts.pick_year(future)
    one_line(e, future.isoformat(), "future")
    with pytest.raises(AnchorError) as e:
        ts.lookup(Anchor((5.9, 53.9, 5.98, 53.98), None))
    one_line(e, "date")
    aset = ts.lookup(Anchor((5.9, 53.9, 5.98, 53.98), "2021-03-01"))
    assert aset.year == 2020 and aset.notes


def test_no_coverage_is_an_error_unless_allowed(store):
    ts = TileStore.open(store[0])
    far = Anchor((20.0, 40.0, 20.05, 40.05), "2020-05-05")
    with pytest.raises(AnchorError) as e:
        ts.lookup(far)
    one_line(e, "2020", str(store[0]), "20.00000")
    aset = ts.lookup(far, allow_empty=True)
    assert not aset.mask.any() and not aset.features.any() and aset.coverage == 0.0


def test_bad_grid(store):
    ts = TileStore.open(store[0])
    for grid in ((0, 4), (4,), ("a", 2), (2000, 2)):
        with pytest.raises(InputError) as e:
            ts.lookup(Anchor((5.9, 53.9, 5.98, 53.98), "2020-06-01"), grid=grid)
        one_line(e, "grid")


def test_rotated_geotiff_footprint_uses_image_space_grid(store, tmp_path):
    path, tiles = store
    # a 100 x 80 px image in UTM 31N, rotated by 30 degrees, inside the 31N tile
    angle = np.radians(30)
    a, b = 20 * np.cos(angle), 20 * np.sin(angle)
    transform = Affine(a, b, 692000.0, b, -a, 5987000.0)
    tif = tmp_path / "rotated.tif"
    with rasterio.open(tif, "w", driver="GTiff", height=100, width=80, count=1, dtype="float32",
                       crs="EPSG:32631", transform=transform) as ds:
        ds.write(np.ones((1, 100, 80), np.float32))
    anchor = Anchor.from_geotiff(tif, date="2022-02-02")
    aset = TileStore.open(path).lookup(anchor, grid=(3, 3))
    # independent: grid cell centres in pixel space through the affine, then PROJ to lon/lat
    rows = 100 * (np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]) + 0.5) / 3
    cols = 80 * (np.array([0, 1, 2, 0, 1, 2, 0, 1, 2]) + 0.5) / 3
    xs, ys = zip(*(transform @ (c, r) for r, c in zip(rows, cols)))
    lon, lat = warp("EPSG:32631", "EPSG:4326", list(xs), list(ys))
    want_f, want_m = expected_lookup(tiles, lon, lat, 2022)
    np.testing.assert_array_equal(aset.mask, want_m)
    np.testing.assert_array_equal(aset.features, want_f)
    assert want_m.sum() >= 8


def test_concurrent_lookups_agree(store):
    ts = TileStore.open(store[0])
    rng = np.random.default_rng(1)
    anchors = [Anchor((lo, la, lo + 0.05, la + 0.03), "2020-01-01")
               for lo, la in zip(rng.uniform(5.85, 6.05, 24), rng.uniform(53.86, 53.95, 24))]
    want = [ts.lookup(a, allow_empty=True) for a in anchors]
    results = [None] * (4 * len(anchors))

    def work(k):
        for i in range(k, len(results), 4):
            results[i] = ts.lookup(anchors[i % len(anchors)], allow_empty=True)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got.features, want[i % len(anchors)].features)
        np.testing.assert_array_equal(got.mask, want[i % len(anchors)].mask)


def test_npz_round_trip(store, tmp_path):
    aset = TileStore.open(store[0]).lookup(Anchor((5.9, 53.9, 5.98, 53.98), "2020-06-01"))
    back = AnchorSet.load(aset.save_npz(tmp_path / "a.npz"))
    np.testing.assert_array_equal(back.features, aset.features)
    np.testing.assert_array_equal(back.positions, aset.positions)
    np.testing.assert_array_equal(back.mask, aset.mask)
    assert back.year == 2020


# -- a damaged store fails loudly, naming the file --------------------------------------------


@pytest.fixture
def small_store(tmp_path):
    rng = np.random.default_rng(0)
    write_store(tmp_path / "s", [dict(year=2021, epsg=32631, x0=500000, y0=6000000, dx=10, dy=10,
                                      data=rng.integers(-127, 128, (20, 30, 64), dtype=np.int8), name="a")])
    return tmp_path / "s"


def test_missing_store_and_current(small_store, tmp_path):
    with pytest.raises(StoreError) as e:
        TileStore.open(tmp_path / "nope")
    one_line(e, "nope")
    (small_store / CURRENT).unlink()
    with pytest.raises(StoreError) as e:
        TileStore.open(small_store)
    one_line(e, CURRENT, "ingest")


def test_truncated_tile_and_index(small_store):
    gen, records, _ = read_generation(small_store)
    tile = small_store / records[0].path
    tile.write_bytes(tile.read_bytes()[:-64])
    with pytest.raises(StoreError) as e:
        TileStore.open(small_store)
    one_line(e, str(tile), "truncated")
    tile.unlink()
    with pytest.raises(StoreError) as e:
        TileStore.open(small_store)
    one_line(e, str(tile), "missing", "verify")
    index = gen / "index.bin"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(StoreError) as e:
        TileStore.open(small_store)
    one_line(e, str(index), "truncated")


def test_manifest_disagreeing_with_index(small_store):
    gen = read_generation(small_store)[0]
    manifest = json.loads((gen / "manifest.json").read_text())
    manifest["tiles"][0]["sha256"] = "0" * 64
    (gen / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as e:
        TileStore.open(small_store)
    one_line(e, "manifest.json", "index.bin")


def test_rewrite_keeps_one_generation_and_old_readers_work(small_store):
    old = TileStore.open(small_store)
    before = old.lookup_points(np.array([3.0001]), np.array([54.1]), 2021)
    rng = np.random.default_rng(5)
    write_store(small_store, [dict(year=2022, epsg=32631, x0=500000, y0=6000000, dx=10, dy=10,
                                   data=rng.integers(-127, 128, (20, 30, 64), dtype=np.int8), name="b")])
    gens = sorted(p.name for p in small_store.iterdir() if p.name.startswith("gen-"))
    assert gens == ["gen-000002"]
    assert TileStore.open(small_store).years == [2021, 2022]
    after = old.lookup_points(np.array([3.0001]), np.array([54.1]), 2021)  # still mapped
    np.testing.assert_array_equal(before[0], after[0])


def test_footprints_across_the_antimeridian_are_looked_up_on_both_sides(tmp_path):
    """A UTM 60N tile ending west of lon 180 and a UTM 1N tile starting east of it (Bering Sea,
    60 N). A box given across lon 180 (lon_min > lon_max, GDAL's convention) and a GeoTIFF in
    UTM 60N that runs over it both find data on both sides, as the independent lookup does, on
    the C reader and the numpy one; `ask` applies TLM with them."""
    from rasterio.transform import from_origin

    from fusar_edge.runtime import Runtime
    from fusar_edge.tiles.store import grid_lonlat
    from tilestore_fixtures import _tile

    rng = np.random.default_rng(1)
    tiles = [_tile(rng, 2021, 32660, 615000, 6697000, 200, 250, 250, hole=False),   # lon ~179.1 .. 179.95
             _tile(rng, 2021, 32601, 335000, 6697000, 200, 250, 250, hole=False)]   # lon ~-179.95 .. -179.1
    path = tmp_path / "store"
    write_store(path, tiles)
    scene = tmp_path / "bering.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=300, height=300, count=1, dtype="float32",
                       crs="EPSG:32660", transform=from_origin(650000, 6690000, 100, 100)) as ds:
        ds.write(rng.gamma(1.0, 1.0, (1, 300, 300)).astype(np.float32))
        ds.update_tags(ACQUISITION_DATE="2021-07-01")
    boxed = Anchor((179.5, 60.0, -179.5, 60.3), "2021-07-01")
    imaged = Anchor.from_geotiff(scene)
    assert boxed.crosses_antimeridian and imaged.crosses_antimeridian
    for backend in ("auto", "numpy"):
        ts = TileStore.open(path, backend=backend)
        for anchor in (boxed, imaged):
            got = ts.lookup(anchor, (6, 8))
            lon, lat = grid_lonlat(anchor, 6, 8)
            want_f, want_m = expected_lookup(tiles, lon, lat, 2021)
            np.testing.assert_array_equal(got.mask, want_m)
            np.testing.assert_array_equal(got.features, want_f)
            assert got.mask[lon > 0].any() and got.mask[lon < 0].any(), backend  # data from both sides
            assert got.crs == "EPSG:32601+EPSG:32660"
    ans = Runtime.open("tiny", tiles=path).ask(scene, "How many ships are there?", max_new_tokens=2)
    assert ans.anchor["tlm"] == "applied" and ans.anchor["bounds"][0] > ans.anchor["bounds"][2]


def test_a_box_with_its_longitudes_swapped_is_refused_not_read_the_long_way():
    with pytest.raises(InputError, match="lon_min = 3.017 must be below lon_max = 2.983"):
        Anchor((3.017, 53.99, 2.983, 54.01), None)  # 359.97 degrees east: a typo, not a footprint
    assert Anchor((10.0, 0.0, -170.0, 1.0), None).lonlat_boxes() == [(10.0, 0.0, 180.0, 1.0), (-180.0, 0.0, -170.0, 1.0)]
