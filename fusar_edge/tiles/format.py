"""On-disk layout of the AEF tile store (docs/tilestore.md is the normative description).

::

    STORE/
      CURRENT                          "gen-000003\\n": the commit point, replaced atomically
      gen-000003/index.bin             fixed-size binary tile table (Python and C read it)
      gen-000003/manifest.json         the same table for people and tools, with provenance
      tiles/<year>/<epsg>/<name>.aef   int8 [height][width][64], pixel-interleaved, north-up
      .ingest/                         ingest's resumable work area (readers ignore it)

A generation directory and the tile files it names are immutable once written. Writing a
store means: write new tile files (invisible until referenced), write a new generation,
then atomically replace ``CURRENT``. A crash before that last step leaves the store as it
was; after it, complete. This module owns that protocol and the binary format; ingest
(``tiles.ingest``), lookup (``tiles.store``) and ``tiles.verify`` build on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fsutil import atomic_writer, write_text_atomic
from .utm import parse_utm_epsg

VEC_DIM = 64
NODATA = -128
MAGIC = b"FUSARAEF"
VERSION = 1
HEADER_SIZE = 64
RECORD_SIZE = 256
PATH_BYTES = 136  # NUL-terminated, so at most 135 bytes of relative path
EPSG_LONLAT = 4326
CURRENT = "CURRENT"
TILE_SUFFIX = ".aef"
_GEN = re.compile(r"gen-(\d{6})")

# index.bin header: magic, version, n_tiles, record_size, vec_dim, nodata; zero padded to 64
_HEADER = struct.Struct("<8sIIIIi")
# one record: year, epsg, width, height, x0, y0, dx, dy, lon_min, lat_min, lon_max, lat_max,
# file_size, sha256, path
_RECORD = struct.Struct(f"<iiii8dQ32s{PATH_BYTES}s")
assert _RECORD.size == RECORD_SIZE, _RECORD.size


class StoreError(InputError):
    """A tile store that cannot be read or written as asked (names the file and the problem)."""


@dataclass(frozen=True)
class TileRecord:
    """One tile: an int8 ``[height, width, 64]`` block in a UTM zone (or EPSG:4326) CRS.

    ``x0, y0`` is the outer corner of pixel (row 0, col 0), which is the north-west corner:
    column ``c`` spans x in ``[x0 + c*dx, x0 + (c+1)*dx)``, row ``r`` spans y in
    ``(y0 - (r+1)*dy, y0 - r*dy]``, ``dx, dy > 0``. ``lonlat_bounds`` is a conservative
    WGS84 envelope of the tile, used only to skip tiles quickly.
    """

    year: int
    epsg: int
    width: int
    height: int
    x0: float
    y0: float
    dx: float
    dy: float
    lonlat_bounds: tuple[float, float, float, float]
    path: str  # relative to the store root, '/'-separated
    sha256: str
    source: str = ""  # provenance (manifest only)

    @property
    def file_size(self) -> int:
        return self.width * self.height * VEC_DIM

    @property
    def utm(self) -> tuple[int, bool] | None:
        return parse_utm_epsg(self.epsg)

    def validate(self, where: str) -> None:
        if self.epsg != EPSG_LONLAT and self.utm is None:
            raise StoreError(f"{where}: tile {self.path}: EPSG:{self.epsg} is not a UTM zone (326xx/327xx) "
                             "or EPSG:4326")
        if self.width < 1 or self.height < 1:
            raise StoreError(f"{where}: tile {self.path}: size {self.width}x{self.height} must be positive")
        if not (self.dx > 0 and self.dy > 0):
            raise StoreError(f"{where}: tile {self.path}: pixel size ({self.dx}, {self.dy}) must be positive")
        encoded = self.path.encode()
        if len(encoded) >= PATH_BYTES or self.path.startswith("/") or ".." in self.path.split("/"):
            raise StoreError(f"{where}: tile path {self.path!r}: expected a relative path under the store "
                             f"of at most {PATH_BYTES - 1} bytes")

    def to_json(self) -> dict:
        d = asdict(self)
        d["lonlat_bounds"] = list(self.lonlat_bounds)
        d["file_size"] = self.file_size
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> "TileRecord":
        try:
            return cls(int(d["year"]), int(d["epsg"]), int(d["width"]), int(d["height"]), float(d["x0"]),
                       float(d["y0"]), float(d["dx"]), float(d["dy"]),
                       tuple(float(v) for v in d["lonlat_bounds"]), str(d["path"]), str(d["sha256"]),
                       str(d.get("source", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where}: malformed tile entry ({exc!r}): {d!r}") from None


# -- index.bin -----------------------------------------------------------------------------


def pack_index(records: list[TileRecord]) -> bytes:
    out = bytearray(_HEADER.pack(MAGIC, VERSION, len(records), RECORD_SIZE, VEC_DIM, NODATA))
    out += bytes(HEADER_SIZE - len(out))
    for r in records:
        out += _RECORD.pack(r.year, r.epsg, r.width, r.height, r.x0, r.y0, r.dx, r.dy, *r.lonlat_bounds,
                            r.file_size, bytes.fromhex(r.sha256), r.path.encode())
    return bytes(out)


def unpack_index(data: bytes, where: str) -> list[TileRecord]:
    if len(data) < HEADER_SIZE:
        raise StoreError(f"{where}: truncated ({len(data)} bytes; the header alone is {HEADER_SIZE})")
    magic, version, n, record_size, vec_dim, nodata = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StoreError(f"{where}: not a fusar-edge tile index (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION or record_size != RECORD_SIZE or vec_dim != VEC_DIM or nodata != NODATA:
        raise StoreError(f"{where}: unsupported index (version {version}, record {record_size} B, "
                         f"{vec_dim} bands, nodata {nodata}); this build reads version {VERSION}")
    if len(data) != HEADER_SIZE + n * RECORD_SIZE:
        raise StoreError(f"{where}: {len(data)} bytes, expected {HEADER_SIZE + n * RECORD_SIZE} for {n} tiles "
                         "(truncated or corrupt)")
    records = []
    for i in range(n):
        (year, epsg, width, height, x0, y0, dx, dy, lo0, la0, lo1, la1, size, digest,
         raw_path) = _RECORD.unpack_from(data, HEADER_SIZE + i * RECORD_SIZE)
        rec = TileRecord(year, epsg, width, height, x0, y0, dx, dy, (lo0, la0, lo1, la1),
                         raw_path.split(b"\0", 1)[0].decode(errors="replace"), digest.hex())
        rec.validate(where)
        if size != rec.file_size:
            raise StoreError(f"{where}: tile {rec.path}: file_size {size} != {width}*{height}*{VEC_DIM}")
        records.append(rec)
    return records


def sort_records(records: list[TileRecord]) -> list[TileRecord]:
    """The canonical index order (lookup's tie-break): year, EPSG, then north-to-south, west-to-east."""
    return sorted(records, key=lambda r: (r.year, r.epsg, -r.y0, r.x0, r.path))


# -- generations and CURRENT ---------------------------------------------------------------


def current_generation(store: Path) -> Path:
    """The directory ``CURRENT`` names, checked to exist."""
    store = Path(store)
    if not store.is_dir():
        raise StoreError(f"tile store {store}: no such directory")
    pointer = store / CURRENT
    if not pointer.is_file():
        raise StoreError(f"tile store {store}: no {CURRENT} file; not a tile store, or an ingest never "
                         "finished (run `fusar-edge tiles ingest ... --store` again)")
    name = pointer.read_text(encoding="ascii", errors="replace").strip()
    if not _GEN.fullmatch(name):
        raise StoreError(f"{pointer}: expected a generation name like gen-000001, got {name[:40]!r}")
    gen = store / name
    if not gen.is_dir():
        raise StoreError(f"{pointer}: names {name}, which is missing")
    return gen


def read_generation(store: Path) -> tuple[Path, list[TileRecord], dict]:
    """``(generation dir, records from index.bin, manifest dict)``; the two must agree."""
    gen = current_generation(store)
    index_path, manifest_path = gen / "index.bin", gen / "manifest.json"
    for p in (index_path, manifest_path):
        if not p.is_file():
            raise StoreError(f"{p}: missing")
    records = unpack_index(index_path.read_bytes(), str(index_path))
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{manifest_path}: not valid JSON ({exc})") from None
    listed = [TileRecord.from_json(t, str(manifest_path)) for t in manifest.get("tiles", [])]
    if [(r.path, r.sha256) for r in listed] != [(r.path, r.sha256) for r in records]:
        raise StoreError(f"{manifest_path}: lists other tiles than {index_path}; the store is corrupt")
    return gen, records, manifest


def lookup_points_arrays(lon, lat) -> tuple[np.ndarray, np.ndarray]:
    """The query points of a lookup as contiguous float64 vectors of one length (both readers' input)."""
    lon = np.ascontiguousarray(lon, dtype=np.float64).reshape(-1)
    lat = np.ascontiguousarray(lat, dtype=np.float64).reshape(-1)
    if lon.shape != lat.shape:
        raise InputError(f"lookup: lon and lat differ in length ({lon.size} vs {lat.size})")
    return lon, lat


def write_tile_file(store: Path, rel_path: str, data: np.ndarray) -> str:
    """Write ``data`` (int8 ``[H, W, 64]``) to ``store/rel_path`` atomically; -> sha256 hex."""
    if data.dtype != np.int8 or data.ndim != 3 or data.shape[2] != VEC_DIM:
        raise StoreError(f"tile {rel_path}: expected int8 [H, W, {VEC_DIM}], got {data.dtype} {list(data.shape)}")
    target = Path(store) / rel_path
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with atomic_writer(target) as f:
        for row in range(0, data.shape[0], 256):  # bounded memory for 8192-row tiles
            block = np.ascontiguousarray(data[row:row + 256]).tobytes()
            h.update(block)
            f.write(block)
    return h.hexdigest()


def commit(store: Path, records: list[TileRecord], info: dict | None = None) -> Path:
    """Publish ``records`` as the store's new generation; -> its directory.

    Every tile file must already be in place. Older generations and tile files no generation
    names any more are removed afterwards (readers that still map them keep their data: on
    POSIX an unlinked file lives until its last mapping goes).
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    records = sort_records(records)
    seen = set()
    for r in records:
        r.validate(str(store))
        key = (r.year, r.path)
        if key in seen:
            raise StoreError(f"tile store {store}: tile {r.path} listed twice")
        seen.add(key)
        p = store / r.path
        if not p.is_file() or p.stat().st_size != r.file_size:
            raise StoreError(f"{p}: missing or not {r.file_size} bytes; not committing")
    numbers = [int(m.group(1)) for d in store.iterdir() if (m := _GEN.fullmatch(d.name))]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    tmp_gen = store / f".{name}.{secrets.token_hex(4)}.tmp"
    tmp_gen.mkdir()
    try:
        (tmp_gen / "index.bin").write_bytes(pack_index(records))
        manifest = {"format": "fusar-edge-aef-tiles", "version": VERSION, "generation": name,
                    "vec_dim": VEC_DIM, "nodata": NODATA, "dequantise": "(q/127.5)^2 * sign(q)",
                    "years": sorted({r.year for r in records}),
                    "crs": sorted({f"EPSG:{r.epsg}" for r in records}),
                    "index_sha256": hashlib.sha256((tmp_gen / "index.bin").read_bytes()).hexdigest(),
                    **(info or {}), "tiles": [r.to_json() for r in records]}
        (tmp_gen / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        for f in tmp_gen.iterdir():
            _fsync_path(f)
        os.rename(tmp_gen, store / name)
        _fsync_path(store)
        write_text_atomic(store / CURRENT, name + "\n")  # <- the commit
        _fsync_path(store)
    finally:
        if tmp_gen.exists():
            shutil.rmtree(tmp_gen, ignore_errors=True)
    _collect_garbage(store, name, {r.path for r in records})
    return store / name


def _collect_garbage(store: Path, keep_gen: str, keep_tiles: set[str]) -> None:
    for d in store.iterdir():
        if _GEN.fullmatch(d.name) and d.name != keep_gen:
            shutil.rmtree(d, ignore_errors=True)
    remove_unreferenced_tiles(store, keep_tiles)


def remove_unreferenced_tiles(store: Path, keep: set[str]) -> None:
    """Delete the tile files whose store-relative path is not in ``keep`` (only under the ingest lock)."""
    tiles = store / "tiles"
    if tiles.is_dir():
        for p in tiles.rglob(f"*{TILE_SUFFIX}"):
            if p.relative_to(store).as_posix() not in keep:
                p.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lonlat_envelope(epsg: int, x0: float, y0: float, dx: float, dy: float, width: int, height: int,
                    pad_deg: float = 1e-5) -> tuple[float, float, float, float]:
    """A conservative WGS84 envelope of a tile (edges densified through PROJ, then padded)."""
    from rasterio.warp import transform_bounds

    if epsg == EPSG_LONLAT:
        b = (x0, y0 - height * dy, x0 + width * dx, y0)
    else:
        b = transform_bounds(f"EPSG:{epsg}", "EPSG:4326", x0, y0 - height * dy, x0 + width * dx, y0,
                             densify_pts=51)
    return (max(-180.0, b[0] - pad_deg), max(-90.0, b[1] - pad_deg),
            min(180.0, b[2] + pad_deg), min(90.0, b[3] + pad_deg))


def write_store(store: Path, tiles: list[dict], info: dict | None = None) -> Path:
    """Build (or extend) a store from in-memory tiles; used by tests and the synthetic demo.

    Each entry: ``year, epsg, x0, y0, dx, dy, data`` (int8 ``[H, W, 64]``, row 0 north),
    optional ``name`` and ``source``. Existing tiles are kept.
    """
    store = Path(store)
    records = []
    if (store / CURRENT).exists():
        records = read_generation(store)[1]
    for t in tiles:
        data = np.asarray(t["data"])
        name = t.get("name") or f"tile-{len(records):04d}"
        rel = f"tiles/{t['year']}/{t['epsg']}/{name}{TILE_SUFFIX}"
        digest = write_tile_file(store, rel, data)
        records = [r for r in records if r.path != rel]
        records.append(TileRecord(int(t["year"]), int(t["epsg"]), data.shape[1], data.shape[0], float(t["x0"]),
                                  float(t["y0"]), float(t["dx"]), float(t["dy"]),
                                  lonlat_envelope(int(t["epsg"]), float(t["x0"]), float(t["y0"]), float(t["dx"]),
                                                  float(t["dy"]), data.shape[1], data.shape[0]),
                                  rel, digest, t.get("source", "")))
    return commit(store, records, info)
