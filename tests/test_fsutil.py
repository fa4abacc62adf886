"""publish_dir: a replaced directory is the old one or the new one, whatever fails."""

import os

import pytest

from fusar_edge import fsutil


def _dir(path, text):
    path.mkdir()
    (path / "f").write_text(text)
    return path


def test_replaces_and_cleans_up(tmp_path):
    out = _dir(tmp_path / "out", "old")
    fsutil.publish_dir(_dir(tmp_path / ".stage", "new"), out)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_swap_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    """No moment without ``out``: the directories trade names in one call, no rename aside."""
    if not os.uname().sysname == "Linux":
        pytest.skip("renameat2 is Linux's")
    monkeypatch.setattr(fsutil.os, "replace", lambda *a: pytest.fail("renamed in two steps"))
    out = _dir(tmp_path / "out", "old")
    fsutil.publish_dir(_dir(tmp_path / ".stage", "new"), out)
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_swap_keeps_the_old_directory(tmp_path, monkeypatch):
    """import-fusar-gpt --force / export --force / data synth --force killed mid-replace lose nothing
    (the two-rename fallback, where the atomic exchange is not available)."""
    out = _dir(tmp_path / "out", "old")
    stage = _dir(tmp_path / ".stage", "new")
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def failing_second_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old one is aside, the new one fails to move in (disk, kill, ...)
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing_second_replace)
    with pytest.raises(OSError):
        fsutil.publish_dir(stage, out)
    assert (out / "f").read_text() == "old"


def test_work_folders_get_mkdir_permissions_not_mkdtemps(tmp_path):
    """A work folder becomes the published output: it must be readable as a plain mkdir would make it."""
    from fusar_edge.fsutil import publishable_mkdtemp, work_dir

    umask = os.umask(0o022)
    try:
        a, b = publishable_mkdtemp(".x.tmp-", tmp_path), work_dir(tmp_path, "out", "export")
        assert a != b and a.is_dir() and b.is_dir() and b.name.startswith(f".out.export-{os.getpid()}-")
        assert a.stat().st_mode & 0o777 == 0o755 and b.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_atomic_writer_replaces_only_on_success_with_ordinary_permissions(tmp_path):
    path = tmp_path / "result.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_writer(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    umask = os.umask(0o022)
    try:
        with fsutil.atomic_writer(path) as f:
            f.write(b"new")
    finally:
        os.umask(umask)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_file_or_link_replaced_by_force_is_removed_too(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    real = _dir(tmp_path / "real", "kept")
    for make in (lambda p: p.write_text("hi"), lambda p: p.symlink_to(real)):
        out = tmp_path / "out"
        make(out)
        fsutil.publish_dir(_dir(tmp_path / ".stage", "new"), out)
        assert (out / "f").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "real"]
        assert (real / "f").read_text() == "kept"  # a link's target is not the output's to delete
        fsutil._remove(out)


def test_a_killed_imports_half_bundle_is_removed_by_the_next_write(tmp_path, tiny_model, tiny_tokenizer):
    """SIGKILL (the OOM killer on a 7B) leaves the hidden work folder; the next write into the same
    parent removes it, since its process is gone."""
    import subprocess
    import sys

    from fusar_edge.model.bundle import save_bundle

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".bundle.tmp-{int(dead.stdout)}-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    save_bundle(tiny_model, tiny_tokenizer, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
