"""Ingest AlphaEarth Foundations (AEF) annual embeddings into a tile store.

``ingest(sources, store, bbox=None, years=None, progress=None, root=None)`` reads AEF
embeddings from local files and writes them as tiles of the store described in
``docs/tilestore.md`` (format and commit protocol: ``tiles.format``). It never downloads.

Sources (any mix, in one call):

* **Official AEF COGs** (``.tif`` / ``.tiff``) in the published ``<year>/<zone>/<file>.tiff``
  layout: ``ingest_cog``.
* **Directories**: walked (sorted) for ``*.tif`` / ``*.tiff`` and zarr stores; hidden
  entries are skipped.
* **The published index** ``aef_index`` (``.csv`` / ``.parquet``), whose rows name COGs
  found locally: ``ingest_index``.
* **Zarr stores** like those ``aef-download`` writes: ``ingest_zarr``.

Each source module's docstring says what it accepts. This module finds the sources
(``_expand``), plans their units (``ingest_plan``), reads each unit into a tile (``_process``)
and hands the run to ``ingest_commit`` (lock, journal, one commit).

Values: int8 sources are stored exactly as they are (pixel for pixel; ``-128`` = no data).
Float sources (``aef-download --dequantize``) are re-quantised with the inverse of AEF's
de-quantisation ``v = (q / 127.5)^2 * sign(q)``: ``q = rint(sign(v) * sqrt(|v|) * 127.5)``
(round half to even), clipped to ``[-127, 127]``; a pixel with any non-finite band (NaN is
the no-data value there) becomes ``-128`` in all bands. Every int8 ``q`` in ``[-127, 127]``
survives the round trip de-quantise -> re-quantise exactly.

``bbox`` (``lon_min, lat_min, lon_max, lat_max``, WGS84 degrees) crops each source to the
pixel window that covers it plus ``ingest_plan.MARGIN_PX`` pixels; sources that do not intersect it are
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
one call are published by a single ``tiles.format.commit`` that keeps the store's other
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

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import format as tf
from .ingest_cog import COG_SUFFIXES, gdal_message, plan_cog, read_cog_rows, rio_env
from .ingest_commit import IngestLock, Journal, TileWriter, clean_stale_temp, journal_entry_valid, merge_and_commit
from .ingest_index import INDEX_SUFFIXES, plan_index
from .ingest_plan import SLOT, YEAR_RANGE, Unit, contains, parse_provenance
from .ingest_zarr import is_zarr_dir, plan_zarr, read_zarr_rows

BLOCK_BYTES = 32 << 20  # target tile bytes per source read (at least one source block row)

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


# -- arguments -----------------------------------------------------------------------------


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
        if not YEAR_RANGE[0] <= yi <= YEAR_RANGE[1]:
            raise InputError(f"years: {yi} is not an AEF year (AEF's annual layers start in 2017)")
        out.add(yi)
    if not out:
        raise InputError("years: empty; give at least one year or None for all")
    return frozenset(out)


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
            if is_zarr_dir(p):
                out.append(("zarr", p))
                continue
            found = []
            for dirpath, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                here = Path(dirpath)
                for d in list(dirs):
                    if is_zarr_dir(here / d):
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
    units: list[Unit] = []
    expanded = _expand(sources)
    n_sources = 0
    for kind, path in expanded:
        if kind == "index":
            for local, year, crs in plan_index(path, years, bbox, Path(root) if root is not None else None, skipped):
                n_sources += 1
                units += plan_cog(local, year, years, bbox, crs, skipped)
        elif kind == "zarr":
            n_sources += 1
            units += plan_zarr(path, years, bbox, skipped, report.warnings)
        else:
            n_sources += 1
            units += plan_cog(path, None, years, bbox, None, skipped)
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
    with IngestLock(store):
        clean_stale_temp(store)
        existing: list[tf.TileRecord] = []
        if (store / tf.CURRENT).exists():
            gen, _records, manifest = tf.read_generation(store)
            # the manifest's entries carry the provenance (index.bin has no room for it)
            existing = [tf.TileRecord.from_json(t, str(gen / "manifest.json")) for t in manifest.get("tiles", [])]
        by_path = {r.path: r for r in existing}
        by_slot: dict[str, tf.TileRecord] = {}
        by_source: dict[tuple, list[tuple[tuple, str, tf.TileRecord]]] = {}  # (src, t) -> [(window, id, rec)]
        for r in existing:
            m = SLOT.match(r.path)
            if m:
                by_slot[m.group(1)] = r
            prov = parse_provenance(r.source)
            if prov is not None:
                by_source.setdefault(prov[0], []).append((prov[1], prov[2], r))
        journal = Journal(store)
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
                src_key, window, ident = parse_provenance(u.provenance)
                if any(w != window and i == ident and r.year == u.year and r.epsg == u.epsg and contains(w, window)
                       and (store / r.path).is_file() for w, i, r in by_source.get(src_key, [])):
                    report.tiles_covered += 1
                    bar.advance(u.nbytes, f"{label}: already in a larger tile")
                    continue
                # (b) finished by an interrupted earlier run of this command
                entry = journal.entries.get(u.provenance)
                if entry is not None and journal_entry_valid(store, entry, u):
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

        # 2. merge with the store's other tiles and commit once (ingest_commit.merge_and_commit)
        run_records = [r for r in new_records.values() if r is not None]
        info = {"ingest": {"tool": "fusar-edge tiles ingest", "bbox": list(bbox) if bbox else None,
                           "years": sorted(years) if years else None,
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        merged, report.generation = merge_and_commit(store, existing, run_records, new_records.keys(), info)
        report.tiles = tf.sort_records(run_records)
        report.years = sorted({r.year for r in run_records})
        report.crs = sorted({f"EPSG:{r.epsg}" for r in run_records})
        report.store_tiles = len(merged)
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


# -- reading one window into a tile ------------------------------------------------------------


def _process(store: Path, u: Unit, by_path: dict, report: IngestReport,
             bar: _Progress) -> tuple[str, tf.TileRecord | None]:
    """Read one window into a tile file; -> (status, record)."""
    writer = TileWriter(store, u.slot)
    blocks = _row_blocks(u.row_off, u.row_off + u.height, _block_step(u), reverse=u.bottom_up)
    try:
        if u.kind == "cog":
            import rasterio
            from rasterio.errors import RasterioIOError

            try:
                with rio_env(), rasterio.open(u.source) as ds:
                    for r0, r1 in blocks:
                        try:
                            data = read_cog_rows(ds, u, r0, r1)
                        except RasterioIOError as exc:
                            raise InputError(f"{u.source}: cannot read rows {r0}..{r1} (corrupt or truncated file?): "
                                             f"{gdal_message(exc)}") from None
                        writer.write(data)
                        report.bytes_read += data.nbytes
                        bar.advance(data.nbytes, f"{u.source.name} {u.year} rows {r0}-{r1}")
            except RasterioIOError as exc:
                raise InputError(f"{u.source}: cannot open (corrupt or truncated file?): {exc}") from None
        else:
            for r0, r1 in blocks:
                data = read_zarr_rows(u, r0, r1)
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
    return any((m := SLOT.match(p)) and m.group(1) == slot for p in by_path)


def _row_blocks(r_start: int, r_end: int, step: int, reverse: bool) -> list[tuple[int, int]]:
    """``[r_start, r_end)`` cut at multiples of ``step`` (the source's block rows)."""
    cuts = [r_start] + list(range((r_start // step + 1) * step, r_end, step)) + [r_end]
    blocks = list(zip(cuts[:-1], cuts[1:]))
    return blocks[::-1] if reverse else blocks


def _block_step(unit: Unit) -> int:
    per_row = unit.width * tf.VEC_DIM
    rows = max(1, BLOCK_BYTES // per_row)
    b = unit.block_rows
    return max(b, rows // b * b)
