import numpy as np
import pytest
from rasterio.warp import transform

from fusar_edge.tiles.utm import lonlat_to_utm, parse_utm_epsg, utm_epsg


@pytest.mark.parametrize("zone,north", [(31, True), (32, True), (33, False), (1, True), (60, False), (18, False)])
def test_utm_forward_matches_proj(zone, north):
    # fresh random points inside the zone and up to 6 degrees outside it (cross-zone footprints)
    rng = np.random.default_rng()
    cm = 6 * zone - 183
    lon = cm + rng.uniform(-9, 9, 5000)
    lat = rng.uniform(0, 84, 5000) * (1 if north else -1)
    e, n = lonlat_to_utm(lon, lat, zone, north)
    e_ref, n_ref = transform("EPSG:4326", f"EPSG:{utm_epsg(zone, north)}", lon, lat)
    # a micrometre: a pixel flip between this and PROJ needs a point that close to a pixel edge
    assert np.abs(e - np.asarray(e_ref)).max() < 1e-6
    assert np.abs(n - np.asarray(n_ref)).max() < 1e-6


def test_utm_known_point():
    # the zone 31N origin: the equator on the central meridian (3 E) is (500000, 0)
    e, n = lonlat_to_utm(np.array([3.0]), np.array([0.0]), 31, True)
    assert e[0] == pytest.approx(500000.0, abs=1e-9) and n[0] == pytest.approx(0.0, abs=1e-9)
    e, n = lonlat_to_utm(np.array([3.0]), np.array([0.0]), 31, False)
    assert n[0] == pytest.approx(10000000.0, abs=1e-9)


def test_epsg_codes():
    assert parse_utm_epsg(32631) == (31, True)
    assert parse_utm_epsg(32760) == (60, False)
    assert parse_utm_epsg(4326) is None and parse_utm_epsg(32661) is None
    assert utm_epsg(31, True) == 32631 and utm_epsg(1, False) == 32701
