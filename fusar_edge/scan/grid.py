"""The chip grid over a scene: overlapping windows that cover every pixel, all full size.

The last window on each axis is aligned to the far edge instead of padding past it: the model
then always sees a full chip of real pixels (no fill it was never trained on), at the cost of a
larger overlap between the last two windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from ..errors import InputError


@dataclass(frozen=True)
class Chip:
    index: int  # row-major order
    row: int  # position in the grid
    col: int
    x0: int  # window in scene pixels (x = column, y = row)
    y0: int
    width: int
    height: int


def _offsets(size: int, chip: int, stride: int) -> list[int]:
    if size <= chip:
        return [0]  # one window: the whole axis (narrower than a chip when size < chip)
    out = list(range(0, size - chip, stride))  # every offset with offset + chip < size
    out.append(size - chip)  # the far-edge window; strictly after out[-1], so no duplicate
    return out


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an Integral too, but --chip True is a caller's bug, not a size
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} {value!r}: expected an integer")
    if value < minimum:
        raise InputError(f"{name} {value}: must be at least {minimum}")
    return int(value)


def chip_grid(width: int, height: int, chip: int, overlap: int) -> list[Chip]:
    """Windows of ``chip`` px, ``overlap`` px shared between neighbours (at least), row-major."""
    width = _check_int("scene width", width, 1)
    height = _check_int("scene height", height, 1)
    chip = _check_int("--chip", chip, 1)
    overlap = _check_int("--overlap", overlap, 0)
    if overlap >= chip:
        raise InputError(f"--overlap {overlap}: must be smaller than --chip {chip}")
    stride = chip - overlap
    xs, ys = _offsets(width, chip, stride), _offsets(height, chip, stride)
    w, h = min(chip, width), min(chip, height)
    return [Chip(r * len(xs) + c, r, c, x0, y0, w, h) for r, y0 in enumerate(ys) for c, x0 in enumerate(xs)]
