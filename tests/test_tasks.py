"""Tests for fusar_edge.tasks: task inference, labels, prompts and answer parsers."""

from __future__ import annotations

import json
import random

import pytest

from fusar_edge.errors import InputError
from fusar_edge.tasks import (
    DETECT_PROMPT,
    GRID_CELLS,
    PROMPT_TEMPLATES,
    TASKS,
    ParsedAnswer,
    build_prompt,
    extract_label,
    infer_task,
    parse_answer,
    singularize,
)

# Typed independently of the module: the FUSAR-GPT reference detection prompt.
REFERENCE_DETECT = (
    "This is a SAR image. Please carefully check the image and detect the following object: "
    "ship. Output each detected target\u2019s bbox coordinates in JSON format. The format of "
    "the bbox coordinates is:  '''json [ {  \"bbox_2d\": [x1, y1, x2, y2], \"label\": "
    "\"category name\" }, {  \"bbox_2d\": [x1, y1, x2, y2], \"label\": \"category name\" } ]"
    "  '''  If there are no such targets in the image, simply respond with None."
)

# Original image 600 high x 1000 wide, model chip 500: x scales by 2, y by 1.2.
GEO = {"chip_size": 500, "image_size": (600, 1000)}
# The real FUSAR-GPT chip size on the same image.
GEO504 = {"chip_size": 504, "image_size": (600, 1000)}


def det(text, label=None, geo=GEO):
    return parse_answer("detect", text, label=label, **geo)


# ----------------------------------------------------------------------------- inference

def test_tasks_constant():
    assert TASKS == ("count", "locate", "classify", "detect", "caption")


@pytest.mark.parametrize("question, task", [
    ("How many ships are there?", "count"),
    ("how many aircraft can you see", "count"),
    ("HOW MANY VEHICLES ARE PARKED?", "count"),
    ("Count the ships in the harbor.", "count"),
    ("Please count all vessels", "count"),
    ("What is the number of oil tanks?", "count"),
    ("Detect the aircraft.", "detect"),
    ("detect all ships", "detect"),
    ("Find all planes in the image", "detect"),
    ("Give the bbox of every ship", "detect"),
    ("Output bounding boxes for the bridges", "detect"),
    ("Detection of vehicles in this scene", "detect"),
    (REFERENCE_DETECT, "detect"),
    ("Where is the ship?", "locate"),
    ("where are the aircraft", "locate"),
    ("Locate the bridge.", "locate"),
    ("Which part of the image contains the harbor?", "locate"),
    ("What is the location of the tank?", "locate"),
    ("Where is the ship? Give its bbox.", "locate"),
    ("What type of ship is this?", "classify"),
    ("What kind of target is shown?", "classify"),
    ("What class does this object belong to?", "classify"),
    ("Classify the target.", "classify"),
    ("What is this?", "classify"),
    ("Identify the type of vessel.", "classify"),
    ("Describe the image.", "caption"),
    ("What is in the image?", "caption"),
    ("Is there a port?", "caption"),
    ("", "caption"),
    # first rule in the table wins
    ("Detect and count the ships", "count"),
    ("Where can I find how many ships there are?", "count"),
])
def test_infer_task(question, task):
    assert infer_task(question) == task


@pytest.mark.parametrize("task, question", [
    ("count", "How many ships are there?"),
    ("locate", "Where is the ship?"),
    ("locate", "Which part of the image contains the bridge?"),
    ("classify", "What type of ship is this?"),
    ("detect", "Detect the aircraft"),
    ("caption", "Describe the image."),
])
def test_built_prompt_infers_back_to_its_task(task, question):
    assert infer_task(question) == task
    assert infer_task(build_prompt(task, question)) == task


def test_infer_task_rejects_non_string():
    with pytest.raises(InputError, match="question"):
        infer_task(None)


# ----------------------------------------------------------------------------- labels

@pytest.mark.parametrize("question, label", [
    ("How many ships are there?", "ship"),
    ("detect the aircraft", "aircraft"),
    ("Detect all planes.", "plane"),
    ("Find all the vehicles in this image", "vehicle"),
    ("How many oil tanks are in the port?", "oil tank"),
    ("Count the buses", "bus"),
    ("How many ferries are docked?", "ferry"),
    ("How many of the boxes are visible?", "box"),
    ("how many people", "person"),
    ("What is the number of bridges in the scene?", "bridge"),
    ("Where is the harbor?", "harbor"),
    ("Locate the ship.", "ship"),
    ("Which part of the image contains the airport?", "airport"),
    ("What type of ship is this?", "ship"),
    ("Detection of vehicles in this scene", "vehicle"),
    (REFERENCE_DETECT, "ship"),
    ("What is this?", None),
    ("Describe the image.", None),
    ("How many?", None),
    ("Count them.", None),
    ("What kind of target is shown?", None),
    ("Classify this object.", None),
])
def test_extract_label(question, label):
    assert extract_label(question) == label


@pytest.mark.parametrize("word, singular", [
    ("ships", "ship"), ("planes", "plane"), ("aircraft", "aircraft"), ("aircrafts", "aircraft"),
    ("vehicles", "vehicle"), ("facilities", "facility"), ("churches", "church"),
    ("boxes", "box"), ("people", "person"), ("wharves", "wharf"), ("bus", "bus"),
    ("gas", "gas"), ("ship", "ship"), ("glass", "glass"), ("Ships", "ship"),
])
def test_singularize(word, singular):
    assert singularize(word) == singular


# ----------------------------------------------------------------------------- prompts

def test_detect_prompt_matches_reference_byte_for_byte():
    prompt = build_prompt("detect", "How many ships... no: detect the ships")
    assert prompt == REFERENCE_DETECT
    assert prompt.encode("utf-8") == REFERENCE_DETECT.encode("utf-8")
    assert "target\u2019s" in prompt and "target's" not in prompt
    assert prompt.count("  ") == 5
    assert DETECT_PROMPT.replace("{label}", "ship") == REFERENCE_DETECT
    assert PROMPT_TEMPLATES["detect"] == DETECT_PROMPT


def test_detect_prompt_label_fallbacks():
    assert "following object: target." in build_prompt("detect", "Detect everything")
    assert "following object: tank." in build_prompt("detect", "Detect ships", label="tank")
    assert "following object: aircraft." in build_prompt("detect", "Find all aircraft")


@pytest.mark.parametrize("task", ["count", "locate", "classify", "caption"])
def test_other_prompts_start_with_sar_prefix_and_keep_question(task):
    p = build_prompt(task, "  Where is the ship?  ")
    assert p.startswith("This is a SAR image. Where is the ship?")


def test_prompt_answer_forms():
    assert build_prompt("caption", "Describe it.") == "This is a SAR image. Describe it."
    assert "single integer" in build_prompt("count", "How many ships?")
    loc = build_prompt("locate", "Where is the ship?")
    assert "top-left" in loc and "bottom-right" in loc and "bbox_2d" in loc and "3x3" in loc
    assert "single category name" in build_prompt("classify", "What type is it?")


def test_prompt_passthrough_unchanged():
    q = "This is a SAR image. How many {label} ships?  "
    for task in TASKS:
        assert build_prompt(task, q) is q


def test_prompt_template_override_and_literal_braces():
    tpl = {"count": "CUSTOM {question} / {label} / {other} {"}
    assert build_prompt("count", "How many ships?", templates=tpl) == \
        "CUSTOM How many ships? / ship / {other} {"
    # overrides only what is given
    assert build_prompt("detect", "detect ships", templates=tpl) == REFERENCE_DETECT
    # braces in the question are not template syntax
    assert build_prompt("caption", "What is {label}?") == "This is a SAR image. What is {label}?"


def test_prompt_bad_input():
    with pytest.raises(InputError, match="'segment'"):
        build_prompt("segment", "Segment the ship")
    with pytest.raises(InputError, match="'count2'"):
        build_prompt("count", "How many?", templates={"count2": "x"})
    with pytest.raises(InputError, match="template 'count'"):
        build_prompt("count", "How many?", templates={"count": 3})


# ----------------------------------------------------------------------------- detect

def test_detect_maps_to_original_pixels_non_square():
    r = det('[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]')
    # x * 1000 / 500, y * 600 / 500
    assert r.value == [{"bbox_2d": [200.0, 60.0, 500.0, 480.0], "bbox_chip": [100, 50, 250, 400], "label": "ship"}]
    assert r.parse_error is None and r.flags == []


def test_detect_rounding_at_504():
    r = det('[{"bbox_2d": [10, 20, 30, 41], "label": "ship"}]', geo=GEO504)
    # 10*1000/504=19.841.., 20*600/504=23.809.., 30*1000/504=59.523.., 41*600/504=48.809..
    assert r.value == [{"bbox_2d": [19.84, 23.81, 59.52, 48.81], "bbox_chip": [10, 20, 30, 41], "label": "ship"}]


@pytest.mark.parametrize("text", [
    '```json\n[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]\n```',
    '```JSON\n[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]\n```',
    "'''json [ {  \"bbox_2d\": [100, 50, 250, 400], \"label\": \"ship\" } ]  '''",
    '```\n[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]\n```',
    'Sure! Here are the results:\n[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]\n'
    'Let me know if you need more.',
    'I found one target [see below]: {"bbox_2d": [100, 50, 250, 400], "label": "ship"}.',
    '{"bbox_2d": [100, 50, 250, 400], "label": "ship"}',
    '<answer>```json\n[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]\n```</answer>',
    '[{"bbox_2d": [100, 50, 250, 400], "label": "ship"}]<|im_end|>',
    '```json\n[{"bbox_2d": [100, 50, 250, 400], "label": "  ship "}]',  # unterminated fence
])
def test_detect_accepts_wrappings(text):
    r = det(text)
    assert r.parse_error is None, r.parse_error
    assert r.value == [{"bbox_2d": [200.0, 60.0, 500.0, 480.0], "bbox_chip": [100, 50, 250, 400], "label": "ship"}]


def test_detect_several_objects_not_in_a_list():
    r = det('{"bbox_2d": [0, 0, 10, 10], "label": "ship"},\n{"bbox_2d": [20, 20, 30, 30], '
            '"label": "tank"}')
    assert r.value == [{"bbox_2d": [0.0, 0.0, 20.0, 12.0], "bbox_chip": [0, 0, 10, 10], "label": "ship"},
                       {"bbox_2d": [40.0, 24.0, 60.0, 36.0], "bbox_chip": [20, 20, 30, 30], "label": "tank"}]


def test_detect_lenient_trailing_comma_and_python_literals():
    r = det('[{"bbox_2d": [0, 0, 10, 10], "label": "ship"},]')
    assert r.value == [{"bbox_2d": [0.0, 0.0, 20.0, 12.0], "bbox_chip": [0, 0, 10, 10], "label": "ship"}]
    assert r.flags == ["lenient_json"]
    r = det("[{'bbox_2d': [0, 0, 10, 10], 'label': 'ship'}]")
    assert r.value == [{"bbox_2d": [0.0, 0.0, 20.0, 12.0], "bbox_chip": [0, 0, 10, 10], "label": "ship"}]
    assert r.flags == ["lenient_json"]


@pytest.mark.parametrize("text", [
    "None", "None.", "none", "null", "[]", "```json\n[]\n```", "'''json None '''", "```json\n```",
    "None of the requested targets are present.", "There are no such targets in the image.",
    '```json\nnull\n```',
])
def test_detect_none_answers(text):
    r = det(text)
    assert r.value == [] and r.parse_error is None and r.flags == []


def test_detect_negative_coordinates_clipped_real_output():
    # A real FUSAR-GPT output shape, at the real chip size.
    r = det('[{"bbox_2d": [-35, 134, 95, 246], "label": "ship"}]', geo=GEO504)
    # x1 -> 0; 95*1000/504 = 188.492; 134*600/504 = 159.524; 246*600/504 = 292.857; the raw box survives
    assert r.value == [{"bbox_2d": [0.0, 159.52, 188.49, 292.86], "bbox_chip": [-35, 134, 95, 246],
                        "label": "ship", "clipped": True}]
    assert r.flags == ["clipped_boxes"]
    assert r.parse_error is None


def test_detect_out_of_range_clipped_only_that_box():
    r = det('[{"bbox_2d": [400, -10, 600, 100], "label": "ship"}, '
            '{"bbox_2d": [10, 10, 20, 20], "label": "ship"}]')
    assert r.value == [
        {"bbox_2d": [800.0, 0.0, 1000.0, 120.0], "bbox_chip": [400, -10, 600, 100], "label": "ship", "clipped": True},
        {"bbox_2d": [20.0, 12.0, 40.0, 24.0], "bbox_chip": [10, 10, 20, 20], "label": "ship"},
    ]
    assert r.flags == ["clipped_boxes"]


def test_detect_degenerate_boxes_flagged_not_dropped():
    r = det('[{"bbox_2d": [50, 50, 50, 80], "label": "a"}, '   # zero width
            '{"bbox_2d": [60, 90, 70, 10], "label": "b"}, '    # y1 > y2
            '{"bbox_2d": [-40, 10, -5, 30], "label": "c"}, '   # entirely left of the chip
            '{"bbox_2d": [1, 2, 3, 4.5], "label": "d"}]')
    assert [d["bbox_chip"] for d in r.value] == [[50, 50, 50, 80], [60, 90, 70, 10], [-40, 10, -5, 30], [1, 2, 3, 4.5]]
    assert [d.get("degenerate", False) for d in r.value] == [True, True, True, False]
    assert r.value[2] == {"bbox_2d": [0.0, 12.0, 0.0, 36.0], "bbox_chip": [-40, 10, -5, 30], "label": "c",
                          "clipped": True, "degenerate": True}
    assert r.value[3] == {"bbox_2d": [2.0, 2.4, 6.0, 5.4], "bbox_chip": [1, 2, 3, 4.5], "label": "d"}
    assert r.flags == ["degenerate_boxes", "clipped_boxes"]
    assert r.parse_error is None


def test_detect_reference_ground_truth_boxes_survive_raw():
    """Boxes of the reference's examples/detection.jsonl, outside [0, 504], come back unchanged."""
    text = '[{"bbox_2d": [-35, 134, 95, 246], "label": "ship"}, {"bbox_2d": [408, 365, 509, 473], "label": "ship"}]'
    r = det(text, geo=GEO504)
    assert [d["bbox_chip"] for d in r.value] == [[-35, 134, 95, 246], [408, 365, 509, 473]]
    assert all(isinstance(v, int) for d in r.value for v in d["bbox_chip"])
    assert all(d["clipped"] for d in r.value) and not any("degenerate" in d for d in r.value)


def test_detect_label_fallback_and_missing_label():
    text = '[{"bbox_2d": [0, 0, 10, 10]}]'
    r = det(text, label="ship")
    assert r.value == [{"bbox_2d": [0.0, 0.0, 20.0, 12.0], "bbox_chip": [0, 0, 10, 10], "label": "ship"}]
    r = det(text)
    assert r.value is None and r.parse_error == "detect answer: detection 0 has no label"


@pytest.mark.parametrize("text, error", [
    ('[{"bbox_2d": [1, 2, 3', "malformed JSON"),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "ship"', "malformed JSON"),
    ('[{"bbox_2d": [1, 2, 3, 4] "label": "ship"}]', "malformed JSON"),
    ("There is a ship near the coast.", "no JSON list or object found"),
    ('[{"bbox_2d": ["a", 2, 3, 4], "label": "ship"}]', "non-numeric coordinates"),
    ('[{"bbox_2d": [1, 2, NaN, 4], "label": "ship"}]', "non-numeric coordinates"),
    ('[{"bbox_2d": [true, 2, 3, 4], "label": "ship"}]', "non-numeric coordinates"),
    ('[{"bbox_2d": [1, 2, 3], "label": "ship"}]', "must be 4 numbers"),
    ('[{"label": "ship"}]', "has no bbox_2d"),
    ('[{"bbox_2d": [1, 2, 3, 4], "label": "ship"}, 7]', "detection 1 is not a JSON object"),
    ('Boxes: [1, 2, 3, 4] and [5, 6, 7, 8]', "no JSON list of boxes found"),
])
def test_detect_malformed(text, error):
    r = det(text)
    assert r.value is None
    assert r.parse_error is not None and error in r.parse_error
    assert r.parse_error.startswith("detect answer: ")


def test_detect_truncated_output_is_named():
    r = det('```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "ship"}, {"bbox_2d": [5,')
    assert r.value is None
    assert "cut off" in r.parse_error


# ----------------------------------------------------------------------------- count

@pytest.mark.parametrize("text, value", [
    ("3", 3), ("There are 12 ships in the image.", 12), ("three", 3),
    ("I can see Seven ships.", 7), ("twenty", 20), ("zero", 0), ("There is one ship.", 1),
    ("None", 0), ("None.", 0), ("No ships are visible.", 0), ("There are no targets.", 0),
    ("nothing", 0), ("Answer: 4 aircraft, 2 of them large", 4), ("0", 0),
    ("There are eleven ships and 3 boats.", 11),
])
def test_count(text, value):
    r = parse_answer("count", text, **GEO)
    assert r.value == value and r.parse_error is None


@pytest.mark.parametrize("text", ["many ships", "I cannot tell.", "No."])
def test_count_unparseable(text):
    r = parse_answer("count", text, **GEO)
    assert r.value is None and r.parse_error.startswith("count answer: no number found")


def test_count_from_boxes():
    r = parse_answer("count", '```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "ship"}, '
                     '{"bbox_2d": [50, 60, 70, 80], "label": "ship"}]\n```', **GEO)
    assert r.value == 2 and r.flags == ["count_from_boxes"]


# ----------------------------------------------------------------------------- locate

def _cell(name):
    for row, names in enumerate(GRID_CELLS):
        if name in names:
            return {"cell": name, "row": row, "col": names.index(name), "bbox_2d": None, "bbox_chip": None}
    raise AssertionError(name)


@pytest.mark.parametrize("text, cell", [
    ("top-left", "top-left"), ("The ship is in the upper left corner.", "top-left"),
    ("top left corner", "top-left"), ("Top Right", "top-right"), ("lower right", "bottom-right"),
    ("bottom-left", "bottom-left"), ("at the bottom of the image", "bottom"),
    ("upper part", "top"), ("middle", "center"), ("centre", "center"),
    ("In the center of the image.", "center"), ("on the left side", "left"),
    ("right", "right"), ("center-left", "left"), ("top center", "top"),
    ("lower middle", "bottom"),
])
def test_locate_words(text, cell):
    r = parse_answer("locate", text, **GEO)
    assert r.value == _cell(cell) and r.parse_error is None and r.flags == []


@pytest.mark.parametrize("text, cell, row, col, bbox", [
    # chip 500: thirds at 166.67 / 333.33; centre (35, 60) -> row 0, col 0
    ('{"bbox_2d": [10, 20, 60, 100], "label": "ship"}', "top-left", 0, 0,
     [20.0, 24.0, 120.0, 120.0]),
    ("[400, 400, 500, 500]", "bottom-right", 2, 2, [800.0, 480.0, 1000.0, 600.0]),
    ("The ship is at (200, 10, 300, 100).", "top", 0, 1, [400.0, 12.0, 600.0, 120.0]),
    ('```json\n[{"bbox_2d": [200, 200, 300, 300], "label": "ship"}]\n```', "center", 1, 1,
     [400.0, 240.0, 600.0, 360.0]),
    ("(10,200),(100,300)", "left", 1, 0, [20.0, 240.0, 200.0, 360.0]),
])
def test_locate_box(text, cell, row, col, bbox):
    r = parse_answer("locate", text, **GEO)
    assert {k: v for k, v in r.value.items() if k != "bbox_chip"} == {"cell": cell, "row": row, "col": col,
                                                                        "bbox_2d": bbox}
    # the raw chip box maps to bbox_2d (x * 1000 / 500, y * 600 / 500)
    assert r.value["bbox_chip"] == [v * 500 / 1000 if i % 2 == 0 else v * 500 / 600 for i, v in enumerate(bbox)]
    assert r.parse_error is None


def test_locate_box_clipped_and_flags():
    r = parse_answer("locate", "[-20, 420, 100, 560] bottom-left", **GEO)
    # clipped to [0, 420, 100, 500]; centre (50, 460) -> bottom-left
    assert r.value == {"cell": "bottom-left", "row": 2, "col": 0,
                       "bbox_2d": [0.0, 504.0, 200.0, 600.0], "bbox_chip": [-20, 420, 100, 560]}
    assert r.flags == ["clipped_boxes"]
    r = parse_answer("locate", "[400, 10, 490, 60] in the lower left", **GEO)
    assert r.value["cell"] == "top-right"  # the box wins over words
    assert r.flags == ["cell_words_disagree"]
    r = parse_answer("locate", '[{"bbox_2d": [1, 1, 9, 9]}, {"bbox_2d": [400, 400, 450, 450]}]',
                     **GEO)
    assert r.value["cell"] == "top-left" and r.flags == ["multiple_boxes"]


def test_locate_degenerate_box_falls_back_to_words():
    r = parse_answer("locate", "[50, 50, 50, 50], near the top right", **GEO)
    assert r.value == {**_cell("top-right"), "bbox_chip": [50, 50, 50, 50]}
    assert r.flags == ["degenerate_boxes"]


def test_locate_none_and_unparseable():
    r = parse_answer("locate", "None", **GEO)
    assert r.value is None and r.parse_error is None and r.flags == ["no_target"]
    r = parse_answer("locate", "Near the pier.", **GEO)
    assert r.value is None and r.parse_error.startswith("locate answer: no grid cell")
    r = parse_answer("locate", '{"bbox_2d": ["x", 1, 2, 3]}', **GEO)
    assert r.value is None and "non-numeric" in r.parse_error


# ----------------------------------------------------------------------------- classify

@pytest.mark.parametrize("text, value", [
    ("It is a ship.", "ship"), ("Ship", "ship"), ("  an Aircraft!  ", "aircraft"),
    ("This is a SAR image of a cargo ship.", "cargo ship"), ("The target is a tanker.", "tanker"),
    ("**Oil tank**", "oil tank"), ("Category: Bridge", "bridge"), ('"vessel"', "vessel"),
    ("It's probably a fishing boat, moored at the pier.", "fishing boat"),
    ("Tanker\nIt is long and narrow.", "tanker"), ("this looks like an airplane", "airplane"),
])
def test_classify(text, value):
    r = parse_answer("classify", text, **GEO)
    assert r.value == value and r.parse_error is None


def test_classify_nothing_left():
    r = parse_answer("classify", "It is a ...", **GEO)
    assert r.value is None and r.parse_error.startswith("classify answer:")


# ----------------------------------------------------------------------------- common

def test_caption_and_empty():
    assert parse_answer("caption", "  A port with ships.\n", **GEO).value == "A port with ships."
    for task in TASKS:
        r = parse_answer(task, "   \n", **GEO)
        assert r.value is None and r.parse_error == f"{task} answer: empty answer"


def test_parse_answer_bad_caller_input():
    with pytest.raises(InputError, match="'segment'"):
        parse_answer("segment", "x", **GEO)
    with pytest.raises(InputError, match="chip_size"):
        parse_answer("count", "3", chip_size=0, image_size=(10, 10))
    with pytest.raises(InputError, match="image_size"):
        parse_answer("count", "3", chip_size=504, image_size=(10,))
    with pytest.raises(InputError, match="image_size"):
        parse_answer("count", "3", chip_size=504, image_size=(10, -1))
    with pytest.raises(InputError, match="text"):
        parse_answer("count", None, **GEO)


def test_to_json_plain():
    r = det('[{"bbox_2d": [-5, 0, 10, 10], "label": "ship"}]')
    j = r.to_json()
    assert j == {"value": [{"bbox_2d": [0.0, 0.0, 20.0, 12.0], "bbox_chip": [-5, 0, 10, 10], "label": "ship",
                            "clipped": True}],
                 "parse_error": None, "flags": ["clipped_boxes"]}
    assert json.loads(json.dumps(j)) == j
    assert ParsedAnswer(None, "bad").to_json() == {"value": None, "parse_error": "bad", "flags": []}
    assert ParsedAnswer((1, 2)).to_json()["value"] == [1, 2]


def test_parse_answer_never_raises_on_garbage():
    pieces = ['[', ']', '{', '}', '"bbox_2d"', ':', ',', '-3', '600', '1e999', 'None', 'null',
              '```json', "'''", '"label"', '"ship"', 'top', 'left', 'three', '\n', ' ', 'NaN',
              '[[[[', '}}}}', '"', "'", '<|im_end|>', 'true']
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        for task in TASKS:
            r = parse_answer(task, text, **GEO504)
            assert "parser_exception" not in r.flags, (task, text, r.parse_error)
            assert (r.value is None) or r.parse_error is None
            json.dumps(r.to_json())
    deep = "[" * 5000 + "]" * 5000
    for task in TASKS:
        r = parse_answer(task, deep, **GEO504)
        assert "parser_exception" not in r.flags, r.parse_error


# ----------------------------------------------------------------------------- reference prompts

@pytest.mark.parametrize("task", ["count", "locate", "classify", "caption", "detect"])
def test_reference_style_sends_the_question_as_given(task):
    """Imported FUSAR-GPT checkpoints: no template, no label rewriting, `<image>` removed, stripped."""
    q = "  <image>How many ships are moored here? "
    assert build_prompt(task, q, style="reference") == "How many ships are moored here?"
    assert build_prompt(task, "Detect the ships", style="reference") == "Detect the ships"


def test_reference_style_detect_with_a_label_is_the_reference_prompt_byte_for_byte():
    prompt = build_prompt("detect", "anything at all", label="ship", style="reference")
    assert prompt == DETECT_PROMPT.replace("{label}", "ship")
    assert "object: ship. Output each detected target\u2019s bbox" in prompt  # label kept as given
    assert build_prompt("count", "How many ships?", label="ship", style="reference") == "How many ships?"


def test_unknown_prompt_style_is_refused():
    with pytest.raises(InputError, match="prompt style"):
        build_prompt("count", "How many?", style="fancy")


def test_a_count_that_is_not_a_whole_number_is_a_parse_error():
    from fusar_edge import tasks

    for text in ("-2", "2.5", "about 3.5 ships"):
        parsed = tasks.parse_answer("count", text, chip_size=504, image_size=(504, 504))
        assert parsed.value is None and "not a whole number" in parsed.parse_error, text
    assert tasks.parse_answer("count", "There are 3 ships.", chip_size=504, image_size=(504, 504)).value == 3
