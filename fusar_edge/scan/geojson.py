"""Detections as RFC 7946 GeoJSON, written so that the same detections give the same bytes."""

from __future__ import annotations

import json

import numpy as np

from .georef import SceneGeoref
from .merge import Detection

DECIMALS = 7  # ~1 cm in latitude: far below a SAR pixel, and few enough digits to be byte-stable


def _ring(det: Detection, georef: SceneGeoref) -> list[list[float]]:
    x0, y0, x1, y1 = det.box
    xs = np.array([x0, x1, x1, x0], np.float64)
    ys = np.array([y0, y0, y1, y1], np.float64)
    lonlat = georef.pixel_to_lonlat(xs, ys)
    # no georeference: pixel coordinates stay (the caller's metadata says so)
    us, vs = (xs, ys) if lonlat is None else lonlat
    ring = [[round(float(u), DECIMALS), round(float(v), DECIMALS)] for u, v in zip(us, vs)]
    # RFC 7946 3.1.6: exterior rings counterclockwise. Which way the four corners turn depends on
    # the georeference (north-up, south-up, a flipped GCP grid; pixel y grows downwards), so the
    # turn is measured, not assumed. Rounded values are measured: they are what is written.
    if _signed_area(ring) < 0:
        ring.reverse()
    return ring + [list(ring[0])]  # closed: the last position repeats the first


def _signed_area(ring: list[list[float]]) -> float:
    """Shoelace formula: > 0 for a counterclockwise ring (x east, y north)."""
    n = len(ring)
    return 0.5 * sum(ring[i][0] * ring[(i + 1) % n][1] - ring[(i + 1) % n][0] * ring[i][1] for i in range(n))


def feature(det: Detection, georef: SceneGeoref, properties: dict) -> dict:
    """One detection as a GeoJSON Polygon Feature (the box's four corners, lon/lat)."""
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(det, georef)]},
            "properties": dict(properties)}


def feature_collection(features: list[dict], metadata: dict) -> dict:
    """A FeatureCollection; ``metadata`` goes into a foreign member (RFC 7946 6.1) of that name."""
    return {"type": "FeatureCollection", "metadata": dict(metadata), "features": list(features)}


def dumps(collection: dict) -> str:
    """Canonical JSON: sorted keys, fixed separators, a trailing newline; same input, same bytes."""
    # ASCII-only (escaped), so the bytes do not depend on the file encoding; NaN/Infinity are not JSON
    return json.dumps(collection, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
