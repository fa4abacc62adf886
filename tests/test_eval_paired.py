"""The paired comparison of two eval runs on hand-made rows whose answers are known."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fusar_edge.errors import InputError
from fusar_edge.evaluate.metrics import score
from fusar_edge.evaluate.paired import compare, read_predictions, sign_test_p

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_evals.py"


def row(i, task, question, gt, text):
    return {"id": f"r{i}", "coordinate_size": 224, "question": question, "task": task, "gt": gt,
            "prediction_text": text, "detections": None, "parse_error": None}


def runs():
    """A counts ships better, B aircraft; B also classifies and locates better; one detect row each."""
    a, b = [], []
    truth = [("Count the ships in this image.", "3")] * 6 + [("How many aircraft are there?", "2")] * 4
    answers_a = ["3", "3", "3", "3", "3", "2", "1", "1", "2", "1"]  # ships 5/6, aircraft 1/4
    answers_b = ["3", "3", "2", "2", "4", "2", "2", "2", "2", "oops"]  # ships 2/6, aircraft 3/4 (one unparsed: wrong)
    for i, ((q, gt), x, y) in enumerate(zip(truth, answers_a, answers_b)):
        a.append(row(i, "count", q, gt, x))
        b.append(row(i, "count", q, gt, y))
    a.append(row(20, "classify", "Classify the target at [1, 2, 3, 4].", "ship", "rock"))
    b.append(row(20, "classify", "Classify the target at [1, 2, 3, 4].", "ship", " Ship "))
    a.append(row(21, "locate", "Where is the ship?", "top-left", "bottom-right"))
    b.append(row(21, "locate", "Where is the ship?", "top-left", "top-left"))
    box = '[{"bbox_2d": [1, 1, 9, 9], "label": "ship"}]'
    a.append(row(22, "detect", "Detect ship.", box, box))
    b.append(row(22, "detect", "Detect ship.", box, "None"))
    return a, b


def test_compare_counts_the_rows_only_one_run_gets_right_per_task_and_class():
    a, b = runs()
    result = compare(a, list(reversed(b)))  # paired by id, not by order
    assert result["count"] == {"n": 10, "a": 0.6, "b": 0.5, "only_a": 3, "only_b": 2, "p": pytest.approx(1.0)}
    assert result["count: ship"]["only_a"] == 3 and result["count: ship"]["only_b"] == 0
    assert result["count: aircraft"]["a"] == 0.25 and result["count: aircraft"]["b"] == 0.75
    assert result["count: aircraft"]["only_b"] == 2 and result["count: aircraft"]["only_a"] == 0
    assert result["classify"]["only_b"] == 1 and result["locate"]["only_b"] == 1
    assert "detect" not in result  # scored over all rows, not per row
    # the per-row verdicts add up to the scores eval reports
    for run, key in ((a, "a"), (b, "b")):
        m = score(run)
        assert result["count"][key] == pytest.approx(m["count"]["exact"])
        assert result["classify"][key] == pytest.approx(m["classify"]["exact"])
        assert result["locate"][key] == pytest.approx(m["locate"]["top1"])


def test_sign_test_p_is_the_exact_two_sided_binomial():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 5) == 1.0
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    # 367 vs 327 of the demo's validation rows: not significant; 148 vs 57: decisively
    assert 0.1 < sign_test_p(327, 367) < 0.2 and sign_test_p(57, 148) < 1e-9
    z = (367 - 327) / math.sqrt(694)  # the normal approximation agrees
    assert sign_test_p(327, 367) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)


def test_compare_refuses_runs_on_different_rows():
    a, b = runs()
    with pytest.raises(InputError, match=r"not the same rows \(1 ids only in A"):
        compare(a, b[1:])
    b[0]["gt"] = "7"
    with pytest.raises(InputError, match="another ground truth"):
        compare(a, b)
    with pytest.raises(InputError, match="appears twice"):
        compare(a + a[:1], b)


def test_read_predictions_names_the_file_and_line(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_predictions(tmp_path)
    (tmp_path / "predictions.jsonl").write_text('{"id": "r0", "question": "q", "gt": "1"}\n\n{"id": 1\n')
    with pytest.raises(InputError, match=r"predictions.jsonl:3: not a JSON row"):
        read_predictions(tmp_path)
    (tmp_path / "predictions.jsonl").write_text('{"id": "r0", "question": "q"}\n')
    with pytest.raises(InputError, match=r"predictions.jsonl:1: expected a prediction row with id, question and gt"):
        read_predictions(tmp_path / "predictions.jsonl")


def test_compare_evals_script_prints_the_table_and_refuses_bad_input_with_exit_2(tmp_path):
    a, b = runs()
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "b"),
                           "--names", "old", "new"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| count | 10 | 0.600 | 0.500 | 3 | 2 | 1 |" in proc.stdout
    assert "right only in new" in proc.stdout.splitlines()[0]
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "a"), str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr
