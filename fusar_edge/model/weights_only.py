"""Pickled checkpoints (``vec64_film.pt``, old ``adapter_model.bin``) read without running code.

``torch.load(weights_only=True)`` refuses any pickle that would build an object it does not
allow, and executes nothing while doing so. Its refusal is a long, version-dependent text that
invites the user to re-run with ``weights_only=False``; ``load_weights_only`` says it in one
line instead, naming what the file holds. The names come from reading the pickle's opcodes
(``pickletools``, which decodes and never calls anything).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import BundleError

MAX_PICKLE_BYTES = 64 << 20  # the pickle part of a checkpoint: small, the tensors live beside it
# What plain tensor checkpoints name (prefixes): the rebuild helpers, OrderedDict, bytes, sizes;
# storages and dtypes are checked by name in _plain.
_PLAIN_GLOBALS = ("torch._utils.", "collections.OrderedDict", "_codecs.encode", "torch.Size")


def load_weights_only(path: Path):
    """``torch.load(path, weights_only=True)`` on the CPU; a refusal is one BundleError line."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the refusal below says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        objects = _pickled_objects(path, exc)
        if objects:
            raise BundleError(f"{path}: refused: not a weights-only checkpoint (it holds pickled Python objects: "
                              f"{', '.join(objects[:3])}; fusar-edge never unpickles code)") from None
        raise BundleError(f"{path}: cannot be read as a weights-only torch file ({_reason(exc)}); it must hold "
                          "only tensors") from None


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if found:
        return found.group(1).rstrip(". ")
    if isinstance(exc, EOFError) or not text:
        return "empty or truncated"
    return text[:200]


def _pickled_objects(path: Path, exc: Exception) -> list[str]:
    """The non-tensor globals (classes, functions) the refused pickle would have loaded."""
    names = set(re.findall(r"GLOBAL ([\w.]+)", str(exc)))
    try:
        names |= _globals(_pickle_bytes(path))
    except (OSError, zipfile.BadZipFile):
        pass
    return sorted(n for n in names if not _plain(n))


def _plain(name: str) -> bool:
    if name.startswith(_PLAIN_GLOBALS):
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and (attr.endswith("Storage") or isinstance(getattr(torch, attr, None), torch.dtype))


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream: ``*/data.pkl`` of a zip checkpoint, else the file's start."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            member = next((i for i in zf.infolist() if i.filename.endswith("data.pkl")), None)
            if member is None or member.file_size > MAX_PICKLE_BYTES:
                return b""
            return zf.read(member)
    with open(path, "rb") as f:
        return f.read(MAX_PICKLE_BYTES)


def _globals(data: bytes) -> set[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST in the pickle(s) at the start of ``data``
    (legacy torch files are several pickles in a row), read as opcodes only."""
    names, stream = set(), io.BytesIO(data)
    while stream.tell() < len(data):
        strings, memo, top = [], {}, None  # top: the string on top of the stack, if any
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    names.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                if op.name == "MEMOIZE":
                    memo[len(memo)] = top
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = top
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    top = memo.get(arg)
                else:
                    top = arg if isinstance(arg, str) and "UNICODE" in op.name else None
                if top is not None and op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    strings.append(top)
        except (ValueError, pickle.UnpicklingError, EOFError):
            break  # the rest is not a pickle (a legacy file's raw storages), or garbage
    return names
