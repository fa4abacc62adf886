"""Deterministic demo data: a small synthetic SAR sea scene with ships, and an anchor set for it.

Lets the README and tests run ``fusar-edge ask`` end to end without downloading anything.
The scene is statistically SAR-like, not physical: sea clutter is multi-look speckle
(intensity gamma-distributed with ``LOOKS`` looks around a dark sea backscatter), ships are
small bright rectangles of the same speckle about 20 dB above the sea. It is placed in the
North Sea (centred on 3 deg E, 54 deg N) in UTM zone 31N with 10 m pixels, north up.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.transform import Affine

from ..errors import InputError
from .anchors import AnchorSet
from .sar import read_sar, render

CRS = "EPSG:32631"
CENTRE_EN = (500000.0, 5983520.0)  # 3 deg E, 54 deg N in UTM 31N (10 m grid)
PIXEL_M = 10.0
LOOKS = 4
SEA_INTENSITY = 0.02  # linear sigma0, a calm sea
SHIP_INTENSITY = 2.0  # 20 dB brighter
ANCHOR_GRID = 8


def write_demo_scene(out_dir: str | Path, size: int = 256, seed: int = 0, year: int = 2023) -> dict[str, Any]:
    """Write ``scene.tif``, ``scene.png`` and ``anchors.npz`` into ``out_dir``.

    Returns their paths (``scene_tif``, ``scene_png``, ``anchors``), the acquisition ``date``
    (ISO string), the lon/lat ``bounds`` and ``ships``: pixel boxes ``[x0, y0, x1, y1]`` with
    exclusive ``x1``/``y1`` (numpy slice bounds), in the ``size x size`` scene.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise InputError(f"size: expected an integer of at least 32 px, got {size!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    intensity = SEA_INTENSITY * rng.gamma(LOOKS, 1.0 / LOOKS, (size, size))
    ships = _place_ships(rng, size)
    for x0, y0, x1, y1 in ships:
        intensity[y0:y1, x0:x1] = SHIP_INTENSITY * rng.gamma(LOOKS, 1.0 / LOOKS, (y1 - y0, x1 - x0))
    date = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))

    tif, png, npz = out / "scene.tif", out / "scene.png", out / "anchors.npz"
    half = size * PIXEL_M / 2
    transform = Affine(PIXEL_M, 0.0, CENTRE_EN[0] - half, 0.0, -PIXEL_M, CENTRE_EN[1] + half)  # north up
    with rasterio.open(tif, "w", driver="GTiff", height=size, width=size, count=1, dtype="float32",
                       crs=CRS, transform=transform) as ds:
        ds.write(np.sqrt(intensity).astype(np.float32), 1)
        ds.update_tags(ACQUISITION_DATE=date.isoformat())
    img = read_sar(tif)  # the PNG is the tif through the module contract, nothing else
    render(img).save(png)

    features = rng.standard_normal((ANCHOR_GRID * ANCHOR_GRID, 64))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    centres = (np.arange(ANCHOR_GRID) + 0.5) / ANCHOR_GRID
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    mask = np.ones(len(features), bool)
    mask[rng.choice(len(features), size=2, replace=False)] = False
    features[~mask] = 0.0  # as a tile store returns points without AEF data
    AnchorSet(features, np.column_stack([yy.ravel(), xx.ravel()]), mask, year, "synthetic", CRS,
              img.bounds_lonlat).save_npz(npz)
    return {"scene_tif": str(tif), "scene_png": str(png), "anchors": str(npz), "date": date.isoformat(),
            "bounds": img.bounds_lonlat, "ships": ships}


def _place_ships(rng: np.random.Generator, size: int) -> list[list[int]]:
    """3-5 non-overlapping ship boxes, lying along x or y, kept off the borders."""
    ships: list[list[int]] = []
    count, margin = 3 + int(rng.integers(0, 3)), 4
    for _ in range(200):
        if len(ships) == count:
            break
        length = int(rng.integers(size // 20 + 4, size // 10 + 9))
        width = int(rng.integers(2, 4 + size // 128))
        w, h = (length, width) if rng.random() < 0.5 else (width, length)
        x0, y0 = int(rng.integers(margin, size - margin - w)), int(rng.integers(margin, size - margin - h))
        box = [x0, y0, x0 + w, y0 + h]
        if all(box[0] >= b[2] + margin or b[0] >= box[2] + margin or box[1] >= b[3] + margin or b[1] >= box[3] + margin
               for b in ships):
            ships.append(box)
    return ships
