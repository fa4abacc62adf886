"""Ingest AlphaEarth Foundations (AEF) annual embeddings into a tile store.

``ingest(sources, store, bbox=None, years=None, progress=None, root=None)`` reads AEF
embeddings from local files and writes them as tiles of the store described in
``docs/tilestore.md`` (format and commit protocol: ``tile_format``). It never downloads.

Sources (any mix, in one call):

* **Official AEF COGs** (``.tif`` / ``.tiff``), laid out as published:
  ``<year>/<utm zone>/<ee id>-<yoff>-<xoff>.tiff``, e.g. ``2023/31N/x...-0000008192-0000000000.tiff``:
  64 int8 bands ``A00..A63``, 10 m pixels, WGS 84 / UTM (EPSG:326xx/327xx), no data -128.
  The published files are stored *bottom-up* (positive y resolution in the geotransform);
  both orientations are read from the geotransform and every stored tile is north-up.
  The year comes from the index row (below), else the ``<year>/`` directory, else a
  ``YEAR`` / ``year`` GeoTIFF tag, else ``years`` when it names exactly one year; a file
  whose year is still unknown is an error naming it.
* **Directories**: walked (sorted) for ``*.tif`` / ``*.tiff`` and zarr stores; hidden
  entries are skipped.
* **The published index** ``aef_index`` as ``.csv`` or (Geo)``.parquet`` (parquet needs
  ``pyarrow``). Columns used (names are matched case-insensitively): ``path`` and ``year``
  (required); ``wgs84_west, wgs84_south, wgs84_east, wgs84_north`` (to pick the files that
  intersect ``bbox``; without them every file of the year is opened) and ``crs``
  (``EPSG:326zz``, cross-checked against the file). Other columns (``fid, utm_zone,
  utm_west .. utm_north, geom / WKT``) are ignored. ``path`` holds remote URLs
  (``s3://us-west-2.opendata.source.coop/tge-labs/aef/v1/annual/2023/31N/x.tiff``,
  ``gs://alphaearth_foundations/satellite_embedding/v1/annual/...``, ``https://...``); each
  is resolved to a local file by its ``<year>/<zone>/<file>`` suffix under ``root`` (default:
  the index file's directory), or by its file name directly under ``root``. Missing files
  are one error listing them.
* **Zarr stores** like those ``aef-download`` writes (regional subsets of the AEF GeoZarr
  mosaic): an ``embeddings`` array with dimensions ``[time, band, y, x]`` (names from zarr
  v3 ``dimension_names`` or v2 ``_ARRAY_DIMENSIONS``; ``[band, y, x]`` for a single year),
  64 bands, an affine ``spatial:transform`` ``[a, b, c, d, e, f]`` (GeoZarr "spatial"
  convention; ``spatial:registration: node`` is shifted by half a pixel; fallbacks: a CF
  ``spatial_ref`` variable's ``GeoTransform``, or regular ``x``/``y`` coordinate arrays), a
  CRS (``proj:code`` / ``proj:epsg`` / ``proj:wkt2`` / ``crs`` / ``spatial_ref`` attributes;
  EPSG:4326 like the mosaic, or a UTM zone), and years from the ``time`` coordinate array
  (integer years, CF ``<unit> since <date>`` numbers, datetime64 or date strings), else from a
  ``year`` attribute or a year in the store's directory name.

Values: int8 sources are stored exactly as they are (pixel for pixel; ``-128`` = no data).
Float sources (``aef-download --dequantize``) are re-quantised with the inverse of AEF's
de-quantisation ``v = (q / 127.5)^2 * sign(q)``: ``q = rint(sign(v) * sqrt(|v|) * 127.5)``
(round half to even), clipped to ``[-127, 127]``; a pixel with any non-finite band (NaN is
the no-data value there) becomes ``-128`` in all bands. Every int8 ``q`` in ``[-127, 127]``
survives the round trip de-quantise -> re-quantise exactly.

``bbox`` (``lon_min, lat_min, lon_max, lat_max``, WGS84 degrees) crops each source to the
pixel window that covers it plus ``MARGIN_PX`` pixels; sources that do not intersect it are
skipped. A window that holds no valid pixel is not stored. Windows are read in row blocks
of about ``BLOCK_BYTES``, aligned to the source's internal blocks, and streamed to the tile
file, so an 8192 x 8192 x 64 COG is never held whole: memory is one source block row
(``width * block height * 64`` bytes, 256 MiB for an 8192-px file with 512-row blocks) plus
GDAL's block cache, capped at 64 MB (``GDAL_CACHEMAX``; GDAL decodes with all cores,
``GDAL_NUM_THREADS``; both environment variables are honoured when set).

Tiles go to ``tiles/<year>/<epsg>/<stem>-<8 hex>.aef``; the 8 hex digits hash the source's
name, year, CRS and window, so re-ingesting the same source and window replaces that tile
(or keeps it untouched when nothing changed) instead of adding a duplicate. Each tile's
``source`` (manifest) records the source path, window and identity; a window already inside
a larger tile of the same unchanged source is not stored again, and a larger window
replaces the smaller windows of its source. A tile file the store names is never rewritten
in place: changed content goes to a new name (``<stem>-<8 hex>.<sha 8>.aef``). All tiles of
one call are published by a single ``tile_format.commit`` that keeps the store's other
tiles. Nothing is visible to readers before that commit: a killed ingest leaves ``CURRENT``
and every file it names as they were. Finished windows are recorded (fsync'd) in
``STORE/.ingest/journal.jsonl`` with their tile's SHA-256 and the source's path, size and
mtime, so the same command run again after a kill skips them (re-hashing the tile only);
the journal is removed after the commit. ``STORE/.ingest/lock`` keeps two ingests out of
one store.

Progress: ``progress(done_bytes, total_bytes, message)`` is called after every block;
bytes count tile bytes (``width * height * 64`` per window), so a tqdm bar is::

    bar = tqdm(total=0, unit="B", unit_scale=True)
    def progress(done, total, message):
        bar.total = total; bar.n = done; bar.set_postfix_str(message, refresh=False); bar.refresh()

An exception raised by the callback aborts the ingest like a kill (the store is unchanged,
finished windows stay in the journal).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np

from ..errors import InputError
from ..hashing import sha256_file
from . import tile_format as tf
from .utm import parse_utm_epsg

try:  # POSIX advisory lock; on other systems ingests are not guarded against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MARGIN_PX = 2
BLOCK_BYTES = 32 << 20  # target tile bytes per source read (at least one source block row)
JOURNAL = "journal.jsonl"
INGEST_DIR = ".ingest"
COG_SUFFIXES = (".tif", ".tiff")
INDEX_SUFFIXES = (".csv", ".parquet", ".geoparquet")
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
BAND_NAMES = tuple(f"A{i:02d}" for i in range(tf.VEC_DIM))
_YEAR_RANGE = (2017, 2100)  # AEF's annual layers start in 2017
_ZONE_DIR = re.compile(r"(\d{1,2})([NS])", re.IGNORECASE)
_YEAR_DIR = re.compile(r"\d{4}")
_SLOT = re.compile(r"^(tiles/\d+/\d+/.+-[0-9a-f]{8})(?:\.[0-9a-f]{8})?\.aef$")

Progress = Callable[[int, int, str], None]


# -- report --------------------------------------------------------------------------------


@dataclass
class IngestReport:
    """What one ``ingest`` call did.

    ``tiles_added``: windows written to a new tile; ``tiles_replaced``: windows whose tile
    existed with other content (source changed) and was replaced; ``tiles_reused``: windows
    whose committed tile already held exactly this data (not rewritten); ``tiles_resumed``:
    windows finished by an earlier, interrupted run of the same command (from the journal);
    ``tiles_empty``: windows without a single valid pixel (not stored); ``tiles_covered``:
    windows inside a larger tile the store already holds from the same, unchanged source
    (not stored twice; conversely a new window replaces the smaller windows of its source
    that it contains). ``skipped``: one line
    per source (or source year) left out, saying why (outside ``bbox``, other year).
    ``bytes_read``: tile bytes produced from sources in this call; ``bytes_total``: tile
    bytes of every window of the call. ``tiles``: the records of this call's tiles.
    ``warnings``: things that did not stop the ingest but deserve a look (one line each).
    ``generation``: the committed generation directory (None when nothing changed and the
    store was left as it was).
    """

    store: str
    sources: int = 0
    tiles_added: int = 0
    tiles_replaced: int = 0
    tiles_reused: int = 0
    tiles_resumed: int = 0
    tiles_empty: int = 0
    tiles_covered: int = 0
    skipped: list[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    years: list[int] = field(default_factory=list)
    crs: list[str] = field(default_factory=list)
    tiles: list[tf.TileRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    store_tiles: int = 0
    generation: str | None = None

    @property
    def tiles_skipped(self) -> int:
        return len(self.skipped)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for people (the CLI prints it)."""
        parts = [f"{self.tiles_added} added", f"{self.tiles_replaced} replaced", f"{self.tiles_reused} unchanged",
                 f"{self.tiles_resumed} resumed", f"{self.tiles_covered} covered", f"{self.tiles_empty} empty",
                 f"{len(self.skipped)} skipped"]
        years = ",".join(str(y) for y in self.years) or "-"
        crs = ",".join(self.crs) or "-"
        return (f"{self.store}: {', '.join(parts)} from {self.sources} source(s); years {years}; {crs}; "
                f"{self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:.1f} MB/s); "
                f"store holds {self.store_tiles} tile(s)")

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tiles"}
        d["tiles"] = [t.to_json() for t in self.tiles]
        d["mb_per_s"] = self.mb_per_s
        return d


# -- units of work -------------------------------------------------------------------------


@dataclass
class _Unit:
    """One window of one source year: becomes (at most) one tile."""

    kind: str  # "cog" | "zarr"
    source: Path
    year: int
    epsg: int
    col_off: int
    row_off: int
    width: int
    height: int
    bottom_up: bool
    x0: float
    y0: float
    dx: float
    dy: float
    slot: str  # tiles/<year>/<epsg>/<stem>-<hash8>  (without suffix)
    provenance: str
    block_rows: int  # a read-block height that matches the source's internal blocks
    t_index: int | None = None  # zarr: time position
    zarr_info: "_ZarrInfo | None" = None

    @property
    def nbytes(self) -> int:
        return self.width * self.height * tf.VEC_DIM

    @property
    def base_path(self) -> str:
        return self.slot + tf.TILE_SUFFIX

    def record(self, path: str, sha: str) -> tf.TileRecord:
        env = tf.lonlat_envelope(self.epsg, self.x0, self.y0, self.dx, self.dy, self.width, self.height)
        return tf.TileRecord(self.year, self.epsg, self.width, self.height, self.x0, self.y0, self.dx, self.dy,
                             env, path, sha, self.provenance)


def _check_bbox(bbox) -> tuple[float, float, float, float] | None:
    if bbox is None:
        return None
    try:
        b = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InputError(f"bbox {bbox!r}: expected four numbers lon_min, lat_min, lon_max, lat_max") from None
    if len(b) != 4 or not all(math.isfinite(v) for v in b):
        raise InputError(f"bbox {bbox!r}: expected four finite numbers lon_min, lat_min, lon_max, lat_max")
    lon0, lat0, lon1, lat1 = b
    if not (-180 <= lon0 < lon1 <= 180 and -90 <= lat0 < lat1 <= 90):
        raise InputError(f"bbox {b}: expected lon_min < lon_max in [-180, 180] and lat_min < lat_max in [-90, 90] "
                         "(a box across the antimeridian must be given as two boxes)")
    return b


def _check_years(years) -> frozenset[int] | None:
    if years is None:
        return None
    if isinstance(years, (int, np.integer, str)):
        years = [years]
    out = set()
    for y in years:
        try:
            yi = int(y)
        except (TypeError, ValueError):
            raise InputError(f"years: {y!r} is not a year") from None
        if not _YEAR_RANGE[0] <= yi <= _YEAR_RANGE[1]:
            raise InputError(f"years: {yi} is not an AEF year (AEF's annual layers start in 2017)")
        out.add(yi)
    if not out:
        raise InputError("years: empty; give at least one year or None for all")
    return frozenset(out)


def _stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return stem[:80] or "source"


def _slot(year: int, epsg: int, stem: str, key: str) -> str:
    h = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"tiles/{year}/{epsg}/{_stem(stem)}-{h}"


def _provenance(path: Path, t_index: int | None, window, ident: str) -> str:
    """The ``source`` string of a tile record: which bytes of which source it holds (JSON)."""
    return json.dumps({"src": str(path.resolve()), "t": t_index, "window": [int(v) for v in window], "id": ident},
                      sort_keys=True)


def _parse_provenance(s: str) -> tuple[tuple[str, int | None], tuple[int, int, int, int], str] | None:
    """``((src, t), window, identity)`` of a record written by this module, else None."""
    try:
        d = json.loads(s)
        return (str(d["src"]), d["t"]), tuple(int(v) for v in d["window"]), str(d["id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _contains(outer, inner) -> bool:
    oc, orow, ow, oh = outer
    ic, irow, iw, ih = inner
    return oc <= ic and orow <= irow and ic + iw <= oc + ow and irow + ih <= orow + oh


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def _dir_identity(path: Path) -> str:
    total, latest, count = 0, 0, 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            total += st.st_size
            latest = max(latest, st.st_mtime_ns)
            count += 1
    return f"files={count} size={total} mtime_ns={latest}"


def _window_for(transform, width: int, height: int, src_epsg: int, bbox) -> tuple[int, int, int, int] | None:
    """Pixel window ``(col_off, row_off, w, h)`` in source pixel space covering ``bbox``; None when
    the source lies outside it (a cheap lon/lat envelope test first, then the projected bounds)."""
    if bbox is None:
        return 0, 0, width, height
    if not _intersects(_unit_bbox_lonlat(src_epsg, transform, width, height), bbox):
        return None
    from rasterio.warp import transform_bounds

    try:
        if src_epsg == tf.EPSG_LONLAT:
            xb = bbox
        else:
            xb = transform_bounds("EPSG:4326", f"EPSG:{src_epsg}", *bbox, densify_pts=21)
    except Exception:  # noqa: BLE001  (PROJ refuses points far outside the zone: no overlap)
        return None
    if not all(math.isfinite(v) for v in xb):
        return None
    cols, rows = [], []  # the transform has no rotation (checked): invert it per axis
    for x, y in ((xb[0], xb[1]), (xb[0], xb[3]), (xb[2], xb[1]), (xb[2], xb[3])):
        cols.append((x - transform.c) / transform.a)
        rows.append((y - transform.f) / transform.e)
    c0 = max(0, math.floor(min(cols)) - MARGIN_PX)
    c1 = min(width, math.ceil(max(cols)) + MARGIN_PX)
    r0 = max(0, math.floor(min(rows)) - MARGIN_PX)
    r1 = min(height, math.ceil(max(rows)) + MARGIN_PX)
    if c1 <= c0 or r1 <= r0:
        return None
    return c0, r0, c1 - c0, r1 - r0


def _north_up_geometry(transform, window) -> tuple[float, float, float, float, bool]:
    """``(x0, y0, dx, dy, bottom_up)`` of a window: its north-west corner and pixel size."""
    c0, r0, w, h = window
    a, e = transform.a, transform.e
    x0 = transform.c + a * c0
    bottom_up = e > 0
    # north edge: the window's first row (north-up) or the outer edge of its last row (bottom-up)
    y0 = transform.f + e * (r0 + h) if bottom_up else transform.f + e * r0
    return float(x0), float(y0), float(abs(a)), float(abs(e)), bottom_up


def _check_affine(transform, where: str) -> None:
    if transform.b != 0 or transform.d != 0:
        raise InputError(f"{where}: rotated or sheared geotransform {tuple(transform)[:6]} is not supported")
    if not (transform.a > 0 and transform.e != 0 and math.isfinite(transform.c) and math.isfinite(transform.f)):
        raise InputError(f"{where}: geotransform {tuple(transform)[:6]}: expected a positive x resolution and a "
                         "non-zero y resolution")


def _unit_bbox_lonlat(unit_epsg, transform, width, height):
    x0, y0, dx, dy, _ = _north_up_geometry(transform, (0, 0, width, height))
    return tf.lonlat_envelope(unit_epsg, x0, y0, dx, dy, width, height)


def _intersects(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


# -- COG sources -----------------------------------------------------------------------------


def _rio_env():
    import rasterio

    # GDAL_NUM_THREADS: GDAL decodes the blocks of one read in parallel (several times faster).
    # GDAL_CACHEMAX (MB): every block is read once, so a large block cache only costs memory
    # (the default, 5% of RAM, took a 1 GiB source to 1.6 GiB of RSS).
    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", CPL_VSIL_CURL_ALLOWED_EXTENSIONS="none",
                        GDAL_NUM_THREADS=os.environ.get("GDAL_NUM_THREADS", "ALL_CPUS"),
                        GDAL_CACHEMAX=int(os.environ.get("GDAL_CACHEMAX", "64")))


def _year_from_path(path: Path) -> int | None:
    # official layout <year>/<zone>/<file>; also accept <year>/<file>
    for part in (path.parent.parent.name, path.parent.name):
        if _YEAR_DIR.fullmatch(part) and _YEAR_RANGE[0] <= int(part) <= _YEAR_RANGE[1]:
            return int(part)
    return None


def _year_from_tags(tags: dict) -> int | None:
    for k, v in tags.items():
        if k.lower() in ("year", "aef_year"):
            try:
                y = int(str(v).strip()[:4])
            except ValueError:
                continue
            if _YEAR_RANGE[0] <= y <= _YEAR_RANGE[1]:
                return y
    return None


def _plan_cog(path: Path, year_hint: int | None, years, bbox, index_crs: str | None,
              skipped: list[str]) -> list[_Unit]:
    import rasterio
    from rasterio.errors import RasterioIOError

    where = str(path)
    try:
        with _rio_env(), rasterio.open(path) as ds:
            count, dtypes, crs, transform = ds.count, ds.dtypes, ds.crs, ds.transform
            width, height = ds.width, ds.height
            tags = ds.tags()
            signed = ds.tags(ns="IMAGE_STRUCTURE").get("PIXELTYPE") == "SIGNEDBYTE"
            descriptions = ds.descriptions
            nodata = ds.nodatavals[0] if ds.nodatavals else None
            block_rows = ds.block_shapes[0][0] if ds.block_shapes else 256
            driver = ds.driver
    except RasterioIOError as exc:
        raise InputError(f"{where}: not a readable GeoTIFF (corrupt or truncated?): {exc}") from None
    if driver != "GTiff":
        raise InputError(f"{where}: a {driver} file, expected an AEF GeoTIFF")
    if count != tf.VEC_DIM:
        raise InputError(f"{where}: {count} bands, expected {tf.VEC_DIM} (A00..A63); not an AEF embedding file")
    if any(d != "int8" for d in dtypes) and not (signed and all(d == "uint8" for d in dtypes)):
        raise InputError(f"{where}: band type {sorted(set(dtypes))}, expected int8 (AEF's quantised embeddings)")
    if any(descriptions) and tuple(d or "" for d in descriptions) != BAND_NAMES:
        raise InputError(f"{where}: bands are named {descriptions[0]!r}..{descriptions[-1]!r}, expected A00..A63 in "
                         "order")
    if nodata is not None and nodata != tf.NODATA:
        raise InputError(f"{where}: no-data value {nodata:g}, expected {tf.NODATA}")
    if crs is None:
        raise InputError(f"{where}: no CRS; AEF files are in WGS 84 / UTM (EPSG:326xx/327xx)")
    epsg = crs.to_epsg()
    if epsg is None or parse_utm_epsg(epsg) is None:
        raise InputError(f"{where}: CRS {epsg and f'EPSG:{epsg}' or crs.to_string()[:60]} is not a WGS 84 / UTM zone "
                         "(EPSG:326xx/327xx)")
    _check_affine(transform, where)
    zone, north = parse_utm_epsg(epsg)
    m = _ZONE_DIR.fullmatch(path.parent.name)
    if m and (int(m.group(1)), m.group(2).upper() == "N") != (zone, north):
        raise InputError(f"{where}: lies in directory {path.parent.name} but its CRS is EPSG:{epsg} (zone {zone}"
                         f"{'N' if north else 'S'}); misplaced file?")
    if index_crs:
        try:
            idx_epsg = int(str(index_crs).upper().replace("EPSG:", ""))
        except ValueError:
            idx_epsg = None
        if idx_epsg is not None and idx_epsg != epsg:
            raise InputError(f"{where}: the index says {index_crs} but the file's CRS is EPSG:{epsg}")

    year = year_hint or _year_from_path(path) or _year_from_tags(tags)
    if year is None:
        if years is not None and len(years) == 1:
            year = next(iter(years))
        else:
            raise InputError(f"{where}: cannot tell its year (no <year>/ directory as in the official "
                             "<year>/<zone>/<file>.tiff layout, no YEAR tag); pass a single year (--year)")
    if years is not None and year not in years:
        skipped.append(f"{where}: year {year} not asked for")
        return []
    window = _window_for(transform, width, height, epsg, bbox)
    if window is None:
        skipped.append(f"{where}: outside bbox")
        return []
    x0, y0, dx, dy, bottom_up = _north_up_geometry(transform, window)
    key = f"cog|{year}|{epsg}|{path.name}|{window}"
    provenance = _provenance(path, None, window, _file_identity(path))
    return [_Unit("cog", path, year, epsg, *window, bottom_up, x0, y0, dx, dy,
                  _slot(year, epsg, path.stem, key), provenance, max(1, int(block_rows)))]


def _gdal_message(exc: BaseException) -> str:
    """rasterio's read errors say "see previous exception": show GDAL's own message."""
    cause = exc.__cause__ or exc.__context__
    return " ".join(str(cause or exc).split())


def _read_cog_rows(ds, unit: _Unit, r0: int, r1: int) -> np.ndarray:
    """File rows ``[r0, r1)`` of the unit's window as int8 ``[rows, width, 64]``, north-up.

    GDAL writes straight into the pixel-interleaved buffer (rasterio honours the strides of
    ``out``), rows reversed for a bottom-up file: no transpose or flip copy afterwards.
    """
    from rasterio.windows import Window

    buf = np.empty((r1 - r0, unit.width, tf.VEC_DIM), dtype=np.int8)
    target = buf[::-1] if unit.bottom_up else buf
    if ds.dtypes[0] == "uint8":  # GDAL < 3.7 shows int8 as uint8 + PIXELTYPE=SIGNEDBYTE
        target = target.view(np.uint8)
    ds.read(window=Window(unit.col_off, r0, unit.width, r1 - r0), out=target.transpose(2, 0, 1))
    return buf


# -- index sources ---------------------------------------------------------------------------


def _col_map(names: Iterable[str]) -> dict[str, str]:
    return {n.strip().lower(): n for n in names}


def _index_rows_csv(path: Path) -> Iterator[dict]:
    csv.field_size_limit(1 << 30)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise InputError(f"{path}: empty index file")
            cols = _col_map(reader.fieldnames)
            _require_index_cols(path, cols)
            for row in reader:
                yield {k: row.get(orig) for k, orig in cols.items()}
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 CSV index ({exc})") from None
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV index ({exc})") from None


def _index_rows_parquet(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading a parquet index needs pyarrow: pip install pyarrow "
                         "(or use the CSV index aef_index.csv)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001  (pyarrow raises several types for a bad file)
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    cols = _col_map(pf.schema_arrow.names)
    _require_index_cols(path, cols)
    wanted = [cols[c] for c in ("path", "year", "crs", "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
              if c in cols]
    try:
        for batch in pf.iter_batches(columns=wanted, batch_size=65536):
            data = {name.strip().lower(): batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
            for i in range(batch.num_rows):
                yield {k: v[i] for k, v in data.items()}
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the parquet index ({exc})") from None


def _require_index_cols(path: Path, cols: dict) -> None:
    missing = [c for c in ("path", "year") if c not in cols]
    if missing:
        raise InputError(f"{path}: index lacks column(s) {', '.join(missing)} (has {', '.join(list(cols)[:20])}); "
                         "expected the AEF aef_index with path, year, wgs84_west..wgs84_north")


def _float_or_none(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _local_for(remote: str, base: Path) -> tuple[list[Path], Path]:
    """Candidate local files for an index ``path`` value (URL or path), and the one to name."""
    parsed = urlparse(remote)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # plain path (or a Windows drive)
        p = Path(parsed.path if parsed.scheme == "file" else remote)
        pure = PurePosixPath(p.as_posix())
        cands = [p if p.is_absolute() else base / p]
    else:
        pure = PurePosixPath(parsed.path)
        cands = []
    parts = pure.parts
    name = parts[-1] if parts else ""
    if len(parts) >= 3:
        cands.append(base.joinpath(*parts[-3:]))
    if name:
        cands.append(base / name)
    out = []
    for c in cands:
        out.append(c)
        if c.suffix.lower() == ".vrt":  # source.coop ships a .vrt beside each .tiff
            out.extend([c.with_suffix(".tiff"), c.with_suffix(".tif")])
    expected = base.joinpath(*parts[-3:]) if len(parts) >= 3 else cands[0]
    return out, expected


def _plan_index(path: Path, years, bbox, root: Path | None, skipped: list[str]) -> list[tuple[Path, int, str | None]]:
    """``(local file, year, crs)`` for the index rows that match ``years`` and ``bbox``."""
    suffix = path.suffix.lower()
    rows = _index_rows_csv(path) if suffix == ".csv" else _index_rows_parquet(path)
    base = Path(root) if root is not None else path.parent
    picked, missing, seen_years, n_rows = [], [], set(), 0
    for row in rows:
        n_rows += 1
        remote = (row.get("path") or "").strip() if isinstance(row.get("path"), str) else row.get("path")
        try:
            year = int(float(row.get("year")))
        except (TypeError, ValueError):
            raise InputError(f"{path}: row {n_rows}: year {row.get('year')!r} is not a year") from None
        if not remote:
            raise InputError(f"{path}: row {n_rows}: empty path")
        seen_years.add(year)
        if years is not None and year not in years:
            continue
        bounds = tuple(_float_or_none(row.get(k)) for k in ("wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north"))
        if bbox is not None and None not in bounds and not _intersects(bounds, bbox):
            continue
        cands, expected = _local_for(str(remote), base)
        local = next((c for c in cands if c.is_file()), None)
        if local is None:
            missing.append((str(remote), expected))
            continue
        picked.append((local, year, row.get("crs")))
    if missing:
        shown = "; ".join(f"{r} (looked for {c})" for r, c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{path}: {len(missing)} file(s) the index selects are not present locally (no downloads are "
                         f"made; place them under {base} as <year>/<zone>/<file>): {shown}{more}")
    if not picked:
        what = []
        if years is not None:
            what.append(f"years {sorted(years)}")
        if bbox is not None:
            what.append(f"bbox {list(bbox)}")
        skipped.append(f"{path}: no row of {n_rows} matches {' and '.join(what) or 'anything'} "
                       f"(index years: {sorted(seen_years)[:12]})")
    return picked


# -- zarr sources ----------------------------------------------------------------------------


_TIME_NAMES = {"time", "year", "years", "t"}
_BAND_NAMES = {"band", "bands", "embedding", "embeddings", "channel", "channels", "feature", "features", "dim", "c"}
_Y_NAMES = {"y", "lat", "latitude", "row", "rows", "northing"}
_X_NAMES = {"x", "lon", "long", "longitude", "col", "cols", "column", "easting"}


@dataclass
class _ZarrInfo:
    path: Path
    array: object
    axes: dict  # role -> axis position ("time" optional)
    float_values: bool
    block_rows: int


def _is_zarr_dir(p: Path) -> bool:
    return p.is_dir() and any((p / m).is_file() for m in ZARR_MARKERS)


def _import_zarr(where: str):
    try:
        import zarr
    except ImportError:
        raise InputError(f"{where}: reading a zarr store needs the zarr package: pip install 'zarr>=3'") from None
    return zarr


def _zarr_dims(arr) -> list[str] | None:
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    if not names:
        names = dict(arr.attrs).get("_ARRAY_DIMENSIONS")
    if not names or any(n is None for n in names):
        return None
    return [str(n) for n in names]


def _zarr_crs(attrs: dict, group, where: str) -> int:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    cands = []
    geo = attrs.get("geo")
    if isinstance(geo, dict) and isinstance(geo.get("proj"), dict):
        cands += [geo["proj"].get(k) for k in ("code", "wkt2", "projjson")]
    cands += [attrs.get(k) for k in ("proj:code", "proj:epsg", "proj:wkt2", "proj:projjson", "crs", "crs_wkt",
                                     "spatial_ref", "epsg")]
    if group is not None and "spatial_ref" in group:
        sr = dict(group["spatial_ref"].attrs)
        cands += [sr.get("crs_wkt"), sr.get("spatial_ref")]
    for c in cands:
        if c is None or c == "":
            continue
        try:
            if isinstance(c, (int, np.integer)):
                crs = CRS.from_epsg(int(c))
            elif isinstance(c, dict):
                crs = CRS.from_user_input(json.dumps(c))
            else:
                crs = CRS.from_user_input(str(c))
        except (CRSError, ValueError, TypeError):
            raise InputError(f"{where}: CRS attribute {str(c)[:60]!r} is not a CRS") from None
        epsg = crs.to_epsg()
        if epsg is None or (epsg != tf.EPSG_LONLAT and parse_utm_epsg(epsg) is None):
            raise InputError(f"{where}: CRS {crs.to_string()[:60]} is neither EPSG:4326 nor a WGS 84 / UTM zone")
        return epsg
    raise InputError(f"{where}: no CRS attribute (proj:code, proj:epsg, crs or a spatial_ref variable)")


def _coords_transform(group, dims, axes, shape):
    """The affine of regular 1-D x/y coordinate arrays (pixel centres), else None."""
    if group is None or dims is None:
        return None
    xn, yn = dims[axes["x"]], dims[axes["y"]]
    try:
        if xn not in group or yn not in group:
            return None
        xs = np.asarray(group[xn][:], dtype=np.float64)
        ys = np.asarray(group[yn][:], dtype=np.float64)
    except Exception:  # noqa: BLE001  (not arrays, unreadable: treat as absent)
        return None
    if xs.ndim != 1 or ys.ndim != 1 or len(xs) != shape[axes["x"]] or len(ys) != shape[axes["y"]]:
        return None
    if len(xs) < 2 or len(ys) < 2:
        return None
    from rasterio.transform import Affine

    dx, dy = (xs[-1] - xs[0]) / (len(xs) - 1), (ys[-1] - ys[0]) / (len(ys) - 1)
    if dx == 0 or dy == 0:
        return None
    # float32 coordinates carry ~1e-7 relative error: accept 10% of a pixel of jitter
    if not (np.allclose(np.diff(xs), dx, rtol=0, atol=0.1 * abs(dx))
            and np.allclose(np.diff(ys), dy, rtol=0, atol=0.1 * abs(dy))):
        return None
    return Affine(dx, 0, xs[0] - dx / 2, 0, dy, ys[0] - dy / 2)


def _zarr_transform(attrs: dict, group, dims, shape, axes, where: str, warnings: list[str]):
    """The array's affine: ``spatial:transform`` (checked against x/y coordinates when both
    exist), a CF ``spatial_ref`` GeoTransform, or the coordinate arrays."""
    from rasterio.transform import Affine

    coords = _coords_transform(group, dims, axes, shape)
    t = attrs.get("spatial:transform")
    geo = attrs.get("geo")
    if t is None and isinstance(geo, dict) and isinstance(geo.get("proj"), dict):
        t = geo["proj"].get("transform")
    tr = None
    if t is not None:
        try:
            vals = [float(v) for v in t]
        except (TypeError, ValueError):
            raise InputError(f"{where}: spatial:transform {t!r} is not six numbers") from None
        if len(vals) == 9:
            vals = vals[:6]
        if len(vals) != 6:
            raise InputError(f"{where}: spatial:transform has {len(vals)} numbers, expected 6 ([a, b, c, d, e, f])")
        tr = Affine(*vals)
        if str(attrs.get("spatial:registration", "pixel")).lower() == "node":
            tr = tr * Affine.translation(-0.5, -0.5)
        src = "spatial:transform"
    elif group is not None and "spatial_ref" in group:
        gt = dict(group["spatial_ref"].attrs).get("GeoTransform")
        if gt:
            try:
                tr = Affine.from_gdal(*[float(v) for v in str(gt).split()])
            except (TypeError, ValueError):
                raise InputError(f"{where}: spatial_ref GeoTransform {gt!r} is not six numbers") from None
            src = "spatial_ref GeoTransform"
    if tr is not None and coords is not None:
        off_x = (coords.c - tr.c) / coords.a
        off_y = (coords.f - tr.f) / coords.e
        if abs(off_x) > 0.5 or abs(off_y) > 0.5 or abs(coords.a / tr.a - 1) > 1e-3 or abs(coords.e / tr.e - 1) > 1e-3:
            # e.g. the whole mosaic's attributes copied onto a regional subset: the coordinate
            # arrays are sliced with the data, so they are the ones that fit it
            warnings.append(f"{where}: {src} {list(tr)[:6]} does not fit the x/y coordinate arrays "
                            f"(off by {off_x:.1f}, {off_y:.1f} px); placed by the coordinates")
            return coords
        return tr
    if tr is not None:
        shape_attr = attrs.get("spatial:shape")
        if shape_attr is not None and [int(v) for v in shape_attr] != [shape[axes["y"]], shape[axes["x"]]]:
            raise InputError(f"{where}: {src} belongs to a {list(shape_attr)} grid but the array is "
                             f"{[shape[axes['y']], shape[axes['x']]]} (attributes copied from a larger mosaic?); "
                             "no x/y coordinate arrays to place it by")
        return tr
    if coords is not None:
        return coords
    raise InputError(f"{where}: no georeferencing (a spatial:transform attribute, a spatial_ref GeoTransform or "
                     "regular x/y coordinate arrays)")


def _cf_years(values: np.ndarray, attrs: dict, where: str) -> list[int]:
    if np.issubdtype(values.dtype, np.datetime64):
        return [int(str(v)[:4]) for v in values.astype("datetime64[D]")]
    if values.dtype.kind in "US":
        try:
            return [int(str(v).strip()[:4]) for v in values]
        except ValueError:
            raise InputError(f"{where}: time values {values[:3].tolist()} are not dates") from None
    if values.dtype.kind not in "iuf":
        raise InputError(f"{where}: time coordinate of type {values.dtype} is not understood")
    units = str(attrs.get("units", "")).strip()
    m = re.fullmatch(r"(days|hours|minutes|seconds|milliseconds)\s+since\s+(\d{4}-\d{1,2}-\d{1,2})(.*)", units)
    if m:
        scale = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1, "milliseconds": 1e-3}[m.group(1)]
        y, mo, d = (int(v) for v in m.group(2).split("-"))
        epoch = np.datetime64(f"{y:04d}-{mo:02d}-{d:02d}", "s")
        secs = np.rint(values.astype(np.float64) * scale).astype(np.int64)
        return [int(str(epoch + np.timedelta64(int(s), "s"))[:4]) for s in secs]
    if units and "year" not in units.lower():
        raise InputError(f"{where}: time units {units!r} not understood")
    if np.all(np.mod(values, 1) == 0) and np.all((values >= _YEAR_RANGE[0]) & (values <= _YEAR_RANGE[1])):
        return [int(v) for v in values]
    raise InputError(f"{where}: time values {values[:3].tolist()} are neither years nor CF '<unit> since <date>'")


def _plan_zarr(path: Path, years, bbox, skipped: list[str], warnings: list[str]) -> list[_Unit]:
    where = str(path)
    zarr = _import_zarr(where)
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:  # noqa: BLE001  (zarr raises many types for unreadable metadata)
        raise InputError(f"{where}: not a readable zarr store ({type(exc).__name__}: {exc})") from None
    group = None
    if isinstance(node, zarr.Group):
        group = node
        try:
            members = list(node.keys())
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{where}: cannot list the zarr group ({exc})") from None
        if "embeddings" not in members:
            raise InputError(f"{where}: no 'embeddings' array in the zarr group "
                             f"(has {', '.join(members) or 'nothing'})")
        try:
            arr = node["embeddings"]
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{where}/embeddings: unreadable ({exc})") from None
        if isinstance(arr, zarr.Group):
            raise InputError(f"{where}/embeddings: a group, expected an array")
        where = f"{path}/embeddings"
    else:
        arr = node
        try:
            group = zarr.open_group(store=str(path.parent), mode="r")
        except Exception:  # noqa: BLE001
            group = None
    attrs = {**(dict(group.attrs) if group is not None else {}), **dict(arr.attrs)}
    shape = tuple(int(s) for s in arr.shape)
    dims = _zarr_dims(arr)
    if len(shape) not in (3, 4):
        raise InputError(f"{where}: {len(shape)} dimensions {list(shape)}, expected [time, band, y, x] or [band, y, x]")
    axes = {}
    if dims is not None:
        for i, d in enumerate(dims):
            dl = d.lower()
            role = ("time" if dl in _TIME_NAMES else "band" if dl in _BAND_NAMES else "y" if dl in _Y_NAMES
                    else "x" if dl in _X_NAMES else None)
            if role is None or role in axes:
                raise InputError(f"{where}: dimensions {dims} not understood; expected time, band, y, x")
            axes[role] = i
        if set(axes) != ({"time", "band", "y", "x"} if len(shape) == 4 else {"band", "y", "x"}):
            raise InputError(f"{where}: dimensions {dims}; expected time, band, y, x (or band, y, x)")
    else:
        axes = {"time": 0, "band": 1, "y": 2, "x": 3} if len(shape) == 4 else {"band": 0, "y": 1, "x": 2}
    if shape[axes["band"]] != tf.VEC_DIM:
        raise InputError(f"{where}: {shape[axes['band']]} bands, expected {tf.VEC_DIM}")
    dtype = np.dtype(arr.dtype)
    if dtype == np.int8:
        float_values = False
    elif dtype.kind == "f":
        float_values = True
    else:
        raise InputError(f"{where}: dtype {dtype}, expected int8 (quantised AEF) or float (de-quantised)")
    epsg = _zarr_crs(attrs, group, where)
    transform = _zarr_transform(attrs, group, dims, shape, axes, where, warnings)
    _check_affine(transform, where)
    height, width = shape[axes["y"]], shape[axes["x"]]

    # years
    if "time" in axes:
        n_t = shape[axes["time"]]
        tname = dims[axes["time"]] if dims else "time"
        if group is not None and tname in group:
            tarr = group[tname]
            t_years = _cf_years(np.asarray(tarr[:]), dict(tarr.attrs), f"{path}/{tname}")
        elif n_t == 1:
            t_years = [None]
        else:
            raise InputError(f"{where}: {n_t} time steps but no '{tname}' coordinate array saying their years")
        if len(t_years) != n_t:
            raise InputError(f"{where}: {tname} has {len(t_years)} values for {n_t} time steps")
    else:
        t_years = [None]
    fallback = None
    if None in t_years:
        y = attrs.get("year")
        m = re.search(r"(?<!\d)(\d{4})(?!\d)", path.name)
        if y is not None:
            try:
                fallback = int(y)
            except (TypeError, ValueError):
                raise InputError(f"{where}: year attribute {y!r} is not a year") from None
        elif m and _YEAR_RANGE[0] <= int(m.group(1)) <= _YEAR_RANGE[1]:
            fallback = int(m.group(1))
        elif years is not None and len(years) == 1:
            fallback = next(iter(years))
        else:
            raise InputError(f"{where}: cannot tell its year (no time coordinate, year attribute or year in the "
                             "name); pass a single year (--year)")
    t_years = [fallback if y is None else y for y in t_years]

    chunks = getattr(arr, "chunks", None) or shape
    block_rows = int(chunks[axes["y"]]) if chunks else 256
    info = _ZarrInfo(path, arr, axes, float_values, max(1, block_rows))
    window = _window_for(transform, width, height, epsg, bbox)
    if window is None:
        skipped.append(f"{path}: outside bbox")
        return []
    x0, y0, dx, dy, bottom_up = _north_up_geometry(transform, window)
    ident = _dir_identity(path)
    units = []
    for ti, year in enumerate(t_years):
        if years is not None and year not in years:
            skipped.append(f"{path}: year {year} not asked for")
            continue
        key = f"zarr|{year}|{epsg}|{path.name}|t={ti}|{window}"
        provenance = _provenance(path, ti, window, ident)
        units.append(_Unit("zarr", path, year, epsg, *window, bottom_up, x0, y0, dx, dy,
                           _slot(year, epsg, f"{path.stem}-{year}", key), provenance, info.block_rows,
                           t_index=ti if "time" in axes else None, zarr_info=info))
    return units


def requantize(values: np.ndarray) -> np.ndarray:
    """Float AEF values ``[..., 64]`` -> int8, the inverse of ``(q/127.5)^2 * sign(q)``.

    ``q = rint(sign(v) * sqrt(|v|) * 127.5)`` clipped to ``[-127, 127]``; a pixel with any
    non-finite value (NaN: no data) becomes -128 in all 64 bands.
    """
    v = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(v).all(axis=-1)
    v = np.where(np.isfinite(v), v, 0.0)
    q = np.clip(np.rint(np.sign(v) * np.sqrt(np.abs(v)) * 127.5), -127, 127).astype(np.int8)
    q[bad] = tf.NODATA
    return q


def dequantize(q: np.ndarray) -> np.ndarray:
    """int8 AEF values -> ``(q/127.5)^2 * sign(q)`` in double, rounded once to float32 (as
    docs/tilestore.md); no-data pixels are not masked."""
    t = np.asarray(q).astype(np.float64) / 127.5
    return np.where(np.asarray(q) < 0, -(t * t), t * t).astype(np.float32)


def _read_zarr_rows(unit: _Unit, r0: int, r1: int) -> np.ndarray:
    info = unit.zarr_info
    sel = [slice(None)] * len(info.axes)
    if "time" in info.axes:
        sel[info.axes["time"]] = unit.t_index
    sel[info.axes["y"]] = slice(r0, r1)
    sel[info.axes["x"]] = slice(unit.col_off, unit.col_off + unit.width)
    try:
        data = np.asarray(info.array[tuple(sel)])
    except Exception as exc:  # noqa: BLE001  (codec / missing-chunk errors of many kinds)
        raise InputError(f"{info.path}: cannot read rows {r0}..{r1} of 'embeddings' (corrupt store?): "
                         f"{type(exc).__name__}: {exc}") from None
    remaining = [r for r in ("time", "band", "y", "x") if r in info.axes and r != "time"]
    order = sorted(remaining, key=lambda r: info.axes[r])
    data = np.transpose(data, [order.index("y"), order.index("x"), order.index("band")])
    if info.float_values:
        return requantize(data)
    return data.astype(np.int8, copy=False)


# -- tile writing ------------------------------------------------------------------------------


class _TileWriter:
    """Streams row blocks to a temp file beside the target; hashes as it goes.

    The same protocol as ``tile_format.write_tile_file`` (temp name, fsync, atomic rename),
    for tiles too large to hold in memory.
    """

    def __init__(self, store: Path, slot: str):
        self.dir = (store / slot).parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp = self.dir / f".{Path(slot).name}.{secrets.token_hex(4)}.tmp"
        self.f = open(self.tmp, "wb")
        self.h = hashlib.sha256()
        self.valid = False
        self.nbytes = 0

    def write(self, block: np.ndarray) -> None:
        buf = np.ascontiguousarray(block, dtype=np.int8)
        if not self.valid:
            self.valid = bool((buf[..., 0] != tf.NODATA).any())
        mv = memoryview(buf).cast("B")
        self.h.update(mv)
        self.f.write(mv)
        self.nbytes += buf.nbytes

    def finish(self) -> str:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.h.hexdigest()

    def publish(self, store: Path, rel: str) -> None:
        os.replace(self.tmp, store / rel)
        tf._fsync_path(self.dir)

    def discard(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def _row_blocks(r_start: int, r_end: int, step: int, reverse: bool) -> list[tuple[int, int]]:
    """``[r_start, r_end)`` cut at multiples of ``step`` (the source's block rows)."""
    cuts = [r_start] + list(range((r_start // step + 1) * step, r_end, step)) + [r_end]
    blocks = list(zip(cuts[:-1], cuts[1:]))
    return blocks[::-1] if reverse else blocks


def _block_step(unit: _Unit) -> int:
    per_row = unit.width * tf.VEC_DIM
    rows = max(1, BLOCK_BYTES // per_row)
    b = unit.block_rows
    return max(b, rows // b * b)


# -- journal --------------------------------------------------------------------------------


class _Journal:
    def __init__(self, store: Path):
        self.path = store / INGEST_DIR / JOURNAL
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    e = json.loads(line)
                    self.entries[e["provenance"]] = e
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        self.f = None

    def append(self, entry: dict) -> None:
        if self.f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(entry, sort_keys=True) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.entries[entry["provenance"]] = entry

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def clear(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
        self.entries = {}


class _Lock:
    def __init__(self, store: Path):
        self.path = store / INGEST_DIR / "lock"
        self.f = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.f.close()
                raise tf.StoreError(f"tile store {self.path.parent.parent}: another ingest is running "
                                    f"(holds {self.path})") from None
        return self

    def __exit__(self, *exc):
        if fcntl is not None:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_UN)
        self.f.close()


def _clean_stale_temp(store: Path) -> None:
    tiles = store / "tiles"
    if tiles.is_dir():
        for p in tiles.rglob(".*.tmp"):
            p.unlink(missing_ok=True)


# -- discovery --------------------------------------------------------------------------------


def _expand(sources) -> list[tuple[str, Path]]:
    """``(kind, path)`` for every source: "cog", "index" or "zarr"."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[tuple[str, Path]] = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise InputError(f"{p}: no such file or directory")
        if p.is_dir():
            if _is_zarr_dir(p):
                out.append(("zarr", p))
                continue
            found = []
            for dirpath, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                here = Path(dirpath)
                for d in list(dirs):
                    if _is_zarr_dir(here / d):
                        found.append(("zarr", here / d))
                        dirs.remove(d)
                for f in sorted(files):
                    if not f.startswith(".") and f.lower().endswith(COG_SUFFIXES):
                        found.append(("cog", here / f))
            if not found:
                raise InputError(f"{p}: a directory without AEF files (*.tif, *.tiff) or zarr stores")
            out.extend(sorted(found, key=lambda kp: str(kp[1])))
        elif p.name.lower().endswith(COG_SUFFIXES):
            out.append(("cog", p))
        elif p.name.lower().endswith(INDEX_SUFFIXES):
            out.append(("index", p))
        elif p.suffix.lower() == ".vrt":
            raise InputError(f"{p}: a VRT; pass the .tiff beside it (bottom-up files are handled directly)")
        else:
            raise InputError(f"{p}: not an AEF source; expected a .tif/.tiff COG, a directory of them, an index "
                             "(.csv/.parquet) or a zarr store")
    return out


# -- ingest ---------------------------------------------------------------------------------


def ingest(sources, store, bbox=None, years=None, progress: Progress | None = None, root=None) -> IngestReport:
    """Ingest AEF ``sources`` into the tile store at ``store`` (created when missing).

    ``sources``: a path or a list of paths: COG files, directories (walked), index files
    (``.csv``, ``.parquet``) and zarr stores. ``bbox``: ``(lon_min, lat_min, lon_max,
    lat_max)`` in WGS84 degrees, or None for whole sources. ``years``: an int or an iterable
    of ints to keep (None: all); a single year is also the year of files that carry none.
    ``progress``: ``progress(done_bytes, total_bytes, message)``. ``root``: where index paths
    are resolved (default: each index file's directory). See the module docstring for the
    details; every bad input raises ``InputError`` (``StoreError`` for the store) naming the
    file. Returns an ``IngestReport``.
    """
    t_start = time.monotonic()
    store = Path(store)
    bbox = _check_bbox(bbox)
    years = _check_years(years)
    report = IngestReport(store=str(store))
    if store.exists() and not store.is_dir():
        raise tf.StoreError(f"tile store {store}: not a directory")

    # 1. plan: open every source's header (all validation happens before any write)
    skipped: list[str] = []
    units: list[_Unit] = []
    expanded = _expand(sources)
    n_sources = 0
    for kind, path in expanded:
        if kind == "index":
            for local, year, crs in _plan_index(path, years, bbox, Path(root) if root is not None else None, skipped):
                n_sources += 1
                units += _plan_cog(local, year, years, bbox, crs, skipped)
        elif kind == "zarr":
            n_sources += 1
            units += _plan_zarr(path, years, bbox, skipped, report.warnings)
        else:
            n_sources += 1
            units += _plan_cog(path, None, years, bbox, None, skipped)
    report.sources = n_sources
    report.skipped = skipped
    if not units:
        what = []
        if bbox is not None:
            what.append(f"intersects bbox {list(bbox)}")
        if years is not None:
            what.append(f"is for year(s) {sorted(years)}")
        reasons = "; ".join(skipped[:3]) + (f"; ... ({len(skipped)} in all)" if len(skipped) > 3 else "")
        raise InputError(f"no AEF tile to ingest: none of {n_sources} source(s) {' and '.join(what) or 'has data'}"
                         + (f" ({reasons})" if reasons else ""))
    seen = {}
    for u in units:  # the same file given twice (e.g. a directory and an index)
        seen.setdefault(u.provenance, u)
    units = list(seen.values())
    report.bytes_total = sum(u.nbytes for u in units)

    store.mkdir(parents=True, exist_ok=True)
    with _Lock(store):
        _clean_stale_temp(store)
        existing: list[tf.TileRecord] = []
        if (store / tf.CURRENT).exists():
            gen, _records, manifest = tf.read_generation(store)
            # the manifest's entries carry the provenance (index.bin has no room for it)
            existing = [tf.TileRecord.from_json(t, str(gen / "manifest.json")) for t in manifest.get("tiles", [])]
        by_path = {r.path: r for r in existing}
        by_slot: dict[str, tf.TileRecord] = {}
        by_source: dict[tuple, list[tuple[tuple, str, tf.TileRecord]]] = {}  # (src, t) -> [(window, id, rec)]
        for r in existing:
            m = _SLOT.match(r.path)
            if m:
                by_slot[m.group(1)] = r
            prov = _parse_provenance(r.source)
            if prov is not None:
                by_source.setdefault(prov[0], []).append((prov[1], prov[2], r))
        journal = _Journal(store)
        new_records: dict[str, tf.TileRecord | None] = {}  # slot -> record (None: empty window)
        bar = _Progress(progress, report.bytes_total)
        try:
            for u in units:
                label = f"{u.source.name} {u.year}"
                # (a) the committed store already holds this exact window of this exact source
                old = by_slot.get(u.slot)
                if (old is not None and old.source == u.provenance and (store / old.path).is_file()
                        and (store / old.path).stat().st_size == old.file_size):
                    new_records[u.slot] = old
                    report.tiles_reused += 1
                    bar.advance(u.nbytes, f"{label}: unchanged")
                    continue
                # (a') ... or a larger window of it (an earlier ingest with a larger or no bbox)
                src_key, window, ident = _parse_provenance(u.provenance)
                if any(w != window and i == ident and r.year == u.year and r.epsg == u.epsg and _contains(w, window)
                       and (store / r.path).is_file() for w, i, r in by_source.get(src_key, [])):
                    report.tiles_covered += 1
                    bar.advance(u.nbytes, f"{label}: already in a larger tile")
                    continue
                # (b) finished by an interrupted earlier run of this command
                entry = journal.entries.get(u.provenance)
                if entry is not None and _journal_entry_valid(store, entry, u):
                    rec = tf.TileRecord.from_json(entry["record"], str(journal.path)) if entry.get("record") else None
                    new_records[u.slot] = rec
                    if rec is None:
                        report.tiles_empty += 1
                    else:
                        report.tiles_resumed += 1
                    bar.advance(u.nbytes, f"{label}: resumed")
                    continue
                # (c) read the source
                status, rec = _process(store, u, by_path, report, bar)
                new_records[u.slot] = rec
                journal.append({"v": 1, "provenance": u.provenance, "slot": u.slot,
                                "record": rec.to_json() if rec is not None else None, "status": status})
                if status == "empty":
                    report.tiles_empty += 1
                elif status == "reused":
                    report.tiles_reused += 1
                elif status == "replaced":
                    report.tiles_replaced += 1
                else:
                    report.tiles_added += 1
        except BaseException:
            journal.close()
            raise

        # 2. merge with the store's other tiles and commit once: this run's windows replace the
        # same windows, and smaller windows of the same source, ingested before
        run_records = [r for r in new_records.values() if r is not None]
        run_windows = [(p[0], p[1], r) for r in run_records if (p := _parse_provenance(r.source))]

        def superseded(r: tf.TileRecord) -> bool:
            m = _SLOT.match(r.path)
            if m and m.group(1) in new_records:
                return True
            p = _parse_provenance(r.source)
            return p is not None and any(k == p[0] and n.year == r.year and n.epsg == r.epsg and n.path != r.path
                                         and _contains(w, p[1]) for k, w, n in run_windows)

        merged = [r for r in existing if not superseded(r)]
        merged += run_records
        report.tiles = tf.sort_records(run_records)
        report.years = sorted({r.year for r in run_records})
        report.crs = sorted({f"EPSG:{r.epsg}" for r in run_records})
        report.store_tiles = len(merged)

        def key(records):
            return sorted((r.path, r.sha256, r.source) for r in records)

        unchanged = (store / tf.CURRENT).exists() and key(merged) == key(existing)
        if not unchanged:
            info = {"ingest": {"tool": "fusar-edge tiles ingest", "bbox": list(bbox) if bbox else None,
                               "years": sorted(years) if years else None,
                               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
            report.generation = str(tf.commit(store, merged, info))
        else:  # commit collects garbage; without one, drop what an interrupted run left behind
            tf.remove_unreferenced_tiles(store, {r.path for r in existing})
        journal.clear()
    report.seconds = time.monotonic() - t_start
    bar.advance(0, "done")
    return report


class _Progress:
    def __init__(self, callback: Progress | None, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def advance(self, n: int, message: str) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total, message)


def _journal_entry_valid(store: Path, entry: dict, unit: _Unit) -> bool:
    if entry.get("slot") != unit.slot:
        return False
    rec = entry.get("record")
    if rec is None:
        return entry.get("status") == "empty"
    try:
        p = store / rec["path"]
        return (p.is_file() and p.stat().st_size == int(rec["file_size"])
                and sha256_file(p) == rec["sha256"])
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _process(store: Path, u: _Unit, by_path: dict, report: IngestReport,
             bar: _Progress) -> tuple[str, tf.TileRecord | None]:
    """Read one window into a tile file; -> (status, record)."""
    writer = _TileWriter(store, u.slot)
    blocks = _row_blocks(u.row_off, u.row_off + u.height, _block_step(u), reverse=u.bottom_up)
    try:
        if u.kind == "cog":
            import rasterio
            from rasterio.errors import RasterioIOError

            try:
                with _rio_env(), rasterio.open(u.source) as ds:
                    for r0, r1 in blocks:
                        try:
                            data = _read_cog_rows(ds, u, r0, r1)
                        except RasterioIOError as exc:
                            raise InputError(f"{u.source}: cannot read rows {r0}..{r1} (corrupt or truncated file?): "
                                             f"{_gdal_message(exc)}") from None
                        writer.write(data)
                        report.bytes_read += data.nbytes
                        bar.advance(data.nbytes, f"{u.source.name} {u.year} rows {r0}-{r1}")
            except RasterioIOError as exc:
                raise InputError(f"{u.source}: cannot open (corrupt or truncated file?): {exc}") from None
        else:
            for r0, r1 in blocks:
                data = _read_zarr_rows(u, r0, r1)
                writer.write(data[::-1] if u.bottom_up else data)
                report.bytes_read += data.nbytes
                bar.advance(data.nbytes, f"{u.source.name} {u.year} rows {r0}-{r1}")
        sha = writer.finish()
        if not writer.valid:
            writer.discard()
            return "empty", None
        base = u.base_path
        committed = by_path.get(base)
        if committed is not None and committed.sha256 == sha:
            writer.discard()  # the committed (immutable) file already holds these bytes
            return "reused", u.record(base, sha)
        status = "replaced" if _slot_taken(by_path, u.slot) else "added"
        rel = base if committed is None else f"{u.slot}.{sha[:8]}{tf.TILE_SUFFIX}"
        if rel in by_path:  # same content under the alternative name
            writer.discard()
            return "reused", u.record(rel, sha)
        writer.publish(store, rel)
        return status, u.record(rel, sha)
    except BaseException:
        writer.discard()
        raise


def _slot_taken(by_path: dict, slot: str) -> bool:
    return any((m := _SLOT.match(p)) and m.group(1) == slot for p in by_path)

