"""Pure helpers shared by the shoal apps, the reference servers and the load generator.

Keeping the per-request work in one place guarantees that shoal and the reference
servers do exactly the same thing for each workload.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

MEMBER_VALUES: tuple[float, ...] = (1.0, 2.0, 3.0)
MEMBER_SLEEP_S = 0.005


def featurize(body: dict[str, Any]) -> dict[str, Any]:
    """W2 step 1: add one derived field to the request dict."""
    return {**body, "feature": float(body.get("x", 0)) * 2.0}


def predict(features: dict[str, Any]) -> float:
    """W2 step 2: return a number computed from the features."""
    return float(features.get("x", 0)) * 0.5 + float(features["feature"]) * 0.25


async def member(value: float) -> float:
    """W4 member: sleep 5 ms, then return a number."""
    await asyncio.sleep(MEMBER_SLEEP_S)
    return value


def mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else math.nan


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return sorted_values[low] * (1.0 - frac) + sorted_values[high] * frac


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the finite values, or None when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def summarize_us(durations_s: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99/mean in microseconds of a list of durations in seconds."""
    ordered = sorted(durations_s)
    return {
        "n": len(ordered),
        "p50_us": percentile(ordered, 50) * 1e6,
        "p90_us": percentile(ordered, 90) * 1e6,
        "p99_us": percentile(ordered, 99) * 1e6,
        "mean_us": mean(ordered) * 1e6,
    }
