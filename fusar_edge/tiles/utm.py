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
    """Easting, northing (metres) of WGS84 ``lon``/``lat`` (degrees, float64) in UTM ``zone``.

    Written as explicit real arithmetic, one rounded operation at a time, in the order the
    C reader uses (no complex numbers: numpy may fuse or reorder their products on some
    CPUs). Only five transcendental functions per point: the double angles of the
    Gauss-Schreiber coordinates follow algebraically from ``t`` and ``lambda``.
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    lam = np.radians(lon - central_meridian(zone))
    sin_phi = np.sin(np.radians(lat))
    # tangent of the conformal latitude
    t = np.sinh(np.arctanh(sin_phi) - _E * np.arctanh(_E * sin_phi))
    cos_lam = np.cos(lam)
    sin_lam = np.sin(lam)
    # Gauss-Schreiber coordinates: xi' = atan2(t, cos lam), eta' = atanh(u)
    xi_p = np.arctan2(t, cos_lam)
    u = sin_lam / np.sqrt(1.0 + t * t)
    eta_p = np.arctanh(u)
    # sin/cos of 2 xi' and sinh/cosh of 2 eta' without further transcendentals
    r2 = t * t + cos_lam * cos_lam
    sin2xi = 2.0 * t * cos_lam / r2
    cos2xi = (cos_lam * cos_lam - t * t) / r2
    d = 1.0 - u * u
    sinh2eta = 2.0 * u / d
    cosh2eta = (1.0 + u * u) / d
    # zeta = zeta' + sum_j alpha_j sin(2 j zeta'), zeta' = xi' + i eta', by Clenshaw's recurrence
    # b_j = a b_{j+1} - b_{j+2} + alpha_j with a = 2 cos(2 zeta'); the sum is b_1 sin(2 zeta')
    sin_r = sin2xi * cosh2eta  # sin(2 zeta') = sin_r + i sin_i
    sin_i = cos2xi * sinh2eta
    a_r = 2.0 * (cos2xi * cosh2eta)  # a = 2 cos(2 zeta') = a_r + i a_i
    a_i = -2.0 * (sin2xi * sinh2eta)
    b1_r = np.zeros_like(t)
    b1_i = np.zeros_like(t)
    b2_r = np.zeros_like(t)
    b2_i = np.zeros_like(t)
    for alpha in reversed(_ALPHA):
        n_r = a_r * b1_r - a_i * b1_i - b2_r + alpha
        n_i = a_r * b1_i + a_i * b1_r - b2_i
        b2_r, b2_i = b1_r, b1_i
        b1_r, b1_i = n_r, n_i
    xi = xi_p + (b1_r * sin_r - b1_i * sin_i)
    eta = eta_p + (b1_r * sin_i + b1_i * sin_r)
    easting = FALSE_EASTING + _K0A * eta
    northing = _K0A * xi + (0.0 if north else FALSE_NORTHING_SOUTH)
    return easting, northing
