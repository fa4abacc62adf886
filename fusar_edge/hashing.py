"""File hashes for manifests (bundles, ONNX exports, the tile store).

Torch-free, so the tile commands can use it without importing the model stack.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable


def sha256_file(path: str | Path, chunk: int = 1 << 22, progress: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks (bounded memory for multi-GB weights);
    ``progress(n)`` is called with each block's size (a progress bar's ``update``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """A manifest entry: ``{"sha256": ..., "bytes": ...}``."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
