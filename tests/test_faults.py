"""Faults that must end in one line and exit code 2, with nothing half-written: a full disk in
every command that writes, bad text and sizes in the question, inputs checked before the model."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import one_line
from fusar_edge.cli import main
from test_import_fusar_gpt import ckpt  # noqa: F401  (its FUSAR-GPT checkpoint fixture)
from fusar_edge.errors import InputError
from fusar_edge.geo.synthetic import write_demo_scene

NO_SPACE = os.strerror(errno.ENOSPC)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)  # what write() raises: no file name attached


def error_line(capsys) -> str:
    """The one error line, last on stderr (after any progress lines), and no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("fusar-edge: error: "), err
    assert sum(line.startswith("fusar-edge: error") for line in lines) == 1, err
    return lines[-1]


def hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_scene(tmp_path_factory.mktemp("demo"), size=64, seed=4)


# -- disk full ---------------------------------------------------------------------------------


def test_export_disk_full_keeps_the_old_export_and_cleans_killed_runs(tmp_path, monkeypatch, capsys):
    import fusar_edge.export.bundle_export as bundle_export

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    killed = tmp_path / f".out.export-{dead_pid()}-abc123"  # left by a killed export
    live = tmp_path / f".other.export-{os.getpid()}-def456"  # a running export's work: not touched
    for d in (killed, live):
        (d / "bundle").mkdir(parents=True)

    def save_half(model, tokenizer, stage, **kwargs):
        Path(stage).mkdir(parents=True)
        (Path(stage) / "model.safetensors").write_bytes(b"half of the weights")
        disk_full()

    monkeypatch.setattr(bundle_export, "save_bundle", save_half)
    assert main(["export", "tiny", "--out", str(out), "--force", "--json"]) == 2
    line = error_line(capsys)
    assert str(out) in line and NO_SPACE in line
    assert (out / "keep.txt").read_text() == "previous export" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert hidden(tmp_path) == [live.name]


def test_tiles_ingest_disk_full_leaves_the_store_as_it_was(tmp_path, monkeypatch, capsys):
    import fusar_edge.tiles.ingest_commit as ingest_commit
    from aef_fixtures import write_official_cog

    store = tmp_path / "store"
    first = write_official_cog(tmp_path / "aef", 2022, 31, seed=1)
    second = write_official_cog(tmp_path / "aef", 2023, 31, seed=2)
    assert main(["tiles", "ingest", str(first.path), "--store", str(store), "--json"]) == 0
    capsys.readouterr()
    current = (store / "CURRENT").read_bytes()
    monkeypatch.setattr(ingest_commit.TileWriter, "write", disk_full)
    assert main(["tiles", "ingest", str(second.path), "--store", str(store), "--json"]) == 2
    line = error_line(capsys)
    assert str(store) in line and NO_SPACE in line
    assert (store / "CURRENT").read_bytes() == current
    assert not list((store / "tiles").rglob(".*.tmp"))
    monkeypatch.undo()
    assert main(["tiles", "verify", "--store", str(store)]) == 0


def test_import_disk_full_keeps_the_old_bundle(ckpt, tmp_path, monkeypatch, capsys):
    import fusar_edge.model.bundle as bundle

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("previous bundle")
    monkeypatch.setattr(bundle, "save_file", disk_full)  # the weights file: the largest write
    assert main(["import-fusar-gpt", str(ckpt.base), str(ckpt.lora), str(ckpt.tlm), "--out", str(out), "--force"]) == 2
    line = error_line(capsys)
    assert str(out) in line and NO_SPACE in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"] and (out / "keep.txt").is_file()


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
def test_sample_disk_full_leaves_no_scene(tmp_path, monkeypatch, capsys, existing):
    import fusar_edge.data.synth as synth

    out = tmp_path / "s"
    if existing:
        out.mkdir()
    real = synth._write_scene

    def write_half(path, *args):
        real(path, *args)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # a truncated scene.tif...
        disk_full()  # ...and the disk is full

    monkeypatch.setattr(synth, "_write_scene", write_half)
    assert main(["sample", str(out), "--size", "64"]) == 2
    line = error_line(capsys)
    assert str(out) in line and NO_SPACE in line
    assert list(out.iterdir()) == [] if existing else not out.exists()
    assert hidden(tmp_path) == []


# -- sample: existing paths, killed runs -------------------------------------------------------


def test_sample_onto_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "some_file.txt").write_text("mine")
    assert main(["sample", str(tmp_path / "some_file.txt")]) == 2
    assert "some_file.txt" in error_line(capsys)
    assert (tmp_path / "some_file.txt").read_text() == "mine"


def test_sample_removes_what_a_killed_sample_left(tmp_path, capsys):
    killed = tmp_path / f".s.sample-{dead_pid()}-abc123"
    (killed / "sample").mkdir(parents=True)
    (killed / "sample" / "scene.tif").write_bytes(b"cut short")
    assert main(["sample", str(tmp_path / "s"), "--size", "64"]) == 0
    assert hidden(tmp_path) == [] and sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "anchors.npz", "scene.png", "scene.tif", "tiles"]


# -- ask: text and sizes, through the Python API -------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_model, tiny_tokenizer):
    from fusar_edge.runtime import Runtime

    return Runtime(tiny_model, tiny_tokenizer, "random", "tiny")


def test_max_new_tokens_beyond_the_context_is_refused(runtime, demo):
    context = runtime.config.context_length
    with pytest.raises(InputError) as e:
        runtime.ask(demo["scene_tif"], "How many ships?", max_new_tokens=10**9, no_anchors=True)
    one_line(e, "max_new_tokens", str(context))
    with pytest.raises(InputError) as e:  # fits the context alone, not after the prompt
        runtime.ask(demo["scene_tif"], "How many ships?", max_new_tokens=context - 1, no_anchors=True)
    one_line(e, "max_new_tokens", str(context - 1), "prompt")


def test_a_label_outside_detection_is_refused_not_ignored(runtime, demo):
    with pytest.raises(InputError) as e:
        runtime.ask(demo["scene_tif"], "How many ships?", label="ship", no_anchors=True)
    one_line(e, "label", "detect", "'count'")


def test_a_question_longer_than_the_context_is_refused_before_the_image_is_read(runtime, tmp_path):
    question = "How many ships are there in this harbour? " * 2400  # 100 KB
    assert len(question) > 100_000
    with pytest.raises(InputError) as e:
        runtime.ask(tmp_path / "not-read.tif", question, no_anchors=True)
    msg = one_line(e, "question", "tokens", str(runtime.config.context_length))
    assert "not-read.tif" not in msg


def test_an_undecodable_byte_in_the_question_is_one_line(runtime, demo, capsys):
    with pytest.raises(InputError) as e:
        runtime.ask(demo["scene_tif"], "How many \udcff ships?", no_anchors=True)
    one_line(e, "question", "0xff")
    assert main(["ask", demo["scene_tif"], "How many \udcff ships?", "--bundle", "tiny", "--no-anchors"]) == 2
    assert "question" in error_line(capsys)


# -- ask: inputs checked before the model loads ------------------------------------------------

CHECK_ONLY = ("import sys; from fusar_edge.cli import main; rc = main(sys.argv[1:]); "
              "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")


@pytest.mark.parametrize("flags, word", [
    (["--anchors", "none.npz"], "none.npz"),
    (["--tiles", "no-store"], "no-store"),
    (["--anchors", "."], "not a file"),
])
def test_missing_inputs_fail_before_torch_is_imported(demo, tmp_path, flags, word):
    for argv in (["ask", str(tmp_path / "nope.tif"), "q"], ["ask", demo["scene_tif"], "q", *flags]):
        run = subprocess.run([sys.executable, "-c", CHECK_ONLY, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert run.stdout.split() == ["2", "False", "False"], run.stderr
        err = run.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fusar-edge: error: ")
    assert word in err[0]


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_work_folder(tmp_path):
    """A service stop or `kill` (SIGTERM) mid-way through `data synth`: exit 143 and nothing left
    beside the output (the default action killed the process with its work folder in place)."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "fusar_edge.cli", "data", "synth", "--out", str(tmp_path / "ds"),
                             "--n", "2000", "--chip", "224", "--json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".ds.synth-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "data synth never started its work folder"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err  # 128 + SIGTERM, as a shell reports a terminated command
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
