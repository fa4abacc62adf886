"""Synthetic SAR scenes with ground truth: land cover, backscatter, targets, speckle.

Pure numpy, deterministic from a ``numpy.random.Generator``. The physics is statistical, not
electromagnetic, but each ingredient is the one a SAR analyst would recognise:

- **Land cover** ``[H, W]`` uint8 (``COVER``: water, land, urban, runway) comes from a region
  map: a coastline (a tilted plane plus smooth noise, thresholded), urban patches on land
  (denser near the coast: ports), and on some regions an airfield runway (a long dark strip).
- **Mean backscatter** sigma0 (linear) per cover class: dark sea with a slowly varying
  K-distribution-like texture (wind), land with field texture (and, on "smooth" regions, land
  as dark as the sea: wet sand, dry soil; only the anchors tell it apart), bright and blocky
  urban, very dark runways.
- **Targets** drawn into sigma0: ships on water (bright rotated hulls with point scatterers and
  azimuth smearing: a faint streak along the azimuth (image y) axis), aircraft near runways
  (bright crosses), oil tanks (bright rings with a darker roof), and **land distractors** that
  look like ships (buildings: bright elongated blocks; rocks: irregular bright blobs).
- **Speckle**: fully developed, intensity ``sigma0 * Gamma(L, 1/L)`` with ``L`` looks; the scene
  is its amplitude ``sqrt(intensity)``.

Boxes are ``[x1, y1, x2, y2]`` in scene pixels (x2, y2 exclusive: the target's pixels are
``[y1:y2, x1:x2]``), the label, and the land cover under the target's centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

COVER = ("water", "land", "urban", "runway")
WATER, LAND, URBAN, RUNWAY = range(4)
TARGET_LABELS = ("ship", "aircraft", "oil tank")
DISTRACTOR_LABELS = ("building", "rock")
LOOKS = 3
SEA_SIGMA0 = 0.015


@dataclass
class Target:
    label: str
    box: list[int]  # [x1, y1, x2, y2], x2/y2 exclusive, scene pixels
    cover: str  # land cover under the target's centre

    def to_json(self) -> dict:
        return {"label": self.label, "box": list(self.box), "cover": self.cover}


@dataclass
class Region:
    """A piece of ground several scenes are cut from (one split owns it)."""

    cover: np.ndarray  # uint8 [R, R]
    smooth_land: bool  # land as dark as the sea in SAR
    has_runway: bool


@dataclass
class Scene:
    amplitude: np.ndarray  # float32 [H, W]
    cover: np.ndarray  # uint8 [H, W]
    targets: list[Target] = field(default_factory=list)


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 0) -> np.ndarray:
    """Zero-mean, unit-variance noise varying over about ``h / cells`` pixels (bicubic-upsampled grid)."""
    shape = (cells + 3, cells + 3)
    layers = []
    for _ in range(max(channels, 1)):
        coarse = rng.standard_normal(shape).astype(np.float32)
        up = np.asarray(Image.fromarray(coarse, "F").resize((w + w // cells * 3, h + h // cells * 3),
                                                              Image.Resampling.BICUBIC))
        oy, ox = h // cells, w // cells
        layers.append(up[oy:oy + h, ox:ox + w])
    out = np.stack(layers, axis=-1) if channels else layers[0]
    del layers
    # the statistics of that array as it is (a one-channel field is a view into the larger
    # upsampled grid, whose sum runs in another order than a copy's), then in place: the same
    # arithmetic as (out - mean) / (std + 1e-6) without two more copies of a [H, W, 64] field
    # (the synthetic AEF layer of a large sample)
    mean, std = out.mean(), out.std()
    if not channels:
        out = out.copy()  # PIL's array is read-only
    out -= mean
    out /= std + 1e-6
    return out


def make_region(rng: np.random.Generator, size: int) -> Region:
    """Land cover of a square region: sea, coast, port, airfield or inland, by chance."""
    kind = rng.choice(["sea", "coast", "port", "airfield", "inland"], p=[0.2, 0.3, 0.2, 0.15, 0.15])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(theta) * xx + np.sin(theta) * yy
    offset = {"sea": 0.9, "coast": rng.uniform(-0.2, 0.2), "port": rng.uniform(-0.15, 0.15),
              "airfield": -rng.uniform(0.2, 0.45), "inland": -0.9}[str(kind)]
    land = ramp + 0.12 * smooth_field(rng, size, size, 4) + offset < 0
    cover = np.where(land, LAND, WATER).astype(np.uint8)
    if kind in ("port", "inland", "airfield", "coast"):
        density = {"port": 0.6, "inland": 0.3, "airfield": 0.15, "coast": 0.15}[str(kind)]
        patches = smooth_field(rng, size, size, 8)
        near_coast = np.clip(1.0 - 4.0 * np.abs(ramp + offset), 0, 1) if kind == "port" else 0.0
        urban = land & (patches + 1.5 * near_coast > 2.2 - 2.0 * density)
        cover[urban] = URBAN
    has_runway = False
    if kind == "airfield":
        has_runway = _add_runway(rng, cover)
    return Region(cover, bool(rng.random() < 0.4 and kind != "sea"), has_runway)


def _add_runway(rng: np.random.Generator, cover: np.ndarray) -> bool:
    size = cover.shape[0]
    for _ in range(50):
        length, width = rng.uniform(0.35, 0.6) * size, rng.uniform(0.012, 0.02) * size + 3
        cx, cy = rng.uniform(0.25, 0.75, 2) * size
        mask = _rect_mask(size, size, cx, cy, length, width, rng.uniform(0, np.pi))
        if (cover[mask] != WATER).all():
            cover[mask] = RUNWAY
            return True
    return False


def _window(h: int, w: int, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
    """The rows and columns within ``reach`` px of ``(cx, cy)``, clipped to the image."""
    r = int(np.ceil(reach)) + 2
    return (slice(max(0, int(cy) - r), min(h, int(cy) + r + 1)), slice(max(0, int(cx) - r), min(w, int(cx) + r + 1)))


def _grid(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(yy, xx)`` float32 over a window: the values ``np.mgrid[0:h, 0:w]``
    holds there, so a shape drawn on a window is the shape drawn on the whole image, without a
    whole-image grid per try (a 4096 px sample made gigabytes of them)."""
    yy, xx = np.mgrid[rows, cols]
    return yy.astype(np.float32), xx.astype(np.float32)


def _full(h: int, w: int, window: tuple[slice, slice], local: np.ndarray) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[window] = local
    return mask


def _rect_mask(h, w, cx, cy, length, width, angle) -> np.ndarray:
    window = _window(h, w, cx, cy, np.hypot(length, width) / 2)
    yy, xx = _grid(*window)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return _full(h, w, window, (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2))


def _sigma0(rng: np.random.Generator, cover: np.ndarray, smooth_land: bool) -> np.ndarray:
    h, w = cover.shape
    wind = np.exp(0.35 * smooth_field(rng, h, w, 3))  # slowly varying sea texture
    fields = np.exp(0.4 * smooth_field(rng, h, w, 12))
    land_level = rng.uniform(0.018, 0.03) if smooth_land else rng.uniform(0.06, 0.12)
    blocks = rng.gamma(0.8, 1.0 / 0.8, (h // 3 + 1, w // 3 + 1)).repeat(3, 0).repeat(3, 1)[:h, :w]
    sigma = np.empty((h, w), np.float32)
    sigma[:] = SEA_SIGMA0 * wind
    sigma[cover == LAND] = (land_level * fields)[cover == LAND]
    sigma[cover == URBAN] = (0.35 * blocks)[cover == URBAN]
    sigma[cover == RUNWAY] = 0.004
    return sigma


def _free(box, placed, gap=4) -> bool:
    x1, y1, x2, y2 = box
    return all(x1 >= b[2] + gap or b[0] >= x2 + gap or y1 >= b[3] + gap or b[1] >= y2 + gap for b in placed)


def _box_of(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _place(rng, cover, allowed, shape_fn, label, sigma, placed, targets, margin=3, tries=40) -> bool:
    """Draw one target whose whole footprint lies on ``allowed`` cover classes."""
    h, w = cover.shape
    for _ in range(tries):
        cx, cy = rng.uniform(margin + 6, w - margin - 6), rng.uniform(margin + 6, h - margin - 6)
        mask, paint = shape_fn(rng, h, w, cx, cy)
        box = _box_of(mask)
        if box is None or box[0] < margin or box[1] < margin or box[2] > w - margin or box[3] > h - margin:
            continue
        if not np.isin(cover[mask], allowed).all() or not _free(box, placed):
            continue
        paint(sigma)
        placed.append(box)
        cy_i, cx_i = (box[1] + box[3]) // 2, (box[0] + box[2]) // 2
        targets.append(Target(label, box, COVER[cover[cy_i, cx_i]]))
        return True
    return False


def _ship(rng, h, w, cx, cy):
    length, width = rng.uniform(10, 28), rng.uniform(3, 5.5)
    angle = rng.uniform(0, np.pi)
    mask = _rect_mask(h, w, cx, cy, length, width, angle)
    level = rng.uniform(2.0, 6.0)

    def paint(sigma):
        sigma[mask] = level * rng.gamma(2.0, 0.5, int(mask.sum()))
        ys, xs = np.nonzero(mask)
        for i in rng.choice(len(xs), size=min(3, len(xs)), replace=False):  # point scatterers
            sigma[ys[i], xs[i]] = level * 6
        # azimuth smearing: a faint streak along y through the hull's columns
        x1, x2 = xs.min(), xs.max() + 1
        y1, y2 = ys.min(), ys.max() + 1
        span = int(rng.integers(8, 20))
        for y in range(max(0, y1 - span), min(h, y2 + span)):
            if y1 <= y < y2:
                continue
            d = (y1 - y) if y < y1 else (y - y2 + 1)
            sigma[y, x1:x2] += level * 0.03 * np.exp(-d / 6.0)
    return mask, paint


def _building(rng, h, w, cx, cy):
    mask, paint_ship = _ship(rng, h, w, cx, cy)  # the same hull-like look, on land

    def paint(sigma):
        paint_ship(sigma)
    return mask, paint


def _rock(rng, h, w, cx, cy):
    r = rng.uniform(4, 8)
    window = _window(h, w, cx, cy, r * 1.35 + 1.5)  # the largest radius the lobes reach
    yy, xx = _grid(*window)
    ang = np.arctan2(yy - cy, xx - cx)
    radius = r * (1 + 0.35 * np.sin(3 * ang + rng.uniform(0, 6)) * rng.uniform(0.3, 1))
    mask = _full(h, w, window, np.hypot(xx - cx, yy - cy) <= radius * np.array([1.0, 0.5])[rng.integers(0, 2)] + 1.5)
    level = rng.uniform(1.5, 4.0)

    def paint(sigma):
        sigma[mask] = level * rng.gamma(1.5, 1 / 1.5, int(mask.sum()))
    return mask, paint


def _aircraft(rng, h, w, cx, cy):
    length = rng.uniform(10, 18)
    angle = rng.uniform(0, np.pi)
    body = _rect_mask(h, w, cx, cy, length, 2.5, angle)
    wings = _rect_mask(h, w, cx, cy, 2.5 + length * 0.1, length * 0.9, angle)
    tail = _rect_mask(h, w, cx - np.cos(angle) * length * 0.42, cy - np.sin(angle) * length * 0.42,
                      2.0, length * 0.35, angle)
    mask = body | wings | tail
    level = rng.uniform(2.0, 5.0)

    def paint(sigma):
        sigma[mask] = level * rng.gamma(2.0, 0.5, int(mask.sum()))
    return mask, paint


def _tank(rng, h, w, cx, cy):
    r = rng.uniform(4, 8)
    window = _window(h, w, cx, cy, r + 0.6)
    yy, xx = _grid(*window)
    d = np.hypot(xx - cx, yy - cy)
    ring, roof = _full(h, w, window, (d >= r - 1.2) & (d <= r + 0.6)), _full(h, w, window, d < r - 1.2)
    mask = ring | roof
    level = rng.uniform(3.0, 7.0)

    def paint(sigma):
        sigma[roof] = 0.04
        sigma[ring] = level * rng.gamma(2.0, 0.5, int(ring.sum()))
    return mask, paint


def make_scene(rng: np.random.Generator, cover: np.ndarray, smooth_land: bool, has_runway: bool,
               distractor_heavy: bool, looks: int = LOOKS) -> Scene:
    """One scene over ``cover``: backscatter, targets, distractors, speckle."""
    h, w = cover.shape
    sigma = _sigma0(rng, cover, smooth_land)
    targets: list[Target] = []
    placed: list[list[int]] = []
    frac = np.bincount(cover.ravel(), minlength=4) / cover.size
    if frac[WATER] > 0.1:
        for _ in range(int(rng.integers(0, 7))):
            _place(rng, cover, [WATER], _ship, "ship", sigma, placed, targets)
    if has_runway and frac[RUNWAY] > 0:
        near = _dilate(cover == RUNWAY, 25) & (cover != WATER)
        apron = np.where(near, cover, WATER)  # only ground near the runway counts
        for _ in range(int(rng.integers(0, 5))):
            _place(rng, apron, [LAND, URBAN, RUNWAY], _aircraft, "aircraft", sigma, placed, targets)
    if frac[URBAN] > 0.02:
        for _ in range(int(rng.integers(0, 4))):
            _place(rng, cover, [URBAN, LAND], _tank, "oil tank", sigma, placed, targets)
    if frac[LAND] + frac[URBAN] > 0.1:
        n = int(rng.integers(3, 8)) if distractor_heavy else int(rng.integers(0, 3))
        for _ in range(n):
            shape, label = (_building, "building") if rng.random() < 0.65 else (_rock, "rock")
            _place(rng, cover, [LAND, URBAN], shape, label, sigma, placed, targets)
    intensity = sigma * rng.gamma(looks, 1.0 / looks, sigma.shape)
    return Scene(np.sqrt(intensity).astype(np.float32), cover, targets)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a square (separable running max), numpy only."""
    out = mask.copy()
    for axis in (0, 1):
        acc = out.copy()
        for s in range(1, radius + 1):
            acc |= np.roll(out, s, axis) | np.roll(out, -s, axis)
        out = acc
    return out
