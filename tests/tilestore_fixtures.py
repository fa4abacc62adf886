"""Small multi-tile stores with known int8 contents, and an independent lookup to check against.

The independent lookup projects with PROJ (rasterio.warp), walks tiles one point at a time in
plain Python and de-quantises with float64 maths, so it shares no code with
``fusar_edge.tiles.store`` beyond the store's published rules (docs/tilestore.md).
"""

from __future__ import annotations

import numpy as np
from rasterio.warp import transform as warp

from fusar_edge.tiles.format import write_store

NODATA = -128


def _tile(rng, year, epsg, x0, y0, dx, h, w, hole=True, name=None):
    data = rng.integers(-127, 128, (h, w, 64), dtype=np.int8)
    if hole:  # a no-data block
        r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
        data[r:r + 4, c:c + 4] = NODATA
    return dict(year=year, epsg=epsg, x0=float(x0), y0=float(y0), dx=float(dx), dy=float(dx), data=data,
                name=name or f"t{epsg}-{int(x0)}-{int(y0)}")


def multi_zone_store(path, seed=0):
    """Tiles around the 31N/32N boundary (6 E, 54 N) for 2020 and 2022, a southern tile
    (33S, around 15 E, 30 S) and a lon/lat (EPSG:4326) tile near 0 E, 10 N, with holes.

    The 31N tile runs ~2 km east of 6 E and the 32N tile ~2 km west of it, so points near
    the boundary have two candidates. Returns the tile dicts written (their ``data`` is the
    north-up int8 content).
    """
    rng = np.random.default_rng(seed)
    tiles = []
    for year in (2020, 2022):
        # 31N: easting of 6 E at 54 N is ~696,900 m; 32N: ~303,100 m
        tiles.append(_tile(rng, year, 32631, 690000, 5990000, 40, 200, 230))
        tiles.append(_tile(rng, year, 32632, 301000, 5990000, 40, 200, 230))
    tiles.append(_tile(rng, 2020, 32733, 480000, 6690000, 30, 150, 160))
    tiles.append(dict(year=2020, epsg=4326, x0=-0.05, y0=10.05, dx=0.001, dy=0.001,
                      data=rng.integers(-127, 128, (100, 100, 64), dtype=np.int8), name="lonlat"))
    write_store(path, tiles)
    return tiles


def dequantise(q: np.ndarray) -> np.ndarray:
    t = q.astype(np.float64) / 127.5
    return (np.sign(q) * t * t).astype(np.float32)


def expected_lookup(tiles, lon, lat, year):
    """Independent per-point lookup: PROJ projection, tiles of ``year`` preferring the point's own
    UTM zone (nearest central meridian), then the canonical index order."""
    lon = np.asarray(lon, np.float64)
    lat = np.asarray(lat, np.float64)
    order = sorted([t for t in tiles if t["year"] == year], key=lambda t: (t["epsg"], -t["y0"], t["x0"]))
    features = np.zeros((lon.size, 64), np.float32)
    mask = np.zeros(lon.size, bool)
    projected = {}
    for t in order:
        if t["epsg"] not in projected:
            projected[t["epsg"]] = (lon, lat) if t["epsg"] == 4326 else \
                tuple(np.asarray(v) for v in warp("EPSG:4326", f"EPSG:{t['epsg']}", lon, lat))
    for s in range(lon.size):
        def distance(t):
            if t["epsg"] == 4326:
                return 0.0
            return abs(lon[s] - (6 * (t["epsg"] % 100) - 183))
        for t in sorted(order, key=distance):  # sorted() is stable: index order on ties
            x, y = projected[t["epsg"]][0][s], projected[t["epsg"]][1][s]
            col = int(np.floor((x - t["x0"]) / t["dx"]))
            row = int(np.floor((t["y0"] - y) / t["dy"]))
            h, w = t["data"].shape[:2]
            if 0 <= row < h and 0 <= col < w and t["data"][row, col, 0] != NODATA:
                features[s] = dequantise(t["data"][row, col])
                mask[s] = True
                break
    return features, mask
