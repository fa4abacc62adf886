"""The scan journal: one line per finished chip, the only state a resumed scan needs.

A header line first (the scene's identity, the model, the settings), then one JSON line per
chip as it finishes, flushed and fsynced before the next chip counts as done. A kill can cut
only the last line; reading drops it, and that chip runs again. A journal whose header differs
from this run's (another scene, model or setting) is refused, never merged.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import InputError
from ..fsutil import write_text_atomic

JOURNAL = "journal.jsonl"
_CHUNK = 1 << 16  # bytes read backwards at a time looking for the last whole line
_MAX_HEADER = 1 << 20  # a header line is well under this; a longer first line is not a journal


class Journal:
    """Append-only record of finished chips; refuses a folder that belongs to another run.

    Read as a stream: a scan of 100k chips never holds their records in memory at once, only
    where each chip's line starts (``offsets``), and reads a record back when it is needed."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        if path.exists():
            self._drop_torn_line()
            self._check_header()
        else:
            write_text_atomic(path, json.dumps({"header": header}, sort_keys=True) + "\n")

    def _drop_torn_line(self) -> None:
        """A line cut by a kill (or a full disk) is dropped, and that chip runs again. Only the
        file's tail is read."""
        with open(self.path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:
                step = min(_CHUNK, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = pos - step + cut + 1
                    break
                pos -= step
            else:
                keep = 0
            if keep != end:
                f.truncate(keep)

    def _check_header(self) -> None:
        with open(self.path, "rb") as f:
            first = f.readline(_MAX_HEADER)
        try:
            found = json.loads(first)["header"] if first.endswith(b"\n") else None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            found = None
        if not isinstance(found, dict):
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

    def _parse(self, line: bytes, number: int) -> dict:
        try:
            record = json.loads(line)
            int(record["chip"])
            return record
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{self.path}: line {number} is not a chip record (the journal was edited or "
                             "damaged); delete the folder to scan the scene again") from None

    def offsets(self) -> dict[int, tuple[int, int]]:
        """Chip -> (byte offset, line number) of its record; a chip recorded twice: the last one."""
        out = {}
        with open(self.path, "rb") as f:
            offset = len(f.readline())  # the header
            for number, line in enumerate(f, 2):
                out[int(self._parse(line, number)["chip"])] = (offset, number)
                offset += len(line)
        return out

    def done(self) -> set[int]:
        return set(self.offsets())

    @contextmanager
    def reader(self) -> Iterator[Callable[[tuple[int, int]], dict]]:
        """``read(offsets()[chip])`` -> that chip's record, read from the file when asked."""
        with open(self.path, "rb") as f:
            def read(where: tuple[int, int]) -> dict:
                f.seek(where[0])
                return self._parse(f.readline(), where[1])

            yield read


def _what(key: str) -> str:
    return {"identity": "scene (or the scene file changed)", "weights": "model", "preset": "model"}.get(key, "setting")
