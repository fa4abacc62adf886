"""``fusar-edge tiles ...``: build, inspect, check and query the AEF tile store."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import InputError

EPILOG = """examples:
  fusar-edge tiles ingest aef/2023/31N/*.tiff --store station-tiles --bbox 2.5 53.5 3.5 54.5
  fusar-edge tiles ingest aef_index.parquet --store station-tiles --bbox 2.5 53.5 3.5 54.5 --years 2022 2023
  fusar-edge tiles info --store station-tiles
  fusar-edge tiles verify --store station-tiles
  fusar-edge tiles lookup --store station-tiles --bbox 2.9 54.0 2.97 54.04 --date 2023-03-15 --out anchors.npz
  fusar-edge tiles lookup --store station-tiles --image scene.tif --out anchors.npz

The store layout is documented in docs/tilestore.md (a C program reads it with libfusar_tiles).
"""

_BBOX = dict(nargs=4, type=float, metavar=("LON_MIN", "LAT_MIN", "LON_MAX", "LAT_MAX"))


def add_parser(sub) -> None:
    t = sub.add_parser("tiles", help="AEF tile store: ingest, info, verify, lookup",
                       description="Build and query the local store of AlphaEarth Foundations embeddings that "
                                   "anchors SAR images offline.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ts = t.add_subparsers(dest="tiles_command", metavar="SUBCOMMAND", required=True)

    g = ts.add_parser("ingest", help="add AEF COGs, an aef_index (CSV/GeoParquet) or an aef-download zarr",
                      description="Copy AEF embeddings into the store (cropped to --bbox), resumably and atomically: "
                                  "a killed ingest leaves the store as it was; running it again resumes.")
    g.add_argument("sources", nargs="+", metavar="SRC",
                   help="AEF COG files or folders (<year>/<zone>/<id>.tiff), aef_index .csv/.parquet, or .zarr folders")
    g.add_argument("--store", required=True, metavar="DIR", help="tile store directory (created if missing)")
    g.add_argument("--bbox", **_BBOX, help="keep only this WGS84 area (default: whole sources)")
    g.add_argument("--years", nargs="+", type=int, metavar="YEAR", help="keep only these AEF years")
    g.add_argument("--root", metavar="DIR", help="local mirror the index's paths are resolved against "
                                                 "(default: the index file's folder)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")

    i = ts.add_parser("info", help="years, CRSs, extents and size of a store")
    i.add_argument("--store", required=True, metavar="DIR", help="tile store directory")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")

    v = ts.add_parser("verify", help="re-hash every file; name missing, truncated or corrupted ones",
                      description="Check every tile file and the index against the manifest's checksums. "
                                  "Exit code 0: intact; 2: problems found (each printed with its file), or no store there.")
    v.add_argument("--store", required=True, metavar="DIR", help="tile store directory")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    lk = ts.add_parser("lookup", help="anchor set of one footprint, written as a reference NPZ",
                       description="Look up the AEF anchors of a footprint (a lon/lat box, or a GeoTIFF's own "
                                   "georeference) and write them as NPZ: features [S,64] float32, positions [S,2] "
                                   "float32 (y, x in [0,1], row-major, y southwards), mask [S] bool, year.")
    lk.add_argument("--store", required=True, metavar="DIR", help="tile store directory")
    where = lk.add_mutually_exclusive_group(required=True)
    where.add_argument("--bbox", **_BBOX, help="footprint in WGS84 degrees")
    where.add_argument("--image", metavar="GEOTIFF", help="take the footprint (and date) from this GeoTIFF")
    lk.add_argument("--date", metavar="YYYY-MM-DD", help="acquisition date (required with --bbox; overrides the "
                                                          "GeoTIFF's)")
    lk.add_argument("--grid", nargs=2, type=int, default=[16, 16], metavar=("ROWS", "COLS"),
                    help="anchor grid over the footprint (default: 16 16)")
    lk.add_argument("--allow-empty", action="store_true", help="write an all-masked set instead of failing when the "
                                                               "store has no data for the footprint")
    lk.add_argument("--out", required=True, metavar="FILE.npz",
                    help="anchors file to write (features, positions, mask; what ask --anchors reads)")
    lk.add_argument("--json", action="store_true", help="print the lookup summary as JSON")


def run(args) -> int:
    return {"ingest": _ingest, "info": _info, "verify": _verify, "lookup": _lookup}[args.tiles_command](args)


class _Bar:
    """A tqdm bar on stderr fed by ``progress(done, total, message)`` callbacks (off for --json)."""

    def __init__(self, enabled: bool, unit: str = "B"):
        self.bar, self.enabled, self.unit = None, enabled, unit

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.n = done
        if message:
            # the end of a long file name says which tile; the ellipsis says it was cut
            self.bar.set_description_str(message if len(message) <= 40 else "…" + message[-39:], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _ingest(args) -> int:
    from .tiles.ingest import ingest

    bar = _Bar(enabled=not args.json)
    try:
        report = ingest(args.sources, args.store, bbox=tuple(args.bbox) if args.bbox else None, years=args.years,
                        progress=bar, root=args.root)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for skipped in report.skipped:
            print(f"skipped: {skipped}", file=sys.stderr)
        print(report.summary())
    return 0


def _info(args) -> int:
    from .tiles.store import TileStore

    info = TileStore.open(args.store).describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store {info['store']} ({info['generation']}): {info['tiles']} tiles, {info['bytes'] / 2**20:.1f} MiB")
    for year, y in info["per_year"].items():
        box = ", ".join(f"{v:.4f}" for v in y["lonlat_extent"])
        print(f"  {year}: {y['tiles']} tiles, {', '.join(y['crs'])}, lon/lat extent [{box}], {y['pixels']:,} pixels")
    return 0


def _verify(args) -> int:
    from .tiles.verify import verify

    bar = _Bar(enabled=not args.json)
    try:
        report = verify(args.store, progress=bar)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        for problem in report.problems:
            print(f"problem: {problem}")
        for warning in getattr(report, "warnings", []):
            print(f"warning: {warning}")
        print(report.summary())
    return 0 if report.ok else 2  # as `fusar-edge verify BUNDLE`: a store that fails its check is bad input


def _lookup(args) -> int:
    from .errors import CoverageError
    from .geo.anchors import Anchor
    from .tiles.store import ALLOW_EMPTY_HINT, TileStore

    store = TileStore.open(args.store)
    if args.image:
        anchor = Anchor.from_geotiff(args.image, date=args.date)
    else:
        if not args.date:
            raise InputError("tiles lookup: --date YYYY-MM-DD is required with --bbox (AEF is annual)")
        anchor = Anchor(tuple(args.bbox), args.date)
    t0 = time.perf_counter()
    try:
        aset = store.lookup(anchor, grid=tuple(args.grid), allow_empty=args.allow_empty)
    except CoverageError as exc:  # the store's hint names ask's flag; this command's is --allow-empty
        raise CoverageError(str(exc).replace(ALLOW_EMPTY_HINT, "tiles lookup --allow-empty")) from None
    ms = (time.perf_counter() - t0) * 1e3
    out = aset.save_npz(args.out)
    summary = {"out": str(out), "year": aset.year, "acquisition_date": anchor.date.isoformat() if anchor.date else None,
               "crs": aset.crs, "count": aset.size, "coverage": round(aset.coverage, 4),
               "bounds": list(anchor.bbox), "notes": aset.notes, "lookup_ms": round(ms, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        for note in aset.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {out}: {aset.size} anchors, coverage {aset.coverage:.2f}, year {aset.year}, "
              f"{aset.crs or 'no CRS (no tile covers the footprint)'}")
    return 0
