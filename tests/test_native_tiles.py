"""libfusar_tiles (native/tiles) against the Python reader: byte-for-byte equal lookups.

The library is built once per session with CMake into a temporary directory (or taken from
$FUSAR_TILES_TEST_LIB, e.g. a sanitizer build); the tests skip (saying why) only when cmake
or a C compiler is missing.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fusar_edge.errors import AnchorError, InputError
from fusar_edge.geo.anchors import Anchor
from fusar_edge.tiles.native import (NativeTileStore, NativeTilesUnavailable, build_native_tiles,
                                         lonlat_to_utm_native)
from fusar_edge.tiles.format import StoreError, read_generation, write_store
from fusar_edge.tiles.store import TileStore
from fusar_edge.tiles.utm import lonlat_to_utm

NODATA = -128
GRIDS = [(16, 16), (1, 1), (3, 7), (32, 32), (5, 1), (9, 12)]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def native_lib(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("FUSAR_TILES_TEST_LIB")  # e.g. a sanitizer build, or an installed library
    if prebuilt:
        return Path(prebuilt)
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH: cannot build libfusar_tiles")
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: cannot build libfusar_tiles")
    return build_native_tiles(tmp_path_factory.mktemp("native-tiles-build"), jobs=2)


def _noisy(rng, h, w, hole_fraction=0.05):
    """Random int8 pixels with no-data holes: a block plus scattered pixels (all 64 bands -128,
    as AEF writes them), and some -128 codes in other bands of valid pixels."""
    data = rng.integers(-128, 128, (h, w, 64), dtype=np.int8)
    data[..., 0] = np.where(data[..., 0] == NODATA, 0, data[..., 0])
    r, c = rng.integers(0, h // 2), rng.integers(0, w // 2)
    data[r:r + h // 4, c:c + w // 3] = NODATA
    data[rng.random((h, w)) < hole_fraction] = NODATA
    return data


def _utm_tile(rng, year, epsg, lon, lat, dx, h, w, shift=(0.0, 0.0), name=None, holes=0.05):
    """A tile of h x w pixels whose centre is near (lon, lat) (shifted by metres)."""
    zone, north = epsg % 100, epsg < 32700
    e, n = lonlat_to_utm(np.array([lon]), np.array([lat]), zone, north)
    x0 = float(e[0]) - w * dx / 2 + shift[0] + 0.37  # off-round corners, like real grids
    y0 = float(n[0]) + h * dx / 2 + shift[1] - 0.21
    return dict(year=year, epsg=epsg, x0=x0, y0=y0, dx=dx, dy=dx, data=_noisy(rng, h, w, holes),
                name=name or f"t{epsg}-{year}-{int(x0)}-{int(y0)}")


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """Two years; around 6 E 45 N: zones 31N and 32N overlap (two 32N tiles overlap each
    other too) under a lon/lat tile full of holes; a 33S tile around 15.3 E 20 S."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("native-store")
    tiles = []
    for year in (2020, 2022):
        tiles.append(_utm_tile(rng, year, 32631, 6.0, 45.0, 20.0, 300, 300))
        tiles.append(_utm_tile(rng, year, 32632, 6.0, 45.0, 25.0, 260, 240))
        tiles.append(_utm_tile(rng, year, 32733, 15.3, -20.0, 10.0, 300, 280))
    tiles.append(_utm_tile(rng, 2020, 32632, 6.0, 45.0, 30.0, 150, 150, shift=(2000.0, 1500.0), name="overlap"))
    lonlat = _noisy(rng, 200, 250, hole_fraction=0.4)
    tiles.append(dict(year=2020, epsg=4326, x0=5.98, y0=45.03, dx=0.0002, dy=0.0002, data=lonlat, name="lonlat"))
    write_store(path, tiles)
    return path


@pytest.fixture(scope="session")
def py_store(store) -> TileStore:
    return TileStore.open(store)


@pytest.fixture(scope="session")
def c_store(store, native_lib) -> NativeTileStore:
    s = NativeTileStore(store, native_lib)
    yield s
    s.close()


@pytest.fixture()
def small_store(tmp_path) -> Path:
    rng = np.random.default_rng(3)
    path = tmp_path / "small"
    write_store(path, [_utm_tile(rng, 2021, 32631, 3.0, 50.0, 10.0, 20, 30, name="only")])
    return path


def _same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a, b)
    assert a.tobytes() == b.tobytes()


def _random_boxes(rng, k):
    """Footprints from 30 m to ~8 km around the two covered areas (some poking outside)."""
    boxes = []
    for _ in range(k):
        lon0, lat0 = (6.0, 45.0) if rng.random() < 0.7 else (15.3, -20.0)
        half_lat = rng.uniform(0.0003, 0.04)
        half_lon = half_lat * rng.uniform(0.5, 2.0) / math.cos(math.radians(lat0))
        clon = lon0 + rng.uniform(-0.05, 0.05)
        clat = lat0 + rng.uniform(-0.04, 0.04)
        boxes.append((clon - half_lon, clat - half_lat, clon + half_lon, clat + half_lat))
    return boxes


def _special_points(store: Path):
    """Points on the tiles' envelope edges, the 31N/32N zone boundary and lon/lat pixel edges."""
    _, records, _ = read_generation(store)
    lon, lat = [], []
    for r in records:
        lo0, la0, lo1, la1 = r.lonlat_bounds
        for x, y in ((lo0, la0), (lo1, la1), (lo0, (la0 + la1) / 2), ((lo0 + lo1) / 2, la1), ((lo0 + lo1) / 2, la0)):
            lon.append(x)
            lat.append(y)
    for k in range(-30, 31):  # the zone boundary, where both zones are equally near
        lon.append(6.0)
        lat.append(45.0 + k * 0.0007)
    for k in range(0, 250, 7):  # exact pixel edges of the lon/lat tile
        lon.append(5.98 + k * 0.0002)
        lat.append(45.03 - (k % 200) * 0.0002)
    return np.array(lon), np.array(lat)


# -- tests ------------------------------------------------------------------------------------


def test_open_reports_the_store(c_store, py_store, store):
    assert c_store.years == py_store.years == [2020, 2022]
    assert c_store.generation == py_store.generation.name
    assert c_store.n_tiles == len(py_store.records) == 8


def test_bbox_lookups_equal_python_byte_for_byte(c_store, py_store):
    rng = np.random.default_rng(11)
    covered = 0
    for k, box in enumerate(_random_boxes(rng, 150)):
        grid = GRIDS[k % len(GRIDS)]
        date = ("2020-03-01", "2021-07-15", "2022-12-31", "2024-01-01")[k % 4]
        ref = py_store.lookup(Anchor(bbox=box, date=date), grid=grid, allow_empty=True)
        year, note = c_store.pick_year(date)
        assert (year, note) == py_store.pick_year(date)
        assert year == ref.year
        features, positions, mask = c_store.lookup_bbox(box, year, grid)
        _same(features, ref.features)
        _same(positions, ref.positions)
        _same(mask, ref.mask)
        covered += int(mask.any())
    assert covered > 100  # the boxes mostly hit data, so the comparison means something


def test_point_lookups_equal_python_byte_for_byte(c_store, py_store, store):
    rng = np.random.default_rng(12)
    s_lon, s_lat = _special_points(store)
    for year in (2020, 2022):
        for lon0, lat0, spread in ((6.0, 45.0, 0.035), (15.3, -20.0, 0.015), (6.0, 45.0, 3.0)):
            lon = np.concatenate([lon0 + rng.uniform(-spread, spread, 3000), s_lon])
            lat = np.concatenate([lat0 + rng.uniform(-spread, spread, 3000), s_lat])
            ref_f, ref_m = py_store.lookup_points(lon, lat, year)
            f, m = c_store.lookup_points(lon, lat, year)
            _same(f, ref_f)
            _same(m, ref_m)
            if spread < 1:
                assert 0.3 < m.mean() < 1.0  # holes and misses, but mostly hits
    f, m = c_store.lookup_points([], [], 2020)
    assert f.shape == (0, 64) and m.shape == (0,)


def test_points_follow_the_documented_rules(c_store, store):
    """A plain per-point reading of docs/tilestore.md ("Lookup"), sharing no code with either reader."""
    _, records, _ = read_generation(store)
    rng = np.random.default_rng(13)
    lon = np.concatenate([6.0 + rng.uniform(-0.04, 0.04, 200), 15.3 + rng.uniform(-0.02, 0.02, 60), [6.0] * 10])
    lat = np.concatenate([45.0 + rng.uniform(-0.03, 0.03, 200), -20.0 + rng.uniform(-0.02, 0.02, 60),
                          45.0 + np.arange(10) * 0.001])
    data = {r.path: np.fromfile(store / r.path, np.int8).reshape(r.height, r.width, 64) for r in records}
    features, mask = c_store.lookup_points(lon, lat, 2020)
    hits_by_kind = set()
    for s in range(lon.size):
        cands = [r for r in records if r.year == 2020 and r.lonlat_bounds[0] <= lon[s] <= r.lonlat_bounds[2]
                 and r.lonlat_bounds[1] <= lat[s] <= r.lonlat_bounds[3]]
        cands.sort(key=lambda r: 0.0 if r.epsg == 4326 else abs(lon[s] - (6.0 * (r.epsg % 100) - 183.0)))
        want = None
        for r in cands:
            if r.epsg == 4326:
                x, y = lon[s], lat[s]
            else:
                e, n = lonlat_to_utm(lon[s:s + 1], lat[s:s + 1], r.epsg % 100, r.epsg < 32700)
                x, y = e[0], n[0]
            col, row = math.floor((x - r.x0) / r.dx), math.floor((r.y0 - y) / r.dy)
            if 0 <= col < r.width and 0 <= row < r.height and data[r.path][row, col, 0] != NODATA:
                # "(q / 127.5)^2 * sign(q) evaluated in double and rounded once to float32"
                t = data[r.path][row, col].astype(np.float64) / 127.5
                want = np.where(t < 0, -(t * t), t * t).astype(np.float32)
                hits_by_kind.add(r.epsg)
                break
        assert bool(mask[s]) == (want is not None), s
        _same(features[s], want if want is not None else np.zeros(64, np.float32))
    assert {4326, 32631, 32632, 32733} <= hits_by_kind


def test_nan_points_find_nothing_and_do_not_disturb_others(c_store, py_store):
    rng = np.random.default_rng(14)
    lon = 6.0 + rng.uniform(-0.03, 0.03, 50)
    lat = 45.0 + rng.uniform(-0.03, 0.03, 50)
    ref_f, ref_m = py_store.lookup_points(lon, lat, 2020)
    lon_nan, lat_nan = lon.copy(), lat.copy()
    lon_nan[[3, 17]] = np.nan
    lat_nan[[17, 30]] = np.nan
    f, m = c_store.lookup_points(lon_nan, lat_nan, 2020)
    bad = np.zeros(50, bool)
    bad[[3, 17, 30]] = True
    assert not m[bad].any() and not f[bad].any()
    _same(f[~bad], ref_f[~bad])
    _same(m[~bad], ref_m[~bad])


def test_projection_matches_utm_py(native_lib):
    rng = np.random.default_rng(15)
    # Same formulas, but the C compiler and numpy's SIMD kernels (AVX2, AVX-512) may fuse different
    # products into FMAs: last-bit differences (5e-10 m seen on an AVX-512 Xeon) are expected.
    # 1 µm is far below anything a 10 m AEF pixel lookup can see.
    for zone in (1, 31, 32, 33, 60):
        lon = 6.0 * zone - 183.0 + rng.uniform(-8, 8, 1500)
        lat = rng.uniform(-80, 80, 1500)
        lon[:3] = 6.0 * zone - 183.0  # on the central meridian
        for north in (True, False):
            e_ref, n_ref = lonlat_to_utm(lon, lat, zone, north)
            got = np.array([lonlat_to_utm_native(a, b, zone, north, native_lib) for a, b in zip(lon, lat)])
            assert np.abs(got[:, 0] - e_ref).max() < 1e-6 and np.abs(got[:, 1] - n_ref).max() < 1e-6


def test_concurrent_lookups_agree(c_store):
    rng = np.random.default_rng(16)
    boxes = _random_boxes(rng, 64)
    serial = [c_store.lookup_bbox(b, 2020, (16, 16)) for b in boxes]

    def work(offset):
        out = []
        for k in range(len(boxes)):
            i = (k + offset) % len(boxes)
            out.append((i, c_store.lookup_bbox(boxes[i], 2020, (16, 16))))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(0, 64, 16)))
    for batch in results:
        for i, got in batch:
            for a, b in zip(got, serial[i]):
                _same(a, b)


def test_years(c_store, py_store):
    this_year = dt.date.today().year
    for year in range(2017, this_year + 1):
        assert c_store.pick_year(year) == py_store.pick_year(year)
    assert c_store.pick_year(2021)[0] == 2020  # tie between 2020 and 2022: the earlier
    for bad in (2016, this_year + 1):
        with pytest.raises(AnchorError, match=str(bad)):
            c_store.pick_year(bad)
    with pytest.raises(AnchorError, match="no tiles for year 2021"):
        c_store.lookup_points([6.0], [45.0], 2021)
    with pytest.raises(AnchorError, match="no tiles for year 2019"):
        c_store.lookup_bbox((5.99, 44.99, 6.01, 45.01), 2019)


def test_bad_arguments(c_store):
    with pytest.raises(InputError, match="grid"):
        c_store.lookup_bbox((5.99, 44.99, 6.01, 45.01), 2020, (0, 16))
    with pytest.raises(InputError, match="bbox"):
        c_store.lookup_bbox((6.01, 44.99, 5.99, 45.01), 2020)  # lon_min > lon_max
    with pytest.raises(InputError, match="bbox"):
        c_store.lookup_bbox((5.99, float("nan"), 6.01, 45.01), 2020)
    with pytest.raises(InputError, match="differ in length"):
        c_store.lookup_points([6.0, 6.1], [45.0], 2020)


def test_open_errors_name_the_file(native_lib, small_store, tmp_path):
    def fails(path, *words):
        with pytest.raises(StoreError) as info:
            NativeTileStore(path, native_lib)
        msg = str(info.value)
        assert "\n" not in msg
        for w in words:
            assert str(w) in msg, (w, msg)

    fails(tmp_path / "nowhere", tmp_path / "nowhere", "no such directory")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", tmp_path / "empty", "no CURRENT")

    gen, records, _ = read_generation(small_store)
    index, tile = gen / "index.bin", small_store / records[0].path
    with NativeTileStore(small_store, native_lib) as ok:  # the intact store opens
        assert ok.years == [2021]

    tile_bytes = tile.read_bytes()
    tile.write_bytes(tile_bytes[:-64])
    fails(small_store, tile, "truncated", len(tile_bytes) - 64, len(tile_bytes))
    tile.unlink()
    fails(small_store, tile, "missing", "index.bin")
    tile.write_bytes(tile_bytes)

    index_bytes = index.read_bytes()
    index.write_bytes(index_bytes[:-10])
    fails(small_store, index, "truncated")
    index.write_bytes(index_bytes[:40])
    fails(small_store, index, "truncated", "header")
    index.write_bytes(b"NOTFUSAR" + index_bytes[8:])
    fails(small_store, index, "magic")
    index.write_bytes(index_bytes[:8] + (2).to_bytes(4, "little") + index_bytes[12:])
    fails(small_store, index, "version 2")
    index.unlink()
    fails(small_store, index, "missing")
    index.write_bytes(index_bytes)

    (small_store / "CURRENT").write_text("gen-999999\n")
    fails(small_store, small_store / "CURRENT", "gen-999999", "missing")
    (small_store / "CURRENT").write_text("garbage\n")
    fails(small_store, small_store / "CURRENT", "garbage")


def test_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(NativeTilesUnavailable, match="no such file"):
        NativeTileStore(tmp_path, tmp_path / "libfusar_tiles.so")


def test_closed_store_refuses_lookups(native_lib, small_store):
    s = NativeTileStore(small_store, native_lib)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.lookup_points([3.0], [50.0], 2021)


def test_example_program(native_lib, store):
    exe = native_lib.parent / "example_lookup"
    out = subprocess.run([str(exe), str(store), "2021", "5.99", "44.99", "6.01", "45.01", "16", "16", "20"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "year: asked 2021, used 2020" in out.stdout
    assert "coverage" in out.stdout and "p99" in out.stdout
    bad = subprocess.run([str(exe), str(store / "nope"), "2021", "0", "0", "1", "1"], capture_output=True, text=True)
    assert bad.returncode == 1 and "no such directory" in bad.stderr
