"""The quick-look: the whole scene, decimated, with what the scan found drawn on it.

Drawn on the reader's overview (at most ``reader.OVERVIEW_SIDE`` px a side, already in memory),
never on the full scene. ``detect`` draws each merged box (at least 3 px, so a ship is visible
at any decimation); ``count`` writes each chip's count at its centre; every task outlines the
chips that had no data in grey and the chips answered without AEF anchors in orange. PNG has
no timestamp, so the same scan gives the same bytes (a resumed run's quick-look is identical).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .grid import Chip
from .merge import Detection

BOX = (255, 40, 40)
NODATA = (110, 110, 110)
NO_ANCHORS = (255, 150, 0)
TEXT = (255, 255, 0)
MIN_BOX_PX = 3


def quicklook_png(overview: np.ndarray, scene_size: tuple[int, int], grid: Sequence[Chip], answered: set[int],
                  detections: list[Detection], counts: dict[int, int], without_anchors: set[int] = frozenset()) -> bytes:
    """``overview``: uint8 [h, w]; ``scene_size``: (width, height) in scene pixels; ``answered``:
    the chips with image data (the others are outlined as no-data);
    ``without_anchors``: the chips the summary lists as ``chips_without_anchors`` (a scan run
    with --no-anchors asked for none, and flags none)."""
    h, w = overview.shape
    sx, sy = w / scene_size[0], h / scene_size[1]
    img = Image.fromarray(np.repeat(overview[:, :, None], 3, axis=2), "RGB")
    draw = ImageDraw.Draw(img)
    for c in grid:
        flag = NODATA if c.index not in answered else NO_ANCHORS if c.index in without_anchors else None
        if flag:
            draw.rectangle(_scaled((c.x0, c.y0, c.x0 + c.width, c.y0 + c.height), sx, sy), outline=flag)
    for d in detections:
        x0, y0, x1, y1 = _scaled(d.box, sx, sy)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half_w, half_h = max((x1 - x0) / 2, MIN_BOX_PX / 2), max((y1 - y0) / 2, MIN_BOX_PX / 2)
        draw.rectangle((cx - half_w, cy - half_h, cx + half_w, cy + half_h), outline=BOX)
    for index, n in sorted(counts.items()):
        c = grid[index]
        draw.text(((c.x0 + c.width / 2) * sx, (c.y0 + c.height / 2) * sy), str(n), fill=TEXT, anchor="mm")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _scaled(box, sx: float, sy: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy
