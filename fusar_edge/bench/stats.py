"""Summary statistics of timing samples (milliseconds)."""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np


def summarize(values_ms: Sequence[float]) -> dict[str, float | int] | None:
    """``p50_ms`` / ``p90_ms`` / ``p99_ms`` (linear interpolation between samples, numpy's
    default), mean, standard deviation (the spread; 0 for one sample), min, max and ``n``."""
    values = [float(v) for v in values_ms]
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
        "mean_ms": round(statistics.fmean(values), 4),
        "stdev_ms": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min_ms": round(min(values), 4), "max_ms": round(max(values), 4), "n": len(values),
    }
