"""Planning an ingest: the unit of work and the window geometry the raster sources share.

A ``Unit`` is one window of one source year and becomes (at most) one tile. The source
modules (``ingest_cog``, ``ingest_zarr``) build units with the helpers here: the pixel window
that covers ``bbox`` (``window_for``), its north-up placement (``north_up_geometry``), the
tile's slot name and the provenance string that make re-ingests idempotent (``tile_slot``,
``make_provenance``; ``ingest`` and ``ingest_commit`` read them back with
``parse_provenance``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from . import format as tf

if TYPE_CHECKING:  # only an annotation: ingest_zarr imports this module
    from .ingest_zarr import ZarrInfo

MARGIN_PX = 2
YEAR_RANGE = (2017, 2100)  # AEF's annual layers start in 2017
# a tile path ingest wrote: its slot (group 1), then an optional ".<sha 8>" content suffix
SLOT = re.compile(r"^(tiles/\d+/\d+/.+-[0-9a-f]{8})(?:\.[0-9a-f]{8})?\.aef$")


@dataclass
class Unit:
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
    zarr_info: ZarrInfo | None = None

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


def _stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return stem[:80] or "source"


def tile_slot(year: int, epsg: int, stem: str, key: str) -> str:
    h = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"tiles/{year}/{epsg}/{_stem(stem)}-{h}"


def make_provenance(path: Path, t_index: int | None, window, ident: str) -> str:
    """The ``source`` string of a tile record: which bytes of which source it holds (JSON)."""
    return json.dumps({"src": str(path.resolve()), "t": t_index, "window": [int(v) for v in window], "id": ident},
                      sort_keys=True)


def parse_provenance(s: str) -> tuple[tuple[str, int | None], tuple[int, int, int, int], str] | None:
    """``((src, t), window, identity)`` of a record written by this module, else None."""
    try:
        d = json.loads(s)
        return (str(d["src"]), d["t"]), tuple(int(v) for v in d["window"]), str(d["id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def contains(outer, inner) -> bool:
    oc, orow, ow, oh = outer
    ic, irow, iw, ih = inner
    return oc <= ic and orow <= irow and ic + iw <= oc + ow and irow + ih <= orow + oh


def file_identity(path: Path) -> str:
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def dir_identity(path: Path) -> str:
    total, latest, count = 0, 0, 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            total += st.st_size
            latest = max(latest, st.st_mtime_ns)
            count += 1
    return f"files={count} size={total} mtime_ns={latest}"


def window_for(transform, width: int, height: int, src_epsg: int, bbox) -> tuple[int, int, int, int] | None:
    """Pixel window ``(col_off, row_off, w, h)`` in source pixel space covering ``bbox``; None when
    the source lies outside it (a cheap lon/lat envelope test first, then the projected bounds)."""
    if bbox is None:
        return 0, 0, width, height
    if not intersects(_unit_bbox_lonlat(src_epsg, transform, width, height), bbox):
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


def north_up_geometry(transform, window) -> tuple[float, float, float, float, bool]:
    """``(x0, y0, dx, dy, bottom_up)`` of a window: its north-west corner and pixel size."""
    c0, r0, w, h = window
    a, e = transform.a, transform.e
    x0 = transform.c + a * c0
    bottom_up = e > 0
    # north edge: the window's first row (north-up) or the outer edge of its last row (bottom-up)
    y0 = transform.f + e * (r0 + h) if bottom_up else transform.f + e * r0
    return float(x0), float(y0), float(abs(a)), float(abs(e)), bottom_up


def check_affine(transform, where: str) -> None:
    if transform.b != 0 or transform.d != 0:
        raise InputError(f"{where}: rotated or sheared geotransform {tuple(transform)[:6]} is not supported")
    if not (transform.a > 0 and transform.e != 0 and math.isfinite(transform.c) and math.isfinite(transform.f)):
        raise InputError(f"{where}: geotransform {tuple(transform)[:6]}: expected a positive x resolution and a "
                         "non-zero y resolution")


def _unit_bbox_lonlat(unit_epsg, transform, width, height):
    x0, y0, dx, dy, _ = north_up_geometry(transform, (0, 0, width, height))
    return tf.lonlat_envelope(unit_epsg, x0, y0, dx, dy, width, height)


def intersects(a, b) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
