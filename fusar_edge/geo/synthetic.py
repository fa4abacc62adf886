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
from .chip import render
from .sar import read_sar

CRS = "EPSG:32631"
CENTRE_EN = (500000.0, 5983520.0)  # 3 deg E, 54 deg N in UTM 31N (10 m grid)
PIXEL_M = 10.0
LOOKS = 4
SEA_INTENSITY = 0.02  # linear sigma0, a calm sea
SHIP_INTENSITY = 2.0  # 20 dB brighter
ANCHOR_GRID = 8


def write_demo_scene(out_dir: str | Path, size: int = 256, seed: int = 0, year: int = 2023) -> dict[str, Any]:
    """Write ``scene.tif``, ``scene.png``, ``anchors.npz`` and a tile store ``tiles/`` into ``out_dir``.

    Returns their paths (``scene_tif``, ``scene_png``, ``anchors``, ``tiles``), the acquisition ``date``
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
    tiles = write_demo_tiles(out / "tiles", size + 64, year, seed)
    return {"scene_tif": str(tif), "scene_png": str(png), "anchors": str(npz), "tiles": str(tiles),
            "date": date.isoformat(), "bounds": img.bounds_lonlat, "ships": ships}


def quantise(values: np.ndarray) -> np.ndarray:
    """Inverse of AEF's de-quantisation ``(q / 127.5)^2 * sign(q)``, to the nearest int8 code."""
    q = np.rint(np.sqrt(np.abs(values)) * 127.5) * np.sign(values)
    return np.clip(q, -127, 127).astype(np.int8)


def write_demo_tiles(store: str | Path, size: int, year: int, seed: int = 0) -> Path:
    """A tile store with one synthetic AEF tile (``size`` px at 10 m) centred on the demo scene.

    The embeddings are a smooth random field of unit vectors (like AEF's, they vary slowly
    over the ground), with a small no-data hole under the scene.
    """
    from ..tiles.format import write_store

    rng = np.random.default_rng(seed + 1)
    coarse = rng.standard_normal((size // 32 + 2, size // 32 + 2, 64))
    rows = np.linspace(0, coarse.shape[0] - 1, size)
    r0 = np.minimum(rows.astype(int), coarse.shape[0] - 2)
    fr = (rows - r0)[:, None, None]
    field = coarse[r0] * (1 - fr) + coarse[r0 + 1] * fr  # bilinear upsampling, rows then columns
    c0 = r0
    fc = (rows - c0)[None, :, None]
    field = field[:, c0] * (1 - fc) + field[:, c0 + 1] * fc
    field /= np.linalg.norm(field, axis=2, keepdims=True)
    q = quantise(field)
    q[size // 8: size // 4, size // 8: size // 4] = -128  # a no-data hole under the scene
    half = size * PIXEL_M / 2
    tile = dict(year=year, epsg=int(CRS.split(":")[1]), x0=CENTRE_EN[0] - half, y0=CENTRE_EN[1] + half,
                dx=PIXEL_M, dy=PIXEL_M, data=q, name="demo", source="synthetic (fusar-edge sample)")
    store = Path(store)
    if store.exists():
        import shutil

        shutil.rmtree(store)
    write_store(store, [tile])
    return store


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
