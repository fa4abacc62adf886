"""Ingest source: AEF zarr stores (``aef-download``'s regional GeoZarr subsets), planned and read.

**Zarr stores** like those ``aef-download`` writes (regional subsets of the AEF GeoZarr
mosaic): an ``embeddings`` array with dimensions ``[time, band, y, x]`` (names from zarr
v3 ``dimension_names`` or v2 ``_ARRAY_DIMENSIONS``; ``[band, y, x]`` for a single year),
64 bands, an affine ``spatial:transform`` ``[a, b, c, d, e, f]`` (GeoZarr "spatial"
convention; ``spatial:registration: node`` is shifted by half a pixel; fallbacks: a CF
``spatial_ref`` variable's ``GeoTransform``, or regular ``x``/``y`` coordinate arrays), a
CRS (``proj:code`` / ``proj:epsg`` / ``proj:wkt2`` / ``crs`` / ``spatial_ref`` attributes;
EPSG:4326 like the mosaic, or a UTM zone), and years from the ``time`` coordinate array
(integer years, CF ``<unit> since <date>`` numbers, datetime64 or date strings), else from a
``year`` attribute or a year in the store's directory name.

``plan_zarr`` returns one unit per stored year; ``read_zarr_rows`` reads a block of rows as
int8, re-quantising float values (``requantize``; the rule is in ``tiles.ingest``, "Values").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import format as tf
from .ingest_plan import (YEAR_RANGE, Unit, check_affine, dir_identity, make_provenance, north_up_geometry,
                          tile_slot, window_for)
from .utm import parse_utm_epsg

ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")

_TIME_NAMES = {"time", "year", "years", "t"}
_BAND_NAMES = {"band", "bands", "embedding", "embeddings", "channel", "channels", "feature", "features", "dim", "c"}
_Y_NAMES = {"y", "lat", "latitude", "row", "rows", "northing"}
_X_NAMES = {"x", "lon", "long", "longitude", "col", "cols", "column", "easting"}


@dataclass
class ZarrInfo:
    path: Path
    array: object
    axes: dict  # role -> axis position ("time" optional)
    float_values: bool
    block_rows: int


def is_zarr_dir(p: Path) -> bool:
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
    if np.all(np.mod(values, 1) == 0) and np.all((values >= YEAR_RANGE[0]) & (values <= YEAR_RANGE[1])):
        return [int(v) for v in values]
    raise InputError(f"{where}: time values {values[:3].tolist()} are neither years nor CF '<unit> since <date>'")


def plan_zarr(path: Path, years, bbox, skipped: list[str], warnings: list[str]) -> list[Unit]:
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
    check_affine(transform, where)
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
        elif m and YEAR_RANGE[0] <= int(m.group(1)) <= YEAR_RANGE[1]:
            fallback = int(m.group(1))
        elif years is not None and len(years) == 1:
            fallback = next(iter(years))
        else:
            raise InputError(f"{where}: cannot tell its year (no time coordinate, year attribute or year in the "
                             "name); pass a single year (--year)")
    t_years = [fallback if y is None else y for y in t_years]

    chunks = getattr(arr, "chunks", None) or shape
    block_rows = int(chunks[axes["y"]]) if chunks else 256
    info = ZarrInfo(path, arr, axes, float_values, max(1, block_rows))
    window = window_for(transform, width, height, epsg, bbox)
    if window is None:
        skipped.append(f"{path}: outside bbox")
        return []
    x0, y0, dx, dy, bottom_up = north_up_geometry(transform, window)
    ident = dir_identity(path)
    units = []
    for ti, year in enumerate(t_years):
        if years is not None and year not in years:
            skipped.append(f"{path}: year {year} not asked for")
            continue
        key = f"zarr|{year}|{epsg}|{path.name}|t={ti}|{window}"
        provenance = make_provenance(path, ti, window, ident)
        units.append(Unit("zarr", path, year, epsg, *window, bottom_up, x0, y0, dx, dy,
                           tile_slot(year, epsg, f"{path.stem}-{year}", key), provenance, info.block_rows,
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


def read_zarr_rows(unit: Unit, r0: int, r1: int) -> np.ndarray:
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
