"""A whole scene read chip by chip: windowed reads, one stretch for the whole scene.

Memory follows the chip, never the scene: rasterio reads one window at a time. Every chip is
rendered with the scene's own stretch limits (``geo.sar``'s contract, step 3), computed once
from a decimated read of the whole scene (GDAL's average, from overviews when the file has
them): stretching each chip by its own percentiles would make open sea in one chip look like
clutter in the next, and the model would see a different scene per chip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError
from ..geo.radiometry import stretch, stretch_limits, to_db
from ..geo.sar import SarImage, exc_reason, open_raster, raster_date
from .georef import SceneGeoref
from .grid import Chip

OVERVIEW_SIDE = 2048  # the decimated read that sets the stretch: enough pixels for stable percentiles
OVERVIEW_STRIP = 64  # output rows per GDAL call of that read: Ctrl-C is seen between calls
GDAL_CACHE_MB = 128  # a row of 512-px uint16 blocks across a 25,000-px scene is 25 MB; float32 SLC 50 MB


class SceneReader:
    """An open scene: ``read(chip)`` -> the chip as a ``SarImage`` (its own georeference), or None
    when it holds no valid pixel (nodata, or the zero fill around a SAR swath). ``overview``: the
    decimated scene (at most ``OVERVIEW_SIDE`` px a side) in 8 bits, rendered with the scene's
    stretch, for the quick-look."""

    def __init__(self, path: str | Path, band: int = 1, scale: str = "auto"):
        self.path = Path(path)
        # GDAL's block cache defaults to 5 % of the machine's memory (1.2 GB on 24 GB), and a scene
        # read window by window would fill it: the scan's memory would follow the machine, not the
        # work. One row of chips touches one or two rows of blocks: GDAL_CACHE_MB holds them.
        self._env, self._ctx = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), None
        self._env.__enter__()
        try:
            ctx = open_raster(self.path)
            self.ds = ds = ctx.__enter__()
            self._ctx = ctx  # entered: close() exits it
            if band < 1 or band > ds.count:
                raise InputError(f"scene {self.path}: band {band} out of range; the file has {ds.count} band(s)")
            self.band, self.width, self.height = band, ds.width, ds.height
            self.nodata = ds.nodatavals[band - 1]
            self.georef = SceneGeoref.from_dataset(ds)
            self.georef.check_lonlat(str(self.path), ds.width, ds.height)
            self.date, _ = raster_date(ds)
            self.kind, self.limits = self._scene_stretch(scale)
        except BaseException:
            self.close()
            raise

    def _scene_stretch(self, scale: str) -> tuple[str, tuple[float, float] | None]:
        side = max(self.width, self.height)
        k = max(1.0, side / OVERVIEW_SIDE)
        shape = (max(1, round(self.height / k)), max(1, round(self.width / k)))
        try:
            pixels = self._decimated(shape)
        except RasterioError as exc:
            raise InputError(f"scene {self.path}: unreadable ({exc_reason(exc)}); is the file truncated "
                             "or corrupt?") from None
        if scale == "auto" and pixels.dtype == np.uint8:
            self.overview = pixels  # an 8-bit rendering already: chips are its pixels
            return "visual8", None
        db, valid, kind = to_db(self.path, pixels, scale, self.nodata)
        limits = stretch_limits(self.path, db, valid)
        self.overview = np.round(stretch(self.path, db, valid, limits) * 255.0).astype(np.uint8)
        return kind, limits

    def _decimated(self, shape: tuple[int, int]) -> np.ndarray:
        """The band averaged down to ``shape``. A scene without overviews is read whole for it
        (minutes for a 100k-px mosaic), and Python handles Ctrl-C only between GDAL calls, so it
        is read in strips of output rows; their windows are fractional, so GDAL averages the same
        source pixels as one call would (tested equal). With overviews GDAL reads a small one:
        one call, quick (strips there would round their edges on the overview's grid)."""
        if self.ds.overviews(self.band):
            return self.ds.read(self.band, out_shape=shape, resampling=Resampling.average)
        out_h, out_w = shape
        rows_per_out = self.height / out_h
        out = np.empty(shape, dtype=self.ds.dtypes[self.band - 1])
        for r0 in range(0, out_h, OVERVIEW_STRIP):
            r1 = min(out_h, r0 + OVERVIEW_STRIP)
            window = Window(0, r0 * rows_per_out, self.width, (r1 - r0) * rows_per_out)
            out[r0:r1] = self.ds.read(self.band, window=window, out_shape=(r1 - r0, out_w),
                                      resampling=Resampling.average)
        return out

    def read(self, chip: Chip) -> SarImage | None:
        window = Window(chip.x0, chip.y0, chip.width, chip.height)
        try:
            pixels = self.ds.read(self.band, window=window)
        except RasterioError as exc:  # a truncated or damaged file fails here, not at open
            raise InputError(f"scene {self.path}: unreadable at chip {chip.index} (window at x {chip.x0}, "
                             f"y {chip.y0}): {exc_reason(exc)}") from None
        if self.kind == "visual8":
            if not pixels.any():
                return None
            data = np.repeat(pixels[:, :, None], 3, axis=2)
        else:
            db, valid, _ = to_db(self.path, pixels, self.kind, self.nodata)
            if not valid.any():
                return None
            data = stretch(self.path, db, valid, self.limits)
        transform = None
        if self.georef.kind == "affine":  # the scene's grid, moved to the window's corner
            transform = tuple(float(v) for v in (self.ds.transform @ Affine.translation(chip.x0, chip.y0))[:6])
        return SarImage(f"{self.path}#chip{chip.index}", data, chip.height, chip.width, self.georef.crs, transform,
                        self.chip_bounds(chip), self.date, self.kind, None, self.band, self.ds.count)

    def chip_bounds(self, chip: Chip, per_side: int = 5) -> tuple[float, float, float, float] | None:
        """The chip's lon/lat envelope (edges sampled, so a rotated or GCP grid is covered), or None."""
        t = np.linspace(0.0, 1.0, per_side)
        xs = np.concatenate([chip.x0 + t * chip.width, np.full(per_side, chip.x0 + chip.width),
                             chip.x0 + t * chip.width, np.full(per_side, chip.x0)])
        ys = np.concatenate([np.full(per_side, chip.y0), chip.y0 + t * chip.height,
                             np.full(per_side, chip.y0 + chip.height), chip.y0 + t * chip.height])
        lonlat = self.georef.pixel_to_lonlat(xs, ys)
        if lonlat is None:
            return None
        lons, lats = (np.asarray(v, dtype=np.float64) for v in lonlat)
        return float(lons.min()), float(lats.min()), float(lons.max()), float(lats.max())

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scene_identity(path: Path, reader: SceneReader) -> dict:
    """What a resumed run must find unchanged: the same file (size, mtime) and its grid."""
    st = path.stat()
    return {"scene": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "width": reader.width, "height": reader.height, "band": reader.band, "georef": reader.georef.describe()}

