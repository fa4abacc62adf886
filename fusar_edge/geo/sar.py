"""SAR image input: read a GeoTIFF, PNG/JPEG or ``.npy`` into one display representation.

This module reads files (pixels, georeference, acquisition date) and owns the contract
below; the value steps 1-3 are in ``geo.radiometry``, the chip of step 4 in ``geo.chip``.

The model was trained on 8-bit renderings of SAR scenes (the FUSAR-GPT reference opens a
PNG, converts it to RGB and resizes it bicubically to 504 x 504), so every input ends as
such a rendering; what differs is how radar measurements become one.

Normalisation contract (THE contract; ``SarImage.data`` and ``to_chip`` follow it):

1. Complex (SLC) pixels become amplitude ``|z|``. Real pixels are read per ``scale``:
   ``"amplitude"`` (linear), ``"power"`` (linear intensity, e.g. sigma0), ``"db"``, or
   ``"auto"``: 8-bit unsigned data is an already-visual image (kept as is, below); other
   data is ``"db"`` if any valid pixel is negative (linear values never are), else
   ``"amplitude"``.
2. Linear values become dB: ``20 log10(max(a, 1e-10))`` for amplitude,
   ``10 log10(max(p, 1e-10))`` for power. After step 3 amplitude and power give the same
   image (the factor 2 cancels); only dB versus linear matters.
3. A robust stretch maps the 2nd..98th percentile of the valid pixels linearly to [0, 1]
   and clips. Valid pixels are finite, not equal to the GeoTIFF's declared nodata value,
   and, for linear data, > 0 (zero amplitude is the fill of SAR products, not a
   measurement). If the two percentiles coincide, min..max is used instead; a constant
   image becomes all 0. Invalid pixels are 0 after the stretch.
4. ``to_chip`` renders ``round(255 * value)`` as 8-bit gray, replicates it to RGB and
   resizes with PIL bicubic to ``size x size`` (aspect ratio not kept, as in the reference).

``SarImage.data`` therefore has one of two forms, told apart by ``kind``:
``kind == "visual8"``: uint8 ``[H, W, 3]``, exactly ``PIL.Image.open(p).convert("RGB")``
(so the chip of an 8-bit PNG is byte-identical to the reference's); every other kind
(``"amplitude"``, ``"power"``, ``"db"``, ``"complex"``): float32 ``[H, W]`` in [0, 1] after
steps 1-3.

PNGs with 16/32-bit pixels hold radar values, not a rendering: they go through steps 1-3.
NaN/Inf pixels are an error unless the GeoTIFF declares NaN as its nodata value: silently
zeroing them would hide a broken product. Images with a side above ``max_side`` are
refused before their pixels are read.

Large images are read decimated: the chip is at most ~1000 px, so a GeoTIFF or ``.npy`` whose
longest side exceeds ``READ_MAX_SIDE`` is read down to that (GeoTIFF: GDAL's average, RMS for
complex pixels, i.e. multilooking, from the file's overviews when it has them; ``.npy``: every
k-th pixel of a memory map). Memory then follows ``READ_MAX_SIDE``, not the file's claimed
size; ``height``/``width`` stay the original's, which boxes are mapped back to. For a
GeoTIFF, ``max_side`` bounds the side GDAL reads at full resolution, so a file with
overviews may be larger. Smaller images are read exactly as they are.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import rasterio
import rasterio.errors
from PIL import Image
from rasterio.enums import Resampling
from rasterio.warp import transform_bounds

from ..errors import InputError
from .radiometry import normalise

SCALES = ("auto", "amplitude", "db", "power")
RASTER_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
NPY_SUFFIXES = (".npy",)
SUFFIXES = RASTER_SUFFIXES + PIL_SUFFIXES + NPY_SUFFIXES
# Tag keys that may carry the acquisition date, most specific first. TIFFTAG_DATETIME is
# last: it is often the time the file was written, not when the scene was acquired.
DATE_KEYS = ("ACQUISITION_DATE", "ACQUISITION_START_TIME", "FIRST_LINE_TIME", "ACQUISITION_TIME",
             "START_TIME", "DATE", "DATETIME", "TIFFTAG_DATETIME")
# YYYY-MM-DD, YYYY:MM:DD (TIFF), YYYYMMDD, each optionally followed by a time.
_TAG_DATE = re.compile(r"\s*(\d{4})[-:/.]?(\d{2})[-:/.]?(\d{2})(?!\d)")
_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
# Longest side read from a GeoTIFF / .npy: 4x the largest chip (1008 px), so the bicubic resize
# to the chip still sees several source pixels per chip pixel.
READ_MAX_SIDE = 4 * 1008
READ_CACHE_MB = 64  # GDAL's block cache during a decimated read: each block is read once


@dataclass
class SarImage:
    """One SAR image in display form plus what is known of where and when it was taken.

    ``data``: see the module docstring (float32 ``[H, W]`` in [0, 1], or uint8 ``[H, W, 3]``
    when ``kind == "visual8"``). ``transform`` holds the affine coefficients
    ``(a, b, c, d, e, f)`` of the pixel grid in ``crs``; ``bounds_lonlat`` is the WGS84
    footprint ``(lon_min, lat_min, lon_max, lat_max)``; ``date_tag`` names the metadata
    key the acquisition date was read from. ``height``/``width`` are the file's, also when
    ``data`` was read decimated (a large image). ``band`` is the band read (None: a GeoTIFF's
    RGB composite), ``bands`` how many the file has.
    """

    path: str
    data: np.ndarray
    height: int
    width: int
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    bounds_lonlat: tuple[float, float, float, float] | None = None
    acquisition_date: dt.date | None = None
    kind: str = "amplitude"
    date_tag: str | None = None
    band: int | None = 1
    bands: int = 1


def parse_date(text: str) -> dt.date:
    """``"YYYY-MM-DD"`` -> date; anything else is an InputError naming the value."""
    match = _ISO_DATE.fullmatch(text.strip()) if isinstance(text, str) else None
    try:
        if match:
            return dt.date(*map(int, match.groups()))
    except ValueError:
        pass
    raise InputError(f"date: expected a calendar date YYYY-MM-DD, got {text!r}")


def read_sar(path: str | Path, *, scale: str = "auto", band: int | None = None, max_side: int = 20000) -> SarImage:
    """Read a SAR image (GeoTIFF/TIFF, PNG/JPEG, ``.npy``) and normalise it per the module contract.

    ``band`` (1-based) selects the GeoTIFF band; None: band 1, or the RGB composite of an 8-bit
    RGB GeoTIFF. PNG/JPEG and ``.npy`` hold a single image. ``max_side`` bounds both sides (for
    a GeoTIFF, the side read at full resolution); PNG/JPEG are also held to Pillow's
    decompression-bomb limit (about 179 Mpx), as they cannot be read decimated.
    """
    p = Path(path)
    if scale not in SCALES:
        raise InputError(f"scale: expected one of {', '.join(SCALES)}, got {scale!r}")
    if band is not None and (isinstance(band, bool) or not isinstance(band, (int, np.integer)) or band < 1):
        raise InputError(f"band (--band): expected a 1-based band index, got {band!r}")
    band = None if band is None else int(band)
    if not p.exists():
        raise InputError(f"image {p}: no such file")
    if not p.is_file():
        raise InputError(f"image {p}: not a file")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"image {p}: unsupported extension {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    if p.stat().st_size == 0:
        raise InputError(f"image {p}: the file is empty (0 bytes)")
    if suffix in RASTER_SUFFIXES:
        return _read_raster(p, scale, band, max_side)
    if band not in (None, 1):
        raise InputError(f"image {p}: band {band} (--band) out of range; a {suffix} file holds one image (band 1)")
    if suffix in PIL_SUFFIXES:
        return _read_pil(p, scale, max_side)
    return _read_npy(p, scale, max_side)


# -- GeoTIFF ------------------------------------------------------------------------------


def exc_reason(exc: BaseException) -> str:
    """An exception's own words on one line. GDAL's come through rasterio as the cause of a
    "Read failed. See previous exception for details." (PIL's of a wrapper too), which the
    exception's own text would drop."""
    return " ".join(str(exc.__cause__ or exc).split())


@contextmanager
def open_raster(path: Path) -> Iterator[rasterio.io.DatasetReader]:
    """Open a GeoTIFF with GDAL errors turned into one-line InputErrors naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                yield ds
    except rasterio.errors.RasterioError as exc:
        raise InputError(f"image {path}: cannot read it as a TIFF ({exc_reason(exc)}); "
                         "is the file truncated or corrupt?") from exc


def raster_georef(ds) -> tuple[str | None, tuple[float, ...] | None, tuple[float, float, float, float] | None]:
    """``(crs, transform, bounds_lonlat)`` from an affine geotransform, else from GCPs.

    GCP-georeferenced files (e.g. Sentinel-1 GRD) get a footprint from the envelope of
    their GCPs and no affine transform.
    """
    if ds.crs and not ds.transform.is_identity:
        t = ds.transform
        xs, ys = zip(*(t @ corner for corner in ((0, 0), (ds.width, 0), (0, ds.height), (ds.width, ds.height))))
        crs, affine = ds.crs, tuple(float(v) for v in t[:6])
    else:
        gcps, crs = ds.gcps
        if not gcps or not crs:
            return None, None, None
        xs, ys = [g.x for g in gcps], [g.y for g in gcps]
        affine = None
    try:
        bounds = transform_bounds(crs, "EPSG:4326", min(xs), min(ys), max(xs), max(ys), densify_pts=21)
    except Exception as exc:  # PROJ / GDAL raise their own types (rasterio._err.CPLE_*)
        raise crs_error(ds.name, crs.to_string(), exc) from None
    return crs.to_string(), affine, tuple(float(v) for v in bounds)


def crs_error(where: str, crs: str, exc: BaseException) -> InputError:
    """One line for a CRS with no way to lon/lat (an engineering CRS, another planet's), naming
    the file; PROJ's own message is cut before the CRS definition it quotes in full."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(" from '")[0]
    name = re.sub(r"\[.*", "", crs) if len(crs) > 60 else crs  # LOCAL_CS["arbitrary",...] -> LOCAL_CS
    return InputError(f"{where}: its CRS {name} cannot be converted to lon/lat ({reason[:120]})")


def raster_date(ds) -> tuple[dt.date | None, str | None]:
    """Acquisition date and the tag it came from, searching every namespace and the band tags."""
    tags: dict[str, str] = {}
    for group in [ds.tags(), *(ds.tags(ns=ns) for ns in ds.tag_namespaces() or ()), ds.tags(1)]:
        for key, value in group.items():
            tags.setdefault(key.upper(), value)
    for key in DATE_KEYS:
        match = _TAG_DATE.match(tags.get(key, ""))
        if match:
            try:
                return dt.date(*map(int, match.groups())), key
            except ValueError:
                continue  # a malformed tag: try the next key
    return None, None


def _read_raster(p: Path, scale: str, band: int | None, max_side: int) -> SarImage:
    with open_raster(p) as ds:
        if band is not None and band > ds.count:
            raise InputError(f"image {p}: band {band} (--band) out of range; the file has {ds.count} band(s)")
        rgb = (band is None and scale == "auto" and ds.count >= 3 and all(d == "uint8" for d in ds.dtypes[:3])
               and [c.name for c in ds.colorinterp[:3]] == ["red", "green", "blue"])
        band = band or 1
        _check_size(p, ds.height, ds.width, max_side, _full_resolution_side(ds, band))
        crs, affine, bounds = raster_georef(ds)
        date, date_tag = raster_date(ds)
        nodata, height, width, bands = ds.nodatavals[band - 1], ds.height, ds.width, ds.count
        pixels = _read_bands(ds, [1, 2, 3] if rgb else [band])  # read errors: open_raster
    if rgb:
        data, kind = np.ascontiguousarray(pixels.transpose(1, 2, 0)), "visual8"
    else:
        data, kind = normalise(p, pixels[0], scale, nodata)
    return SarImage(str(p), data, height, width, crs, affine, bounds, date, kind, date_tag,
                    None if rgb else band, bands)


def _read_shape(height: int, width: int) -> tuple[int, int]:
    """The ``(height, width)`` to read: the image's own, or scaled so its longest side is ``READ_MAX_SIDE``."""
    side = max(height, width)
    if side <= READ_MAX_SIDE:
        return height, width
    return max(1, round(height * READ_MAX_SIDE / side)), max(1, round(width * READ_MAX_SIDE / side))


def _full_resolution_side(ds, band: int) -> int:
    """Longest side GDAL reads pixel by pixel for this image: the file's, or that of the
    coarsest overview still at least as fine as the decimated read (GDAL reads from it)."""
    side = max(ds.height, ds.width)
    wanted = side / READ_MAX_SIDE
    factor = max((f for f in ds.overviews(band) if f <= wanted), default=1)
    return math.ceil(side / factor)


def _read_bands(ds, indexes: list[int]) -> np.ndarray:
    """``[bands, h, w]``, decimated to ``_read_shape``: averaged (RMS for complex pixels, so
    amplitude survives), which also carries NaN/Inf through to the checks."""
    shape = _read_shape(ds.height, ds.width)
    if shape == (ds.height, ds.width):
        return ds.read(indexes)
    complex_pixels = np.dtype(ds.dtypes[indexes[0] - 1]).kind == "c"
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_MB):  # default: 5% of RAM, held after the read
        return ds.read(indexes, out_shape=(len(indexes), *shape),
                       resampling=Resampling.rms if complex_pixels else Resampling.average)


# -- PNG / JPEG and .npy ------------------------------------------------------------------


def _read_pil(p: Path, scale: str, max_side: int) -> SarImage:
    try:
        with warnings.catch_warnings():
            # max_side is the size guard here; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _check_size(p, im.height, im.width, max_side)
                im.load()
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit: radar data, not a rendering
                    data, kind = normalise(p, np.asarray(im), scale, None)
                elif scale == "auto":
                    data, kind = np.asarray(im.convert("RGB")), "visual8"
                else:
                    data, kind = normalise(p, np.asarray(im.convert("L")), scale, None)
                height, width = im.height, im.width
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {p}: more pixels than Pillow's decompression-bomb limit ({exc}); "
                         "convert it to GeoTIFF or .npy") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError and truncation are OSErrors
        raise InputError(f"image {p}: cannot read it as {p.suffix[1:].upper()} "
                         f"({exc_reason(exc)}); is the file truncated or corrupt?") from exc
    return SarImage(str(p), data, height, width, kind=kind)


def _read_npy(p: Path, scale: str, max_side: int) -> SarImage:
    with open(p, "rb") as f:
        if not f.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX:
            raise InputError(f"image {p}: not a NumPy .npy file (wrong magic bytes; pickles are never loaded)")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)  # header only until the size is checked
    except ValueError as exc:
        if "object" in str(exc).lower():
            raise InputError(f"image {p}: holds Python objects, which are never unpickled; "
                             "save a plain numeric 2-D array") from exc
        raise InputError(f"image {p}: cannot read it as .npy ({exc}); is the file truncated or corrupt?") from exc
    except (OSError, EOFError) as exc:
        raise InputError(f"image {p}: cannot read it as .npy ({exc}); is the file truncated or corrupt?") from exc
    return image_from_array(arr, str(p), scale, max_side)


def image_from_array(arr: np.ndarray, name: str = "<array>", scale: str = "auto", max_side: int = 20000) -> SarImage:
    """An in-memory 2-D radar array (amplitude, intensity, dB or complex) as a ``SarImage``,
    through the same checks and steps as a ``.npy`` file (``Runtime.ask`` takes arrays this way);
    ``name`` stands for the path in messages. No georeference: give anchors or a bbox."""
    if not isinstance(arr, np.ndarray):
        raise InputError(f"image {name}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim != 2:
        raise InputError(f"image {name}: expected a 2-D array [H, W], got shape {list(arr.shape)}")
    if arr.dtype.names or arr.dtype.kind not in "biufc" or arr.dtype.kind == "b":
        raise InputError(f"image {name}: expected real or complex numbers, got dtype {arr.dtype}")
    _check_size(name, arr.shape[0], arr.shape[1], max_side)
    step = math.ceil(max(arr.shape) / READ_MAX_SIDE)  # 1 unless the image is large: then every step-th pixel
    data, kind = normalise(name, np.asarray(arr[::step, ::step]), scale, None)
    return SarImage(name, data, arr.shape[0], arr.shape[1], kind=kind)


def _check_size(p: Path, height: int, width: int, max_side: int, read_side: int | None = None) -> None:
    """``read_side``: the longest side read at full resolution, when overviews make it smaller."""
    if height == 0 or width == 0:
        raise InputError(f"image {p}: zero-size image ({height} x {width} px)")
    if (read_side or max(height, width)) > max_side:
        via = f" (its usable overview: {read_side} px)" if read_side and read_side < max(height, width) else ""
        raise InputError(f"image {p}: {height} x {width} px{via} exceeds the limit of {max_side} px per side "
                         "read at full resolution (raise it: --max-image-side PX; read_sar(max_side=...) in Python; "
                         "GeoTIFF overviews, e.g. gdaladdo, are read instead when present)")
