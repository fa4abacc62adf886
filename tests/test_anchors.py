"""Spatiotemporal anchors: Anchor footprints, AnchorSet validation, the reference NPZ/NPY layouts."""

import datetime as dt
import functools
import io
import os
import pickle
import re
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
import rasterio
import torch

from conftest import one_line
from fusar_edge.errors import AnchorError, InputError
from fusar_edge.geo import Anchor, AnchorSet, read_sar
from fusar_edge.geo.synthetic import write_demo_scene

S = 12


def unit_features(s=S, seed=0):
    f = np.random.default_rng(seed).standard_normal((s, 64)).astype(np.float32)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def ref_norm(a):
    """Independent statement of the reference normalisation: per-axis min-max in float32, 0 on zero range."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = a.min(), a.max()
    return np.zeros_like(a) if hi == lo else (a - lo) / (hi - lo)


@pytest.fixture
def samples():
    """Original-style AEF samples: lon, lat, pixel row/col, pixel x/y and 64 features."""
    rng = np.random.default_rng(1)
    row = rng.integers(0, 504, S).astype(np.float64)
    col = rng.integers(0, 504, S).astype(np.float64)
    return {"lon": 3.0 + col * 1e-4, "lat": 54.0 - row * 1e-4, "row": row, "col": col,
            "x": col + 0.5, "y": row + 0.5, "features": unit_features()}


# -- Anchor -----------------------------------------------------------------------------


def test_anchor_fields_and_year():
    a = Anchor((2.9, 53.9, 3.1, 54.1), dt.date(2023, 5, 1))
    assert a.year == 2023 and a.source == "manual" and a.bbox == (2.9, 53.9, 3.1, 54.1)
    assert Anchor([1, 2, 3, 4], "2020-02-29").date == dt.date(2020, 2, 29)
    assert Anchor((0, 0, 1, 1), None).year is None
    assert Anchor((0, 0, 1, 1), dt.datetime(2021, 1, 2, 3, 4)).date == dt.date(2021, 1, 2)


@pytest.mark.parametrize("bbox,field", [
    ((-181, 0, 1, 1), "lon_min"), ((0, -91, 1, 1), "lat_min"), ((0, 0, 181, 1), "lon_max"),
    ((0, 0, 1, 90.5), "lat_max"), ((1, 0, 1, 1), "lon_min"), ((0, 2, 1, 1), "lat_min"),
    ((float("nan"), 0, 1, 1), "lon_min"), ((0, 0, float("inf"), 1), "lon_max"), ((0, 0, 1), "4 numbers"),
    (("a", 0, 1, 1), "4 numbers"), ((3.0, 0, 2.9, 1), "antimeridian"), ((10, 0, -169, 1), "at least 180"),
])
def test_anchor_rejects_bad_bbox(bbox, field):
    with pytest.raises(InputError) as e:
        Anchor(bbox, None)
    one_line(e, "bbox", field)


def test_anchor_rejects_bad_date_and_size():
    with pytest.raises(InputError) as e:
        Anchor((0, 0, 1, 1), "2023-13-01")
    one_line(e, "'2023-13-01'")
    with pytest.raises(InputError):
        Anchor((0, 0, 1, 1), 2023)
    with pytest.raises(InputError) as e:
        Anchor((0, 0, 1, 1), None, size=(0, 5))
    one_line(e, "size")


def test_anchor_from_geotiff_reads_metadata_only(tmp_path):
    demo = write_demo_scene(tmp_path, size=64, seed=2, year=2021)
    a = Anchor.from_geotiff(demo["scene_tif"])
    img = read_sar(demo["scene_tif"])
    assert a.bbox == img.bounds_lonlat and a.crs == "EPSG:32631" and a.transform == img.transform
    assert a.date == img.acquisition_date and a.year == 2021 and a.size == (64, 64) and a.source == "geotiff"
    assert Anchor.from_geotiff(demo["scene_tif"], date="2019-01-02").date == dt.date(2019, 1, 2)
    assert Anchor.from_geotiff(demo["scene_tif"], date=dt.date(2018, 3, 4)).year == 2018


def test_anchor_from_geotiff_needs_georeference(tmp_path):
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        with rasterio.open(tmp_path / "plain.tif", "w", driver="GTiff", height=8, width=8, count=1,
                           dtype="float32") as ds:
            ds.write(np.ones((8, 8), np.float32), 1)
    with pytest.raises(InputError) as e:
        Anchor.from_geotiff(tmp_path / "plain.tif")
    one_line(e, "plain.tif", "bbox")
    with pytest.raises(InputError) as e:
        Anchor.from_geotiff(tmp_path / "missing.tif")
    one_line(e, "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"junk")
    with pytest.raises(InputError) as e:
        Anchor.from_geotiff(tmp_path / "junk.tif")
    one_line(e, "junk.tif")


def test_anchor_from_sar_image_and_overrides(tmp_path):
    demo = write_demo_scene(tmp_path, size=64, seed=2, year=2021)
    img = read_sar(demo["scene_tif"])
    a = Anchor.from_sar_image(img)
    assert a.bbox == img.bounds_lonlat and a.date == img.acquisition_date and a.crs == img.crs
    b = Anchor.from_sar_image(img, date=dt.date(2020, 1, 1), bbox=(1, 2, 3, 4))
    assert b.bbox == (1, 2, 3, 4) and b.year == 2020 and b.source == "manual" and b.crs is None
    assert b.size == (64, 64)
    png = read_sar(demo["scene_png"])
    with pytest.raises(InputError) as e:
        Anchor.from_sar_image(png)
    one_line(e, "scene.png", "bbox")
    assert Anchor.from_sar_image(png, bbox=(1, 2, 3, 4), date="2022-02-02").year == 2022


# -- AnchorSet --------------------------------------------------------------------------


def test_anchor_set_basics():
    f = unit_features()
    pos = np.random.default_rng(0).random((S, 2))
    mask = np.arange(S) % 4 != 0
    s = AnchorSet(f.astype(np.float64), pos, mask, year=np.int64(2022))
    assert s.size == S and s.coverage == pytest.approx(0.75) and s.year == 2022 and isinstance(s.year, int)
    assert s.features.dtype == np.float32 and s.positions.dtype == np.float32 and s.mask.dtype == bool
    tf, tp, tm = s.to_torch()
    assert tf.dtype == torch.float32 and tuple(tf.shape) == (S, 64)
    assert tp.dtype == torch.float32 and tuple(tp.shape) == (S, 2)
    assert tm.dtype == torch.bool and tm.tolist() == mask.tolist()
    assert AnchorSet(f, pos).mask.all()


@pytest.mark.parametrize("kwargs,key,words", [
    ({"features": np.zeros((S, 32))}, "features", ["[S, 64]", "[12, 32]"]),
    ({"features": np.zeros((0, 64)), "positions": np.zeros((0, 2))}, "features", ["S > 0"]),
    ({"features": np.zeros(64)}, "features", ["[S, 64]"]),
    ({"positions": np.zeros((S, 3))}, "positions", ["[12, 2]"]),
    ({"positions": np.zeros((S - 1, 2))}, "positions", ["[12, 2]"]),
    ({"mask": np.ones(S - 1, bool)}, "mask", ["[12]"]),
    ({"mask": np.full(S, 2)}, "mask", ["bool"]),
    ({"features": np.full((S, 64), np.nan)}, "features", ["NaN"]),
    ({"positions": np.full((S, 2), np.inf)}, "positions", ["NaN/Inf"]),
    ({"positions": np.full((S, 2), 1.5)}, "positions", ["outside [0, 1]", "max 1.5"]),
    ({"positions": np.full((S, 2), -0.1)}, "positions", ["outside [0, 1]"]),
    ({"features": np.full((S, 64), "x")}, "features", ["dtype"]),
    ({"year": 2023.5}, "year", ["integer"]),
    ({"bounds": (1, 2, 3)}, "bounds", ["4 finite"]),
])
def test_anchor_set_rejects(kwargs, key, words):
    args = {"features": unit_features(), "positions": np.full((S, 2), 0.5), "source": "here.npz", **kwargs}
    with pytest.raises(AnchorError) as e:
        AnchorSet(**args)
    one_line(e, "here.npz", f"{key}:", *words)


# -- reading the reference layouts ------------------------------------------------------


def test_load_reference_npz(tmp_path, samples):
    pos = np.random.default_rng(3).random((S, 2))
    np.savez(tmp_path / "ref.npz", features=samples["features"].astype(np.float64), positions=pos)
    s = AnchorSet.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(s.features, samples["features"])
    np.testing.assert_array_equal(s.positions, pos.astype(np.float32))
    assert s.mask.all() and s.year is None and s.source == str(tmp_path / "ref.npz")
    mask = np.arange(S) % 3 == 0
    np.savez(tmp_path / "ours.npz", features=samples["features"], positions=pos, mask=mask, year=np.int32(2020))
    s = AnchorSet.load(str(tmp_path / "ours.npz"))
    assert s.mask.tolist() == mask.tolist() and s.year == 2020


def test_load_structured_npy_with_shuffled_fields(tmp_path, samples):
    names = [f"A{i:02d}" for i in range(64)]
    order = list(np.random.default_rng(4).permutation(64))
    dtype = [("y", "f8"), ("lon", "f8"), *[(names[i], "f4") for i in order[:40]], ("x", "f8"), ("lat", "f8"),
             ("row", "f8"), *[(names[i], "f4") for i in order[40:]], ("col", "f8")]
    arr = np.zeros(S, dtype=dtype)
    for key in ("lon", "lat", "row", "col", "x", "y"):
        arr[key] = samples[key]
    for i in range(64):
        arr[names[i]] = samples["features"][:, i]
    np.save(tmp_path / "s.npy", arr.reshape(3, 4))  # any shape: the reference flattens it
    s = AnchorSet.load(tmp_path / "s.npy")
    np.testing.assert_array_equal(s.features, samples["features"])
    expected = np.column_stack([ref_norm(samples["y"]), ref_norm(samples["x"])])
    np.testing.assert_array_equal(s.positions, expected)
    assert s.mask.all() and s.positions.min() == 0 and s.positions.max() == 1


def test_structured_npy_falls_back_to_col_row_and_orders_other_fields(tmp_path, samples):
    dtype = [("row", "f8"), ("col", "f8"), ("b", "f4"), *[(f"a{i}", "f4") for i in range(62, -1, -1)]]
    arr = np.zeros(S, dtype=dtype)
    arr["row"], arr["col"], arr["b"] = samples["row"], samples["col"], 7.0
    for i in range(63):
        arr[f"a{i}"] = samples["features"][:, i]
    np.save(tmp_path / "cr.npy", arr)
    s = AnchorSet.load(tmp_path / "cr.npy")
    np.testing.assert_array_equal(s.features[:, :63], samples["features"][:, :63])
    assert (s.features[:, 63] == 7.0).all()  # a non-A field comes after the numbered ones
    np.testing.assert_array_equal(s.positions, np.column_stack([ref_norm(samples["row"]), ref_norm(samples["col"])]))


def test_structured_npy_with_a_vector_field(tmp_path, samples):
    arr = np.zeros(S, dtype=[("x", "f8"), ("y", "f8"), ("vec", "f4", (64,))])
    arr["x"], arr["y"], arr["vec"] = samples["x"], samples["y"], samples["features"]
    np.save(tmp_path / "v.npy", arr)
    np.testing.assert_array_equal(AnchorSet.load(tmp_path / "v.npy").features, samples["features"])


def _numeric(samples):
    return np.column_stack([samples[k] for k in ("lon", "lat", "row", "col", "x", "y")] + [samples["features"]])


@pytest.mark.parametrize("flat", [False, True])
def test_load_numeric_npy(tmp_path, samples, flat):
    table = _numeric(samples)
    assert table.shape == (S, 70)
    np.save(tmp_path / "n.npy", table.reshape(-1) if flat else table)
    s = AnchorSet.load(tmp_path / "n.npy")
    np.testing.assert_array_equal(s.features, table[:, 6:].astype(np.float32))
    np.testing.assert_array_equal(s.positions, np.column_stack([ref_norm(table[:, 5]), ref_norm(table[:, 4])]))


def test_zero_range_axis_gives_zero_positions(tmp_path, samples):
    table = _numeric(samples)
    table[:, 5] = 42.0
    np.save(tmp_path / "z.npy", table)
    s = AnchorSet.load(tmp_path / "z.npy")
    assert (s.positions[:, 0] == 0).all() and s.positions[:, 1].max() == 1


# -- writing ----------------------------------------------------------------------------


def _temp_files(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_npz_round_trip(tmp_path):
    pos = np.random.default_rng(5).random((S, 2)).astype(np.float32)
    mask = np.arange(S) % 5 != 1
    s = AnchorSet(unit_features(), pos, mask, year=2019, source="x", crs="EPSG:32631", bounds=(2.9, 53.9, 3.1, 54.1))
    out = s.save_npz(tmp_path / "a.npz")
    assert out == tmp_path / "a.npz" and _temp_files(tmp_path) == []
    t = AnchorSet.load(out)
    for key in ("features", "positions", "mask"):
        np.testing.assert_array_equal(getattr(t, key), getattr(s, key))
    assert (t.year, t.crs, t.bounds) == (2019, "EPSG:32631", (2.9, 53.9, 3.1, 54.1))
    with np.load(out, allow_pickle=False) as raw:  # what the reference reads
        assert raw["features"].shape == (S, 64) and raw["positions"].shape == (S, 2)
    s.save_npz(out)  # overwriting is atomic too
    assert _temp_files(tmp_path) == []


def test_npy_round_trip_follows_the_reference_normalisation(tmp_path, samples):
    pos = np.random.default_rng(6).random((S, 2)).astype(np.float32)
    mask = np.ones(S, bool)
    mask[[2, 7]] = False
    s = AnchorSet(samples["features"], pos, mask)
    out = s.save_npy(tmp_path / "a.npy", lon=samples["lon"], lat=samples["lat"])
    assert _temp_files(tmp_path) == []
    table = np.load(out, allow_pickle=False)
    assert table.shape == (S - 2, 70) and np.isfinite(table).all()
    np.testing.assert_array_equal(table[:, 0], samples["lon"][mask])
    assert (table[:, 2:4] == 0).all()  # row/col unknown -> 0
    t = AnchorSet.load(out)
    np.testing.assert_array_equal(t.features, samples["features"][mask])
    expected = np.column_stack([ref_norm(pos[mask, 0]), ref_norm(pos[mask, 1])])
    np.testing.assert_array_equal(t.positions, expected)
    # Positions that span [0, 1] on both axes survive exactly.
    grid = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [0.25, 0.75]] * 2 + [[0.5, 0.5]] * 2, np.float32)
    u = AnchorSet(samples["features"], grid)
    np.testing.assert_array_equal(AnchorSet.load(u.save_npy(tmp_path / "g.npy")).positions, grid)


def test_save_npy_validates_columns(tmp_path, samples):
    s = AnchorSet(samples["features"], np.full((S, 2), 0.5))
    with pytest.raises(AnchorError) as e:
        s.save_npy(tmp_path / "a.npy", lon=np.full(S, np.nan))
    one_line(e, "lon", "NaN")
    with pytest.raises(AnchorError) as e:
        s.save_npy(tmp_path / "a.npy", row=np.zeros(S + 1))
    one_line(e, "row", f"[{S}]")
    with pytest.raises(AnchorError):
        AnchorSet(samples["features"], np.full((S, 2), 0.5), np.zeros(S, bool)).save_npy(tmp_path / "a.npy")
    with pytest.raises(InputError):
        s.save_npz(tmp_path / "a.bin")
    assert not (tmp_path / "a.npy").exists() and _temp_files(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    s = AnchorSet(unit_features(), np.full((S, 2), 0.5), year=2020)
    out = s.save_npz(tmp_path / "a.npz")
    before = out.read_bytes()

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(InputError) as e:
        AnchorSet(unit_features(seed=9), np.full((S, 2), 0.1)).save_npz(out)
    one_line(e, "a.npz", "disk full", "unchanged")
    assert out.read_bytes() == before and _temp_files(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(InputError) as e:
        AnchorSet(unit_features(), np.full((S, 2), 0.5)).save_npz(tmp_path / "no" / "such" / "dir.npz")
    one_line(e, "dir.npz", "cannot write")


def test_written_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = AnchorSet(unit_features(), np.full((S, 2), 0.5)).save_npz(tmp_path / "a.npz")
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644


# -- bad anchor files -------------------------------------------------------------------


def _expect(path, *words):
    with pytest.raises(AnchorError) as e:
        AnchorSet.load(path)
    return one_line(e, path.name, *words)


def test_bad_npz_files(tmp_path, samples):
    f, pos = samples["features"], np.full((S, 2), 0.5)
    cases = {
        "nofeat.npz": ({"positions": pos}, ["missing key features", "positions"]),
        "shape.npz": ({"features": f[:, :60], "positions": pos}, ["features:", "[S, 64]"]),
        "pos.npz": ({"features": f, "positions": pos[:5]}, ["positions:", "[12, 2]"]),
        "nan.npz": ({"features": np.where(np.eye(S, 64) > 0, np.nan, f), "positions": pos}, ["features:", "12 NaN"]),
        "range.npz": ({"features": f, "positions": pos * 3}, ["positions:", "outside [0, 1]"]),
        "mask.npz": ({"features": f, "positions": pos, "mask": np.ones(3, bool)}, ["mask:"]),
        "year.npz": ({"features": f, "positions": pos, "year": np.array([2020, 2021])}, ["year:"]),
    }
    for name, (arrays, words) in cases.items():
        np.savez(tmp_path / name, **arrays)
        _expect(tmp_path / name, *words)


def test_pickled_objects_are_refused(tmp_path):
    objects = np.array([np.zeros(64), np.zeros(64)], dtype=object)
    np.savez(tmp_path / "obj.npz", features=objects, positions=np.zeros((2, 2)))
    _expect(tmp_path / "obj.npz", "pickled")
    np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
    _expect(tmp_path / "obj.npy", "pickled")
    (tmp_path / "p.npy").write_bytes(pickle.dumps({"features": [1, 2]}))
    _expect(tmp_path / "p.npy", "not a NumPy")


def test_bad_npy_files(tmp_path, samples):
    table = _numeric(samples)
    np.save(tmp_path / "wide.npy", table[:, :69])
    _expect(tmp_path / "wide.npy", "[S, 70]", "[12, 69]")
    np.save(tmp_path / "flat.npy", table.reshape(-1)[:-1])
    _expect(tmp_path / "flat.npy", "[S, 70]")
    np.save(tmp_path / "empty.npy", np.zeros((0, 70)))
    _expect(tmp_path / "empty.npy", "S > 0")
    bad = table.copy()
    bad[3, 4] = np.nan
    np.save(tmp_path / "nanx.npy", bad)
    _expect(tmp_path / "nanx.npy", "x:", "1 NaN")
    bad = table.copy()
    bad[0, 10] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    _expect(tmp_path / "inf.npy", "features:")
    np.save(tmp_path / "str.npy", np.array(["a"] * 70))
    _expect(tmp_path / "str.npy", "dtype")
    np.save(tmp_path / "nopos.npy", np.zeros(S, dtype=[("lon", "f8"), ("A00", "f4")]))
    _expect(tmp_path / "nopos.npy", "x, y", "col, row")
    np.save(tmp_path / "few.npy", np.zeros(S, dtype=[("x", "f8"), ("y", "f8"), ("A00", "f4")]))
    _expect(tmp_path / "few.npy", "features:", "[12, 1]")


def test_unreadable_and_missing_files(tmp_path, samples):
    _expect(tmp_path / "missing.npz", "no such file")
    (tmp_path / "a.csv").write_text("1,2,3")
    _expect(tmp_path / "a.csv", ".npz or .npy")
    np.savez(tmp_path / "good.npz", features=samples["features"], positions=np.full((S, 2), 0.5))
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    _expect(tmp_path / "cut.npz", "cannot read")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _expect(tmp_path / "junk.npz", "cannot read")
    np.save(tmp_path / "good.npy", _numeric(samples))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:300])
    _expect(tmp_path / "cut.npy", "cannot read")
    (tmp_path / "empty.npy").write_bytes(b"")
    _expect(tmp_path / "empty.npy")


def test_demo_anchor_set(tmp_path):
    demo = write_demo_scene(tmp_path, size=64, seed=5, year=2024)
    s = AnchorSet.load(demo["anchors"])
    assert s.size == 64 and s.year == 2024 and (~s.mask).sum() == 2
    assert s.bounds == demo["bounds"] and s.crs == "EPSG:32631"
    norms = np.linalg.norm(s.features, axis=1)
    np.testing.assert_allclose(norms[s.mask], 1.0, atol=1e-6)
    assert (norms[~s.mask] == 0).all()
    centres = (np.arange(8) + 0.5) / 8
    np.testing.assert_allclose(s.positions, np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", demo["date"]) and demo["date"].startswith("2024")


# -- bounded reads: a declared size is checked before anything is read ---------------------


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


TERABYTE_SHAPE = (2**32, 64)  # float32: 1 TiB


def test_npz_member_claiming_a_terabyte_is_refused(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("features.npy", _npy_header(TERABYTE_SHAPE) + bytes(4096))
        zf.writestr("positions.npy", _npy_bytes(np.zeros((4, 2), np.float32)))
    _expect(path, "features.npy", str(2**40), "1000000 anchors")


def test_npy_claiming_a_terabyte_is_refused(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_header(TERABYTE_SHAPE) + bytes(4096))
    _expect(path, str(2**40), "1000000 anchors")


@functools.lru_cache(maxsize=None)
def _deflated_zeros_npy(n_bytes: int) -> tuple[bytes, int, int]:
    """``(raw deflate stream, crc32, size)`` of an .npy holding ``n_bytes`` of zeros (float32).

    One compressed 16 MiB block of zeros, repeated: a full flush resets the compressor, so
    every block compresses to the same bytes. Built in a second, not in minutes.
    """
    chunk = 1 << 24
    header = _npy_header(((n_bytes - 128) // 4,))  # numpy pads the header to 128 bytes here
    assert len(header) == 128
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(header + bytes(chunk - len(header))) + comp.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(chunk)
    block = comp.compress(zeros) + comp.flush(zlib.Z_FULL_FLUSH)
    n_blocks = n_bytes // chunk
    crc = zlib.crc32(header + bytes(chunk - len(header)))
    for _ in range(n_blocks - 1):
        crc = zlib.crc32(zeros, crc)
    return first + block * (n_blocks - 1) + comp.flush(), crc, n_blocks * chunk


def _zip_bomb(path, member: str, n_bytes: int, extra: dict | None = None):
    """A valid zip whose ``member`` is an .npy of ``n_bytes`` zeros, deflated about 1000:1."""
    data, crc, size = _deflated_zeros_npy(n_bytes)
    name = member.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                          len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    path.write_bytes(local + data + central + end)
    with zipfile.ZipFile(path, "a") as zf:
        for key, arr in (extra or {}).items():
            zf.writestr(f"{key}.npy", _npy_bytes(arr))
    return path


BOMB_BYTES = 96 * (1 << 24)  # 1.5 GiB of zeros


def test_npz_zip_bomb_is_refused_by_its_declared_size(tmp_path):
    path = _zip_bomb(tmp_path / "bomb.npz", "features.npy", BOMB_BYTES,
                     extra={"positions": np.zeros((4, 2), np.float32)})
    assert path.stat().st_size < 2_000_000
    with zipfile.ZipFile(path) as zf, zf.open("features.npy") as f:  # well formed: refused for its size
        assert zf.getinfo("features.npy").file_size == BOMB_BYTES and f.read(1 << 20)[-4:] == bytes(4)
    tracemalloc.start()
    try:
        _expect(path, "features.npy", "declares", "1000000 anchors")
        assert tracemalloc.get_traced_memory()[1] < 64 << 20  # nothing near the 1.5 GiB was allocated
    finally:
        tracemalloc.stop()


def test_npz_keys_the_reader_does_not_use_are_never_decompressed(tmp_path, samples):
    path = _zip_bomb(tmp_path / "extra.npz", "thumbnail.npy", BOMB_BYTES,
                     extra={"features": samples["features"], "positions": np.full((S, 2), 0.5, np.float32)})
    tracemalloc.start()
    try:
        assert AnchorSet.load(path).size == S
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
