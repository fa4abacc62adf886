"""Journal and commit of an ingest: how it survives a kill and publishes once.

``IngestLock`` keeps two ingests out of one store (``STORE/.ingest/lock``). ``TileWriter``
streams a window's rows to a temp file beside its tile (hashing as it goes) and renames it
into place. ``Journal`` records every finished window, fsync'd, in
``STORE/.ingest/journal.jsonl``, so the same command run again after a kill skips it
(``journal_entry_valid`` re-hashes the tile). ``merge_and_commit`` merges the run's tiles
with the store's others and publishes them with one ``tiles.format.commit``; nothing is
visible to readers before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import numpy as np

from ..hashing import sha256_file
from . import format as tf
from .ingest_plan import SLOT, Unit, contains, parse_provenance

try:  # POSIX advisory lock; on other systems ingests are not guarded against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

JOURNAL = "journal.jsonl"
INGEST_DIR = ".ingest"


class TileWriter:
    """Streams row blocks to a temp file beside the target; hashes as it goes.

    The same protocol as ``tiles.format.write_tile_file`` (temp name, fsync, atomic rename),
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


class Journal:
    """``STORE/.ingest/journal.jsonl``: the windows a run finished, by provenance (one fsync'd line each)."""

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


class IngestLock:
    """``STORE/.ingest/lock`` held for the whole ingest (POSIX ``flock``): a second ingest is a ``StoreError``."""

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


def clean_stale_temp(store: Path) -> None:
    tiles = store / "tiles"
    if tiles.is_dir():
        for p in tiles.rglob(".*.tmp"):
            p.unlink(missing_ok=True)


def journal_entry_valid(store: Path, entry: dict, unit: Unit) -> bool:
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


def merge_and_commit(store: Path, existing: list[tf.TileRecord], run_records: list[tf.TileRecord], run_slots,
                     info: dict) -> tuple[list[tf.TileRecord], str | None]:
    """Publish one run's tiles; -> ``(the store's records afterwards, committed generation or None)``.

    This run's windows replace the same windows (``run_slots``: every slot the run handled),
    and smaller windows of the same source, ingested before; the store's other tiles stay.
    When that changes nothing, nothing is committed (None).
    """
    run_windows = [(p[0], p[1], r) for r in run_records if (p := parse_provenance(r.source))]

    def superseded(r: tf.TileRecord) -> bool:
        m = SLOT.match(r.path)
        if m and m.group(1) in run_slots:
            return True
        p = parse_provenance(r.source)
        return p is not None and any(k == p[0] and n.year == r.year and n.epsg == r.epsg and n.path != r.path
                                     and contains(w, p[1]) for k, w, n in run_windows)

    merged = [r for r in existing if not superseded(r)]
    merged += run_records

    def key(records):
        return sorted((r.path, r.sha256, r.source) for r in records)

    unchanged = (store / tf.CURRENT).exists() and key(merged) == key(existing)
    if not unchanged:
        return merged, str(tf.commit(store, merged, info))
    # commit collects garbage; without one, drop what an interrupted run left behind
    tf.remove_unreferenced_tiles(store, {r.path for r in existing})
    return merged, None
