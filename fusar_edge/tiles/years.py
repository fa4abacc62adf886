"""Which AEF year an acquisition date asks for: the rule both tile readers share.

AEF is annual, from 2017. ``TileStore.pick_year`` (numpy, ``tiles.store``) and
``NativeTileStore.pick_year`` (C, ``tiles.native``) both turn the scene's date into a year
here, then pick the stored year nearest to it; keeping the rule in its own module is what
lets neither reader import the other.
"""

from __future__ import annotations

import datetime as dt

from ..errors import AnchorError

FIRST_AEF_YEAR = 2017


def acquisition_year(date: dt.date | dt.datetime | str | int | None) -> int:
    """The AEF year asked for by an acquisition date (or year), checked: known, not in the
    future, within AEF's range. Shared by both readers' ``pick_year``."""
    if date is None:
        raise AnchorError("anchor date: unknown acquisition date; AEF is annual, so give one "
                          "(--date YYYY-MM-DD, or Anchor(..., date=...))")
    if isinstance(date, str):
        from ..geo.sar import parse_date  # lazy: geo.sar pulls in rasterio, needed here only for a date string

        date = parse_date(date)
    if isinstance(date, dt.datetime):
        date = date.date()
    if isinstance(date, dt.date) and date > dt.date.today():
        raise AnchorError(f"anchor date: {date.isoformat()} is in the future")
    year = int(date.year if isinstance(date, dt.date) else date)
    if year < FIRST_AEF_YEAR or year > dt.date.today().year:
        raise AnchorError(f"anchor date: year {year} is outside AEF's range ({FIRST_AEF_YEAR} to this year)")
    return year
