"""The paper's metrics on hand-made prediction rows whose answers are known."""


import pytest

from fusar_edge.evaluate.metrics import gt_boxes, headline, iou, match, prf, score


def row(task, gt, text, **extra):
    return {"id": extra.pop("id", 0), "coordinate_size": 504, "question": "q", "task": task, "gt": gt,
            "prediction_text": text, "detections": extra.pop("detections", None),
            "parse_error": extra.pop("parse_error", None), **extra}


def test_count_exact_and_mae_with_a_parse_error():
    rows = [row("count", "3", "3"), row("count", 2, "There are 4 ships."), row("count", "0", "None"),
            row("count", "5", "I cannot tell")]  # the last one does not parse
    m = score(rows)["count"]
    assert m["n"] == 4 and m["unparsed"] == 1
    assert m["exact"] == pytest.approx(2 / 4)  # 3 == 3, 0 == 0; the unparsed row is wrong
    assert m["mae"] == pytest.approx((0 + 2 + 0) / 3)


def test_count_answers_by_true_count():
    """The confusion rows: a model that answers 5 for 4 and 6 shows it."""
    from fusar_edge.evaluate.report import count_answers_table

    rows = [row("count", "4", "5"), row("count", "4", "5"), row("count", "4", "4"), row("count", "6", "5"),
            row("count", "0", "0"), row("count", "6", "I cannot tell")]
    m = score(rows)["count"]
    assert m["by_truth"] == {
        "0": {"n": 1, "exact": 1.0, "answers": {"0": 1}},
        "4": {"n": 3, "exact": pytest.approx(1 / 3), "answers": {"4": 1, "5": 2}},
        "6": {"n": 2, "exact": 0.0, "answers": {"5": 1, "unparsed": 1}},
    }
    assert list(m["by_truth"]["6"]["answers"]) == ["5", "unparsed"]  # counts first, parse errors last
    table = count_answers_table({"metrics": {"count": m}}).splitlines()
    assert table[0] == "| true count | rows | exact | answered 0 | answered 4 | answered 5 | answered unparsed |"
    assert table[3] == "| 4 | 3 | 0.333 |  | 1 | 2 |  |" and table[4] == "| 6 | 2 | 0.000 |  |  | 1 | 1 |"
    assert count_answers_table({"metrics": {"classify": {"n": 1}}}) == ""


def test_count_by_counted_class():
    """Each class the questions name scored on its own: ships right, aircraft guessed."""
    from fusar_edge.evaluate.report import count_labels_table

    rows = [row("count", "3", "3", question="How many ships are in the image?"),
            row("count", "0", "0", question="Count the ships in this image."),
            row("count", "1", "2", question="How many aircraft are there in this image?"),
            row("count", "3", "2", question="What is the number of aircraft in this SAR image?"),
            row("count", "2", "2", question="Count the aircraft in this image."),
            row("count", "2", "I cannot tell", question="How many oil tanks are in the image?"),
            row("count", "4", "4", question="What do you see?")]  # names no class
    m = score(rows)["count"]
    assert m["by_label"] == {
        "aircraft": {"n": 3, "exact": pytest.approx(1 / 3), "mae": pytest.approx(2 / 3), "unparsed": 0},
        "oil tank": {"n": 1, "exact": 0.0, "mae": None, "unparsed": 1},
        "other": {"n": 1, "exact": 1.0, "mae": 0.0, "unparsed": 0},
        "ship": {"n": 2, "exact": 1.0, "mae": 0.0, "unparsed": 0},
    }
    assert m["exact"] == pytest.approx(4 / 7) and m["unparsed"] == 1  # the whole is unchanged by the split
    table = count_labels_table({"metrics": {"count": m}}).splitlines()
    assert table[2] == "| aircraft | 3 | 0.333 | 0.667 |" and table[3] == "| oil tank | 1 | 0.000 | — |"
    # questions that name no class: no per-class split at all
    assert "by_label" not in score([row("count", "1", "1")])["count"]
    assert count_labels_table({"metrics": {"count": score([row("count", "1", "1")])["count"]}}) == ""


def test_classify_and_locate():
    rows = [row("classify", "Ship", "ship"), row("classify", "oil tank", "It is an Oil Tank."),
            row("classify", "aircraft", "ship")]
    assert score(rows)["classify"]["exact"] == pytest.approx(2 / 3)
    rows = [row("locate", "top-left", "top-left"), row("locate", "center", '[{"bbox_2d": [200, 200, 300, 300]}]'),
            row("locate", "bottom", "top"), row("locate", "right", "None"), row("locate", "left", "???")]
    assert score(rows)["locate"]["top1"] == pytest.approx(2 / 5)


def test_iou_and_greedy_one_to_one_matching():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou([5, 5, 5, 9], [0, 0, 10, 10]) == 0.0  # no area
    gts = [{"bbox_2d": [0, 0, 10, 10], "label": "ship"}]
    # two predictions on one ship: one true positive, not two
    preds = [{"bbox_2d": [0, 0, 10, 10], "label": "ship"}, {"bbox_2d": [1, 0, 10, 10], "label": "ship"}]
    assert match(preds, gts, 0.5) == 1
    # greedy by decreasing IoU: the best pair is taken first even if listed second
    gts2 = gts + [{"bbox_2d": [4, 0, 14, 10], "label": "ship"}]
    preds2 = [{"bbox_2d": [2, 0, 12, 10], "label": "ship"}, {"bbox_2d": [0, 0, 10, 10], "label": "ship"}]
    assert match(preds2, gts2, 0.5) == 2
    assert match([{"bbox_2d": [0, 0, 10, 10], "label": "aircraft"}], gts, 0.5) == 0  # labels must agree
    assert match([{"bbox_2d": [0, 0, 10, 10], "label": " Ship"}], gts, 0.5) == 1


def test_detection_micro_prf_with_parse_error_empty_list_and_box_outside_the_chip():
    gt_edge = [{"bbox_2d": [-35, 134, 95, 246], "label": "ship"}]  # the reference's own out-of-chip box
    rows = [
        # the model prints the out-of-chip box as the ground truth has it: a match on raw values
        row("detect", gt_edge, '[{"bbox_2d": [-35, 134, 95, 246], "label": "ship"}]'),
        # a parse error: no predictions, the ground truth box is a false negative
        row("detect", [{"bbox_2d": [10, 10, 50, 50], "label": "ship"}], '[{"bbox_2d": [1, 2', parse_error="bad"),
        # "None" on an empty scene: nothing to find, nothing found
        row("detect", "None", "None"),
        # a false positive on an empty scene, and a loose box (IoU 0.36) on another
        row("detect", [], '[{"bbox_2d": [0, 0, 20, 20], "label": "ship"}]'),
        row("detect", [{"bbox_2d": [100, 100, 200, 200], "label": "ship"}],
            '[{"bbox_2d": [120, 120, 220, 220], "label": "ship"}]'),
    ]
    m = score(rows)["detect"]
    assert m["predicted"] == 3 and m["ground_truth"] == 3 and m["parse_errors"] == 1
    assert m["iou0.5"]["tp"] == 1 and m["iou0.25"]["tp"] == 2
    assert m["iou0.5"]["precision"] == pytest.approx(1 / 3) and m["iou0.5"]["recall"] == pytest.approx(1 / 3)
    assert m["iou0.25"]["f1"] == pytest.approx(2 / 3)
    # clipping the ground truth to the chip would lose the first match (IoU of clipped vs raw < 1)
    clipped = [{"bbox_2d": [0, 134, 95, 246], "label": "ship"}]
    assert match([{"bbox_2d": [-35, 134, 95, 246], "label": "ship"}], clipped, 0.8) == 0


def test_prf_edge_cases():
    # nothing to find and nothing found: nothing to measure (not a perfect score)
    assert prf(0, 0, 0) == {"precision": None, "recall": None, "f1": None}
    assert prf(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert prf(0, 2, 0)["precision"] == 0.0 and prf(0, 2, 0)["recall"] == 1.0


def test_ground_truth_forms_and_groups():
    assert gt_boxes("None") == [] and gt_boxes(None) == []
    assert gt_boxes('[{"bbox_2d": [1, 2, 3, 4], "label": "ship"}]')[0]["label"] == "ship"
    with pytest.raises(ValueError):
        gt_boxes("[1, 2, 3]")
    rows = [row("count", "2", "2", group="distractors"), row("count", "1", "3", group="clean"),
            row("count", "1", "1", group="clean")]
    m = score(rows)["count"]
    assert m["exact"] == pytest.approx(2 / 3)
    assert m["groups"]["distractors"]["exact"] == 1.0 and m["groups"]["clean"]["exact"] == 0.5
    assert headline(score(rows)) == {"count": pytest.approx(2 / 3)}
    assert score([row("count", "1", "unclear")])["count"]["mae"] is None  # null in JSON, not NaN


def test_every_detection_answer_unparsed_on_empty_scenes_is_not_a_perfect_score():
    rows = [row("detect", "None", '[{"bbox_2d": [1, 2', parse_error="bad") for _ in range(4)]
    m = score(rows)
    assert m["detect"]["parse_errors"] == 4 and m["detect"]["iou0.5"]["f1"] is None
    assert "detect" not in headline(m)
