"""WGS84 lon/lat -> UTM (transverse Mercator) forward projection, vectorised in numpy.

Why not PROJ (through rasterio / pyproj)? Two reasons, both about the tile store's lookup:

1. Latency: the lookup's budget is a fraction of a millisecond; building a PROJ transformer
   per call costs more than that, and pyproj is not a dependency.
2. The C reader (``native/tiles``) must land on exactly the same AEF pixel as Python. It has
   only libc/libm, so it evaluates this same series; both agree with PROJ to nanometres, so
   they pick different pixels only for a point within nanometres of a pixel edge.

The series is Krüger's, in Karney's 6th-order form (C. F. F. Karney, "Transverse Mercator
with an accuracy of a few nanometers", J. Geodesy 85, 2011, eqs. 7-9, 35): a few nm within
the UTM zone and well below a millimetre several degrees outside it. tests/test_utm.py checks
it against PROJ. ``docs/tilestore.md`` spells out the same steps for C.
"""

from __future__ import annotations

import math

import numpy as np

A_WGS84 = 6378137.0
F_WGS84 = 1 / 298.257223563
K0 = 0.9996
FALSE_EASTING = 500000.0
FALSE_NORTHING_SOUTH = 10000000.0

_N = F_WGS84 / (2 - F_WGS84)  # third flattening
_E = 2 * math.sqrt(_N) / (1 + _N)  # first eccentricity, written through n
# rectifying radius times k0: northing/easting scale of the conformal sphere
_K0A = K0 * A_WGS84 / (1 + _N) * (1 + _N**2 / 4 + _N**4 / 64 + _N**6 / 256)
_ALPHA = (
    _N / 2 - 2 * _N**2 / 3 + 5 * _N**3 / 16 + 41 * _N**4 / 180 - 127 * _N**5 / 288 + 7891 * _N**6 / 37800,
    13 * _N**2 / 48 - 3 * _N**3 / 5 + 557 * _N**4 / 1440 + 281 * _N**5 / 630 - 1983433 * _N**6 / 1935360,
    61 * _N**3 / 240 - 103 * _N**4 / 140 + 15061 * _N**5 / 26880 + 167603 * _N**6 / 181440,
    49561 * _N**4 / 161280 - 179 * _N**5 / 168 + 6601661 * _N**6 / 7257600,
    34729 * _N**5 / 80640 - 3418889 * _N**6 / 1995840,
    212378941 * _N**6 / 319334400,
)


def utm_epsg(zone: int, north: bool) -> int:
    return (32600 if north else 32700) + zone


def parse_utm_epsg(epsg: int) -> tuple[int, bool] | None:
    """``(zone, north)`` for EPSG:326zz / 327zz, else None."""
    if 32601 <= epsg <= 32660:
        return epsg - 32600, True
    if 32701 <= epsg <= 32760:
        return epsg - 32700, False
    return None


def central_meridian(zone: int) -> float:
    return 6.0 * zone - 183.0


def lonlat_to_utm(lon, lat, zone: int, north: bool) -> tuple[np.ndarray, np.ndarray]:
    """Easting, northing (metres) of WGS84 ``lon``/``lat`` (degrees, float64) in UTM ``zone``."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    lam = np.radians(lon - central_meridian(zone))
    sin_phi = np.sin(np.radians(lat))
    # tangent of the conformal latitude, then Gauss-Schreiber coordinates (xi', eta')
    t = np.sinh(np.arctanh(sin_phi) - _E * np.arctanh(_E * sin_phi))
    xi_p = np.arctan2(t, np.cos(lam))
    eta_p = np.arctanh(np.sin(lam) / np.sqrt(1.0 + t * t))
    # zeta = zeta' + sum_j alpha_j sin(2 j zeta') with zeta' = xi' + i eta', summed by Clenshaw's
    # recurrence on complex numbers: two complex sin/cos instead of 24 real transcendentals.
    two_zeta = 2.0 * (xi_p + 1j * eta_p)
    a = 2.0 * np.cos(two_zeta)
    b1 = np.zeros_like(two_zeta)
    b2 = np.zeros_like(two_zeta)
    for alpha in reversed(_ALPHA):
        b1, b2 = a * b1 - b2 + alpha, b1
    zeta = 0.5 * two_zeta + b1 * np.sin(two_zeta)
    easting = FALSE_EASTING + _K0A * zeta.imag
    northing = _K0A * zeta.real + (0.0 if north else FALSE_NORTHING_SOUTH)
    return easting, northing
