"""Detections as RFC 7946 GeoJSON, written so that the same detections give the same bytes."""

from __future__ import annotations

import json

import numpy as np

from .georef import SceneGeoref
from .merge import Detection

DECIMALS = 7  # ~1 cm in latitude: far below a SAR pixel, and few enough digits to be byte-stable


def _corners(det: Detection, georef: SceneGeoref) -> list[list[float]]:
    """The box's four corners in lon/lat (the scene has a georeference)."""
    x0, y0, x1, y1 = det.box
    xs = np.array([x0, x1, x1, x0], np.float64)
    ys = np.array([y0, y0, y1, y1], np.float64)
    lons, lats = georef.pixel_to_lonlat(xs, ys)
    return [[float(u), float(v)] for u, v in zip(lons, lats)]


POLE_SIDE_POINTS = 16  # points per box side when the box holds a pole: its edge is a curve in lon/lat


def _around_pole(det: Detection, georef: SceneGeoref) -> list[list[float]] | None:
    """A box holding a pole (polar-stereographic scenes) as the lon/lat region it covers, or None.

    Its corners' longitudes go once around the globe, so no ring of them bounds the region
    (joined, they make a sliver at one latitude). The box's edge, sampled densely, is laid out
    west to east from lon -180 to 180, and the ring closes along the pole's latitude: the usual
    GeoJSON form of a polar cap."""
    x0, y0, x1, y1 = det.box
    t = np.linspace(0.0, 1.0, POLE_SIDE_POINTS, endpoint=False)
    xs = np.concatenate([x0 + t * (x1 - x0), np.full_like(t, x1), x1 - t * (x1 - x0), np.full_like(t, x0)])
    ys = np.concatenate([np.full_like(t, y0), y0 + t * (y1 - y0), np.full_like(t, y1), y1 - t * (y1 - y0)])
    lons, lats = (np.asarray(v, np.float64) for v in georef.pixel_to_lonlat(xs, ys))
    steps = (np.diff(np.append(lons, lons[0])) + 180.0) % 360.0 - 180.0  # each step the short way round
    turn = steps.sum()
    if abs(turn) < 180.0:
        return None  # the ring does not go round a pole
    if turn < 0:  # walk it eastwards
        lons, lats = lons[::-1], lats[::-1]
        steps = (np.diff(np.append(lons, lons[0])) + 180.0) % 360.0 - 180.0
    unrolled = lons[0] + np.concatenate([[0.0], np.cumsum(steps)])  # n + 1 points over exactly 360 degrees
    lat_loop = np.append(lats, lats[0])
    u = np.concatenate([unrolled - 360.0, unrolled[1:], unrolled[1:] + 360.0])  # three laps, increasing
    v = np.concatenate([lat_loop, lat_loop[1:], lat_loop[1:]])
    inside = (u > -180.0) & (u < 180.0)
    edge = [[-180.0, float(np.interp(-180.0, u, v))], *([float(a), float(b)] for a, b in zip(u[inside], v[inside])),
            [180.0, float(np.interp(180.0, u, v))]]
    pole = 90.0 if lats.mean() > 0 else -90.0
    ring = [[round(a, DECIMALS), round(b, DECIMALS)] for a, b in edge + [[180.0, pole], [-180.0, pole]]]
    return [p for i, p in enumerate(ring) if i == 0 or p != ring[i - 1]]  # an edge point on lon +-180 twice


def _closed_ccw(ring: list[list[float]]) -> list[list[float]]:
    """Rounded, counterclockwise, closed. RFC 7946 3.1.6: exterior rings counterclockwise. Which
    way the corners turn depends on the georeference (north-up, south-up, a flipped GCP grid;
    pixel y grows downwards), so the turn is measured, not assumed; rounded values are measured:
    they are what is written."""
    ring = [[round(u, DECIMALS), round(v, DECIMALS)] for u, v in ring]
    if _signed_area(ring) < 0:
        ring.reverse()
    return ring + [list(ring[0])]  # closed: the last position repeats the first


def _split_at_antimeridian(ring: list[list[float]]) -> list[list[list[float]]]:
    """RFC 7946 3.1.9: a polygon across lon 180 is cut in two there, so that no part's ring
    crosses it (drawn whole, a box from 179.99 to -179.99 spans the globe) and every longitude is
    within [-180, 180] (a CRS may give 180.01). The ring is unrolled around its first corner,
    then each side of the seam is clipped off the convex ring and wrapped back."""
    ref = ring[0][0]
    unrolled = [[u + 360.0 * round((ref - u) / 360.0), v] for u, v in ring]
    lons = [u for u, _ in unrolled]
    if min(lons) >= -180 and max(lons) <= 180:
        return [unrolled]
    seam = 180.0 if max(lons) > 180 else -180.0
    west = _clip(unrolled, seam, keep_west=True)
    east = _clip(unrolled, seam, keep_west=False)
    if seam == 180.0:
        east = [[u - 360.0, v] for u, v in east]
    else:
        west = [[u + 360.0, v] for u, v in west]
    return [part for part in (west, east) if len(part) >= 3]


def _clip(ring: list[list[float]], x: float, keep_west: bool) -> list[list[float]]:
    """Sutherland-Hodgman: the part of a (convex) ring on one side of the meridian ``x``."""
    inside = (lambda p: p[0] <= x) if keep_west else (lambda p: p[0] >= x)
    out = []
    for i, p in enumerate(ring):
        q = ring[(i + 1) % len(ring)]
        if inside(p):
            out.append(p)
        if inside(p) != inside(q):  # the edge crosses the meridian: add where
            t = (x - p[0]) / (q[0] - p[0])
            out.append([x, p[1] + t * (q[1] - p[1])])
    return out


def _signed_area(ring: list[list[float]]) -> float:
    """Shoelace formula: > 0 for a counterclockwise ring (x east, y north)."""
    n = len(ring)
    return 0.5 * sum(ring[i][0] * ring[(i + 1) % n][1] - ring[(i + 1) % n][0] * ring[i][1] for i in range(n))


def feature(det: Detection, georef: SceneGeoref, properties: dict) -> dict:
    """One detection as a GeoJSON Polygon Feature (the box's four corners, lon/lat); a box across
    the antimeridian is a MultiPolygon of its two sides. A scene without a georeference has no place
    on the map: its features' geometry is null (RFC 7946 3.2; pixel coordinates written as positions
    would be read as degrees by every GIS); the caller's properties carry the pixel box."""
    if georef.kind == "none":
        return {"type": "Feature", "geometry": None, "properties": dict(properties)}
    cap = _around_pole(det, georef)
    parts = [cap] if cap is not None else _split_at_antimeridian(_corners(det, georef))
    if len(parts) == 1:
        geometry = {"type": "Polygon", "coordinates": [_closed_ccw(parts[0])]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": [[_closed_ccw(p)] for p in parts]}
    return {"type": "Feature", "geometry": geometry, "properties": dict(properties)}


def feature_collection(features: list[dict], metadata: dict) -> dict:
    """A FeatureCollection; ``metadata`` goes into a foreign member (RFC 7946 6.1) of that name."""
    return {"type": "FeatureCollection", "metadata": dict(metadata), "features": list(features)}


def dumps(collection: dict) -> str:
    """Canonical JSON: sorted keys, fixed separators, a trailing newline; same input, same bytes."""
    # ASCII-only (escaped), so the bytes do not depend on the file encoding; NaN/Infinity are not JSON
    return json.dumps(collection, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
