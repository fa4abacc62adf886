"""Anchored AEF lookup from a local tile store (format: docs/tilestore.md).

``TileStore.open(dir).lookup(anchor, grid=(16, 16)) -> AnchorSet``: lay a grid over the
image footprint, pick the AEF year, and read each grid point's 64-d vector from
memory-mapped int8 tiles (nearest pixel, de-quantised on read). This module is the
reference the C reader (``native/tiles``, wrapped by ``tiles.native``) is tested against byte
for byte; both follow the per-point rules of docs/tilestore.md. ``open`` hands lookups to the
C reader when it is available (``backend="auto"``).

Thread safety: everything is read-only after ``open`` (numpy memmaps, immutable arrays),
so one ``TileStore`` may serve lookups from several threads at once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import AnchorError, CoverageError, InputError
from ..geo.anchors import Anchor, AnchorSet
from .format import (EPSG_LONLAT, NODATA, VEC_DIM, StoreError, TileRecord, lookup_points_arrays,
                     read_generation)
from .native import NativeTilesUnavailable, NativeTileStore
from .utm import central_meridian, lonlat_to_utm
from .years import acquisition_year

DEFAULT_GRID = (16, 16)
ALLOW_EMPTY_HINT = "ask --allow-no-coverage; Runtime.open(allow_empty_anchors=True)"  # commands say their own
BACKENDS = ("auto", "native", "numpy")


def dequantise_table() -> np.ndarray:
    """float32 value of every int8 code, indexed by the code's uint8 bit pattern.

    ``(q / 127.5)^2 * sign(q)`` evaluated in double and rounded once to float32, exactly as
    the C reader does (``double t = q / 127.5; (float)(q < 0 ? -t * t : t * t)``).
    """
    q = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float64)
    t = q / 127.5
    return np.where(q < 0, -(t * t), t * t).astype(np.float32)


_DEQUANT = dequantise_table()


@dataclass(frozen=True)
class _Tile:
    record: TileRecord
    pixels_by_index: np.ndarray  # int8 [height * width, 64], memory-mapped (a plain ndarray view)
    meridian: float  # central meridian of its UTM zone (nan for lon/lat tiles)

    def pixels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(rows, cols, inside)`` of projected coordinates; floor of the exact position."""
        r = self.record
        colf = np.floor((x - r.x0) / r.dx)
        rowf = np.floor((r.y0 - y) / r.dy)
        inside = (colf >= 0) & (colf < r.width) & (rowf >= 0) & (rowf < r.height)
        return rowf[inside].astype(np.intp), colf[inside].astype(np.intp), inside


class TileStore:
    """A read-only view of one generation of a tile store."""

    def __init__(self, root: Path, generation: Path, records: list[TileRecord], manifest: dict,
                 native=None):
        self.root = root
        self._native = native  # a NativeTileStore on the same generation, or None
        self.backend = "native" if native is not None else "numpy"
        self.generation = generation
        self.records = records
        self.manifest = manifest
        self._tiles: dict[int, list[_Tile]] = {}
        for rec in records:  # index order is the tie-break order
            path = root / rec.path
            try:
                size = path.stat().st_size
            except OSError:
                raise StoreError(f"{path}: tile file missing (listed in {generation / 'index.bin'}); "
                                 f"run `fusar-edge tiles verify --store {root}`") from None
            if size != rec.file_size:
                raise StoreError(f"{path}: {size} bytes, expected {rec.file_size} "
                                 f"({rec.height}x{rec.width}x{VEC_DIM}); truncated or corrupt")
            # a plain ndarray view: indexing np.memmap itself costs a subclass round trip per call
            data = np.memmap(path, dtype=np.int8, mode="r", shape=(rec.height * rec.width, VEC_DIM))
            data = data.view(np.ndarray)
            zone = rec.utm
            meridian = central_meridian(zone[0]) if zone else float("nan")
            self._tiles.setdefault(rec.year, []).append(_Tile(rec, data, meridian))

    @classmethod
    def open(cls, root: str | Path, backend: str = "auto") -> "TileStore":
        """Open the store's current generation.

        ``backend``: ``"native"`` looks up through libfusar_tiles (C, the fast path; built by
        ``pip install`` when a C compiler is present), ``"numpy"`` through the numpy reference
        in this module, ``"auto"`` (default) the native one when the library is available.
        Both return the same bytes (tests/test_native_tiles.py).
        """
        if backend not in BACKENDS:
            raise InputError(f"tile store backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        root = Path(root)
        generation, records, manifest = read_generation(root)
        if not records:
            raise StoreError(f"tile store {root}: holds no tiles")
        native = None
        if backend != "numpy":
            try:
                native = NativeTileStore(root)
            except NativeTilesUnavailable:
                if backend == "native":
                    raise
            if native is not None and native.generation != generation.name:
                # the store was rewritten between the two opens: retry once on the new generation
                native.close()
                return cls.open(root, backend)
        return cls(root, generation, records, manifest, native)

    # -- what is in it ------------------------------------------------------------------------

    @property
    def years(self) -> list[int]:
        return sorted(self._tiles)

    def describe(self) -> dict:
        per_year = {}
        for year, tiles in sorted(self._tiles.items()):
            b = np.array([t.record.lonlat_bounds for t in tiles])
            per_year[str(year)] = {
                "tiles": len(tiles),
                "crs": sorted({f"EPSG:{t.record.epsg}" for t in tiles}),
                "lonlat_extent": [float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()),
                                  float(b[:, 3].max())],
                "pixels": int(sum(t.record.width * t.record.height for t in tiles)),
            }
        return {"store": str(self.root), "generation": self.generation.name, "years": self.years,
                "tiles": len(self.records), "bytes": int(sum(r.file_size for r in self.records)),
                "per_year": per_year}

    def pick_year(self, date: dt.date | str | int | None) -> tuple[int, str | None]:
        """``(year, note)``: the acquisition year if stored, else the nearest (ties: earlier)."""
        year = acquisition_year(date)
        if year in self._tiles:
            return year, None
        best = min(self.years, key=lambda y: (abs(y - year), y))
        return best, f"no AEF tiles for {year} in {self.root}; used the nearest year, {best}"

    # -- lookup -------------------------------------------------------------------------------

    def lookup_points(self, lon, lat, year: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features float32 [S, 64], mask bool [S])`` at WGS84 points, per docs/tilestore.md."""
        if self._native is not None:
            if year not in self._tiles:
                raise AnchorError(f"tile store {self.root}: no tiles for year {year} (has {self.years})")
            return self._native.lookup_points(lon, lat, year)
        return self.lookup_points_numpy(lon, lat, year)

    def lookup_points_numpy(self, lon, lat, year: int) -> tuple[np.ndarray, np.ndarray]:
        """The numpy reference of ``lookup_points`` (what the C reader is tested against)."""
        lon, lat = lookup_points_arrays(lon, lat)
        n = lon.size
        features = np.zeros((n, VEC_DIM), np.float32)
        mask = np.zeros(n, bool)
        tiles = self._tiles.get(year)
        if tiles is None:
            raise AnchorError(f"tile store {self.root}: no tiles for year {year} (has {self.years})")
        if n == 0:
            return features, mask
        finite = np.isfinite(lon) & np.isfinite(lat)  # points are independent: a NaN one finds nothing
        if not finite.all():
            if not finite.any():
                return features, mask
            lon, lat = np.where(finite, lon, np.nan), np.where(finite, lat, np.nan)
        lo0, lo1, la0, la1 = np.nanmin(lon), np.nanmax(lon), np.nanmin(lat), np.nanmax(lat)
        tiles = [t for t in tiles if t.record.lonlat_bounds[0] <= lo1 and t.record.lonlat_bounds[2] >= lo0
                 and t.record.lonlat_bounds[1] <= la1 and t.record.lonlat_bounds[3] >= la0]
        if not tiles:
            return features, mask
        bounds = np.array([t.record.lonlat_bounds for t in tiles])
        candidate = ((lon[:, None] >= bounds[:, 0]) & (lon[:, None] <= bounds[:, 2])
                     & (lat[:, None] >= bounds[:, 1]) & (lat[:, None] <= bounds[:, 3]))
        if len(tiles) == 1:  # the common case (a chip inside one tile): no ordering needed
            self._read(tiles[0], np.nonzero(candidate[:, 0])[0], lon, lat, {}, features, mask)
            return features, mask
        # the point's own UTM zone first, ties in index order (a stable sort keeps it)
        distance = np.array([np.abs(lon - t.meridian) if t.record.epsg != EPSG_LONLAT else np.zeros(n)
                             for t in tiles]).T
        order = np.argsort(np.where(candidate, distance, np.inf), axis=1, kind="stable")
        projected: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending = np.ones(n, bool)
        every = np.arange(n)
        for rank in range(len(tiles)):
            choice = order[:, rank]
            active = pending & candidate[every, choice]
            if not active.any():
                break
            for ti in np.unique(choice[active]):
                points = np.nonzero(active & (choice == ti))[0]
                found = self._read(tiles[ti], points, lon, lat, projected, features, mask)
                pending[found] = False
        return features, mask

    @classmethod
    def _read(cls, tile: _Tile, points, lon, lat, projected, features, mask) -> np.ndarray:
        """Fill ``features``/``mask`` at ``points`` that have data in ``tile``; -> those points."""
        x, y = cls._project(tile.record, lon, lat, projected)
        rows, cols, inside = tile.pixels(x[points], y[points])
        points = points[inside]
        q = tile.pixels_by_index[rows * tile.record.width + cols]  # k 64-byte reads from the mapping
        has_data = q[:, 0] != NODATA
        points = points[has_data]
        features[points] = np.take(_DEQUANT, q[has_data].view(np.uint8))
        mask[points] = True
        return points

    @staticmethod
    def _project(rec: TileRecord, lon, lat, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        if rec.epsg not in cache:
            cache[rec.epsg] = (lon, lat) if rec.epsg == EPSG_LONLAT else lonlat_to_utm(lon, lat, *rec.utm)
        return cache[rec.epsg]

    def lookup(self, anchor: Anchor, grid: tuple[int, int] = DEFAULT_GRID, allow_empty: bool = False) -> AnchorSet:
        """The anchor set of one image footprint (see docs/tilestore.md, "Grids" and "Year").

        A footprint with no AEF data at all is an ``AnchorError`` unless ``allow_empty``
        (then every mask entry is False).
        """
        if not isinstance(anchor, Anchor):
            raise InputError(f"anchor: expected an Anchor (e.g. Anchor(bbox=(lon_min, lat_min, lon_max, lat_max), "
                             f"date='YYYY-MM-DD')), got {type(anchor).__name__}")
        rows, cols = check_grid(grid)
        year, note = self.pick_year(anchor.date)
        if self._native is not None and not _has_image_grid(anchor) and not anchor.crosses_antimeridian:
            features, _, mask = self._native.lookup_bbox(anchor.bbox, year, (rows, cols))  # grid laid in C
        else:
            lon, lat = grid_lonlat(anchor, rows, cols)
            features, mask = self.lookup_points(lon, lat, year)
        if not mask.any() and not allow_empty:
            extent = self.describe()["per_year"][str(year)]["lonlat_extent"]
            raise CoverageError(f"anchor bbox {_fmt_box(anchor.bbox)}: no AEF data for {year} in tile store "
                              f"{self.root} (its {year} tiles cover {_fmt_box(extent)}); ingest tiles for "
                              f"this area, or allow an empty anchor set ({ALLOW_EMPTY_HINT})")
        used = sorted({f"EPSG:{t.record.epsg}" for t in self._tiles[year]
                       if any(_box_overlaps(t.record.lonlat_bounds, box) for box in anchor.lonlat_boxes())})
        # positions are valid by construction: skip AnchorSet's input checks (a third of the time)
        return AnchorSet.trusted(features, grid_positions(rows, cols).copy(), mask, year, f"tiles:{self.root}",
                                 "+".join(used) or None, anchor.bbox, [note] if note else [])


@lru_cache(maxsize=16)
def _grid_fractions(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i + 0.5) / rows`` and ``(j + 0.5) / cols`` in float64 (read-only, cached)."""
    fy = (np.arange(rows, dtype=np.float64) + 0.5) / rows
    fx = (np.arange(cols, dtype=np.float64) + 0.5) / cols
    fy.flags.writeable = fx.flags.writeable = False
    return fy, fx


@lru_cache(maxsize=16)
def grid_positions(rows: int, cols: int) -> np.ndarray:
    """float32 ``[rows * cols, 2]`` normalised (y, x) of the cell centres, row-major (read-only)."""
    fy, fx = _grid_fractions(rows, cols)
    pos = np.stack([np.repeat(fy, cols), np.tile(fx, rows)], axis=1).astype(np.float32)
    pos.flags.writeable = False
    return pos


def grid_lonlat(anchor: Anchor, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 lon/lat of the ``rows x cols`` grid's cell centres, row-major (docs/tilestore.md)."""
    fy, fx = _grid_fractions(rows, cols)
    if _has_image_grid(anchor):
        from rasterio.warp import transform as warp

        height, width = anchor.size
        r = np.repeat(height * fy, cols)
        c = np.tile(width * fx, rows)
        a, b, xoff, d, e, yoff = anchor.transform[:6]
        x = a * c + b * r + xoff
        y = d * c + e * r + yoff
        lon, lat = warp(anchor.crs, "EPSG:4326", x, y)
        return np.asarray(lon, np.float64), np.asarray(lat, np.float64)
    lon_min, lat_min, lon_max, lat_max = anchor.bbox
    span = (lon_max - lon_min) % 360.0 if anchor.crosses_antimeridian else lon_max - lon_min
    lon = lon_min + span * fx
    if anchor.crosses_antimeridian:  # east over lon 180: back into [-180, 180)
        lon = (lon + 180.0) % 360.0 - 180.0
    lat = lat_max - (lat_max - lat_min) * fy
    return np.tile(lon, rows), np.repeat(lat, cols)


def _has_image_grid(anchor: Anchor) -> bool:
    """A georeferenced image: its grid is laid in image space, not over the lon/lat box."""
    return bool(anchor.crs and anchor.transform and anchor.size)


def check_grid(grid) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise InputError(f"grid: expected (rows, cols), got {grid!r}") from None
    if not (1 <= rows <= 1024 and 1 <= cols <= 1024):
        raise InputError(f"grid: rows and cols must be in 1..1024, got {rows} x {cols}")
    return rows, cols


def _box_overlaps(a, b) -> bool:
    return a[0] <= b[2] and a[2] >= b[0] and a[1] <= b[3] and a[3] >= b[1]


def _fmt_box(b) -> str:
    return "[" + ", ".join(f"{v:.5f}" for v in b) + "]"
