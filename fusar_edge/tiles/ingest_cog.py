"""Ingest source: official AEF COGs (GeoTIFF files), planned into units and read by row blocks.

**Official AEF COGs** (``.tif`` / ``.tiff``), laid out as published:
``<year>/<utm zone>/<ee id>-<yoff>-<xoff>.tiff``, e.g. ``2023/31N/x...-0000008192-0000000000.tiff``:
64 int8 bands ``A00..A63``, 10 m pixels, WGS 84 / UTM (EPSG:326xx/327xx), no data -128.
The published files are stored *bottom-up* (positive y resolution in the geotransform);
both orientations are read from the geotransform and every stored tile is north-up.
The year comes from the index row (``ingest_index``), else the ``<year>/`` directory, else a
``YEAR`` / ``year`` GeoTIFF tag, else ``years`` when it names exactly one year; a file
whose year is still unknown is an error naming it.

``plan_cog`` checks a file's header and returns its unit (one per file); ``read_cog_rows``
reads a block of its rows, north-up. Index rows (``ingest_index``) resolve to such files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import format as tf
from .ingest_plan import (YEAR_RANGE, Unit, check_affine, file_identity, make_provenance, north_up_geometry,
                          tile_slot, window_for)
from .utm import parse_utm_epsg

COG_SUFFIXES = (".tif", ".tiff")
BAND_NAMES = tuple(f"A{i:02d}" for i in range(tf.VEC_DIM))
_ZONE_DIR = re.compile(r"(\d{1,2})([NS])", re.IGNORECASE)
_YEAR_DIR = re.compile(r"\d{4}")


def rio_env():
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
        if _YEAR_DIR.fullmatch(part) and YEAR_RANGE[0] <= int(part) <= YEAR_RANGE[1]:
            return int(part)
    return None


def _year_from_tags(tags: dict) -> int | None:
    for k, v in tags.items():
        if k.lower() in ("year", "aef_year"):
            try:
                y = int(str(v).strip()[:4])
            except ValueError:
                continue
            if YEAR_RANGE[0] <= y <= YEAR_RANGE[1]:
                return y
    return None


def plan_cog(path: Path, year_hint: int | None, years, bbox, index_crs: str | None,
              skipped: list[str]) -> list[Unit]:
    import rasterio
    from rasterio.errors import RasterioIOError

    where = str(path)
    try:
        with rio_env(), rasterio.open(path) as ds:
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
    check_affine(transform, where)
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
    window = window_for(transform, width, height, epsg, bbox)
    if window is None:
        skipped.append(f"{where}: outside bbox")
        return []
    x0, y0, dx, dy, bottom_up = north_up_geometry(transform, window)
    key = f"cog|{year}|{epsg}|{path.name}|{window}"
    provenance = make_provenance(path, None, window, file_identity(path))
    return [Unit("cog", path, year, epsg, *window, bottom_up, x0, y0, dx, dy,
                  tile_slot(year, epsg, path.stem, key), provenance, max(1, int(block_rows)))]


def gdal_message(exc: BaseException) -> str:
    """rasterio's read errors say "see previous exception": show GDAL's own message."""
    cause = exc.__cause__ or exc.__context__
    return " ".join(str(cause or exc).split())


def read_cog_rows(ds, unit: Unit, r0: int, r1: int) -> np.ndarray:
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
