"""Spatiotemporal anchors: where and when an image was taken, and the AEF vectors sampled there.

``Anchor`` is the footprint + acquisition date of one image (from a GeoTIFF's metadata, or
given by hand); a tile store turns it into an ``AnchorSet``: ``S`` AlphaEarth vectors
(``features [S, 64]`` float32), their image positions (``positions [S, 2]`` float32,
normalised ``(y, x)`` in [0, 1]) and validity (``mask [S]`` bool, False where AEF has no
data).

Files, as the FUSAR-GPT reference code reads them (``data.py`` ``load_aef``):

- ``.npz``: keys ``features`` and ``positions``. We add optional ``mask`` (default all
  True, as the reference assumes), ``year``, ``bounds`` (lon/lat footprint) and ``crs``;
  the reference ignores extra keys.
- ``.npy``: the original CSV-like AEF samples, columns ``lon, lat, row, col, x, y,
  A00..A63``, either as a structured array (feature fields: every field that is not
  lon/lat/row/col/x/y, those named like ``A12`` ordered by number, others after them in
  declaration order; positions from x/y, else col/row) or as a numeric ``[S, 70]`` array
  (or a flat one of a multiple of 70 values). Positions are min-max normalised per axis
  in float32, ``(a - min) / (max - min)``, 0 where an axis has zero range, exactly like
  the reference. Hence an NPY round trip keeps positions only when each axis already
  spans [0, 1]. The layout has no mask: ``save_npy`` leaves masked anchors out.

Nothing is unpickled (``allow_pickle=False``); writes are atomic (temp file + ``os.replace``).
Reads are bounded by what an anchor set can be (``MAX_ANCHORS``): every array's declared size
(the ``.npy`` header's shape x dtype, and for ``.npz`` members the zip's declared uncompressed
size) is checked before a byte of it is read, so a forged header or a zip bomb is refused, not
allocated. Only the ``.npz`` keys above are read; other members are never decompressed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datetime as dt
import math
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, IO

import numpy as np

if TYPE_CHECKING:
    import torch

from ..errors import AnchorError, InputError
from ..fsutil import atomic_writer
from .sar import SarImage, open_raster, parse_date, raster_date, raster_georef

VEC_DIM = 64
NPY_COLUMNS = ("lon", "lat", "row", "col", "x", "y")
NPY_WIDTH = len(NPY_COLUMNS) + VEC_DIM  # 70
NPY_MAGIC = np.lib.format.MAGIC_PREFIX
ZIP_MAGIC = b"PK\x03\x04"
_FEATURE_NAME = re.compile(r"[aA]\d+")
# Size bounds: a 1000 x 1000 anchor grid is far beyond any chip's (16 x 16 by default), and the
# widest legitimate array is the NPY layout in float64 (70 columns x 8 bytes per anchor).
MAX_ANCHORS = 1_000_000
MAX_NPY_BYTES = MAX_ANCHORS * NPY_WIDTH * 8
NPZ_KEYS = ("features", "positions", "mask", "year", "bounds", "crs")
_NPZ_MAX_BYTES = {"features": MAX_ANCHORS * VEC_DIM * 8, "positions": MAX_ANCHORS * 2 * 8, "mask": MAX_ANCHORS * 8}
_SMALL_MAX_BYTES = 1 << 16  # year, bounds, crs: a few values (a WKT CRS string fits)
_HEADER_MAX_BYTES = 1 << 16  # an .npy header is at most numpy's 10000 characters plus padding


@dataclass(frozen=True)
class Anchor:
    """Footprint ``bbox = (lon_min, lat_min, lon_max, lat_max)`` (WGS84) and acquisition date.

    ``crs``/``transform``/``size`` describe the image's own pixel grid when known
    (``size`` = (height, width)). A footprint across the antimeridian has ``lon_min > lon_max``
    (GDAL's convention, what ``transform_bounds`` gives for such a scene): it runs east from
    ``lon_min`` over lon 180 to ``lon_max``, and may span at most 180 degrees that way, so that a
    box with its longitudes swapped by mistake is refused rather than read the long way round.
    """

    bbox: tuple[float, float, float, float]
    date: dt.date | None
    crs: str | None = None
    transform: tuple | None = None
    size: tuple[int, int] | None = None
    source: str = "manual"

    def __post_init__(self):
        try:
            bbox = tuple(float(v) for v in self.bbox)
        except (TypeError, ValueError):
            raise InputError(f"anchor bbox: expected 4 numbers (lon_min, lat_min, lon_max, lat_max), "
                             f"got {self.bbox!r}") from None
        if len(bbox) != 4:
            raise InputError(f"anchor bbox: expected 4 numbers (lon_min, lat_min, lon_max, lat_max), got {len(bbox)}")
        for name, value, limit in zip(("lon_min", "lat_min", "lon_max", "lat_max"), bbox, (180, 90, 180, 90)):
            if not math.isfinite(value) or abs(value) > limit:
                raise InputError(f"anchor bbox: {name} = {value} is outside [-{limit}, {limit}]")
        if not bbox[1] < bbox[3]:
            raise InputError(f"anchor bbox: lat_min = {bbox[1]} must be below lat_max = {bbox[3]}")
        if not bbox[0] < bbox[2] and not (bbox[0] > bbox[2] and bbox[2] + 360.0 - bbox[0] <= 180.0):
            raise InputError(f"anchor bbox: lon_min = {bbox[0]} must be below lon_max = {bbox[2]} (or, for a "
                             "footprint across the antimeridian, above it by at least 180: east from lon_min over "
                             "lon 180 to lon_max)")
        object.__setattr__(self, "bbox", bbox)
        date = self.date
        if isinstance(date, str):
            date = parse_date(date)
        elif isinstance(date, dt.datetime):
            date = date.date()
        elif date is not None and not isinstance(date, dt.date):
            raise InputError(f"anchor date: expected a date or YYYY-MM-DD, got {date!r}")
        object.__setattr__(self, "date", date)
        if self.size is not None:
            size = tuple(int(v) for v in self.size)
            if len(size) != 2 or min(size) < 1:
                raise InputError(f"anchor size: expected (height, width) > 0, got {self.size!r}")
            object.__setattr__(self, "size", size)

    @property
    def year(self) -> int | None:
        return self.date.year if self.date else None

    @property
    def crosses_antimeridian(self) -> bool:
        return self.bbox[0] > self.bbox[2]

    def lonlat_boxes(self) -> list[tuple[float, float, float, float]]:
        """The footprint as ordinary boxes (lon_min < lon_max): itself, or its two sides of lon 180."""
        lon_min, lat_min, lon_max, lat_max = self.bbox
        if not self.crosses_antimeridian:
            return [self.bbox]
        return [(lon_min, lat_min, 180.0, lat_max), (-180.0, lat_min, lon_max, lat_max)]

    @classmethod
    def from_geotiff(cls, path: str | Path, date: dt.date | str | None = None) -> "Anchor":
        """From a GeoTIFF's georeference and date tags; reads metadata only, no pixels."""
        p = Path(path)
        if not p.is_file():
            raise InputError(f"image {p}: no such file")
        with open_raster(p) as ds:
            crs, transform, bbox = raster_georef(ds)
            tag_date, _ = raster_date(ds)
            size = (ds.height, ds.width)
        if bbox is None:
            raise InputError(f"image {p}: no georeference (CRS + transform or GCPs); give the footprint as a bbox")
        return cls(bbox, date if date is not None else tag_date, crs, transform, size, "geotiff")

    @classmethod
    def from_sar_image(cls, img: SarImage, date: dt.date | str | None = None,
                       bbox: tuple[float, float, float, float] | None = None) -> "Anchor":
        """From a read image; ``bbox``/``date`` override its metadata (a given bbox drops its CRS grid)."""
        date = date if date is not None else img.acquisition_date
        size = (img.height, img.width)
        if bbox is not None:
            return cls(bbox, date, size=size, source="manual")
        if img.bounds_lonlat is None:
            raise InputError(f"image {img.path}: no georeference; give its footprint as a bbox "
                             "(--bbox LON_MIN LAT_MIN LON_MAX LAT_MAX)")
        try:
            return cls(img.bounds_lonlat, date, img.crs, img.transform, size, "image")
        except InputError as exc:  # e.g. a footprint across lon 180: say whose
            raise InputError(f"image {img.path}: {exc}") from None


@dataclass
class AnchorSet:
    """``S`` anchors: ``features [S, 64]`` float32, ``positions [S, 2]`` float32 normalised (y, x)
    in [0, 1], ``mask [S]`` bool (None: all valid).

    ``year`` is the AEF year the vectors come from, ``bounds`` the lon/lat footprint they were
    sampled over, ``crs`` the CRS of their source, ``source`` where they came from (a path for
    loaded sets; it prefixes every error message), ``notes`` what the user should know about
    how they were made (e.g. the nearest AEF year was used).
    """

    features: np.ndarray
    positions: np.ndarray
    mask: np.ndarray | None = None
    year: int | None = None
    source: str = ""
    crs: str | None = None
    bounds: tuple | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "used the nearest AEF year"

    def __post_init__(self):
        self.features = self._real("features", self.features)
        s = self.features.shape[0] if self.features.ndim == 2 else 0
        if self.features.ndim != 2 or self.features.shape[1] != VEC_DIM or s == 0:
            raise self._error("features", f"expected shape [S, {VEC_DIM}] with S > 0, got {list(self.features.shape)}")
        self.positions = self._real("positions", self.positions)
        if self.positions.shape != (s, 2):
            raise self._error("positions", f"expected shape [{s}, 2] (y, x), got {list(self.positions.shape)}")
        for name, arr in (("features", self.features), ("positions", self.positions)):
            n_bad = int((~np.isfinite(arr)).sum())
            if n_bad:
                raise self._error(name, f"{n_bad} NaN/Inf values")
        outside = int(((self.positions < 0) | (self.positions > 1)).sum())
        if outside:
            raise self._error("positions", f"{outside} values outside [0, 1] (min {self.positions.min():g}, "
                                           f"max {self.positions.max():g}); expected normalised (y, x)")
        self.mask = np.ones(s, bool) if self.mask is None else self._mask(np.asarray(self.mask), s)
        if self.year is not None:
            if isinstance(self.year, (bool, np.bool_)) or not isinstance(self.year, (int, np.integer)):
                raise self._error("year", f"expected an integer year, got {self.year!r}")
            self.year = int(self.year)
        if self.bounds is not None:
            try:
                bounds = tuple(float(v) for v in np.asarray(self.bounds, dtype=np.float64).reshape(-1))
            except (TypeError, ValueError):
                bounds = ()
            if len(bounds) != 4 or not all(map(math.isfinite, bounds)):
                raise self._error("bounds", f"expected 4 finite numbers (lon_min, lat_min, lon_max, lat_max), "
                                            f"got {self.bounds!r}")
            self.bounds = bounds

    @classmethod
    def trusted(cls, features, positions, mask, year=None, source="", crs=None, bounds=None, notes=None):
        """Build without the input checks, for producers whose arrays are valid by construction
        (the tile store: float32 [S, 64], positions in [0, 1], bool mask); ~60 us saved per call."""
        self = object.__new__(cls)
        self.features, self.positions, self.mask = features, positions, mask
        self.year, self.source, self.crs, self.bounds = year, source, crs, bounds
        self.notes = list(notes or [])
        return self

    def _error(self, key: str, what: str) -> AnchorError:
        return AnchorError(f"anchors {self.source or '(in memory)'}: {key}: {what}")

    def _real(self, key: str, value) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf":
            raise self._error(key, f"expected real numbers, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _mask(self, mask: np.ndarray, s: int) -> np.ndarray:
        if mask.shape != (s,):
            raise self._error("mask", f"expected shape [{s}], got {list(mask.shape)}")
        if mask.dtype != bool and not (mask.dtype.kind in "iu" and np.isin(mask, (0, 1)).all()):
            raise self._error("mask", f"expected booleans (or 0/1), got dtype {mask.dtype}")
        return mask.astype(bool)

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @property
    def coverage(self) -> float:
        """Fraction of anchors with AEF data."""
        return float(self.mask.mean())

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features [S, 64] float32, positions [S, 2] float32, mask [S] bool)``: what the
        vision stage takes, on either backend."""
        return self.features, self.positions, self.mask

    def to_torch(self) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """``(features [S, 64] float32, positions [S, 2] float32, mask [S] bool)``, sharing memory."""
        import torch  # here, so `fusar-edge tiles ...` never pays for importing torch

        return torch.from_numpy(self.features), torch.from_numpy(self.positions), torch.from_numpy(self.mask)

    # -- files ------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "AnchorSet":
        """Read a reference ``.npz`` or ``.npy`` anchor file (see the module docstring)."""
        p = Path(path)
        if not p.is_file():
            raise AnchorError(f"anchors {p}: no such file")
        suffix = p.suffix.lower()
        if suffix not in (".npz", ".npy"):
            raise AnchorError(f"anchors {p}: unsupported extension {p.suffix!r}; expected .npz or .npy")
        with open(p, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        if not head.startswith(ZIP_MAGIC if suffix == ".npz" else NPY_MAGIC):
            raise AnchorError(f"anchors {p}: not a NumPy {suffix} file (wrong magic bytes {head!r}; "
                              "pickles are never loaded)")
        try:
            if suffix == ".npz":
                return cls._from_npz(p, _read_npz(p))
            with open(p, "rb") as f:
                _check_npy_header(f, MAX_NPY_BYTES, f"anchors {p}")
            return cls._from_npy(p, np.load(p, allow_pickle=False))
        except ValueError as exc:
            text = " ".join(str(exc).split())
            if "object" in text.lower():  # numpy refuses object arrays under allow_pickle=False
                raise AnchorError(f"anchors {p}: holds pickled Python objects, which are never loaded; "
                                  "save plain numeric arrays") from exc
            raise AnchorError(f"anchors {p}: cannot read it as {suffix} ({text})") from exc
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise AnchorError(f"anchors {p}: cannot read it as {suffix} ({exc}); is the file truncated?") from exc

    @classmethod
    def _from_npz(cls, p: Path, read: tuple[dict[str, np.ndarray], list[str]]) -> "AnchorSet":
        arrays, names = read
        missing = [key for key in ("features", "positions") if key not in arrays]
        if missing:
            has = ", ".join(sorted(names)) or "none"
            raise AnchorError(f"anchors {p}: missing key {', '.join(missing)} (has: {has})")
        year = arrays.get("year")
        if year is not None and (year.size != 1 or year.dtype.kind not in "iu"):
            raise AnchorError(f"anchors {p}: year: expected one integer, got {year.dtype} {list(year.shape)}")
        crs = arrays.get("crs")
        if crs is not None and (crs.size != 1 or crs.dtype.kind != "U"):
            raise AnchorError(f"anchors {p}: crs: expected one string, got {crs.dtype} {list(crs.shape)}")
        return cls(arrays["features"], arrays["positions"], arrays.get("mask"),
                   None if year is None else int(year.reshape(())), str(p),
                   None if crs is None else str(crs.reshape(())), arrays.get("bounds"))

    @classmethod
    def _from_npy(cls, p: Path, arr: np.ndarray) -> "AnchorSet":
        if arr.dtype.names:
            arr = arr.reshape(-1)
            names = arr.dtype.names
            fields = [n for n in names if n not in NPY_COLUMNS]
            fields.sort(key=lambda n: (0, int(n[1:])) if _FEATURE_NAME.fullmatch(n) else (1, names.index(n)))
            pos_fields = ("x", "y") if "x" in names and "y" in names else ("col", "row")
            missing = [n for n in pos_fields if n not in names]
            if missing or not fields:
                raise AnchorError(f"anchors {p}: structured array needs fields x, y (or col, row) and A00..A63; "
                                  f"has {', '.join(names)}")
            for n in fields:  # a sub-array field (e.g. 64 values) is stacked as its columns, like the reference
                if arr.dtype[n].base.kind not in "iuf":
                    raise AnchorError(f"anchors {p}: field {n}: expected real numbers, got {arr.dtype[n]}")
            for n in pos_fields:
                if arr.dtype[n].kind not in "iuf":
                    raise AnchorError(f"anchors {p}: field {n}: expected one real number per row, got {arr.dtype[n]}")
            features = np.column_stack([arr[n] for n in fields]) if len(arr) else np.zeros((0, len(fields)))
            xs, ys = arr[pos_fields[0]], arr[pos_fields[1]]
        else:
            if arr.dtype.kind not in "iuf":
                raise AnchorError(f"anchors {p}: expected real numbers, got dtype {arr.dtype}")
            if arr.ndim == 1 and arr.size % NPY_WIDTH == 0:
                arr = arr.reshape(-1, NPY_WIDTH)
            if arr.ndim != 2 or arr.shape[1] != NPY_WIDTH:
                raise AnchorError(f"anchors {p}: expected a numeric [S, {NPY_WIDTH}] array (lon, lat, row, col, x, y, "
                                  f"A00..A63), got shape {list(arr.shape)}")
            features, xs, ys = arr[:, len(NPY_COLUMNS):], arr[:, 4], arr[:, 5]
        for axis, values in (("x", xs), ("y", ys)):
            n_bad = int((~np.isfinite(np.asarray(values, dtype=np.float32))).sum())
            if n_bad:
                raise AnchorError(f"anchors {p}: {axis}: {n_bad} NaN/Inf values")
        return cls(features, np.column_stack([_minmax(ys), _minmax(xs)]), source=str(p))

    def save_npz(self, path: str | Path) -> Path:
        """Write ``features, positions, mask`` (+ ``year``, ``bounds``, ``crs`` when known), atomically."""
        arrays = {"features": self.features, "positions": self.positions, "mask": self.mask}
        if self.year is not None:
            arrays["year"] = np.asarray(self.year, dtype=np.int64)
        if self.bounds is not None:
            arrays["bounds"] = np.asarray(self.bounds, dtype=np.float64)
        if self.crs is not None:
            arrays["crs"] = np.asarray(self.crs)
        return _atomic_write(path, ".npz", lambda f: np.savez(f, **arrays))

    def save_npy(self, path: str | Path, lon=None, lat=None, row=None, col=None, x=None, y=None) -> Path:
        """Write the reference's numeric float64 ``[S, 70]`` layout, atomically.

        ``x``/``y`` default to ``positions[:, 1]``/``positions[:, 0]``; unknown
        ``lon, lat, row, col`` are written as 0 (the reference never reads them). Masked
        anchors are left out: the layout cannot mark them, and the reference would use them.
        """
        keep = self.mask
        if not keep.any():
            raise self._error("mask", "every anchor is masked; the NPY layout cannot hold an empty set")
        columns = []
        for name, values, default in (("lon", lon, 0.0), ("lat", lat, 0.0), ("row", row, 0.0), ("col", col, 0.0),
                                      ("x", x, self.positions[:, 1]), ("y", y, self.positions[:, 0])):
            values = np.asarray(default if values is None else values, dtype=np.float64)
            if values.shape not in ((), (self.size,)):
                raise self._error(name, f"expected one value or shape [{self.size}], got {list(values.shape)}")
            values = np.broadcast_to(values, (self.size,))
            if not np.isfinite(values).all():
                raise self._error(name, "NaN/Inf values cannot be written to the NPY layout")
            columns.append(values)
        table = np.column_stack([*columns, self.features])[keep]
        return _atomic_write(path, ".npy", lambda f: np.save(f, table, allow_pickle=False))


def _read_npz(p: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """The anchor keys of an ``.npz`` (each size-checked before it is read) and every key's name."""
    with zipfile.ZipFile(p) as zf:
        members = {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}
        arrays = {key: _read_npz_member(p, zf, members[key]) for key in NPZ_KEYS if key in members}
    return arrays, list(members)


def _read_npz_member(p: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    key = info.filename[:-4]
    cap = _NPZ_MAX_BYTES.get(key, _SMALL_MAX_BYTES)
    where = f"anchors {p}: member {info.filename}"
    # the declared size bounds what decompression can produce (zipfile stops there)
    if info.file_size > cap + _HEADER_MAX_BYTES:
        raise AnchorError(f"{where}: declares {info.file_size} bytes uncompressed; an anchor set's {key} holds "
                          f"at most {cap} bytes ({MAX_ANCHORS} anchors)")
    with zf.open(info) as f:
        _check_npy_header(f, cap, where)
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _check_npy_header(f: IO[bytes], cap: int, where: str) -> None:
    """Refuse an ``.npy`` stream whose header declares more than ``cap`` bytes of data: numpy
    allocates the declared shape before reading (a forged header could claim terabytes)."""
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
    # 3.0 differs from 2.0 only in the header text's encoding (UTF-8 field names), which leaves
    # the shape and the item size as they are
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > cap:
        raise AnchorError(f"{where}: declares shape {list(shape)} {dtype} ({nbytes} bytes); an anchor set holds "
                          f"at most {cap} bytes there ({MAX_ANCHORS} anchors)")


def _minmax(a) -> np.ndarray:
    """The reference's per-axis normalisation, in float32: (a - min) / (max - min), 0 on zero range."""
    a = np.asarray(a, dtype=np.float32)
    if a.size == 0 or np.ptp(a) <= 0:
        return np.zeros_like(a)
    return (a - a.min()) / (a.max() - a.min())


def _atomic_write(path: str | Path, suffix: str, write: Callable[[IO[bytes]], None]) -> Path:
    """``write`` the file through ``fsutil.atomic_writer``: a crash leaves either the old file or
    the new one, never half of one; a failure is one line naming the file."""
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise InputError(f"anchors {p}: expected a {suffix} file name (the reader dispatches on it)")
    try:
        with atomic_writer(p) as f:
            write(f)
    except OSError as exc:
        raise InputError(f"anchors {p}: cannot write ({exc.strerror or exc}); the old file is unchanged") from exc
    return p
