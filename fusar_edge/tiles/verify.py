"""Check a tile store against its own checksums (``fusar-edge tiles verify``).

``verify(store, progress=None) -> VerifyReport`` reads ``CURRENT``, the generation's
``manifest.json`` and ``index.bin`` and re-hashes every file the generation names:

* ``index.bin`` against the manifest's ``index_sha256``, then parsed (header, size, records)
  and compared with the manifest's tile list;
* every tile file: present, exactly ``width * height * 64`` bytes, SHA-256 as listed.

Each finding is a ``Problem`` naming the file (``kind``: ``store``, ``current``,
``manifest``, ``index``, ``missing``, ``truncated``, ``oversized``, ``corrupted``);
``report.ok`` is true when there is none. Files the generation does not name (tiles left
over, old generations, temp files, an unfinished ingest's journal) are ``warnings``: they
do not make the store wrong, but they take space or say an ingest was interrupted.

``progress(done_bytes, total_bytes, message)`` is called as files are hashed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import format as tf

Progress = Callable[[int, int, str], None]
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the store: ``path`` (the file), ``kind`` and a message."""

    kind: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyReport:
    store: str
    generation: str | None = None
    tiles_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (f"{self.store}: {state}; {self.tiles_checked} tile(s), {self.bytes_checked / 1e6:.1f} MB checked "
                f"({self.generation or 'no generation'}); {len(self.warnings)} warning(s)")

    def to_json(self) -> dict:
        return {"store": self.store, "ok": self.ok, "generation": self.generation,
                "tiles_checked": self.tiles_checked, "bytes_checked": self.bytes_checked,
                "problems": [{"kind": p.kind, "path": p.path, "message": p.message} for p in self.problems],
                "warnings": list(self.warnings)}


def _hash(path: Path, on_bytes: Callable[[int], None]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            on_bytes(len(block))
    return h.hexdigest()


def verify(store, progress: Progress | None = None) -> VerifyReport:
    """Re-hash every file of the store's current generation; see the module docstring."""
    store = Path(store)
    report = VerifyReport(store=str(store))
    problems = report.problems

    def bad(kind: str, path: Path | str, message: str) -> None:
        problems.append(Problem(kind, str(path), message))

    if not store.is_dir():
        bad("store", store, "no such directory")
        return report
    try:
        gen = tf.current_generation(store)
    except tf.StoreError as exc:
        bad("current", store / tf.CURRENT, str(exc))
        return report
    report.generation = gen.name
    index_path, manifest_path = gen / "index.bin", gen / "manifest.json"

    # manifest
    manifest_tiles: list[tf.TileRecord] | None = None
    manifest: dict = {}
    if not manifest_path.is_file():
        bad("manifest", manifest_path, "missing")
    else:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if not isinstance(manifest, dict) or not isinstance(manifest.get("tiles"), list):
                raise ValueError("no 'tiles' list")
            manifest_tiles = [tf.TileRecord.from_json(t, str(manifest_path)) for t in manifest["tiles"]]
        except (UnicodeDecodeError, ValueError, tf.StoreError) as exc:
            bad("manifest", manifest_path, f"unreadable ({exc}); re-ingest to rebuild the store")
            manifest_tiles = None

    # index.bin
    index_records: list[tf.TileRecord] | None = None
    if not index_path.is_file():
        bad("index", index_path, "missing")
    else:
        data = index_path.read_bytes()
        want = manifest.get("index_sha256")
        got = hashlib.sha256(data).hexdigest()
        if want and got != want:
            bad("index", index_path, f"SHA-256 {got[:16]}... differs from the manifest's {str(want)[:16]}... "
                                     "(corrupted)")
        elif manifest_tiles is not None and not want:
            report.warnings.append(f"{manifest_path}: no index_sha256; index.bin checked by content only")
        try:
            index_records = tf.unpack_index(data, str(index_path))
        except tf.StoreError as exc:
            bad("index", index_path, f"unreadable: {str(exc).removeprefix(str(index_path) + ': ')}")
    if index_records is not None and manifest_tiles is not None:
        a = [(r.path, r.sha256, r.year, r.epsg, r.width, r.height, r.x0, r.y0, r.dx, r.dy) for r in index_records]
        b = [(r.path, r.sha256, r.year, r.epsg, r.width, r.height, r.x0, r.y0, r.dx, r.dy) for r in manifest_tiles]
        if a != b:
            bad("index", index_path, f"does not match {manifest_path.name} ({len(a)} vs {len(b)} tiles, or other "
                                     "values): one of them is corrupt")

    # tiles
    tiles = manifest_tiles if manifest_tiles is not None else (index_records or [])
    total = sum(r.file_size for r in tiles)
    done = 0

    def advance(n: int, msg: str) -> None:
        nonlocal done
        done += n
        report.bytes_checked += n
        if progress is not None:
            progress(done, total, msg)

    named = set()
    for r in tiles:
        p = store / r.path
        named.add(r.path)
        if not p.is_file():
            bad("missing", p, "missing")
            advance(r.file_size, r.path)
            continue
        size = p.stat().st_size
        if size < r.file_size:
            bad("truncated", p, f"truncated: {size} bytes, expected {r.file_size} ({r.width}x{r.height}x64)")
            advance(r.file_size, r.path)
            continue
        if size > r.file_size:
            bad("oversized", p, f"{size} bytes, expected {r.file_size} ({r.width}x{r.height}x64)")
            advance(r.file_size, r.path)
            continue
        got = _hash(p, lambda n, path=r.path: advance(n, path))
        report.tiles_checked += 1
        if got != r.sha256:
            bad("corrupted", p, f"corrupted: SHA-256 {got[:16]}..., expected {r.sha256[:16]}...")

    # what the generation does not name
    tiles_dir = store / "tiles"
    if tiles_dir.is_dir():
        for p in sorted(tiles_dir.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(store).as_posix()
            if rel in named:
                continue
            what = "temp file of an interrupted write" if p.name.endswith(".tmp") else "not named by the index"
            report.warnings.append(f"{p}: stray file ({what}; the next ingest removes it)")
    for d in sorted(store.iterdir()):
        if d.is_dir() and d != gen and (tf._GEN.fullmatch(d.name) or d.name.endswith(".tmp")):
            report.warnings.append(f"{d}: generation not in force (left by an interrupted commit)")
    journal = store / ".ingest" / "journal.jsonl"
    if journal.is_file():
        report.warnings.append(f"{journal}: an ingest was interrupted; run the same ingest command again to finish it")
    return report
