"""Small synthetic AEF sources in the official layouts, with known values (test helpers).

Everything here is written with rasterio / zarr / pyarrow and read back independently of
``fusar_edge.tiles.ingest``, so tests can compare a tile store with its sources.

Sources
-------
``write_official_cog(root, year, zone, ...) -> AefCog``
    One COG as Google / source.coop publish them: ``root/<year>/<zone><N|S>/<id>-<yoff>-<xoff>.tiff``,
    64 int8 bands named A00..A63, 10 m pixels, WGS 84 / UTM, no data -128, tiled (32 px) and
    deflate-compressed. ``bottom_up=True`` stores it like the published files (positive y
    resolution, row 0 = south); ``False`` is an ordinary north-up GeoTIFF. ``AefCog.values``
    is always the **north-up** int8 ``[H, W, 64]`` array and ``AefCog.transform`` its
    north-up affine (``a = 10, e = -10``); tuple-unpacking gives ``(path, values, transform)``.
``official_scene(root, years=(2022, 2023)) -> list[AefCog]``
    Per year two 64 x 64 px COGs either side of the 31N / 32N zone boundary at 6°E, 45°N,
    overlapping there: zone 31N bottom-up (as published), zone 32N north-up, both with
    no-data holes; other seeds per year.
``write_index_csv(path, cogs, prefix=SOURCE_COOP) / write_index_parquet(path, cogs, prefix)``
    The published ``aef_index`` table for ``cogs``: columns ``WKT`` (CSV) / ``geom`` (WKB,
    GeoParquet), ``fid, path, year, utm_zone, crs, utm_west, utm_south, utm_east, utm_north,
    wgs84_west, wgs84_south, wgs84_east, wgs84_north``; ``path`` is the remote URL
    ``prefix + <year>/<zone>/<file>``. ``extra_rows`` adds rows for files that do not exist.
``write_aef_zarr(path, years, ...) -> AefZarr``
    A zarr store like ``aef-download`` writes (a subset of the AEF GeoZarr mosaic): group
    attributes ``spatial:transform`` / ``proj:code``, an ``embeddings`` array
    ``[time, band, y, x]`` (int8 with fill -128, or de-quantised float32 with NaN for no
    data) and a ``time`` array of integer years. ``AefZarr.values`` is int8 ``[T, H, W, 64]``
    north-up (what the store must hold), ``AefZarr.transform`` the north-up affine.

Expected values
---------------
``expected_vector(src, lon, lat)``: the source's int8 vector at a WGS84 point (None outside
the source or on no data), found with PROJ (``rasterio.warp.transform``) and the file's own
geotransform (``rasterio`` ``index`` + a 1-pixel window read), i.e. without the code under
test. ``dequantize(q)`` is AEF's ``(q/127.5)^2 * sign(q)``.
``store_vector(store, lon, lat, year)``: the int8 vector a lookup in the store must return
(docs/tilestore.md "Lookup", with PROJ for the projection), read from the raw tile files.
``tile_array(store, record)``: a tile file as int8 ``[height, width, 64]``.
"""

from __future__ import annotations

import csv
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE_COOP = "s3://us-west-2.opendata.source.coop/tge-labs/aef/v1/annual/"
GCS = "gs://alphaearth_foundations/satellite_embedding/v1/annual/"
PIXEL = 10.0
NODATA = -128
VEC_DIM = 64
MOSAIC_PIXEL_DEG = 0.00008983111749910169  # the AEF GeoZarr mosaic's pixel (EPSG:4326)


def dequantize(q) -> np.ndarray:
    """AEF's ``(q/127.5)^2 * sign(q)``, in double, rounded once to float32 (docs/tilestore.md)."""
    t = np.asarray(q).astype(np.float64) / 127.5
    return np.where(np.asarray(q) < 0, -(t * t), t * t).astype(np.float32)


def _values(seed: int, height: int, width: int, holes) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.integers(-127, 128, size=(height, width, VEC_DIM), dtype=np.int16).astype(np.int8)
    if holes is True:
        holes = [(3, 9, 5, 13), (height - 2, height - 1, width - 1, width)]
    for r0, r1, c0, c1 in holes or []:
        v[r0:r1, c0:c1, :] = NODATA
    return v


@dataclass
class AefCog:
    path: Path
    year: int
    zone: int
    north: bool
    values: np.ndarray  # int8 [H, W, 64], row 0 north
    transform: object  # north-up Affine of `values`
    bottom_up: bool

    def __iter__(self):  # (path, values, transform)
        return iter((self.path, self.values, self.transform))

    @property
    def epsg(self) -> int:
        return (32600 if self.north else 32700) + self.zone

    @property
    def zone_name(self) -> str:
        return f"{self.zone}{'N' if self.north else 'S'}"

    @property
    def height(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        return self.values.shape[1]

    def utm_bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        return (t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f)

    def wgs84_bounds(self) -> tuple[float, float, float, float]:
        from rasterio.warp import transform_bounds

        return transform_bounds(f"EPSG:{self.epsg}", "EPSG:4326", *self.utm_bounds(), densify_pts=21)

    def url(self, prefix: str = SOURCE_COOP) -> str:
        return f"{prefix}{self.year}/{self.zone_name}/{self.path.name}"


def write_official_cog(root, year: int, zone: int, north: bool = True, x0: float = 500000.0, y0: float = 5000000.0,
                       width: int = 64, height: int = 64, bottom_up: bool = True, seed: int = 0, holes=True,
                       name: str | None = None, compress: str = "deflate", band_names: bool = True,
                       year_dir: bool = True, tags: dict | None = None, values: np.ndarray | None = None) -> AefCog:
    """Write one AEF COG; ``x0, y0``: its north-west corner (easting, northing, metres).

    ``holes``: True for two default no-data rectangles, or a list of ``(r0, r1, c0, c1)``
    north-up row/col ranges, or False. ``year_dir=False`` writes ``root/<name>`` (no year in
    the path). ``values`` overrides the random int8 ``[H, W, 64]`` content.
    """
    import rasterio
    from rasterio.transform import Affine

    vals = _values(seed, height, width, holes) if values is None else np.asarray(values, dtype=np.int8)
    height, width = vals.shape[:2]
    zone_name = f"{zone}{'N' if north else 'S'}"
    if name is None:
        name = f"xsyn{seed:04d}{zone_name.lower()}{year}-{0:010d}-{0:010d}.tiff"
    directory = Path(root) / str(year) / zone_name if year_dir else Path(root)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    north_up = Affine(PIXEL, 0, x0, 0, -PIXEL, y0)
    if bottom_up:
        file_transform = Affine(PIXEL, 0, x0, 0, PIXEL, y0 - height * PIXEL)
        file_values = vals[::-1]
    else:
        file_transform, file_values = north_up, vals
    profile = dict(driver="GTiff", width=width, height=height, count=VEC_DIM, dtype="int8",
                   crs=f"EPSG:{(32600 if north else 32700) + zone}", transform=file_transform, nodata=NODATA,
                   tiled=True, blockxsize=32, blockysize=32, compress=compress, interleave="pixel")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.ascontiguousarray(np.moveaxis(file_values, -1, 0)))
        if band_names:
            for i in range(VEC_DIM):
                ds.set_band_description(i + 1, f"A{i:02d}")
        if tags:
            ds.update_tags(**tags)
    return AefCog(path, year, zone, north, vals, north_up, bottom_up)


def boundary_corners(lon: float = 6.0, lat: float = 45.0) -> dict[int, tuple[float, float]]:
    """North-west corners of 64 px tiles in zones 31N and 32N that overlap at ``lon, lat``."""
    from rasterio.warp import transform

    out = {}
    for zone, west_px in ((31, 40), (32, 24)):  # 31N reaches 24 px east of lon, 32N 40 px west of it
        (e,), (n,) = transform("EPSG:4326", f"EPSG:326{zone}", [lon], [lat])
        out[zone] = (math.floor(e / PIXEL - west_px) * PIXEL, math.floor(n / PIXEL + 32) * PIXEL)
    return out


def official_scene(root, years=(2022, 2023), size: int = 64) -> list[AefCog]:
    corners = boundary_corners()
    cogs = []
    for k, year in enumerate(years):
        for zone, bottom_up in ((31, True), (32, False)):
            x0, y0 = corners[zone]
            seed = 100 * k + zone
            cogs.append(write_official_cog(root, year, zone, True, x0, y0, size, size, bottom_up=bottom_up, seed=seed,
                                           name=f"xsyn{year}z{zone}-{8192 * k:010d}-{0:010d}.tiff"))
    return cogs


# -- index -----------------------------------------------------------------------------------

INDEX_COLUMNS = ["fid", "path", "year", "utm_zone", "crs", "utm_west", "utm_south", "utm_east", "utm_north",
                 "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north"]


def _index_rows(cogs, prefix, extra_rows):
    rows = []
    for i, c in enumerate(cogs):
        w, s, e, n = c.wgs84_bounds()
        uw, us, ue, un = c.utm_bounds()
        rows.append({"fid": i + 1, "path": c.url(prefix), "year": c.year, "utm_zone": c.zone_name,
                     "crs": f"EPSG:{c.epsg}", "utm_west": uw, "utm_south": us, "utm_east": ue, "utm_north": un,
                     "wgs84_west": w, "wgs84_south": s, "wgs84_east": e, "wgs84_north": n})
    for extra in extra_rows:
        row = {"fid": len(rows) + 1, "utm_zone": "1N", "crs": "EPSG:32601", "utm_west": 0.0, "utm_south": 0.0,
               "utm_east": 1.0, "utm_north": 1.0}
        row.update(extra)
        rows.append(row)
    return rows


def _wkt(row) -> str:
    w, s, e, n = (row[k] for k in ("wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north"))
    return f"POLYGON (({w} {s}, {e} {s}, {e} {n}, {w} {n}, {w} {s}))"


def write_index_csv(path, cogs, prefix: str = SOURCE_COOP, extra_rows=(), columns=None) -> Path:
    """``extra_rows``: dicts with at least path, year, wgs84_west..wgs84_north."""
    path = Path(path)
    rows = _index_rows(cogs, prefix, extra_rows)
    cols = ["WKT"] + (columns or INDEX_COLUMNS)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({"WKT": _wkt(r), **r})
    return path


def write_index_parquet(path, cogs, prefix: str = SOURCE_COOP, extra_rows=()) -> Path:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    rows = _index_rows(cogs, prefix, extra_rows)
    cols = {c: [r[c] for r in rows] for c in INDEX_COLUMNS}
    cols["year"] = pa.array(cols["year"], pa.int32())

    def wkb(r):  # little-endian WKB polygon of the WGS84 box
        w, s, e, n = (r[k] for k in ("wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north"))
        pts = [(w, s), (e, s), (e, n), (w, n), (w, s)]
        return struct.pack("<BIII", 1, 3, 1, len(pts)) + b"".join(struct.pack("<dd", *p) for p in pts)

    cols["geom"] = pa.array([wkb(r) for r in rows], pa.binary())
    table = pa.table(cols)
    geo = {"version": "1.0.0", "primary_column": "geom",
           "columns": {"geom": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": None}}}
    table = table.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(table, path)
    return path


# -- zarr ------------------------------------------------------------------------------------


@dataclass
class AefZarr:
    path: Path
    years: list[int]
    values: np.ndarray  # int8 [T, H, W, 64], north-up
    transform: object  # north-up Affine
    epsg: int


def write_aef_zarr(path, years=(2022, 2023), width: int = 48, height: int = 40, x0: float = 5.998,
                   y0: float = 45.002, pixel: float = MOSAIC_PIXEL_DEG, epsg: int = 4326, dtype: str = "int8",
                   bottom_up: bool = False, zarr_format: int = 3, seed: int = 7, holes=True, chunk: int = 16,
                   time_coord: bool = True, crs_attr: str = "proj:code", dims: bool = True, coords: bool = False,
                   mosaic_attrs: bool = False) -> AefZarr:
    """A zarr store in aef-download's layout; ``x0, y0``: north-west corner in ``epsg`` units.

    ``dtype="float32"`` stores de-quantised values (NaN = no data). ``zarr_format=2`` writes
    ``_ARRAY_DIMENSIONS`` instead of v3 ``dimension_names``; ``crs_attr`` names the CRS
    attribute (``proj:code`` -> "EPSG:n", ``proj:epsg`` -> n, ``crs`` -> "EPSG:n").
    ``coords=True`` adds ``x`` / ``y`` pixel-centre coordinate arrays (as xarray writes them);
    ``mosaic_attrs=True`` writes the whole AEF mosaic's ``spatial:transform`` / ``spatial:shape``
    instead of the subset's (attributes copied without being updated).
    """
    import zarr
    from rasterio.transform import Affine

    years = list(years)
    vals = np.stack([_values(seed + i, height, width, holes) for i in range(len(years))])
    north_up = Affine(pixel, 0, x0, 0, -pixel, y0)
    file_vals = vals[:, ::-1] if bottom_up else vals
    file_transform = Affine(pixel, 0, x0, 0, pixel, y0 - height * pixel) if bottom_up else north_up
    data = np.ascontiguousarray(np.moveaxis(file_vals, -1, 1))  # [T, 64, H, W]
    if dtype != "int8":
        f = dequantize(data).astype(dtype)
        f[np.broadcast_to((data == NODATA).all(axis=1, keepdims=True), f.shape)] = np.nan
        data, fill = f, float("nan")
    else:
        fill = NODATA
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    kw = {"dimension_names": ["time", "band", "y", "x"]} if (zarr_format == 3 and dims) else {}
    arr = g.create_array("embeddings", shape=data.shape, chunks=(1, VEC_DIM, chunk, chunk), dtype=data.dtype,
                         fill_value=fill, **kw)
    arr[:] = data
    if zarr_format == 2 and dims:
        arr.attrs["_ARRAY_DIMENSIONS"] = ["time", "band", "y", "x"]
    if time_coord:
        kw_t = {"dimension_names": ["time"]} if zarr_format == 3 else {}
        t = g.create_array("time", shape=(len(years),), dtype="int32", fill_value=0, **kw_t)
        t[:] = np.asarray(years, dtype=np.int32)
        if zarr_format == 2:
            t.attrs["_ARRAY_DIMENSIONS"] = ["time"]
    if coords:
        for name, n, origin, step in (("x", width, file_transform.c, file_transform.a),
                                      ("y", height, file_transform.f, file_transform.e)):
            kw_c = {"dimension_names": [name]} if zarr_format == 3 else {}
            c = g.create_array(name, shape=(n,), dtype="float64", fill_value=0.0, **kw_c)
            c[:] = origin + (np.arange(n) + 0.5) * step
            if zarr_format == 2:
                c.attrs["_ARRAY_DIMENSIONS"] = [name]
    crs_value = {"proj:code": f"EPSG:{epsg}", "proj:epsg": epsg, "crs": f"EPSG:{epsg}"}[crs_attr]
    transform_attr, shape_attr = list(file_transform)[:6], [height, width]
    if mosaic_attrs:  # the global AEF GeoZarr mosaic's grid
        transform_attr = [MOSAIC_PIXEL_DEG, 0.0, -180.0, 0.0, -MOSAIC_PIXEL_DEG, 83.68570533713473]
        shape_attr = [1859584, 4009984]
    g.attrs.update({"spatial:transform": transform_attr, "spatial:dimensions": ["y", "x"],
                    "spatial:shape": shape_attr, "spatial:registration": "pixel", crs_attr: crs_value,
                    "nodata": NODATA})
    return AefZarr(Path(path), years, vals, north_up, epsg)


# -- expected values ---------------------------------------------------------------------------


def expected_vector(src, lon: float, lat: float, year: int | None = None) -> np.ndarray | None:
    """int8 [64] of ``src`` (an AefCog, a GeoTIFF path or an AefZarr) at WGS84 ``lon, lat``."""
    if isinstance(src, AefZarr):
        from rasterio.warp import transform

        (x,), (y,) = transform("EPSG:4326", f"EPSG:{src.epsg}", [lon], [lat])
        t = src.transform
        col, row = math.floor((x - t.c) / t.a), math.floor((y - t.f) / t.e)
        if not (0 <= row < src.values.shape[1] and 0 <= col < src.values.shape[2]):
            return None
        v = src.values[src.years.index(year) if year is not None else 0, row, col]
        return None if v[0] == NODATA else v.copy()
    import rasterio
    from rasterio.warp import transform
    from rasterio.windows import Window

    path = src.path if isinstance(src, AefCog) else Path(src)
    with rasterio.open(path) as ds:
        (x,), (y,) = transform("EPSG:4326", ds.crs, [lon], [lat])
        row, col = ds.index(x, y, op=math.floor)
        if not (0 <= row < ds.height and 0 <= col < ds.width):
            return None
        v = ds.read(window=Window(col, row, 1, 1))[:, 0, 0].astype(np.int8)
    return None if v[0] == NODATA else v


def tile_array(store, record) -> np.ndarray:
    p = Path(store) / record.path
    return np.fromfile(p, dtype=np.int8).reshape(record.height, record.width, VEC_DIM)


def store_vector(store, lon: float, lat: float, year: int) -> np.ndarray | None:
    """The int8 vector docs/tilestore.md's lookup returns at ``lon, lat`` for ``year``."""
    from rasterio.warp import transform

    from fusar_edge.tiles.format import read_generation

    _gen, records, _manifest = read_generation(Path(store))
    cands = [(i, r) for i, r in enumerate(records) if r.year == year and r.lonlat_bounds[0] <= lon <= r.lonlat_bounds[2]
             and r.lonlat_bounds[1] <= lat <= r.lonlat_bounds[3]]

    def dist(r):
        return 0.0 if r.epsg == 4326 else abs(lon - (6.0 * (r.epsg % 100) - 183.0))

    for _i, r in sorted(cands, key=lambda ir: (dist(ir[1]), ir[0])):
        (x,), (y,) = transform("EPSG:4326", f"EPSG:{r.epsg}", [lon], [lat])
        col, row = math.floor((x - r.x0) / r.dx), math.floor((r.y0 - y) / r.dy)
        if 0 <= col < r.width and 0 <= row < r.height:
            v = tile_array(store, r)[row, col]
            if v[0] != NODATA:
                return v.copy()
    return None


def pixel_centre_lonlat(cog: AefCog, row: int, col: int) -> tuple[float, float]:
    """WGS84 lon, lat of the centre of north-up pixel ``(row, col)`` of ``cog``."""
    from rasterio.warp import transform

    t = cog.transform
    (lon,), (lat,) = transform(f"EPSG:{cog.epsg}", "EPSG:4326", [t.c + (col + 0.5) * t.a], [t.f + (row + 0.5) * t.e])
    return lon, lat
