"""``fusar-edge data synth``: a synthetic SAR dataset with ground truth and its AEF tile store.

Layout of ``OUT`` (written into a temporary sibling and renamed into place, so a killed run
leaves nothing under ``OUT``)::

    aef/<year>/31N/synthNNNNN-...tiff  AEF COGs in the official layout (64 int8 bands A00..A63,
                                       10 m, UTM 31N, no data -128, bottom-up like the published files)
    tiles/                             those COGs ingested with ``tiles ingest``
    scenes/<id>.tif                    the scene: uint16 amplitude DN (like Sentinel-1 GRD), UTM 31N,
                                       10 m, ACQUISITION_DATE tag
    scenes/<id>.png                    its 8-bit rendering (what the reference training reads)
    anchors/<id>.npz                   its 16 x 16 anchor set looked up in tiles/ (reference NPZ)
    stage1-{train,val,test}.jsonl      caption rows (reference manifest format)
    stage2-{train,val,test}.jsonl      count / locate / classify / detect rows
    stage0-grid-{train,val,test}.jsonl what lies in each 3x3 cell: the demo's stage 0 only (ours)
    scenes.jsonl                       ground truth per scene (split, region, date, bounds, targets)
    dataset.json                       what made it: seed, counts, chip size, generator version

**Regions and splits.** Scenes are cut from square regions of ground (1.5 chips wide, each at
its own place in UTM zone 31N, 1 km apart at least), several scenes per region at different
offsets and dates (within the region's AEF year), each with its own targets. A region belongs
to one split, so train / val / test never share a scene or an area.

**AEF embeddings encode land cover**: each pixel's vector is a fixed prototype of its class
(water, land, urban, runway) plus smooth noise, normalised and quantised as AEF is. The
prototypes come from a constant seed (``PROTOTYPE_SEED``), not ``--seed``, so every dataset
this version writes gives anchors the same meaning: a model trained on one seed can be
evaluated on another.

Everything is deterministic from ``--seed`` (same bytes for the same seed and version).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError
from ..fsutil import publish_dir, remove_stale_work_dirs, work_dir
from .questions import grid_row, scene_rows
from .scene import COVER, TARGET_LABELS, make_region, make_scene, smooth_field

GENERATOR_VERSION = "fusar-edge-synth-v1"
PROTOTYPE_SEED = 20260201
PIXEL_M = 10.0
MAX_CHIP = 1008  # data synth --chip: twice the reference's 504 (a region's AEF layer then needs ~2 GB)
EPSG = 32631
ORIGIN_EN = (300000.0, 5800000.0)  # the regions' grid starts here (UTM 31N, North Sea)
REGION_STEP_M = 12000.0
YEARS = tuple(range(2018, 2025))
ANCHOR_GRID = (16, 16)
DN_SCALE = 2000.0  # uint16 DN = amplitude * DN_SCALE


def split_of(region: int) -> str:
    """Region 0 is test, 1 is val; then one in ten each, the rest train."""
    if region < 2:
        return ("test", "val")[region]
    return {0: "test", 1: "val"}.get(region % 10, "train")


def prototypes() -> np.ndarray:
    """Unit vectors ``[4, 64]``, one per land-cover class; constant across datasets."""
    p = np.random.default_rng(PROTOTYPE_SEED).standard_normal((len(COVER), 64))
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def aef_values(rng: np.random.Generator, cover: np.ndarray) -> np.ndarray:
    """int8 ``[H, W, 64]`` AEF codes for a land-cover map (prototype + smooth noise, unit length)."""
    from ..geo.synthetic import quantise

    h, w = cover.shape
    noise = smooth_field(rng, h, w, max(2, h // 48), channels=64)
    noise *= 0.35  # in place, the same arithmetic as prototype + 0.35 * noise / 8 with fewer copies
    noise /= math.sqrt(64)
    v = prototypes()[cover]
    v += noise
    del noise
    out = np.empty(v.shape, np.int8)
    for r0 in range(0, h, 64):  # rows at a time: a norm and a quantisation per pixel, bounded temporaries
        block = v[r0:r0 + 64]
        block /= np.linalg.norm(block, axis=2, keepdims=True)
        out[r0:r0 + 64] = quantise(block)
    return out


def _write_cog(path: Path, values: np.ndarray, x0: float, y0: float, pixel: float = PIXEL_M) -> None:
    import rasterio
    from rasterio.transform import Affine

    h, w = values.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    # bottom-up (positive y resolution, row 0 = south), as the published files are stored
    profile = dict(driver="GTiff", width=w, height=h, count=64, dtype="int8", crs=f"EPSG:{EPSG}",
                   transform=Affine(pixel, 0, x0, 0, pixel, y0 - h * pixel), nodata=-128, tiled=True,
                   blockxsize=128, blockysize=128, compress="deflate", interleave="pixel")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.ascontiguousarray(np.moveaxis(values[::-1], -1, 0)))
        for i in range(64):
            ds.set_band_description(i + 1, f"A{i:02d}")


def _write_scene(path: Path, amplitude: np.ndarray, x0: float, y0: float, date: dt.date) -> None:
    import rasterio
    from rasterio.transform import Affine

    h, w = amplitude.shape
    dn = np.clip(np.rint(amplitude * DN_SCALE), 1, 65535).astype(np.uint16)
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=1, dtype="uint16", crs=f"EPSG:{EPSG}",
                       transform=Affine(PIXEL_M, 0, x0, 0, -PIXEL_M, y0), compress="deflate") as ds:
        ds.write(dn, 1)
        ds.update_tags(ACQUISITION_DATE=date.isoformat())


def _write_region_aef(path: Path, rng: np.random.Generator, cover: np.ndarray, x0: float, y0: float,
                      margin: int = 8, step: int = 1) -> None:
    """The AEF COG of a region whose north-west corner is ``(x0, y0)``, a few pixels wider on
    every side so that lookups at the region's edge still find data. ``step``: AEF pixels of
    ``step`` scene pixels (the cover sampled every ``step``), for scenes too large to hold a
    64-channel layer at their own resolution."""
    pixel = PIXEL_M * step
    _write_cog(path, aef_values(rng, np.pad(cover[::step, ::step], margin, mode="edge")), x0 - margin * pixel,
               y0 + margin * pixel, pixel)


def _write_scene_files(tif: Path, png: Path, npz: Path, amplitude: np.ndarray, x0: float, y0: float,
                       date: dt.date, store):
    """A scene's GeoTIFF, its 8-bit rendering and its anchors looked up in ``store``; -> the SarImage."""
    from ..geo.anchors import Anchor
    from ..geo.chip import render
    from ..geo.sar import read_sar

    _write_scene(tif, amplitude, x0, y0, date)
    img = read_sar(tif)  # the PNG is the tif through the reader's contract, nothing else
    render(img).save(png)
    store.lookup(Anchor.from_sar_image(img), grid=ANCHOR_GRID).save_npz(npz)
    return img


def synth(out: str | Path, n: int, seed: int = 0, chip: int = 504, per_region: int = 8, force: bool = False,
          progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the dataset into ``out``; returns ``dataset.json``'s content.

    ``progress(phase, done, total)`` is called per region ("regions") and per scene ("scenes").
    """
    from ..tiles.ingest import ingest
    from ..tiles.store import TileStore

    for name, value, low in (("--n", n, 3), ("--chip", chip, 56), ("--per-region", per_region, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")
    if chip % 28 or chip > MAX_CHIP:
        # the bound: each region's 64-channel AEF layer is (1.5 chip)^2 x 64 values in memory
        raise InputError(f"--chip: expected a multiple of 28 (Qwen2.5-VL patch 14 x merge 2) from 56 to {MAX_CHIP}, "
                         f"got {chip}")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out}: already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out.parent, "synth")  # a killed run's (named by its process id)
    tmp = work_dir(out.parent, out.name, "synth")
    try:
        n_regions = max(3, math.ceil(n / per_region))
        region_px = chip * 3 // 2
        regions = []
        for r in range(n_regions):
            rng = np.random.default_rng([seed, 1, r])
            region = make_region(rng, region_px)
            year = YEARS[int(rng.integers(0, len(YEARS)))]
            x0 = ORIGIN_EN[0] + (r % 20) * REGION_STEP_M
            y0 = ORIGIN_EN[1] + (r // 20) * REGION_STEP_M + region_px * PIXEL_M  # north edge
            _write_region_aef(tmp / "aef" / str(year) / "31N" / f"synth{r:05d}-0000000000-0000000000.tiff",
                              rng, region.cover, x0, y0)
            regions.append((region, year, x0, y0))
            if progress:
                progress("regions", r + 1, n_regions)
        ingest([tmp / "aef"], tmp / "tiles")
        store = TileStore.open(tmp / "tiles")
        (tmp / "scenes").mkdir()
        (tmp / "anchors").mkdir()
        manifests: dict[str, list[dict]] = {f"stage{s}-{sp}": [] for s in ("1", "2", "0-grid")
                                            for sp in ("train", "val", "test")}
        truth = []
        for i in range(n):
            r = i % n_regions
            region, year, rx0, ry0 = regions[r]
            rng = np.random.default_rng([seed, 2, i])
            oy, ox = (int(v) for v in rng.integers(0, region_px - chip + 1, 2))
            cover = np.ascontiguousarray(region.cover[oy:oy + chip, ox:ox + chip])
            has_land = (cover != 0).mean() > 0.1
            heavy = bool(has_land and rng.random() < 0.5)
            scene = make_scene(rng, cover, region.smooth_land, region.has_runway, heavy)
            date = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
            sid = f"s{i:05d}"
            img = _write_scene_files(tmp / "scenes" / f"{sid}.tif", tmp / "scenes" / f"{sid}.png",
                                     tmp / "anchors" / f"{sid}.npz", scene.amplitude,
                                     rx0 + ox * PIXEL_M, ry0 - oy * PIXEL_M, date, store)
            split = split_of(r)
            group = "distractors" if any(t.label in ("building", "rock") for t in scene.targets) else "clean"
            captions, tasks = scene_rows(rng, sid, f"scenes/{sid}.png", f"anchors/{sid}.npz", cover,
                                         scene.targets, chip, group)
            manifests[f"stage1-{split}"] += captions
            manifests[f"stage2-{split}"] += tasks
            manifests[f"stage0-grid-{split}"].append(grid_row(sid, f"scenes/{sid}.png", f"anchors/{sid}.npz",
                                                              scene.targets, chip, chip / cover.shape[0], group))
            frac = np.bincount(cover.ravel(), minlength=4) / cover.size
            truth.append({"id": sid, "split": split, "region": r, "date": date.isoformat(),
                          "bounds": list(img.bounds_lonlat), "tif": f"scenes/{sid}.tif",
                          "png": f"scenes/{sid}.png", "anchors": f"anchors/{sid}.npz", "group": group,
                          "cover": {c: round(float(f), 4) for c, f in zip(COVER, frac)},
                          "counts": {lab: sum(t.label == lab for t in scene.targets) for lab in TARGET_LABELS},
                          "targets": [t.to_json() for t in scene.targets]})
            if progress:
                progress("scenes", i + 1, n)
        for name, rows in manifests.items():
            _write_jsonl(tmp / f"{name}.jsonl", rows)
        _write_jsonl(tmp / "scenes.jsonl", truth)
        info = {"format": GENERATOR_VERSION, "seed": seed, "n": n, "chip": chip, "regions": n_regions,
                "per_region": per_region, "pixel_m": PIXEL_M, "anchor_grid": list(ANCHOR_GRID),
                "splits": {sp: sum(t["split"] == sp for t in truth) for sp in ("train", "val", "test")},
                "rows": {k: len(v) for k, v in manifests.items()}}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        publish_dir(tmp, out)  # --force: the old dataset is swapped out, then deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


SAMPLE_AEF_MAX_PX = 1024  # sample: the largest AEF layer side at the scene's own resolution
SAMPLE_FILES = ("tiles", "anchors.npz", "scene.png", "scene.tif")  # moved in this order: scene.tif last


def _publish_sample(stage: Path, out: Path) -> None:
    """A new ``out`` in one rename; into an existing directory, file by file (each rename atomic)."""
    if not out.exists():
        publish_dir(stage, out)
        return
    for name in SAMPLE_FILES:
        os.replace(stage / name, out / name)


def sample_scene(out: str | Path, seed: int = 0, size: int = 224) -> dict:
    """One scene of the synthetic dataset's kind, for trying ``ask``: ``scene.tif``, ``scene.png``,
    its AEF tile store ``tiles/`` and its anchors ``anchors.npz`` (16 x 16, looked up in ``tiles/``).

    A coastal or open-sea region with at least one ship, so the README's "How many ships are
    there in this image?" has an answer; ``ships`` lists their boxes (scene pixels, x2/y2 exclusive).

    Everything is written into a hidden work directory first (``.NAME.sample-PID-*``; a later
    run removes a killed run's), then moved into place: a new ``out`` appears whole, and into
    an existing one each file is renamed in, ``scene.tif`` last. A kill or a full disk never
    leaves a truncated file.
    """
    from ..tiles.ingest import ingest
    from ..tiles.store import TileStore

    if isinstance(size, bool) or not isinstance(size, int) or size < 56 or size > 4096:
        raise InputError(f"--size: expected an integer from 56 to 4096 px, got {size!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: already exists and is not a directory (sample writes a directory of files)")
    for name in SAMPLE_FILES:
        if (out / name).exists():
            raise InputError(f"{out / name}: already exists (choose an empty directory)")
    for attempt in range(100):
        rng = np.random.default_rng([seed, 3, attempt])
        region = make_region(rng, size)
        if (region.cover == 0).mean() < 0.3:
            continue  # the sample is about ships: keep regions with sea
        scene = make_scene(rng, region.cover, region.smooth_land, region.has_runway, bool(rng.random() < 0.5))
        if any(t.label == "ship" for t in scene.targets):
            break
    year = YEARS[int(rng.integers(0, len(YEARS)))]
    date = dt.date(year, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    x0, y0 = 500000.0 - size * PIXEL_M / 2, 5983520.0 + size * PIXEL_M / 2  # 3 deg E, 54 deg N (North Sea)
    where = out if out.is_dir() else out.absolute().parent
    where.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(where, "sample")
    tmp = work_dir(where, out.name, "sample")
    try:
        stage = tmp / "sample"  # made by mkdir, not mkdtemp: the usual permissions once published
        stage.mkdir()
        # up to 1024 px the AEF layer has the scene's pixels; beyond, coarser, so that its 64
        # channels stay within ~1 GB of memory (4096 px at full resolution needed ~30 GB)
        _write_region_aef(tmp / "aef" / str(year) / "31N" / "sample-0000000000-0000000000.tiff", rng, region.cover,
                          x0, y0, step=-(-size // SAMPLE_AEF_MAX_PX))
        ingest([tmp / "aef"], stage / "tiles")
        img = _write_scene_files(stage / "scene.tif", stage / "scene.png", stage / "anchors.npz", scene.amplitude,
                                 x0, y0, date, TileStore.open(stage / "tiles"))
        _publish_sample(stage, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"scene_tif": str(out / "scene.tif"), "scene_png": str(out / "scene.png"),
            "anchors": str(out / "anchors.npz"), "tiles": str(out / "tiles"), "date": date.isoformat(),
            "bounds": img.bounds_lonlat, "ships": [t.box for t in scene.targets if t.label == "ship"],
            "counts": {lab: sum(t.label == lab for t in scene.targets) for lab in TARGET_LABELS}}
