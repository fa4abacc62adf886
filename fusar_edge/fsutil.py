"""Filesystem steps shared by every command that writes a directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_dir(stage: Path, out: Path) -> None:
    """Move the finished directory ``stage`` to ``out``, atomically replacing an old one.

    The old ``out`` is renamed aside first and deleted only once the new one is in place, so
    a kill at any moment leaves the old directory or the new one under ``out`` (and at worst a
    hidden ``.NAME.old-PID`` beside it), never neither and never half of each.
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
