"""JSON reports written into an exported bundle, without the run's timings.

The bundle's weights id hashes every file it holds (``model/manifest.py``), so a file that
recorded how long this run took made two exports of the same model two different "models" (a
``scan`` journal then refuses to resume with the re-export). Timings stay in the report the
export returns and prints; the files keep what the export made and what its checks found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TIMING_KEYS = frozenset({"seconds", "export_seconds"})


def without_timings(obj: Any) -> Any:
    """``obj`` with every ``TIMING_KEYS`` entry of every nested dict left out."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, (list, tuple)):
        return [without_timings(v) for v in obj]
    return obj


def write_report(path: Path, obj: Any, indent: int = 2) -> None:
    Path(path).write_text(json.dumps(without_timings(obj), indent=indent) + "\n", encoding="utf-8")
