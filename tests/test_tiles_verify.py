"""tiles verify: re-hash a store and name every missing, truncated or corrupted file."""

import json

import numpy as np

from aef_fixtures import official_scene
from fusar_edge.tiles import format as tf
from fusar_edge.tiles.ingest import ingest
from fusar_edge.tiles.verify import verify


def small_store(path, n=3):
    rng = np.random.default_rng(0)
    tiles = [{"year": 2023, "epsg": 32631, "x0": 600000.0 + 100 * i, "y0": 5000000.0, "dx": 10.0, "dy": 10.0,
              "data": rng.integers(-127, 128, (4 + i, 5, 64)).astype(np.int8), "name": f"t{i}"} for i in range(n)]
    tf.write_store(path, tiles)
    return tf.read_generation(path)


def kinds(report):
    return sorted(p.kind for p in report.problems)


def test_a_sound_store_verifies(tmp_path):
    official_scene(tmp_path / "aef", years=(2022,))
    store = tmp_path / "store"
    ingest([tmp_path / "aef"], store)
    calls = []
    r = verify(store, progress=lambda d, t, m: calls.append((d, t)))
    assert r.ok and r.problems == [] and r.warnings == []
    assert r.tiles_checked == 2 and r.bytes_checked == 2 * 64 * 64 * 64
    assert calls[-1] == (r.bytes_checked, r.bytes_checked)
    assert "OK" in r.summary() and r.to_json()["ok"] is True


def test_truncated_corrupted_and_missing_tiles_are_named(tmp_path):
    store = tmp_path / "store"
    _gen, records, _ = small_store(store)
    a, b, c = (store / r.path for r in records)
    with open(a, "r+b") as f:
        f.truncate(a.stat().st_size - 1)
    with open(b, "r+b") as f:
        f.seek(17)
        byte = f.read(1)
        f.seek(17)
        f.write(bytes([byte[0] ^ 0xFF]))
    c.unlink()
    r = verify(store)
    assert not r.ok
    assert kinds(r) == ["corrupted", "missing", "truncated"]
    named = {p.kind: p.path for p in r.problems}
    assert named == {"truncated": str(a), "corrupted": str(b), "missing": str(c)}
    for p in r.problems:
        assert str(p).startswith(p.path) and "\n" not in str(p)


def test_oversized_tile(tmp_path):
    store = tmp_path / "store"
    _gen, records, _ = small_store(store, n=1)
    with open(store / records[0].path, "ab") as f:
        f.write(b"\0")
    assert kinds(verify(store)) == ["oversized"]


def test_corrupted_index_is_named(tmp_path):
    store = tmp_path / "store"
    gen, records, _ = small_store(store)
    index = gen / "index.bin"
    data = bytearray(index.read_bytes())
    data[tf.HEADER_SIZE + 20] ^= 0x40  # a bit of record 0's x0
    index.write_bytes(bytes(data))
    r = verify(store)
    assert not r.ok and all(p.path == str(index) for p in r.problems)
    assert any("SHA-256" in p.message for p in r.problems)
    assert any("does not match" in p.message for p in r.problems)
    # the tiles themselves are still checked
    assert r.tiles_checked == 3


def test_truncated_or_garbage_index(tmp_path):
    store = tmp_path / "store"
    gen, _records, _ = small_store(store)
    index = gen / "index.bin"
    index.write_bytes(index.read_bytes()[:100])
    r = verify(store)
    assert {p.kind for p in r.problems} == {"index"}
    assert any("unreadable" in p.message and "truncated" in p.message for p in r.problems)
    index.write_bytes(b"GARBAGE!" + bytes(56))
    assert any("not a fusar-edge tile index" in p.message for p in verify(store).problems)
    index.unlink()
    assert [(p.kind, p.message) for p in verify(store).problems] == [("index", "missing")]


def test_broken_manifest_and_current(tmp_path):
    store = tmp_path / "store"
    gen, _records, _ = small_store(store)
    (gen / "manifest.json").write_text("{ nope")
    r = verify(store)
    assert kinds(r) == ["manifest"] and r.tiles_checked == 3  # tiles checked from index.bin
    (store / tf.CURRENT).write_text("gen-999999\n")
    r = verify(store)
    assert kinds(r) == ["current"] and "gen-999999" in r.problems[0].message
    r = verify(tmp_path / "nowhere")
    assert kinds(r) == ["store"]


def test_stray_files_are_warnings(tmp_path):
    store = tmp_path / "store"
    gen, records, _ = small_store(store)
    (store / "tiles" / "2023" / "32631" / "left-over.aef").write_bytes(b"x" * 64)
    (store / "tiles" / "2023" / "32631" / ".t0.aef.abcd1234.tmp").write_bytes(b"x")
    (store / "gen-000000").mkdir()
    (store / ".ingest").mkdir()
    (store / ".ingest" / "journal.jsonl").write_text(json.dumps({"provenance": "x"}) + "\n")
    r = verify(store)
    assert r.ok and len(r.warnings) == 4
    text = " ".join(r.warnings)
    for word in ("left-over.aef", ".tmp", "gen-000000", "journal.jsonl"):
        assert word in text


def test_empty_store(tmp_path):
    store = tmp_path / "store"
    tf.commit(store, [])
    r = verify(store)
    assert r.ok and r.tiles_checked == 0
