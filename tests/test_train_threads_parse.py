"""benchmarks/train_threads.py reads steps per second from the training progress bar; the reading is tested here."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("train_threads", Path(__file__).resolve().parents[1] / "benchmarks" / "train_threads.py")
train_threads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_threads)


def _bar(label: str, n: int, total: int, elapsed: str) -> str:
    return f"\r{label}:  {100 * n // total}%|##   | {n}/{total} [{elapsed}<00:10,  2.00step/s, loss=0.5]"


def test_rate_uses_refreshes_after_settling():
    text = "loading\n" + "".join([_bar("vision warm-up", 1, 4800, "00:01"), _bar("vision warm-up", 30, 4800, "00:20"),
                                  _bar("vision warm-up", 130, 4800, "01:10"), _bar("train", 999, 6400, "01:11")])
    samples = train_threads.bar_samples(text, "vision warm-up")
    assert samples == [(1, 4800, 1), (30, 4800, 20), (130, 4800, 70)]
    rate, total = train_threads.rate(samples, settle=15)
    assert total == 4800 and rate == pytest.approx(100 / 50)  # the first second's step is left out
    assert train_threads.bar_samples(text, "train") == [(999, 6400, 71)]
    assert train_threads.bar_samples(_bar("train", 5, 10, "1:02:03"), "train") == [(5, 10, 3723)]


def test_rate_refuses_too_short_a_run():
    samples = train_threads.bar_samples(_bar("train", 3, 100, "00:05"), "train")
    with pytest.raises(SystemExit, match="raise --seconds"):
        train_threads.rate(samples, settle=15)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_threads.py"
    missing = subprocess.run([sys.executable, str(script), "--run", str(tmp_path / "none"), "--data", str(tmp_path)],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert f"{tmp_path / 'none' / 's0' / 'dense-warmup.pt'} is missing" in missing.stderr
    run, data = tmp_path / "run", tmp_path / "data"
    for need in (run / "s0" / "base", run / "s1", data):
        need.mkdir(parents=True)
    (run / "s0" / "dense-warmup.pt").write_bytes(b"")
    (data / "scenes.jsonl").write_text("")
    bad = subprocess.run([sys.executable, str(script), "--run", str(run), "--data", str(data), "--phases", "stage 9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--phases: unknown ['stage 9']" in bad.stderr
    assert not any(tmp_path.glob("**/*.log"))  # refused before any timed run
    wrong = subprocess.run([sys.executable, str(script), "--run", str(run), "--data", str(data), "--recipe-args",
                            "--dense-warmup-epochz 8"], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "--recipe-args '--dense-warmup-epochz 8': unrecognized arguments: --dense-warmup-epochz 8" in wrong.stderr
    unquoted = subprocess.run([sys.executable, str(script), "--run", str(run), "--data", str(data), "--recipe-args",
                               "--dense-warmup-epochs '8"], capture_output=True, text=True)
    assert unquoted.returncode == 2 and unquoted.stderr.count("\n") == 1, unquoted.stderr
    assert "No closing quotation" in unquoted.stderr


def test_a_timed_command_that_fails_is_refused_with_its_own_error(tmp_path, capsys):
    # e.g. stage 0 handed a warm-up checkpoint of other settings: its InputError, not "raise --seconds"
    with pytest.raises(SystemExit) as stop:
        train_threads.timed(["train", "--stage", "0", "--data", str(tmp_path / "none.jsonl"), "--out",
                             str(tmp_path / "out")], 120, tmp_path / "run.log")
    assert stop.value.code == 2
    said = capsys.readouterr().err
    assert said.count("\n") == 1 and "`fusar-edge train --stage 0 ...` failed (exit 2)" in said
    assert "none.jsonl" in said.split("failed (exit 2):")[1]  # the command's own last line

