"""The chip grid over a scene: overlapping windows that cover every pixel, all full size.

The last window on each axis is aligned to the far edge instead of padding past it: the model
then always sees a full chip of real pixels (no fill it was never trained on), at the cost of a
larger overlap between the last two windows.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class ChipGrid(Sequence):
    """The chips of a grid, made when asked: a scene's grid can hold millions of chips (a header
    may claim any size), and memory should follow the chips being worked on, not that count."""

    def __init__(self, xs: list[int], ys: list[int], width: int, height: int):
        self.xs, self.ys, self.width, self.height = xs, ys, width, height

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i) + n if i < 0 else int(i)
        if not 0 <= i < n:
            raise IndexError(f"chip {i} of {n}")
        r, c = divmod(i, len(self.xs))
        return Chip(i, r, c, self.xs[c], self.ys[r], self.width, self.height)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))


def chip_grid(width: int, height: int, chip: int, overlap: int) -> ChipGrid:
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
    return ChipGrid(xs, ys, w, h)
