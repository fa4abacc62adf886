"""Task manifests in the FUSAR-GPT reference row format (``image``, ``aef``, ``question``,
``answer``; paths relative to the manifest), read without torch so evaluation on the ONNX
Runtime backend runs on the edge install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_manifest(path: str | Path, need_aef: bool = True) -> list[dict[str, Any]]:
    """JSON (a list) or JSONL rows, each checked: ``image`` and ``aef`` (paths, relative to the
    manifest), ``question`` (non-empty text) and ``answer`` present; ``coordinate_size`` a
    positive integer when given. ``need_aef`` False (training or evaluating without anchors)
    lets rows go without ``aef``. Every problem is one line naming the file, the row and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (expected JSON or JSONL rows)") from None
    rows = _parse_rows(path, text)
    root = str(path.resolve().parent)
    for i, row in enumerate(rows):
        _check_row(path, i + 1, row, need_aef)
        row["_root"] = root
    return rows


def _parse_rows(path: Path, text: str) -> list:
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:  # the file's line, not the line within the row
                    raise InputError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: expected a non-empty list of rows")
    return rows


def _check_row(path: Path, number: int, row: Any, need_aef: bool) -> None:
    where = f"{path}: row {number}"
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object")
    for key in ("image", "aef", "question", "answer"):
        if key not in row and (key != "aef" or need_aef):
            raise InputError(f"{where}: missing {key!r} (rows need image, aef, question, answer)")
    for key in ("image", "aef", "question"):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            what = "a non-empty question" if key == "question" else "a file path relative to the manifest"
            raise InputError(f"{where}: {key}: expected {what}, got {row[key]!r}")
    size = row.get("coordinate_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(f"{where}: coordinate_size: expected a positive integer (e.g. 504), got {size!r}")
