"""Radar pixel values to display values: steps 1-3 of the normalisation contract in ``geo.sar``.

Complex pixels become amplitude, linear amplitude or power becomes dB (``to_db``), and a
robust percentile stretch maps dB to [0, 1] (``stretch_limits``, ``stretch``). ``normalise``
chains them for a whole image (``read_sar``); ``fusar_edge.scan`` calls the steps apart, so
that every chip of a scene is stretched with the scene's limits instead of its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError

EPS = 1e-10
STRETCH_PERCENTILES = (2.0, 98.0)


def normalise(p: Path, pixels: np.ndarray, scale: str, nodata: float | None) -> tuple[np.ndarray, str]:
    """Steps 1-3 of the contract: raw pixels -> (data, kind)."""
    if pixels.size == 0:
        raise InputError(f"image {p}: zero-size image (shape {list(pixels.shape)})")
    if scale == "auto" and pixels.dtype == np.uint8:
        return np.repeat(pixels[:, :, None], 3, axis=2), "visual8"
    db, valid, kind = to_db(p, pixels, scale, nodata)
    return stretch(p, db, valid), kind


def to_db(p: Path | str, pixels: np.ndarray, scale: str, nodata: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Steps 1-2 of the contract: raw radar pixels -> ``(dB float32, valid mask, kind)``.

    Kept apart from the stretch so that a scene scanned chip by chip (``fusar_edge.scan``) can
    stretch every chip with the scene's limits instead of its own."""
    nodata_mask = None
    if nodata is not None:
        nodata_mask = np.isnan(pixels) if np.isnan(nodata) else pixels == nodata
    if pixels.dtype.kind in "fc":
        bad = ~np.isfinite(pixels)
        if nodata_mask is not None:
            bad &= ~nodata_mask
        n_bad = int(bad.sum())
        if n_bad:
            raise InputError(f"image {p}: {n_bad} of the {pixels.size} pixels read (a large image: of its decimated read) "
                             "are NaN/Inf; fill them (e.g. with 0) "
                             "or declare them as the GeoTIFF's nodata value")
    if pixels.dtype.kind == "c":
        if scale not in ("auto", "amplitude", "complex"):
            raise InputError(f"image {p}: complex (SLC) pixels are read as amplitude |z|; "
                             f"scale={scale!r} does not apply (use auto or amplitude)")
        values, kind = np.abs(pixels).astype(np.float32), "complex"
    else:
        values = pixels.astype(np.float32)
        kind = scale
    valid = np.ones(values.shape, bool) if nodata_mask is None else ~nodata_mask
    if kind == "auto":
        kind = "db" if (values[valid] < 0).any() else "amplitude"
    if kind != "db":
        valid &= values > 0
        np.log10(np.maximum(values, EPS), out=values)
        values *= 10.0 if kind == "power" else 20.0
    return values, valid, kind


def stretch_limits(p: Path | str, db: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Step 3's ``(lo, hi)``: the 2nd..98th percentile of the valid pixels (min..max if they coincide)."""
    sample = db[valid]
    if sample.size == 0:
        raise InputError(f"image {p}: no valid pixels (all are nodata, or zero in linear data)")
    lo, hi = (float(v) for v in np.percentile(sample, STRETCH_PERCENTILES))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return lo, hi


def stretch(p: Path | str, db: np.ndarray, valid: np.ndarray,
            limits: tuple[float, float] | None = None) -> np.ndarray:
    """Step 3: ``(lo, hi)`` (the image's own by default) mapped to [0, 1]; invalid pixels -> 0 (in place on ``db``)."""
    lo, hi = limits if limits is not None else stretch_limits(p, db, valid)
    if hi <= lo:
        return np.zeros(db.shape, np.float32)
    db -= lo
    db /= hi - lo
    np.clip(db, 0.0, 1.0, out=db)
    db[~valid] = 0.0
    return db
