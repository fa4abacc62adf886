"""Question tasks: pick the task, build the model prompt, parse the model's answer.

FUSAR-GPT answers five kinds of question about a SAR chip. This module is pure text
handling (no torch), so it is cheap to import and easy to test::

    task = infer_task("How many ships are there?")            # "count"
    prompt = build_prompt(task, "How many ships are there?")    # text sent to the model
    parsed = parse_answer(task, model_text, chip_size=504, image_size=(h, w))
    parsed.value, parsed.parse_error, parsed.flags

Coordinates: the model sees a ``chip_size`` x ``chip_size`` chip and answers boxes in
chip pixels ``[x1, y1, x2, y2]``. Each box is kept exactly as printed in ``bbox_chip``
(negative or > chip_size values included: the reference's own ground truth has them, and
evaluation compares raw values); ``bbox_2d`` is that box clipped to ``[0, chip_size]`` and
mapped to the original image with ``x * width / chip_size`` and ``y * height / chip_size``
(``image_size`` is ``(height, width)``), rounded to 2 decimals. Clipped boxes carry
``clipped: true``, boxes with no area ``degenerate: true``; none is ever dropped.

``parse_answer`` never raises on model text: whatever the model wrote, problems end up in
``ParsedAnswer.parse_error`` (with ``value`` None) or in ``ParsedAnswer.flags``. Only bad
caller input (an unknown task name, a bad ``chip_size``/``image_size``) raises
``InputError``.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError

TASKS = ("count", "locate", "classify", "detect", "caption")

SAR_PREFIX = "This is a SAR image."

# ----------------------------------------------------------------------------------------
# Prompt templates. One dict so a bundle can override any of them (``templates=`` in
# build_prompt). Placeholders: ``{question}`` (the stripped question) and ``{label}`` (the
# object class from extract_label, or DEFAULT_LABEL). Any other brace is literal text: the
# detect template contains JSON braces, so templates are filled by placeholder
# substitution, not str.format.
# ----------------------------------------------------------------------------------------

# The FUSAR-GPT reference detection prompt, byte for byte (typographic apostrophe in
# "target’s", double spaces around the '''json fence). Do not "fix" it.
DETECT_PROMPT = (
    "This is a SAR image. Please carefully check the image and detect the following "
    "object: {label}. Output each detected target\u2019s bbox coordinates in JSON format. "
    "The format of the bbox coordinates is:  '''json [ {  \"bbox_2d\": [x1, y1, x2, y2], "
    "\"label\": \"category name\" }, {  \"bbox_2d\": [x1, y1, x2, y2], \"label\": "
    "\"category name\" } ]  '''  If there are no such targets in the image, simply "
    "respond with None."
)

PROMPT_TEMPLATES: dict[str, str] = {
    "count": (
        "This is a SAR image. {question} Answer with a single integer: the number of "
        "targets in the image (0 if there are none)."
    ),
    "locate": (
        "This is a SAR image. {question} Answer with the cell of a 3x3 grid over the "
        "image that contains the target, one of: top-left, top, top-right, left, center, "
        "right, bottom-left, bottom, bottom-right; or with its bbox_2d box "
        "[x1, y1, x2, y2] in JSON format."
    ),
    "classify": (
        "This is a SAR image. {question} Answer with a single category name only."
    ),
    "detect": DETECT_PROMPT,
    "caption": "This is a SAR image. {question}",
}

# Used for {label} when the question names no object class.
DEFAULT_LABEL = "target"

# 3x3 grid cell names, indexed [row][col] (row 0 = top, col 0 = left).
GRID_CELLS = (
    ("top-left", "top", "top-right"),
    ("left", "center", "right"),
    ("bottom-left", "bottom", "bottom-right"),
)

# ----------------------------------------------------------------------------------------
# Task inference: ordered table, first match wins. Matched case-insensitively against the
# question. The detection prompt itself comes first so a pre-built prompt round-trips;
# the bare "bbox"/"bounding box" hint comes last-but-one so the locate template (which
# mentions bbox_2d) and "where is ... give its bbox" stay locate.
# ----------------------------------------------------------------------------------------

TASK_RULES: tuple[tuple[str, str, str], ...] = (
    # (task, regex, what it documents)
    ("detect", r"detect the following object", "the FUSAR-GPT detection prompt itself"),
    ("count", r"\bhow many\b|\bcount(?:s|ing)?\b|\bnumber of\b",
     "'How many ...', 'count ...', 'number of ...'"),
    ("detect", r"\bdetect(?:s|ion|ing)?\b|\bfind (?:all|every)\b",
     "'detect ...', 'find all ...'"),
    ("locate", r"\bwhere(?:'s)?\b|\blocat(?:e|ion of)\b|\bwhich (?:part|region|area|quadrant)\b"
               r"|\bposition of\b",
     "'where is ...', 'locate ...', 'which part ...', 'location/position of ...'"),
    ("classify", r"\bwhat (?:type|class|kind|category|sort)\b|\bclassify\b|\bwhat is this\b"
                 r"|\b(?:which|identify the) (?:type|class|kind|category)\b",
     "'what type/class/kind ...', 'classify ...', 'what is this ...'"),
    ("detect", r"\bbbox|\bbounding box", "'bbox', 'bounding box'"),
)

_TASK_RULES_RE = tuple((task, re.compile(rx, re.IGNORECASE)) for task, rx, _ in TASK_RULES)


def _check_task(task: Any) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {type(value).__name__}")
    return value


def infer_task(question: str) -> str:
    """The task a question asks for (one of TASKS); "caption" when no rule matches."""
    _check_str("question", question)
    for task, rx in _TASK_RULES_RE:
        if rx.search(question):
            return task
    return "caption"


# ----------------------------------------------------------------------------------------
# Label extraction.
# ----------------------------------------------------------------------------------------

# Keyword patterns after which the object class follows, tried in order.
_LABEL_CUES = tuple(re.compile(rx, re.IGNORECASE) for rx in (
    r"detect the following objects?\s*:\s*",
    r"\bhow many\b",
    r"\bnumber of\b",
    r"\bcount(?:ing)?\b",
    r"\bdetect(?:ing)?\b|\bdetection of\b",
    r"\bfind (?:all|every)\b",
    r"\bwhich (?:part|region|area|quadrant) of the (?:image|picture|scene|chip)\s+"
    r"(?:contains?|has|shows?|holds?)\b",
    r"\bwhere(?:'s| is| are)\b",
    r"\blocate\b",
    r"\b(?:location|position) of\b",
    r"\b(?:type|class|kind|category|sort) of\b",
    r"\bclassify\b",
    r"\b(?:bbox(?:es)?|bounding box(?:es)?) (?:of|for)\b",
))

# Skipped before the noun phrase starts.
_LEADING = frozenset("the a an all any every each of these those this that some".split())
# End the noun phrase.
_STOP = frozenset("""
are is was were be been there here in on at of near inside within around from by with and
or can could do does did you we visible present shown seen appear appears exist exists
located docked parked moored anchored sailing moving this that these those the image
picture scene please to for which have has contain contains if any total them they
it its their
""".split())
# Nouns too generic to be a class name.
_GENERIC = frozenset("object objects target targets thing things item items image images "
                     "picture scene one ones it everything anything something".split())
# Explicit irregular plurals (and words that must not lose their final "s").
IRREGULAR_PLURALS: dict[str, str] = {
    "aircraft": "aircraft", "spacecraft": "spacecraft", "hovercraft": "hovercraft",
    "people": "person", "men": "man", "women": "woman", "children": "child",
    "buses": "bus", "gas": "gas", "series": "series", "species": "species",
    "wharves": "wharf", "fish": "fish",
}
_MAX_LABEL_WORDS = 3


def singularize(word: str) -> str:
    """Simple English plural stripping with the IRREGULAR_PLURALS table."""
    w = word.lower()
    if w in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def _noun_phrase(rest: str) -> str | None:
    m = re.match(r"[\sa-z\-]*", rest.lower())
    words = re.findall(r"[a-z][a-z\-]*", m.group(0) if m else "")
    i = 0
    while i < len(words) and words[i] in _LEADING:
        i += 1
    phrase: list[str] = []
    for w in words[i:]:
        if w in _STOP or len(phrase) == _MAX_LABEL_WORDS:
            break
        phrase.append(w)
    if not phrase or phrase[-1] in _GENERIC:
        return None
    phrase[-1] = singularize(phrase[-1])
    return " ".join(phrase)


def extract_label(question: str) -> str | None:
    """The object class the question names, singular and lowercase, or None.

    "How many ships are there?" -> "ship"; "detect the aircraft" -> "aircraft";
    "How many oil tanks are in the port?" -> "oil tank"; "What is this?" -> None.
    """
    _check_str("question", question)
    for cue in _LABEL_CUES:
        for m in cue.finditer(question):
            label = _noun_phrase(question[m.end():])
            if label:
                return label
    return None


# ----------------------------------------------------------------------------------------
# Prompt building.
# ----------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(label|question)\}")


PROMPT_STYLES = ("reference", "templates")


def reference_question(question: str) -> str:
    """The question as the FUSAR-GPT reference sends it: ``<image>`` removed, whitespace stripped."""
    return question.replace("<image>", "").strip()


def build_prompt(task: str, question: str, templates: Mapping[str, str] | None = None,
                 *, label: str | None = None, style: str = "templates") -> str:
    """The text sent to the model for ``question`` under ``task``.

    ``style="reference"`` (imported FUSAR-GPT checkpoints): the question as the reference
    sends it (``reference_question``), untouched; only ``task="detect"`` with an explicit
    ``label`` builds the reference detection prompt (DETECT_PROMPT) for that label.

    ``style="templates"`` (bundles trained with fusar-edge's templates, and the presets): a
    question that already starts with "This is a SAR image." is returned unchanged, any
    other is wrapped in the task's template. ``templates`` overrides entries of
    PROMPT_TEMPLATES; ``label`` overrides the label extracted from the question.
    """
    _check_task(task)
    _check_str("question", question)
    if style not in PROMPT_STYLES:
        raise InputError(f"prompt style: expected one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style == "reference":
        if task == "detect" and label:
            return _PLACEHOLDER.sub(lambda m: label, DETECT_PROMPT)  # DETECT_PROMPT has only {label}
        return reference_question(question)
    if question.lstrip().startswith(SAR_PREFIX):
        return question
    merged = dict(PROMPT_TEMPLATES)
    if templates is not None:
        for key, value in templates.items():
            if key not in TASKS:
                raise InputError(f"unknown prompt template {key!r}; expected one of "
                                 f"{', '.join(TASKS)}")
            if not isinstance(value, str):
                raise InputError(f"prompt template {key!r} must be a string, "
                                 f"got {type(value).__name__}")
            merged[key] = value
    q = question.strip()
    values = {"question": q, "label": label or extract_label(q) or DEFAULT_LABEL}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], merged[task])


# ----------------------------------------------------------------------------------------
# Answer parsing.
# ----------------------------------------------------------------------------------------


@dataclass
class ParsedAnswer:
    """A parsed model answer.

    ``value``: typed per task (count int, detect list of dicts, locate dict, classify
    str, caption str), or None when it could not be parsed (then ``parse_error`` says
    why; locate also gives None with no parse_error when the model said there is no
    target, flagged "no_target"). ``flags``: non-fatal notes such as "clipped_boxes".
    """

    value: Any = None
    parse_error: str | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.parse_error is None

    def to_json(self) -> dict[str, Any]:
        return {"value": _plain(self.value), "parse_error": self.parse_error,
                "flags": list(self.flags)}


def _plain(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _add_flag(flags: list[str], flag: str) -> None:
    if flag not in flags:
        flags.append(flag)


def _short(obj: Any, limit: int = 60) -> str:
    r = repr(obj)
    return r if len(r) <= limit else r[:limit - 3] + "..."


_SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")
_NONE_ANSWER = re.compile(r"^\s*(?:none|null|nothing)\b|\bthere (?:is|are) no\b|\bno such\b",
                          re.IGNORECASE)


@dataclass
class _Geometry:
    chip: int
    height: int
    width: int

    def clip_and_map(self, box: list[float]) -> tuple[list[float], bool, bool]:
        """(original-pixel box after clipping to the chip, was_clipped, degenerate).

        ``degenerate``: no area after clipping (x1 >= x2 or y1 >= y2, or wholly outside).
        """
        clipped = [min(max(float(v), 0.0), float(self.chip)) for v in box]
        was_clipped = any(c != float(v) for c, v in zip(clipped, box))
        x1, y1, x2, y2 = clipped
        sx, sy = self.width / self.chip, self.height / self.chip
        return [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)], \
            was_clipped, (x1 >= x2 or y1 >= y2)

    def cell_of(self, box: list[float]) -> tuple[int, int]:
        """(row, col) of the box centre (chip coordinates, already clipped)."""
        x1, y1, x2, y2 = (min(max(float(v), 0.0), float(self.chip)) for v in box)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        return min(int(cy * 3 / self.chip), 2), min(int(cx * 3 / self.chip), 2)


# ```json ... ``` or '''json ... ''' (the prompt's own fence); an unterminated fence runs
# to the end of the text (generation cut off by max tokens).
_FENCE = re.compile(r"(```|''')[ \t]*(?:json)?[ \t]*\r?\n?(.*?)(?:\1|\Z)",
                    re.IGNORECASE | re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_SEPARATORS = re.compile(r"[\s,]*")
# An opener that starts real JSON content (an object, string or nested list follows).
_JSON_START = re.compile(r"[\[{]\s*[\[{\"']")


def _is_box_payload(obj: Any) -> bool:
    """A dict, [] or a list holding at least one dict (bad items are reported later)."""
    if isinstance(obj, dict):
        return True
    return isinstance(obj, list) and (not obj or any(isinstance(o, dict) for o in obj))


def _decode_json(text: str) -> tuple[Any, str | None, bool]:
    """Find the JSON list/object of boxes in ``text``.

    Returns (payload, error, lenient). payload is a list of items, [] for a "None"
    answer, or None with error set. Consecutive top-level objects ("{...}, {...}")
    become a list.
    """
    fence = _FENCE.search(text)
    body = fence.group(2) if fence else text
    bare = body.strip().strip(".!").strip().lower()
    if bare in ("", "none", "null", "[]", "nothing") and (fence or bare):
        return [], None, False
    starts = [m.start() for m in re.finditer(r"[\[{]", body)]
    if not starts:
        if _NONE_ANSWER.search(body) or (fence and _NONE_ANSWER.search(text)):
            return [], None, False
        return None, "no JSON list or object found", False
    decoder = json.JSONDecoder()
    first_error: str | None = None
    lenient_pos = starts[0]
    for pos in starts[:64]:
        try:
            obj, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError) as e:
            at = getattr(e, "pos", pos)
            error = f"malformed JSON: {getattr(e, 'msg', str(e))} at char {at}"
            if at >= len(body.rstrip()):
                error += " (the answer ends mid-JSON; output cut off?)"
            if _JSON_START.match(body, pos):
                # This is the answer's JSON and it is broken: do not salvage an inner
                # object from it, only try the lenient repairs below.
                first_error, lenient_pos = error, pos
                break
            first_error = first_error or error
            continue  # chatter such as "[see below]"
        if not _is_box_payload(obj):
            continue  # e.g. a bare "[1, 2, 3, 4]" in chatter
        if isinstance(obj, dict):
            items = [obj]
            while True:  # "{...}, {...}" or one object per line
                nxt = _SEPARATORS.match(body, end).end()
                if nxt >= len(body) or body[nxt] != "{":
                    break
                try:
                    more, end = decoder.raw_decode(body, nxt)
                except (ValueError, RecursionError):
                    break
                if not isinstance(more, dict):
                    break
                items.append(more)
            return items, None, False
        return obj, None, False
    # Lenient retry from the (broken) JSON opener to the last closer: trailing commas, Python
    # literals (single quotes, True/None).
    pos = lenient_pos
    close = "]" if body[pos] == "[" else "}"
    end = body.rfind(close)
    if end > pos:
        chunk = body[pos:end + 1]
        for attempt in (lambda s: json.loads(_TRAILING_COMMA.sub(r"\1", s)),
                        lambda s: ast.literal_eval(s)):
            try:
                obj = attempt(chunk)
            except Exception:  # noqa: BLE001 - any failure just means "not parseable"
                continue
            if _is_box_payload(obj):
                return ([obj] if isinstance(obj, dict) else obj), None, True
    return None, first_error or "no JSON list of boxes found", False


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _read_box(item: Mapping[str, Any], idx: int) -> tuple[list[float] | None, str | None]:
    """The box exactly as the model printed it (ints stay ints), or an error."""
    box = item.get("bbox_2d", item.get("bbox"))
    if box is None:
        return None, f"detection {idx} has no bbox_2d"
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None, f"detection {idx}: bbox_2d must be 4 numbers, got {_short(box)}"
    if any(_as_number(v) is None for v in box):
        return None, f"detection {idx}: bbox_2d has non-numeric coordinates {_short(box)}"
    return list(box), None


def _detections(items: list[Any], geo: _Geometry, label: str | None, flags: list[str],
                require_label: bool = True) -> tuple[list[dict[str, Any]] | None, str | None]:
    out: list[dict[str, Any]] = []
    for idx, item in enumerate(items):
        if not isinstance(item, dict):
            return None, f"detection {idx} is not a JSON object: {_short(item)}"
        box, err = _read_box(item, idx)
        if err:
            return None, err
        lab = item.get("label")
        if isinstance(lab, str) and lab.strip():
            lab = lab.strip()
        elif label:
            lab = label
        elif require_label:
            return None, f"detection {idx} has no label"
        else:
            lab = None
        mapped, clipped, degenerate = geo.clip_and_map(box)  # type: ignore[arg-type]
        # bbox_chip: the raw numbers in the model's chip frame (evaluation compares these);
        # bbox_2d: clipped to the chip and mapped to original-image pixels.
        det: dict[str, Any] = {"bbox_2d": mapped, "bbox_chip": box, "label": lab}
        if clipped:
            det["clipped"] = True
            _add_flag(flags, "clipped_boxes")
        if degenerate:  # kept and flagged, never dropped: the raw box is still the model's answer
            det["degenerate"] = True
            _add_flag(flags, "degenerate_boxes")
        out.append(det)
    return out, None


def _parse_detect(text: str, geo: _Geometry, label: str | None) -> ParsedAnswer:
    flags: list[str] = []
    payload, err, lenient = _decode_json(text)
    if err:
        return ParsedAnswer(None, f"detect answer: {err}", flags)
    if lenient:
        _add_flag(flags, "lenient_json")
    dets, err = _detections(payload, geo, label, flags)
    if err:
        return ParsedAnswer(None, f"detect answer: {err}", flags)
    return ParsedAnswer(dets, None, flags)


_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_COUNT_TOKEN = re.compile(
    r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r"|none|nothing)\b|\bno\s+[a-z]", re.IGNORECASE)


def _parse_count(text: str, geo: _Geometry, label: str | None) -> ParsedAnswer:
    flags: list[str] = []
    if "bbox_2d" in text:  # answered with boxes instead of a number: count them
        det = _parse_detect(text, geo, label or DEFAULT_LABEL)
        if det.value is not None:
            return ParsedAnswer(len(det.value), None, ["count_from_boxes", *det.flags])
    m = _COUNT_TOKEN.search(text)
    if not m:
        return ParsedAnswer(None, f"count answer: no number found in {_short(text)}", flags)
    tok = (m.group(1) or "no").lower()
    if tok.isdigit():
        start, end = m.span(1)
        if text[start - 1:start] == "-" or re.match(r"[.,]\d", text[end:end + 2]):  # "-2", "2.5": not 2
            return ParsedAnswer(None, f"count answer: {_short(text)} is not a whole number of objects", flags)
        return ParsedAnswer(int(tok), None, flags)
    if tok in _NUMBER_WORDS:
        return ParsedAnswer(_NUMBER_WORDS[tok], None, flags)
    return ParsedAnswer(0, None, flags)  # none / nothing / "no ships"


_NUM = r"(-?\d+(?:\.\d+)?)"
_SEP = r"[\s()\[\]]*,[\s()\[\]]*"
_FOUR_NUMBERS = re.compile(_NUM + _SEP + _NUM + _SEP + _NUM + _SEP + _NUM)
_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_CENTRAL = {"center", "centre", "middle", "central"}


def _cell_from_words(text: str) -> tuple[int, int] | None:
    row = col = None
    central = False
    for w in re.findall(r"[a-z]+", text.lower()):
        if row is None and w in _VERTICAL:
            row = _VERTICAL[w]
        elif col is None and w in _HORIZONTAL:
            col = _HORIZONTAL[w]
        elif w in _CENTRAL:
            central = True
    if row is None and col is None and not central:
        return None
    return (1 if row is None else row), (1 if col is None else col)


def _locate_box(text: str, geo: _Geometry, flags: list[str]) -> tuple[Any, str | None]:
    """(detection dict, None) / (None, None) if no box / (None, error)."""
    if "{" in text:
        payload, err, lenient = _decode_json(text)
        if not err and payload:
            if lenient:
                _add_flag(flags, "lenient_json")
            dets, err = _detections(payload, geo, None, flags, require_label=False)
            if err:
                return None, err
            if len(payload) > 1:
                _add_flag(flags, "multiple_boxes")
            return (dets[0] if dets else None), None
    m = _FOUR_NUMBERS.search(text)
    if m:
        box = [int(g) if re.fullmatch(r"-?\d+", g) else float(g) for g in m.groups()]
        dets, _ = _detections([{"bbox_2d": box}], geo, None, flags, require_label=False)
        return (dets[0] if dets else None), None
    return None, None


def _parse_locate(text: str, geo: _Geometry, label: str | None) -> ParsedAnswer:
    flags: list[str] = []
    det, err = _locate_box(text, geo, flags)
    if err:
        return ParsedAnswer(None, f"locate answer: {err}", flags)
    words = _cell_from_words(text)
    if det is not None and not det.get("degenerate"):
        row, col = geo.cell_of(det["bbox_chip"])
        if words is not None and words != (row, col):
            _add_flag(flags, "cell_words_disagree")
        bbox, bbox_chip = det["bbox_2d"], det["bbox_chip"]
    elif words is not None:  # no box, or one with no area: the words say where
        (row, col), bbox, bbox_chip = words, None, (det["bbox_chip"] if det is not None else None)
    elif _NONE_ANSWER.search(text):
        return ParsedAnswer(None, None, ["no_target"])
    else:
        return ParsedAnswer(None, f"locate answer: no grid cell or box found in "
                                  f"{_short(text)}", flags)
    return ParsedAnswer({"cell": GRID_CELLS[row][col], "row": row, "col": col,
                         "bbox_2d": bbox, "bbox_chip": bbox_chip}, None, flags)


_CLASSIFY_PREFIX = re.compile(
    r"^(?:(?:answer|category|class|label|type)\s*[:\-]\s*"
    r"|(?:it|this|that)(?:\s+is|'s|\s+looks\s+like|\s+appears\s+to\s+be)\s+"
    r"|(?:the\s+)?(?:target|object|image)\s+(?:is|shows|contains)\s+"
    r"|(?:this\s+is\s+)?(?:a\s+)?sar\s+image\s+(?:of|showing)\s+"
    r"|(?:most\s+)?(?:likely|probably|possibly)\s+"
    r"|(?:a|an|the)\s+)")
_CLASSIFY_CUT = re.compile(r"[.,;!?\n]")
_CLASSIFY_STRIP = " \t\"'`*_()[]{}:-"


def _parse_classify(text: str, geo: _Geometry, label: str | None) -> ParsedAnswer:
    line = text.strip().splitlines()[0].strip().lower()
    line = line.strip(_CLASSIFY_STRIP)
    while True:
        new = _CLASSIFY_PREFIX.sub("", line, count=1).strip(_CLASSIFY_STRIP)
        if new == line:
            break
        line = new
    line = _CLASSIFY_CUT.split(line, maxsplit=1)[0]
    line = " ".join(line.strip(_CLASSIFY_STRIP).split())
    if not line:
        return ParsedAnswer(None, f"classify answer: no category name in {_short(text)}")
    return ParsedAnswer(line, None, [])


def _parse_caption(text: str, geo: _Geometry, label: str | None) -> ParsedAnswer:
    return ParsedAnswer(text.strip(), None, [])


_PARSERS = {
    "count": _parse_count,
    "detect": _parse_detect,
    "locate": _parse_locate,
    "classify": _parse_classify,
    "caption": _parse_caption,
}


def _check_geometry(chip_size: Any, image_size: Any) -> _Geometry:
    if isinstance(chip_size, bool) or not isinstance(chip_size, int) or chip_size <= 0:
        raise InputError(f"chip_size must be a positive integer, got {chip_size!r}")
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise InputError(f"image_size must be (height, width), got {image_size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 \
                or not math.isfinite(v):
            raise InputError(f"image_size must be two positive numbers (height, width), "
                             f"got {image_size!r}")
    return _Geometry(chip_size, h, w)


def parse_answer(task: str, text: str, *, chip_size: int, image_size: tuple[int, int],
                 label: str | None = None) -> ParsedAnswer:
    """Parse the model's answer ``text`` for ``task``; never raises on the text itself.

    ``image_size`` is the original image's (height, width); boxes are mapped from chip
    coordinates (``chip_size`` square) to original pixels. ``label`` is the fallback
    label for detections without one. An empty answer gives value None and a
    parse_error for every task.
    """
    _check_task(task)
    _check_str("text", text)
    geo = _check_geometry(chip_size, image_size)
    clean = _SPECIAL_TOKEN.sub("", text).strip()
    if not clean:
        return ParsedAnswer(None, f"{task} answer: empty answer", [])
    try:
        return _PARSERS[task](clean, geo, label)
    except Exception as e:  # noqa: BLE001 - a parser bug must not crash a ground station
        return ParsedAnswer(None, f"{task} answer: internal parser error "
                                  f"({type(e).__name__}: {e})", ["parser_exception"])


__all__ = [
    "TASKS", "SAR_PREFIX", "DETECT_PROMPT", "PROMPT_TEMPLATES", "PROMPT_STYLES", "reference_question", "DEFAULT_LABEL", "GRID_CELLS",
    "TASK_RULES", "IRREGULAR_PLURALS", "ParsedAnswer", "infer_task", "extract_label",
    "singularize", "build_prompt", "parse_answer",
]
