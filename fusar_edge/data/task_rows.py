"""Task manifests in the FUSAR-GPT reference row format (``image``, ``aef``, ``question``,
``answer``; paths relative to the manifest), read without torch so evaluation on the ONNX
Runtime backend runs on the edge install."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """JSON (a list) or JSONL rows; each must have image, aef, question and answer."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        rows = json.loads(text) if path.suffix == ".json" else [json.loads(s) for s in text.splitlines() if s.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON/JSONL ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"{path}: expected a non-empty list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {i + 1}: expected a JSON object")
        for key in ("image", "aef", "question"):
            if key not in row:
                raise InputError(f"{path}: row {i + 1}: missing {key!r} (rows need image, aef, question, answer)")
        row["_root"] = str(path.resolve().parent)
    return rows
