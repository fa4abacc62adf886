"""ctypes binding of ``libfusar_tiles``, the C reader of the AEF tile store (``native/tiles``).

``NativeTileStore(dir).lookup_bbox(bbox, year, grid)`` returns the same float32 bytes as
``TileStore`` (``fusar_edge.tiles.store``), both following docs/tilestore.md; the C side
exists for callers without Python (and is faster). The library is found through
``$FUSAR_TILES_LIB``, the copy setup.py builds into the package, the source tree's
``build/`` directory, or the system's library path; ``build_native_tiles(build_dir)``
compiles it with CMake.

Lookups release the GIL (ctypes does, for a plain ``CDLL``), so several Python threads can
look up concurrently on one store; the C handle is read-only after opening.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import importlib.machinery
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np

from ..errors import AnchorError, FusarError, InputError
from .format import VEC_DIM, StoreError, lookup_points_arrays
from .years import acquisition_year

LIB_ENV = "FUSAR_TILES_LIB"
LIB_FILE = "libfusar_tiles.so"
PACKAGED_NAME = "_fusar_tiles"  # setup.py builds the same source into fusar_edge/ under this name
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding CMakeLists.txt, if any
MAX_GRID = 1024  # as TileStore.lookup

# error codes of fusar_tiles.h
_EINVAL, _ENOYEAR, _ERANGE, _ENOMEM, _EOPEN = -1, -2, -3, -4, -5


class NativeTilesUnavailable(FusarError):
    """libfusar_tiles cannot be found, loaded or built."""


# -- finding, building and loading the library ------------------------------------------------


def build_native_tiles(build_dir: str | Path, source_dir: str | Path | None = None, jobs: int | None = None) -> Path:
    """Configure and build ``libfusar_tiles`` (and ``example_lookup``) with CMake; -> the library.

    ``source_dir`` defaults to this checkout's root (where CMakeLists.txt is).
    """
    source = Path(source_dir) if source_dir else SOURCE_ROOT
    if not (source / "CMakeLists.txt").is_file() or not (source / "native/tiles/fusar_tiles.c").is_file():
        raise NativeTilesUnavailable(f"libfusar_tiles: no sources under {source} (expected CMakeLists.txt and "
                                     "native/tiles/fusar_tiles.c); build from a source checkout")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise NativeTilesUnavailable("libfusar_tiles: cmake not found on PATH; install CMake >= 3.20 and a C "
                                     "compiler, or point $FUSAR_TILES_LIB at a built libfusar_tiles.so")
    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    steps = [
        [cmake, "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
        [cmake, "--build", str(build), "--target", "fusar_tiles", "example_lookup",
         "-j", str(jobs or os.cpu_count() or 1)],
    ]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NativeTilesUnavailable(f"libfusar_tiles: `{' '.join(cmd)}` failed to run: {exc}") from None
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise NativeTilesUnavailable(f"libfusar_tiles: `{' '.join(cmd)}` exited with {done.returncode}: "
                                         + " | ".join(tail))
    lib = build / LIB_FILE
    if not lib.is_file():
        raise NativeTilesUnavailable(f"libfusar_tiles: the build in {build} finished but produced no {LIB_FILE}")
    return lib


def find_native_tiles() -> Path | None:
    """``$FUSAR_TILES_LIB``, else the copy built with the package (``fusar_edge/_fusar_tiles*.so``,
    see setup.py), else ``<checkout>/build/libfusar_tiles.so``, else the system's; or None."""
    env = os.environ.get(LIB_ENV)
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        packaged = package / f"{PACKAGED_NAME}{suffix}"
        if packaged.is_file():
            return packaged
    local = SOURCE_ROOT / "build" / LIB_FILE
    if local.is_file():
        return local
    found = ctypes.util.find_library("fusar_tiles")
    return Path(found) if found else None


_LIBS: dict[str, ctypes.CDLL] = {}
_LIBS_LOCK = threading.Lock()


def load_native_tiles(lib_path: str | Path | None = None) -> ctypes.CDLL:
    """The loaded library with its prototypes declared (cached per path)."""
    path = Path(lib_path) if lib_path else find_native_tiles()
    if path is None:
        raise NativeTilesUnavailable(
            f"libfusar_tiles not found: set ${LIB_ENV} to a built {LIB_FILE}, build it into {SOURCE_ROOT / 'build'} "
            "(`cmake -S . -B build && cmake --build build`), or call "
            "fusar_edge.tiles.native.build_native_tiles(build_dir)")
    key = str(path)
    with _LIBS_LOCK:
        lib = _LIBS.get(key)
        if lib is None:
            if os.sep in key and not path.is_file():
                raise NativeTilesUnavailable(f"libfusar_tiles: {path}: no such file")
            try:
                lib = ctypes.CDLL(key)
            except OSError as exc:
                raise NativeTilesUnavailable(f"libfusar_tiles: cannot load {path}: {exc}") from None
            _declare(lib)
            _LIBS[key] = lib
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, c = ctypes.c_void_p, ctypes
    sigs = {
        "fusar_tiles_strerror": (c.c_char_p, [c.c_int]),
        "fusar_tiles_open": (c.c_int, [c.c_char_p, c.POINTER(p), c.c_char_p, c.c_size_t]),
        "fusar_tiles_close": (None, [p]),
        "fusar_tiles_generation": (c.c_char_p, [p]),
        "fusar_tiles_count_tiles": (c.c_size_t, [p]),
        "fusar_tiles_count_years": (c.c_int, [p]),
        "fusar_tiles_year": (c.c_int, [p, c.c_int]),
        "fusar_tiles_pick_year": (c.c_int, [p, c.c_int]),
        "fusar_tiles_lookup_points": (c.c_long, [p, c.c_int, c.c_size_t, p, p, p, p]),
        "fusar_tiles_lookup_bbox": (c.c_long, [p, c.c_int, c.c_double, c.c_double, c.c_double, c.c_double,
                                               c.c_int, c.c_int, p, p, p]),
        "fusar_tiles_lonlat_to_utm": (c.c_int, [c.c_double, c.c_double, c.c_int, c.c_int, c.POINTER(c.c_double),
                                                c.POINTER(c.c_double)]),
    }
    for name, (restype, argtypes) in sigs.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeTilesUnavailable(f"libfusar_tiles: {lib._name} lacks {name}; rebuild it") from None
        fn.restype, fn.argtypes = restype, argtypes


# -- the store ------------------------------------------------------------------------------


class NativeTileStore:
    """A tile store opened by libfusar_tiles: tiles memory-mapped in C, lookups in C.

    Safe to share between threads. ``close()`` (or leaving a ``with`` block) waits for
    lookups in flight, then unmaps; later calls raise ``StoreError``.
    """

    def __init__(self, store_dir: str | Path, lib_path: str | Path | None = None):
        self._lib = load_native_tiles(lib_path)
        self.root = Path(store_dir)
        err = ctypes.create_string_buffer(1024)
        handle = ctypes.c_void_p()
        rc = self._lib.fusar_tiles_open(os.fsencode(str(store_dir)), ctypes.byref(handle), err, len(err))
        if rc != 0:
            msg = err.value.decode("utf-8", errors="replace") or self._strerror(rc)
            raise StoreError(msg)
        self._handle = handle
        self._cond = threading.Condition()
        self._active = 0
        self.generation = self._lib.fusar_tiles_generation(handle).decode()
        self.n_tiles = int(self._lib.fusar_tiles_count_tiles(handle))
        self.years = [self._lib.fusar_tiles_year(handle, i) for i in range(self._lib.fusar_tiles_count_years(handle))]

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._cond:
            handle, self._handle = self._handle, None
            while self._active:
                self._cond.wait()
        if handle:
            self._lib.fusar_tiles_close(handle)

    def __enter__(self) -> "NativeTileStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.fusar_tiles_close(self._handle)
            self._handle = None

    def _acquire(self) -> ctypes.c_void_p:
        with self._cond:
            if not self._handle:
                raise StoreError(f"tile store {self.root}: closed")
            self._active += 1
            return self._handle

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def _strerror(self, code: int) -> str:
        return self._lib.fusar_tiles_strerror(code).decode()

    def _year_error(self, code: int, year: int) -> Exception:
        if code == _ENOYEAR:
            return AnchorError(f"tile store {self.root}: no tiles for year {year} (has {self.years})")
        if code == _ERANGE:
            return AnchorError(f"anchor date: year {year} is outside AEF's range (2017 to this year)")
        if code == _ENOMEM:
            return MemoryError(f"tile store {self.root}: out of memory in the lookup")
        return InputError(f"tile store {self.root}: lookup: {self._strerror(code)}")

    # -- queries -----------------------------------------------------------------------------

    def pick_year(self, date: dt.date | str | int | None) -> tuple[int, str | None]:
        """``(year, note)`` as ``TileStore.pick_year``: the acquisition year if stored, else the nearest."""
        year = acquisition_year(date)
        handle = self._acquire()
        try:
            used = self._lib.fusar_tiles_pick_year(handle, year)
        finally:
            self._release()
        if used < 0:
            raise self._year_error(used, year)
        note = None if used == year else f"no AEF tiles for {year} in {self.root}; used the nearest year, {used}"
        return used, note

    def lookup_points(self, lon, lat, year: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features float32 [S, 64], mask bool [S])`` at WGS84 points (docs/tilestore.md, "Lookup")."""
        lon, lat = lookup_points_arrays(lon, lat)
        n = lon.size
        features = np.empty((n, VEC_DIM), np.float32)
        mask = np.empty(n, bool)  # C writes 0/1 bytes: valid numpy booleans
        handle = self._acquire()
        try:
            rc = self._lib.fusar_tiles_lookup_points(handle, int(year), n, lon.ctypes.data, lat.ctypes.data,
                                                     features.ctypes.data, mask.ctypes.data)
        finally:
            self._release()
        if rc < 0:
            raise self._year_error(rc, int(year))
        return features, mask

    def lookup_bbox(self, bbox, year: int, grid: tuple[int, int] = (16, 16)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features [S, 64], positions [S, 2] (y, x), mask [S])`` of a ``rows x cols`` grid over
        ``bbox = (lon_min, lat_min, lon_max, lat_max)`` (docs/tilestore.md, "Grids")."""
        try:
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise InputError(f"grid: expected (rows, cols), got {grid!r}") from None
        if not (1 <= rows <= MAX_GRID and 1 <= cols <= MAX_GRID):
            raise InputError(f"grid: rows and cols must be in 1..{MAX_GRID}, got {rows} x {cols}")
        try:
            lon_min, lat_min, lon_max, lat_max = (float(v) for v in bbox)
        except (TypeError, ValueError):
            raise InputError(f"bbox: expected 4 numbers (lon_min, lat_min, lon_max, lat_max), got {bbox!r}") from None
        n = rows * cols
        features = np.empty((n, VEC_DIM), np.float32)
        positions = np.empty((n, 2), np.float32)
        mask = np.empty(n, bool)
        handle = self._acquire()
        try:
            rc = self._lib.fusar_tiles_lookup_bbox(handle, int(year), lon_min, lat_min, lon_max, lat_max, rows, cols,
                                                   features.ctypes.data, positions.ctypes.data, mask.ctypes.data)
        finally:
            self._release()
        if rc == _EINVAL:
            raise InputError(f"bbox ({lon_min}, {lat_min}, {lon_max}, {lat_max}): expected finite lon_min < lon_max "
                             "in [-180, 180] and lat_min < lat_max in [-90, 90] (no antimeridian crossing)")
        if rc < 0:
            raise self._year_error(rc, int(year))
        return features, positions, mask


def lonlat_to_utm_native(lon: float, lat: float, zone: int, north: bool,
                         lib_path: str | Path | None = None) -> tuple[float, float]:
    """The C library's projection of one point (for tests; ``utm.lonlat_to_utm`` is the reference)."""
    lib = load_native_tiles(lib_path)
    e, n = ctypes.c_double(), ctypes.c_double()
    if lib.fusar_tiles_lonlat_to_utm(float(lon), float(lat), int(zone), int(bool(north)), e, n) != 0:
        raise InputError(f"UTM zone {zone}: expected 1..60")
    return e.value, n.value
