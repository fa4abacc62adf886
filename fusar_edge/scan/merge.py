"""One detection per target: boxes from overlapping chips merged in scene space.

A target in the overlap of two chips is answered twice; when a chip border cuts it, one answer
is truncated. The box farthest from its chip's inner borders is the one least likely to be cut,
so greedy NMS visits boxes in that order and keeps the first of each overlapping group; a box
from another chip lying mostly inside a kept one (a cut-off piece) is dropped as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from .grid import Chip


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # scene pixels x0, y0, x1, y1
    label: str
    chip: int  # Chip.index it came from
    chip_box: list  # the model's raw box, as it answered (e.g. 504-px chip coordinates)
    margin: float = 0.0  # distance from the box to the nearest chip border that is inside the scene


def _norm(box) -> tuple[float, float, float, float]:
    # a model may name the corners in either order; geometry needs x0 <= x1, y0 <= y1
    x0, y0, x1, y1 = (float(v) for v in box)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def edge_margin(box, chip: Chip, scene_width: int, scene_height: int) -> float:
    """Distance (px, >= 0) from ``box`` (scene pixels) to the nearest border of ``chip`` that lies
    inside the scene; ``math.inf`` when the chip has none (it spans the scene: nothing is cut).

    A border on the scene edge is skipped: no neighbouring chip sees past it, so a box touching
    it is as whole as the scene lets it be."""
    x0, y0, x1, y1 = _norm(box)
    gaps = []
    if chip.x0 > 0:
        gaps.append(x0 - chip.x0)
    if chip.y0 > 0:
        gaps.append(y0 - chip.y0)
    if chip.x0 + chip.width < scene_width:
        gaps.append(chip.x0 + chip.width - x1)
    if chip.y0 + chip.height < scene_height:
        gaps.append(chip.y0 + chip.height - y1)
    return max(0.0, float(min(gaps))) if gaps else math.inf  # past a border (a bad box) counts as on it


def box_iou(a, b) -> float:
    """Intersection over union of two boxes; 0 for boxes of no area (unless identical)."""
    ax0, ay0, ax1, ay1 = _norm(a)
    bx0, by0, bx1, by1 = _norm(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    if union <= 0:
        return 1.0 if (ax0, ay0, ax1, ay1) == (bx0, by0, bx1, by1) else 0.0
    return inter / union


def merge_detections(dets: list[Detection], iou: float = 0.5) -> list[Detection]:
    """Greedy NMS per label; -> the kept detections (the same objects), sorted by (label, y0, x0)."""
    if not 0.0 < iou <= 1.0:
        raise InputError(f"--iou {iou}: expected a value in (0, 1]")
    # margin descending (whole before truncated), then chip index and box: the same input in any
    # order gives the same survivors
    order = sorted(dets, key=lambda d: (-d.margin, d.chip, _norm(d.box)))
    kept: dict[str, list[Detection]] = {}
    for d in order:
        same = kept.setdefault(d.label, [])  # labels never suppress each other
        if not any(_duplicate(d, k, iou) for k in same):
            same.append(d)
    out = [d for group in kept.values() for d in group]
    return sorted(out, key=_output_key)


def _duplicate(d: Detection, kept: Detection, iou: float) -> bool:
    """``d`` repeats ``kept``: they overlap by IoU, or (from another chip) ``d`` lies mostly inside
    ``kept``. The second rule catches the piece of a target a chip border cut off: a sliver has a
    small IoU with the whole box but sits entirely within it. Boxes of one chip are the model's own
    decision and only IoU applies to them."""
    if box_iou(d.box, kept.box) >= iou:
        return True
    if d.chip == kept.chip:
        return False
    ax0, ay0, ax1, ay1 = _norm(d.box)
    bx0, by0, bx1, by1 = _norm(kept.box)
    area = (ax1 - ax0) * (ay1 - ay0)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return area > 0 and inter / area >= iou


def _output_key(d: Detection) -> tuple:
    x0, y0, x1, y1 = _norm(d.box)
    return d.label, y0, x0, y1, x1, d.chip  # (label, y0, x0), then the rest so no tie is left to chance
