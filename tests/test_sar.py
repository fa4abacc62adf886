"""SAR image input: formats, scales, footprint, dates, the reference chip, and every bad input."""

import datetime as dt
import json
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from PIL import Image
from rasterio.control import GroundControlPoint
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.windows import Window
from rasterio.warp import transform as warp_transform

from conftest import one_line
from fusar_edge.errors import InputError
from fusar_edge.geo import SarImage, parse_date, read_sar, sar, to_chip
from fusar_edge.geo.synthetic import write_demo_scene

UTM = "EPSG:32631"
ORIGIN = (497440.0, 5986080.0)  # north-west corner, North Sea, UTM 31N


@pytest.fixture(autouse=True)
def _quiet_ungeoreferenced_writes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        yield


def write_tif(path, data, crs=UTM, transform=None, nodata=None, tags=None, ns_tags=None, gcps=None, **profile):
    data = np.asarray(data)
    bands = data[None] if data.ndim == 2 else data
    kw = dict(driver="GTiff", height=bands.shape[1], width=bands.shape[2], count=bands.shape[0],
              dtype=bands.dtype, nodata=nodata, **profile)
    if gcps is None:
        kw.update(crs=crs, transform=transform or Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]))
    with rasterio.open(path, "w", **kw) as ds:
        ds.write(bands)
        if gcps is not None:
            ds.gcps = (gcps, crs)
        if tags:
            ds.update_tags(**tags)
        for ns, values in (ns_tags or {}).items():
            ds.update_tags(ns=ns, **values)
    return path


def reference_stretch(db, valid):
    """Independent reading of the contract: 2..98th percentile of valid pixels -> [0, 1]."""
    lo, hi = np.percentile(db[valid].astype(np.float64), [2, 98])
    out = np.clip((db - lo) / (hi - lo), 0, 1)
    return np.where(valid, out, 0.0)


def reference_chip(path, size=504):
    """The FUSAR-GPT reference recipe, verbatim in behaviour."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture
def amplitude():
    rng = np.random.default_rng(1)
    return np.sqrt(0.05 * rng.gamma(4, 0.25, (96, 128))).astype(np.float32)


# -- formats and scales -----------------------------------------------------------------


def test_geotiff_amplitude_contract(tmp_path, amplitude):
    img = read_sar(write_tif(tmp_path / "a.tif", amplitude))
    assert isinstance(img, SarImage) and img.kind == "amplitude"
    assert img.data.dtype == np.float32 and img.data.shape == (96, 128) == (img.height, img.width)
    expected = reference_stretch(20 * np.log10(amplitude.astype(np.float64)), amplitude > 0)
    np.testing.assert_allclose(img.data, expected, atol=2e-6)
    assert img.data.min() == 0.0 and img.data.max() == 1.0


def test_scales_power_db_and_auto(tmp_path, amplitude):
    amp = read_sar(write_tif(tmp_path / "a.tif", amplitude)).data
    power = read_sar(write_tif(tmp_path / "p.tif", amplitude**2), scale="power")
    assert power.kind == "power"
    np.testing.assert_allclose(power.data, amp, atol=2e-5)  # 10 log10(a^2) == 20 log10(a)
    db_values = (20 * np.log10(amplitude)).astype(np.float32)
    db_auto = read_sar(write_tif(tmp_path / "d.tif", db_values))  # negative values -> dB
    assert db_auto.kind == "db"
    np.testing.assert_allclose(db_auto.data, amp, atol=2e-5)
    # Non-negative data read as dB on request differs from reading it as amplitude.
    explicit = read_sar(tmp_path / "a.tif", scale="db")
    assert explicit.kind == "db" and not np.allclose(explicit.data, amp, atol=1e-3)
    np.testing.assert_allclose(explicit.data, reference_stretch(amplitude.astype(np.float64),
                                                                np.ones(amplitude.shape, bool)), atol=2e-6)


def test_uint16_is_amplitude_uint8_is_visual(tmp_path, amplitude):
    dn = np.round(amplitude * 1000).astype(np.uint16)
    img = read_sar(write_tif(tmp_path / "u16.tif", dn))
    assert img.kind == "amplitude"
    valid = dn > 0
    np.testing.assert_allclose(img.data, reference_stretch(20 * np.log10(np.maximum(dn, 1)), valid), atol=2e-6)
    u8 = (np.arange(96 * 128) % 256).astype(np.uint8).reshape(96, 128)
    vis = read_sar(write_tif(tmp_path / "u8.tif", u8))
    assert vis.kind == "visual8" and vis.data.dtype == np.uint8 and vis.data.shape == (96, 128, 3)
    assert (vis.data == u8[:, :, None]).all()
    assert read_sar(tmp_path / "u8.tif", scale="amplitude").kind == "amplitude"


def test_rgb_uint8_geotiff_keeps_colour(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 40, 50), dtype=np.uint8)
    img = read_sar(write_tif(tmp_path / "rgb.tif", rgb, photometric="RGB"))
    assert img.kind == "visual8" and (img.data == rgb.transpose(1, 2, 0)).all()


def test_band_selection(tmp_path, amplitude):
    stack = np.stack([amplitude, amplitude[::-1]])
    img = read_sar(write_tif(tmp_path / "two.tif", stack), band=2)
    ref = read_sar(write_tif(tmp_path / "flip.tif", amplitude[::-1].copy()))
    np.testing.assert_array_equal(img.data, ref.data)


def test_npy_real_and_complex(tmp_path, amplitude):
    np.save(tmp_path / "a.npy", amplitude.astype(np.float64))
    real = read_sar(tmp_path / "a.npy")
    assert real.kind == "amplitude" and real.crs is None and real.bounds_lonlat is None
    rng = np.random.default_rng(2)
    phase = np.exp(1j * rng.uniform(-np.pi, np.pi, amplitude.shape))
    np.save(tmp_path / "slc.npy", (amplitude * phase).astype(np.complex64))
    slc = read_sar(tmp_path / "slc.npy")
    assert slc.kind == "complex" and slc.data.dtype == np.float32
    np.testing.assert_allclose(slc.data, real.data, atol=2e-5)
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "slc.npy", scale="db")
    one_line(e, "slc.npy", "complex", "amplitude")


def test_nodata_pixels_are_zero_and_left_out_of_statistics(tmp_path, amplitude):
    a = amplitude.copy()
    a[:10] = -9999.0  # a nodata border
    img = read_sar(write_tif(tmp_path / "nd.tif", a, nodata=-9999.0))
    assert img.kind == "amplitude"  # nodata does not count as a negative (dB) value
    valid = a != -9999.0
    np.testing.assert_allclose(img.data, reference_stretch(20 * np.log10(np.where(valid, a, 1.0)), valid), atol=2e-6)
    assert (img.data[:10] == 0).all()
    b = amplitude.copy()
    b[5:8, 5:8] = np.nan
    img_nan = read_sar(write_tif(tmp_path / "nan_nd.tif", b, nodata=np.nan))
    assert (img_nan.data[5:8, 5:8] == 0).all()


def test_zero_fill_is_left_out_of_linear_statistics(tmp_path, amplitude):
    a = amplitude.copy()
    a[:, :40] = 0.0  # 31 % black border without a declared nodata value
    img = read_sar(write_tif(tmp_path / "z.tif", a))
    valid = a > 0
    np.testing.assert_allclose(img.data, reference_stretch(20 * np.log10(np.where(valid, a, 1.0)), valid), atol=2e-6)


def test_png_and_jpeg_are_visual(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    img = read_sar(tmp_path / "g.png")
    assert img.kind == "visual8" and img.data.shape == (60, 80, 3) and (img.data == gray[:, :, None]).all()
    assert (img.height, img.width) == (60, 80) and img.acquisition_date is None
    Image.fromarray(gray, "L").save(tmp_path / "g.jpg", quality=90)
    assert read_sar(tmp_path / "g.jpg").kind == "visual8"


def test_16bit_png_is_amplitude(tmp_path, amplitude):
    dn = np.round(amplitude * 1000).astype(np.uint16)
    Image.fromarray(dn).save(tmp_path / "dn.png")
    img = read_sar(tmp_path / "dn.png")
    assert img.kind == "amplitude"
    np.testing.assert_allclose(img.data, read_sar(write_tif(tmp_path / "dn.tif", dn)).data, atol=1e-6)


# -- the chip ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_chip_is_byte_identical_to_reference(tmp_path, mode):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    im = Image.fromarray(arr, "RGBA")
    im = im.convert("L") if mode == "L" else im.convert(mode) if mode != "P" else im.convert("RGB").quantize(64)
    im.save(tmp_path / "x.png")
    for size in (504, 28):
        chip = to_chip(read_sar(tmp_path / "x.png"), size)
        assert chip.dtype == np.uint8 and chip.shape == (size, size, 3)
        assert chip.tobytes() == reference_chip(tmp_path / "x.png", size).tobytes()


def test_jpeg_chip_is_byte_identical_to_reference(tmp_path):
    arr = np.random.default_rng(5).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.jpg")
    assert to_chip(read_sar(tmp_path / "x.jpg"), 504).tobytes() == reference_chip(tmp_path / "x.jpg").tobytes()


def test_geotiff_chip_equals_reference_on_its_png_rendering(tmp_path):
    demo = write_demo_scene(tmp_path, size=128, seed=3)
    chip = to_chip(read_sar(demo["scene_tif"]), 504)
    assert chip.tobytes() == reference_chip(demo["scene_png"]).tobytes()
    png = np.asarray(Image.open(demo["scene_png"]))
    np.testing.assert_array_equal(png, np.rint(read_sar(demo["scene_tif"]).data * 255).astype(np.uint8))


def test_chip_size_must_be_positive(tmp_path, amplitude):
    img = read_sar(write_tif(tmp_path / "a.tif", amplitude))
    for size in (0, -4, 2.5):
        with pytest.raises(InputError):
            to_chip(img, size)


# -- footprint and dates ----------------------------------------------------------------


def test_utm_footprint_matches_independent_transform(tmp_path, amplitude):
    img = read_sar(write_tif(tmp_path / "a.tif", amplitude))
    assert img.crs == UTM and img.transform == (10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1])
    h, w = amplitude.shape
    xs = [ORIGIN[0], ORIGIN[0] + 10 * w, ORIGIN[0], ORIGIN[0] + 10 * w]
    ys = [ORIGIN[1], ORIGIN[1], ORIGIN[1] - 10 * h, ORIGIN[1] - 10 * h]
    lons, lats = warp_transform(UTM, "EPSG:4326", xs, ys)
    lon_min, lat_min, lon_max, lat_max = img.bounds_lonlat
    tol = 1e-4  # deg; the densified edges may bulge slightly beyond the corners
    assert lon_min <= min(lons) + 1e-9 and lon_max >= max(lons) - 1e-9
    assert lat_min <= min(lats) + 1e-9 and lat_max >= max(lats) - 1e-9
    np.testing.assert_allclose(img.bounds_lonlat, (min(lons), min(lats), max(lons), max(lats)), atol=tol)
    # And against densely sampled edges: the footprint is their envelope.
    t = np.linspace(0, 1, 201)
    ex = np.concatenate([ORIGIN[0] + 10 * w * t, ORIGIN[0] + 10 * w * t, np.full_like(t, ORIGIN[0]),
                         np.full_like(t, ORIGIN[0] + 10 * w)])
    ey = np.concatenate([np.full_like(t, ORIGIN[1]), np.full_like(t, ORIGIN[1] - 10 * h), ORIGIN[1] - 10 * h * t,
                         ORIGIN[1] - 10 * h * t])
    elon, elat = warp_transform(UTM, "EPSG:4326", ex.tolist(), ey.tolist())
    np.testing.assert_allclose(img.bounds_lonlat, (min(elon), min(elat), max(elon), max(elat)), atol=1e-7)
    assert 2.9 < lon_min < lon_max < 3.1 and 53.9 < lat_min < lat_max < 54.1  # the North Sea


def test_gcp_georeferenced_footprint(tmp_path, amplitude):
    h, w = amplitude.shape
    gcps = [GroundControlPoint(row=r, col=c, x=x, y=y) for r, c, x, y in
            ((0, 0, 2.90, 54.10), (0, w, 3.10, 54.12), (h, 0, 2.88, 53.95), (h, w, 3.08, 53.97))]
    img = read_sar(write_tif(tmp_path / "gcp.tif", amplitude, crs="EPSG:4326", gcps=gcps))
    assert img.crs == "EPSG:4326" and img.transform is None
    np.testing.assert_allclose(img.bounds_lonlat, (2.88, 53.95, 3.10, 54.12), atol=1e-9)


def test_no_georeference(tmp_path, amplitude):
    with rasterio.open(tmp_path / "plain.tif", "w", driver="GTiff", height=96, width=128, count=1,
                       dtype="float32") as ds:
        ds.write(amplitude, 1)
    img = read_sar(tmp_path / "plain.tif")
    assert img.crs is None and img.transform is None and img.bounds_lonlat is None


@pytest.mark.parametrize("tags,ns_tags,expected,key", [
    ({"ACQUISITION_DATE": "2021-07-04"}, None, dt.date(2021, 7, 4), "ACQUISITION_DATE"),
    ({"TIFFTAG_DATETIME": "2020:02:29 10:11:12"}, None, dt.date(2020, 2, 29), "TIFFTAG_DATETIME"),
    ({"TIFFTAG_DATETIME": "2024:01:01 00:00:00", "acquisition_start_time": "2019-12-31T23:59:59.5Z"}, None,
     dt.date(2019, 12, 31), "ACQUISITION_START_TIME"),
    (None, {"SAR": {"FIRST_LINE_TIME": "20180305T054321"}}, dt.date(2018, 3, 5), "FIRST_LINE_TIME"),
    ({"ACQUISITION_DATE": "not a date", "DATE": "2022-02-30", "TIFFTAG_DATETIME": "2017:08:09 01:02:03"}, None,
     dt.date(2017, 8, 9), "TIFFTAG_DATETIME"),
    ({"SOMETHING": "2020-01-01"}, None, None, None),
])
def test_date_from_tags(tmp_path, amplitude, tags, ns_tags, expected, key):
    img = read_sar(write_tif(tmp_path / "d.tif", amplitude, tags=tags, ns_tags=ns_tags))
    assert img.acquisition_date == expected and img.date_tag == key


def test_parse_date():
    assert parse_date("2023-06-01") == dt.date(2023, 6, 1)
    assert parse_date(" 2024-02-29 ") == dt.date(2024, 2, 29)
    for bad in ("2023-02-30", "2023/06/01", "20230601", "2023-6-1", "June 1 2023", "", "2023-06-01T00:00"):
        with pytest.raises(InputError) as e:
            parse_date(bad)
        one_line(e, repr(bad), "YYYY-MM-DD")


# -- bad input --------------------------------------------------------------------------


def test_missing_file_and_extension(tmp_path):
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "nope.tif")
    one_line(e, "nope.tif", "no such file")
    (tmp_path / "x.bmp").write_bytes(b"BM....")
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "x.bmp")
    one_line(e, "x.bmp", ".bmp", ".tif", ".png", ".npy")
    with pytest.raises(InputError) as e:
        read_sar(tmp_path)
    one_line(e, "not a file")


@pytest.mark.parametrize("name", ["e.tif", "e.png", "e.npy"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / name)
    one_line(e, name, "empty")


def test_truncated_geotiff(tmp_path, amplitude):
    good = write_tif(tmp_path / "g.tif", amplitude)
    raw = good.read_bytes()
    cog = tmp_path / "cog.tif"
    rasterio.shutil.copy(good, cog, driver="COG")  # header first, so a cut keeps it readable until the pixels
    cases = {"half.tif": raw[: len(raw) // 2], "head.tif": raw[:16], "cog_cut.tif": cog.read_bytes()[:-200],
             "junk.tif": b"this is not a tiff at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as e:
            read_sar(tmp_path / name)
        one_line(e, name, "truncated")


def test_truncated_png(tmp_path):
    arr = np.random.default_rng(6).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "g.png")
    raw = (tmp_path / "g.png").read_bytes()
    for name, data in {"half.png": raw[: len(raw) // 2], "junk.png": b"\x89PNG garbage"}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as e:
            read_sar(tmp_path / name)
        one_line(e, name, "truncated")


def test_truncated_npy(tmp_path, amplitude):
    np.save(tmp_path / "g.npy", amplitude)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "g.npy").read_bytes()[:500])
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "cut.npy")
    one_line(e, "cut.npy", "truncated")


def test_nan_and_inf_pixels(tmp_path, amplitude):
    a = amplitude.copy()
    a[0, :3] = np.nan
    a[1, 0] = np.inf
    for path in (write_tif(tmp_path / "bad.tif", a), tmp_path / "bad.npy"):
        np.save(tmp_path / "bad.npy", a)
        with pytest.raises(InputError) as e:
            read_sar(path)
        one_line(e, path.name, "4 of", "NaN/Inf", "fill")
    # NaN nodata declared, but an Inf is still an error
    with pytest.raises(InputError) as e:
        read_sar(write_tif(tmp_path / "inf.tif", a, nodata=np.nan))
    one_line(e, "inf.tif", "1 of")


def test_declared_nodata_is_not_an_error_but_all_nodata_is(tmp_path):
    a = np.full((20, 20), -1.0, np.float32)
    with pytest.raises(InputError) as e:
        read_sar(write_tif(tmp_path / "all.tif", a, nodata=-1.0))
    one_line(e, "all.tif", "no valid pixels")


def test_max_side(tmp_path, amplitude):
    path = write_tif(tmp_path / "a.tif", amplitude)
    with pytest.raises(InputError) as e:
        read_sar(path, max_side=100)
    one_line(e, "a.tif", "96 x 128", "100", "--max-image-side")
    Image.fromarray(np.zeros((30, 120), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(InputError):
        read_sar(tmp_path / "wide.png", max_side=119)
    np.save(tmp_path / "big.npy", np.ones((10, 300), np.float32))
    with pytest.raises(InputError):
        read_sar(tmp_path / "big.npy", max_side=299)
    assert read_sar(path, max_side=128).width == 128


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), (0, 7)])
def test_npy_must_be_2d_nonempty(tmp_path, shape):
    np.save(tmp_path / "s.npy", np.ones(shape, np.float32))
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "s.npy")
    one_line(e, "s.npy")


def test_npy_objects_strings_and_bools_are_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "bool.npy", np.ones((4, 4), bool))
    (tmp_path / "pickle.npy").write_bytes(pickle.dumps(np.ones((4, 4))))
    for name in ("obj.npy", "str.npy", "bool.npy", "pickle.npy"):
        with pytest.raises(InputError) as e:
            read_sar(tmp_path / name)
        one_line(e, name)


def test_band_out_of_range(tmp_path, amplitude):
    path = write_tif(tmp_path / "a.tif", amplitude)
    with pytest.raises(InputError) as e:
        read_sar(path, band=2)
    one_line(e, "a.tif", "band 2", "1 band")
    with pytest.raises(InputError):
        read_sar(path, band=0)
    np.save(tmp_path / "a.npy", amplitude)
    with pytest.raises(InputError) as e:
        read_sar(tmp_path / "a.npy", band=2)
    one_line(e, "a.npy", "band 2")


def test_bad_scale(tmp_path, amplitude):
    with pytest.raises(InputError) as e:
        read_sar(write_tif(tmp_path / "a.tif", amplitude), scale="linear")
    one_line(e, "'linear'", "auto")


# -- large images: read decimated, bounded memory -------------------------------------------

# The peak is this process's own VmHWM: ru_maxrss would also carry the RSS the child had at
# fork, i.e. pytest's (Linux keeps the high-water mark across exec), ~1 GB late in the suite.
PEAK_SCRIPT = """
import json, re, resource, sys
limit = 4 << 30  # guards the machine: this file read whole took 6 GB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from fusar_edge.geo.sar import read_sar
img = read_sar(sys.argv[1])
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"shape": list(img.data.shape), "size": [img.height, img.width], "kind": img.kind,
                  "peak_mb": hwm_kb / 1024}))
"""


def test_sparse_20000_px_geotiff_is_read_decimated_in_bounded_memory(tmp_path):
    pytest.importorskip("resource")
    path = tmp_path / "sparse.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20000, height=20000, count=1, dtype="float32", crs=UTM,
                       transform=Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]), tiled=True, blockxsize=512,
                       blockysize=512, compress="deflate", sparse_ok=True) as ds:
        sea = np.full((2048, 2048), 0.1, np.float32)  # the rest of the file: blocks never written (zeros)
        sea[100:140, 200:300] = 5.0
        ds.write(sea, 1, window=Window(4096, 4096, 2048, 2048))
    assert path.stat().st_size < 200_000
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout)
    assert res["size"] == [20000, 20000] and res["shape"] == [sar.READ_MAX_SIDE] * 2
    assert res["peak_mb"] < 1024  # read whole: 6.3 GB; decimated: about 300 MB


@pytest.fixture
def small_read(monkeypatch):
    """Decimation at a small size, so small files exercise it: 96 x 128 reads as 48 x 64."""
    monkeypatch.setattr(sar, "READ_MAX_SIDE", 64)


def _block_mean(a, f=2):
    h, w = a.shape
    return a.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def test_decimated_geotiff_is_the_block_average_at_the_original_size(tmp_path, amplitude, small_read):
    img = read_sar(write_tif(tmp_path / "a.tif", amplitude))
    assert img.data.shape == (48, 64) and (img.height, img.width) == (96, 128)
    assert img.bounds_lonlat == read_sar(write_tif(tmp_path / "same.tif", amplitude), max_side=200).bounds_lonlat
    ref = read_sar(write_tif(tmp_path / "mean.tif", _block_mean(amplitude).astype(np.float32)))
    np.testing.assert_allclose(img.data, ref.data, atol=1e-5)
    assert to_chip(img, 56).shape == (56, 56, 3)


def test_decimated_complex_pixels_keep_their_amplitude(tmp_path, small_read):
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((96, 128)) + 1j * rng.standard_normal((96, 128))).astype(np.complex64)
    img = read_sar(write_tif(tmp_path / "slc.tif", z))
    rms = np.sqrt(_block_mean(np.abs(z) ** 2)).astype(np.float32)  # multilook: mean power per block
    ref = read_sar(write_tif(tmp_path / "rms.tif", rms))
    assert img.kind == "complex" and img.data.shape == (48, 64)
    np.testing.assert_allclose(img.data, ref.data, atol=1e-4)


def test_decimated_reads_still_refuse_nan(tmp_path, amplitude, small_read):
    a = amplitude.copy()
    a[5, 7] = np.nan
    with pytest.raises(InputError) as e:
        read_sar(write_tif(tmp_path / "nan.tif", a))
    one_line(e, "nan.tif", "NaN")


def test_decimated_npy_keeps_the_original_size(tmp_path, amplitude, small_read):
    np.save(tmp_path / "a.npy", amplitude)
    np.save(tmp_path / "every2.npy", np.ascontiguousarray(amplitude[::2, ::2]))
    img = read_sar(tmp_path / "a.npy")
    assert img.data.shape == (48, 64) and (img.height, img.width) == (96, 128)
    np.testing.assert_allclose(img.data, read_sar(tmp_path / "every2.npy").data, atol=1e-6)


def test_max_side_counts_the_overview_gdal_reads(tmp_path, amplitude, monkeypatch):
    monkeypatch.setattr(sar, "READ_MAX_SIDE", 32)  # 96 x 128 is read at a quarter
    path = write_tif(tmp_path / "a.tif", amplitude)
    with pytest.raises(InputError) as e:
        read_sar(path, max_side=100)
    one_line(e, "a.tif", "96 x 128", "100", "overviews")
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.average)
    img = read_sar(path, max_side=100)  # GDAL reads the 24 x 32 overview, not 96 x 128 pixels
    assert img.data.shape == (24, 32) and (img.height, img.width) == (96, 128)


def test_two_band_file_reads_band_1_unless_told_and_says_so(tmp_path, amplitude):
    path = write_tif(tmp_path / "vv_vh.tif", np.stack([amplitude, amplitude[::-1]]))
    assert (read_sar(path).band, read_sar(path).bands) == (1, 2)
    assert read_sar(path, band=2).band == 2
    with pytest.raises(InputError) as e:
        read_sar(path, band=3)
    one_line(e, "vv_vh.tif", "band 3", "--band", "2 band")
    rgb = write_tif(tmp_path / "rgb.tif", np.random.default_rng(0).integers(0, 256, (3, 8, 9), dtype=np.uint8),
                    photometric="RGB")
    assert (read_sar(rgb).band, read_sar(rgb).bands, read_sar(rgb).kind) == (None, 3, "visual8")
    green = read_sar(rgb, band=2)  # an explicit band: that band alone, as gray
    assert green.band == 2 and (green.data[..., 0] == green.data[..., 2]).all()


# -- demo data --------------------------------------------------------------------------


def test_demo_scene_is_deterministic_and_sar_like(tmp_path):
    a = write_demo_scene(tmp_path / "a", size=128, seed=7)
    b = write_demo_scene(tmp_path / "b", size=128, seed=7)
    for key in ("scene_png", "anchors"):
        assert open(a[key], "rb").read() == open(b[key], "rb").read()
    assert a["ships"] == b["ships"] and a["date"] == b["date"]
    assert write_demo_scene(tmp_path / "c", size=128, seed=8)["ships"] != a["ships"]
    img = read_sar(a["scene_tif"])
    assert img.kind == "amplitude" and img.crs == "EPSG:32631" and img.acquisition_date.isoformat() == a["date"]
    assert img.bounds_lonlat == a["bounds"]
    with rasterio.open(a["scene_tif"]) as ds, rasterio.open(b["scene_tif"]) as ds_b:
        raw = ds.read(1)
        assert ds.res == (10.0, 10.0) and ds.dtypes[0] == "float32"
        np.testing.assert_array_equal(raw, ds_b.read(1))
    assert 3 <= len(a["ships"]) <= 5
    sea = np.ones(raw.shape, bool)
    for x0, y0, x1, y1 in a["ships"]:
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
        sea[y0:y1, x0:x1] = False
    for x0, y0, x1, y1 in a["ships"]:
        assert 20 * np.log10(raw[y0:y1, x0:x1].mean() / raw[sea].mean()) > 15  # ships stand out of the clutter
    with pytest.raises(InputError) as e:
        write_demo_scene(tmp_path / "d", size=16)
    one_line(e, "size", "16")
