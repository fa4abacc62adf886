"""The scan journal: one line per finished chip, the only state a resumed scan needs.

A header line first (the scene's identity, the model, the settings), then one JSON line per
chip as it finishes, flushed and fsynced before the next chip counts as done. A kill can cut
only the last line; reading drops it, and that chip runs again. A journal whose header differs
from this run's (another scene, model or setting) is refused, never merged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from ..fsutil import write_text_atomic

JOURNAL = "journal.jsonl"


class Journal:
    """Append-only record of finished chips; refuses a folder that belongs to another run."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        if path.exists():
            self._check_header()
        else:
            write_text_atomic(path, json.dumps({"header": header}, sort_keys=True) + "\n")

    def _lines(self) -> list[str]:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a line cut by a kill (or a full disk): drop it, the chip runs again
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        return raw.decode("utf-8").splitlines()

    def _check_header(self) -> None:
        lines = self._lines()
        try:
            found = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            found = None
        if found is None:
            raise InputError(f"{self.path}: not a scan journal; choose another --out")
        for key in self.header:
            if found.get(key) != self.header[key]:
                raise InputError(f"{self.path.parent}: holds a scan of another {_what(key)} ({key} differs); it is "
                                 "not merged: choose another --out, or delete the folder to start over")

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> dict[int, dict]:
        out = {}
        for number, line in enumerate(self._lines()[1:], 2):
            try:
                r = json.loads(line)
                out[int(r["chip"])] = r
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise InputError(f"{self.path}: line {number} is not a chip record (the journal was edited or "
                                 "damaged); delete the folder to scan the scene again") from None
        return out

    def done(self) -> set[int]:
        return set(self.records())


def _what(key: str) -> str:
    return {"identity": "scene (or the scene file changed)", "weights": "model", "preset": "model"}.get(key, "setting")
