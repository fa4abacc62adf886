"""`fusar-edge eval`: one model load over a manifest, rows in the reference's infer_val.py format, metrics."""

import json

import pytest

from fusar_edge.cli import main
from fusar_edge.data.synth import synth
from fusar_edge.evaluate.metrics import score

INFER_VAL_KEYS = {"id", "coordinate_size", "question", "gt", "prediction_text", "detections", "parse_error"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "ds"
    synth(out, 6, seed=4, chip=224, per_region=2)
    return out


def test_eval_writes_reference_rows_and_metrics(ds, tmp_path, capsys):
    manifest = ds / "stage2-val.jsonl"
    n = len(manifest.read_text().splitlines())
    out = tmp_path / "ev"
    assert main(["eval", "tiny", "--data", str(manifest), "--out", str(out), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["device"], report["dtype"]) == ("cpu", "float32")  # where the numbers came from
    preds = [json.loads(s) for s in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n == report["rows"]
    rows = [json.loads(s) for s in manifest.read_text().splitlines()]
    for p, r in zip(preds, rows):
        assert INFER_VAL_KEYS <= set(p) and p["id"] == r["id"] and p["gt"] == r["answer"]
        assert p["task"] == r["task"] and p["coordinate_size"] == 224
        if p["task"] == "detect" and p["detections"] is not None:
            assert all(set(d) == {"bbox_2d", "label"} for d in p["detections"])
    # the report is the metrics of the rows written
    assert json.loads((out / "metrics.json").read_text())["metrics"] == json.loads(json.dumps(score(preds)))
    assert set(report["metrics"]) == {r["task"] for r in rows}
    assert (out / "metrics.md").read_text().startswith("| run |") and (out / "metrics.png").stat().st_size > 1000
    assert "| true count | rows | exact |" in (out / "metrics.md").read_text()  # counting's confusion rows
    md = (out / "metrics.md").read_text()
    assert "Counting, by counted class:\n\n| counted class | rows | exact | MAE |" in md and "\n| ship | " in md

    assert main(["eval", "tiny", "--data", str(manifest), "--out", str(tmp_path / "na"), "--no-anchors",
                 "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "no anchors" in text and "2 rows" in text


def test_eval_bad_input_is_one_line(ds, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    row = json.loads((ds / "stage2-val.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps({**row, "image": "scenes/missing.png"}) + "\n")
    count = json.loads(next(s for s in (ds / "stage2-val.jsonl").read_text().splitlines() if '"count"' in s))

    def manifest(name, *rows):  # beside the real one, so the image paths resolve
        path = ds / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    cases = [
        (manifest("noanswer.jsonl", {k: v for k, v in row.items() if k != "answer"}), ["row 1", "missing 'answer'"]),
        (manifest("nullq.jsonl", row, {**row, "question": None}), ["nullq.jsonl: row 2", "question"]),
        (manifest("intimage.jsonl", {**row, "image": 123}), ["row 1", "image"]),
        (manifest("size.jsonl", {**row, "coordinate_size": "abc"}), ["coordinate_size", "positive integer"]),
        (manifest("many.jsonl", {**count, "answer": "many"}), ["many.jsonl: row 1", "answer", "integer"]),
        (manifest("grid.jsonl", {**row, "task": "grid"}), ["row 1", "task", "'grid'"]),
        (manifest("chip.jsonl", {**row, "coordinate_size": 504}), ["coordinate_size [504]", "224 px"]),
    ]
    broken = ds / "broken.jsonl"
    broken.write_text(json.dumps(row) + "\n" * 3 + "{oops\n")
    cases.append((str(broken), ["broken.jsonl: line 4", "not valid JSON"]))
    for argv, words in ((["--data", str(bad)], ["missing.png", "not found"]),
                        *((["--data", path], words) for path, words in cases),
                        (["--data", str(tmp_path / "none.jsonl")], ["none.jsonl"]),
                        (["--data", str(ds / "stage2-val.jsonl"), "--limit", "0"], ["--limit"]),
                        (["--data", str(ds / "stage2-val.jsonl"), "--device", "gpu0"], ["device", "'gpu0'"])):
        assert main(["eval", "tiny", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
    # without anchors a row needs no aef
    no_aef = ds / "noaef.jsonl"
    no_aef.write_text(json.dumps({k: v for k, v in row.items() if k != "aef"}) + "\n")
    assert main(["eval", "tiny", "--data", str(no_aef), "--out", str(tmp_path / "o"), "--no-anchors"]) == 0
    assert main(["eval", "tiny", "--data", str(no_aef), "--out", str(tmp_path / "o2")]) == 2
    assert "missing 'aef'" in capsys.readouterr().err


def test_eval_tasks_scores_only_those_rows_and_limit_counts_among_them(ds, tmp_path, capsys):
    manifest = ds / "stage2-val.jsonl"
    rows = [json.loads(s) for s in manifest.read_text().splitlines()]
    wanted = [r["id"] for r in rows if r["task"] in ("count", "classify")]
    assert 0 < len(wanted) < len(rows)
    out = tmp_path / "cc"
    assert main(["eval", "tiny", "--data", str(manifest), "--out", str(out), "--json", "--device", "cpu",
                 "--tasks", "count, classify"]) == 0
    report = json.loads(capsys.readouterr().out)
    preds = [json.loads(s) for s in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == wanted and report["rows"] == len(wanted)
    assert set(report["metrics"]) == {"count", "classify"} and report["tasks"] == ["count", "classify"]
    assert main(["eval", "tiny", "--data", str(manifest), "--out", str(tmp_path / "c1"), "--json", "--device", "cpu",
                 "--tasks", "count", "--limit", "1"]) == 0
    capsys.readouterr()
    first = json.loads((tmp_path / "c1" / "predictions.jsonl").read_text())
    assert first["id"] == next(r["id"] for r in rows if r["task"] == "count")  # the first count row, wherever it lies
    only_count = ds / "only-count.jsonl"
    only_count.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "count"))
    for data, tasks, words in ((manifest, "grid", ["--tasks", "'grid'", "count, locate"]),
                               (only_count, "detect", ["only-count.jsonl", "no row of task detect"])):
        assert main(["eval", "tiny", "--data", str(data), "--out", str(tmp_path / "bad"), "--tasks", tasks]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
