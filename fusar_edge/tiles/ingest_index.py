"""Ingest source: the published AEF index (``aef_index`` .csv / .parquet) -> local COG files.

**The published index** ``aef_index`` as ``.csv`` or (Geo)``.parquet`` (parquet needs
``pyarrow``). Columns used (names are matched case-insensitively): ``path`` and ``year``
(required); ``wgs84_west, wgs84_south, wgs84_east, wgs84_north`` (to pick the files that
intersect ``bbox``; without them every file of the year is opened) and ``crs``
(``EPSG:326zz``, cross-checked against the file). Other columns (``fid, utm_zone,
utm_west .. utm_north, geom / WKT``) are ignored. ``path`` holds remote URLs
(``s3://us-west-2.opendata.source.coop/tge-labs/aef/v1/annual/2023/31N/x.tiff``,
``gs://alphaearth_foundations/satellite_embedding/v1/annual/...``, ``https://...``); each
is resolved to a local file by its ``<year>/<zone>/<file>`` suffix under ``root`` (default:
the index file's directory), or by its file name directly under ``root``. Missing files
are one error listing them.

``plan_index`` returns ``(local file, year, crs)`` for the rows that match; ``ingest`` plans
each file as a COG (``ingest_cog.plan_cog``) with that year and CRS.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from ..errors import InputError
from .ingest_plan import intersects

INDEX_SUFFIXES = (".csv", ".parquet", ".geoparquet")


def _col_map(names: Iterable[str]) -> dict[str, str]:
    return {n.strip().lower(): n for n in names}


def _index_rows_csv(path: Path) -> Iterator[dict]:
    csv.field_size_limit(1 << 30)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise InputError(f"{path}: empty index file")
            cols = _col_map(reader.fieldnames)
            _require_index_cols(path, cols)
            for row in reader:
                yield {k: row.get(orig) for k, orig in cols.items()}
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 CSV index ({exc})") from None
    except csv.Error as exc:
        raise InputError(f"{path}: malformed CSV index ({exc})") from None


def _index_rows_parquet(path: Path) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading a parquet index needs pyarrow: pip install pyarrow "
                         "(or use the CSV index aef_index.csv)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001  (pyarrow raises several types for a bad file)
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    cols = _col_map(pf.schema_arrow.names)
    _require_index_cols(path, cols)
    wanted = [cols[c] for c in ("path", "year", "crs", "wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north")
              if c in cols]
    try:
        for batch in pf.iter_batches(columns=wanted, batch_size=65536):
            data = {name.strip().lower(): batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
            for i in range(batch.num_rows):
                yield {k: v[i] for k, v in data.items()}
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read the parquet index ({exc})") from None


def _require_index_cols(path: Path, cols: dict) -> None:
    missing = [c for c in ("path", "year") if c not in cols]
    if missing:
        raise InputError(f"{path}: index lacks column(s) {', '.join(missing)} (has {', '.join(list(cols)[:20])}); "
                         "expected the AEF aef_index with path, year, wgs84_west..wgs84_north")


def _float_or_none(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _local_for(remote: str, base: Path) -> tuple[list[Path], Path]:
    """Candidate local files for an index ``path`` value (URL or path), and the one to name."""
    parsed = urlparse(remote)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # plain path (or a Windows drive)
        p = Path(parsed.path if parsed.scheme == "file" else remote)
        pure = PurePosixPath(p.as_posix())
        cands = [p if p.is_absolute() else base / p]
    else:
        pure = PurePosixPath(parsed.path)
        cands = []
    parts = pure.parts
    name = parts[-1] if parts else ""
    if len(parts) >= 3:
        cands.append(base.joinpath(*parts[-3:]))
    if name:
        cands.append(base / name)
    out = []
    for c in cands:
        out.append(c)
        if c.suffix.lower() == ".vrt":  # source.coop ships a .vrt beside each .tiff
            out.extend([c.with_suffix(".tiff"), c.with_suffix(".tif")])
    expected = base.joinpath(*parts[-3:]) if len(parts) >= 3 else cands[0]
    return out, expected


def plan_index(path: Path, years, bbox, root: Path | None, skipped: list[str]) -> list[tuple[Path, int, str | None]]:
    """``(local file, year, crs)`` for the index rows that match ``years`` and ``bbox``."""
    suffix = path.suffix.lower()
    rows = _index_rows_csv(path) if suffix == ".csv" else _index_rows_parquet(path)
    base = Path(root) if root is not None else path.parent
    picked, missing, seen_years, n_rows = [], [], set(), 0
    for row in rows:
        n_rows += 1
        remote = (row.get("path") or "").strip() if isinstance(row.get("path"), str) else row.get("path")
        try:
            year = int(float(row.get("year")))
        except (TypeError, ValueError):
            raise InputError(f"{path}: row {n_rows}: year {row.get('year')!r} is not a year") from None
        if not remote:
            raise InputError(f"{path}: row {n_rows}: empty path")
        seen_years.add(year)
        if years is not None and year not in years:
            continue
        bounds = tuple(_float_or_none(row.get(k)) for k in ("wgs84_west", "wgs84_south", "wgs84_east", "wgs84_north"))
        if bbox is not None and None not in bounds and not intersects(bounds, bbox):
            continue
        cands, expected = _local_for(str(remote), base)
        local = next((c for c in cands if c.is_file()), None)
        if local is None:
            missing.append((str(remote), expected))
            continue
        picked.append((local, year, row.get("crs")))
    if missing:
        shown = "; ".join(f"{r} (looked for {c})" for r, c in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(f"{path}: {len(missing)} file(s) the index selects are not present locally (no downloads are "
                         f"made; place them under {base} as <year>/<zone>/<file>): {shown}{more}")
    if not picked:
        what = []
        if years is not None:
            what.append(f"years {sorted(years)}")
        if bbox is not None:
            what.append(f"bbox {list(bbox)}")
        skipped.append(f"{path}: no row of {n_rows} matches {' and '.join(what) or 'anything'} "
                       f"(index years: {sorted(seen_years)[:12]})")
    return picked
