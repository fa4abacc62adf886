"""Filesystem steps shared by every command that writes a directory."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import BundleError


def publish_dir(stage: Path, out: Path) -> None:
    """Move the finished directory ``stage`` to ``out``, atomically replacing an old one.

    On Linux the two directories trade names in one ``renameat2(RENAME_EXCHANGE)``, so a kill at
    any moment leaves the old directory or the new one under ``out``, never neither and never
    half of each. Where that call is missing (other systems, file systems without it) the old
    ``out`` is renamed aside first and deleted once the new one is in place: a kill between the
    two renames then leaves only the hidden ``.NAME.old-PID`` beside ``out``.
    """
    if (out.exists() or out.is_symlink()) and _exchange(stage, out):
        _remove(stage)  # ``stage`` holds the old output now
        return
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    """What an output replaced: a directory, or a file or link that --force replaced with one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # <linux/fs.h>, <fcntl.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of ``a`` and ``b`` atomically (Linux ``renameat2``); False where it is not
    available, the caller then renames in two steps. Through ctypes because ``os`` has no
    renameat2."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2  # glibc 2.28+
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this kernel or file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(b))


def publishable_mkdtemp(prefix: str, parent: Path) -> Path:
    """A new uniquely named folder with the permissions a plain ``mkdir`` gives (``mkdtemp``'s
    are 0700): it is renamed into place as the output, which others may need to read. Made by
    ``os.mkdir`` under the umask, not by reading the umask (``os.umask`` sets it process-wide,
    which would race with other threads creating files)."""
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free name for a work folder {prefix}*")


def work_dir(parent: Path, name: str, kind: str) -> Path:
    """A new hidden directory ``.NAME.KIND-PID-RANDOM`` in ``parent`` to build an output in.

    The process id in the name lets a later run tell a killed run's leftovers from a live
    run's work (``remove_stale_work_dirs``).
    """
    return publishable_mkdtemp(f".{name}.{kind}-{os.getpid()}-", parent)


def remove_stale_work_dirs(parent: Path, kind: str) -> list[Path]:
    """Delete the ``work_dir``s of ``kind`` in ``parent`` whose process is gone (a killed run's)."""
    owner = re.compile(rf"\..+\.{re.escape(kind)}-(\d+)-[^/]+")
    removed = []
    for p in parent.glob(f".*.{kind}-*"):
        m = owner.fullmatch(p.name)
        if m and p.is_dir() and not _process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no safe probe (os.kill would end the process): keep the directory
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


@contextmanager
def atomic_writer(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces ``path`` when the ``with`` block ends without an error.

    It is a temp file beside ``path`` (unique per process and call, so threads never share one),
    made with the permissions a plain ``open`` gives (0666 less the umask, not ``mkstemp``'s
    0600), flushed to disk, then renamed over ``path``: ``path`` holds the old bytes or the new,
    never part of either; on an error the temp file is removed and ``path`` is as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``path`` holds the old bytes or the new, never part of either (``atomic_writer``)."""
    with atomic_writer(path) as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: Path, missing: str) -> Any:
    """A bundle's JSON file, or one line naming it: ``<path>: missing (<missing>)`` or
    ``<path>: not valid JSON (<what> at line <n>)``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing ({missing})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
