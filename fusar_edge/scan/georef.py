"""Scene pixels -> the scene's CRS and EPSG:4326.

Pixel coordinates are corners, not centres: x = column, y = row, (0, 0) is the top-left corner
of the first pixel and (width, height) the bottom-right corner of the last (rasterio's
``offset="ul"``). A detection box's edges lie on pixel corners, so this is the convention that
maps a box exactly.

rasterio's transformers do the mapping rather than hand-written math: they run GDAL's own
transformers, so a GCP grid gets the polynomial GDAL fits (order chosen from the GCP count, as
gdalwarp does) and RPCs get GDAL's RPC model. The polygons then line up with the scene as GDAL,
QGIS or gdalwarp place it, which a home-made fit would not guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.transform import Affine, AffineTransformer, GCPTransformer, RPCTransformer
from rasterio.warp import transform as warp_transform

from ..errors import InputError
from ..geo.sar import crs_error

LONLAT = "EPSG:4326"


@dataclass(frozen=True)
class SceneGeoref:
    """How a scene's pixels sit on the Earth. Holds plain data, not the dataset, so it outlives
    the open file. ``crs`` is what ``pixel_to_crs`` returns coordinates in (None for "none")."""

    kind: str
    crs: str | None
    transform: Affine | None = None
    gcps: tuple = ()
    rpcs: Any = None

    @classmethod
    def from_dataset(cls, ds) -> "SceneGeoref":
        # Affine first: when a file has one with a CRS it is the scene's stated grid. GDAL gives
        # an identity transform to a file without one, which must not read as "1 m pixels at 0, 0".
        if ds.crs and not ds.transform.is_identity:
            return cls("affine", ds.crs.to_string(), transform=ds.transform)
        gcps, gcp_crs = ds.gcps
        if gcps and gcp_crs:  # GCPs without a CRS place nothing: fall through
            return cls("gcps", gcp_crs.to_string(), gcps=tuple(gcps))
        if ds.rpcs is not None:
            return cls("rpcs", LONLAT, rpcs=ds.rpcs)  # RPCs map to WGS84 lon/lat by definition
        return cls("none", None)

    def check_lonlat(self, where: str, width: int = 1, height: int = 1) -> None:
        """One line naming the scene, before any chip is answered, when its CRS has no way to
        lon/lat (an engineering or another body's CRS: not a projection library traceback at the
        first chip), or when its corners land off the Earth: a grid in metres labelled EPSG:4326
        (a common mislabel) would otherwise be written into GeoJSON as 500000 degrees."""
        if self.kind == "none":
            return
        xs, ys = [0.0, width, width, 0.0, width / 2], [0.0, 0.0, height, height, height / 2]
        try:
            lon, lat = self.pixel_to_lonlat(xs, ys)
        except Exception as exc:  # PROJ / GDAL raise their own types (rasterio._err.CPLE_*)
            raise crs_error(f"scene {where}", self.crs or "?", exc) from None
        # |lon| up to 540: a geographic grid may run past 180 (written as two polygons there)
        off = ~(np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0 + 1e-9) & (np.abs(lon) <= 540.0))
        if off.any():
            i = int(np.argmax(off))
            raise InputError(f"scene {where}: its corner at pixel ({xs[i]:g}, {ys[i]:g}) maps to lon {lon[i]:.6g}, lat "
                             f"{lat[i]:.6g}, off the Earth: is {self.crs} the CRS its transform is in? (a grid in "
                             "metres labelled as degrees, say)")

    def describe(self) -> dict:
        return {"kind": self.kind, "crs": self.crs}

    def _transformer(self):
        if self.kind == "affine":
            return AffineTransformer(self.transform)
        if self.kind == "gcps":
            return GCPTransformer(list(self.gcps))
        # RPCs at height 0 above the ellipsoid (no DEM): the offset this leaves grows with terrain
        # height and off-nadir angle; sea-level targets (ships) are where it is smallest.
        return RPCTransformer(self.rpcs)

    def pixel_to_crs(self, xs, ys) -> tuple[np.ndarray, np.ndarray]:
        """Pixel corners -> ``(X, Y)`` in ``self.crs``; the pixel coordinates themselves for "none"."""
        xs, ys, shape = _flat(xs, ys)
        if self.kind == "none" or xs.size == 0:
            return xs.reshape(shape), ys.reshape(shape)
        with self._transformer() as t:
            # rasterio takes rows first; offset="ul" keeps our corners as corners
            X, Y = t.xy(ys, xs, offset="ul")
        return np.asarray(X, np.float64).reshape(shape), np.asarray(Y, np.float64).reshape(shape)

    def pixel_to_lonlat(self, xs, ys) -> tuple[np.ndarray, np.ndarray] | None:
        """Pixel corners -> ``(lon, lat)`` in EPSG:4326 (lon first, as GeoJSON); None for "none"."""
        if self.kind == "none":
            return None
        X, Y = self.pixel_to_crs(xs, ys)
        if X.size == 0:
            return X, Y
        lon, lat = warp_transform(self.crs, LONLAT, X.ravel(), Y.ravel())
        return np.asarray(lon, np.float64).reshape(X.shape), np.asarray(lat, np.float64).reshape(Y.shape)


def _flat(xs, ys) -> tuple[np.ndarray, np.ndarray, tuple]:
    xs, ys = np.broadcast_arrays(np.asarray(xs, np.float64), np.asarray(ys, np.float64))
    return xs.ravel(), ys.ravel(), xs.shape
