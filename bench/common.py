"""Pure helpers shared by the shoal apps, the reference servers and the load generator.

Keeping the per-request work in one place guarantees that shoal and the reference
servers do exactly the same thing for each workload.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

ECHO_BODY = b'{"x": 1}'
MEMBER_VALUES: tuple[float, ...] = (1.0, 2.0, 3.0)
MEMBER_SLEEP_S = 0.005

# W3: a batch of n items costs 10 ms + 0.1 ms per item (a model whose fixed cost dominates).
W3_BASE_S = 0.010
W3_PER_ITEM_S = 0.0001
W3_MAX_BATCH = 32
W3_WAIT_S = 0.005
W3_MAX_ONGOING = 128  # enough for batches to fill at c=64

# Streaming: the first item comes after a known delay; the "many" stream yields small items.
STREAM_FIRST_DELAY_S = 0.020
STREAM_ITEM = "0123456789abcde\n"  # 16 bytes

# Where bench.apps_fastapi:business keeps its SQLite feature store (set by the bench driver).
BUSINESS_DB_ENV = "SHOAL_BENCH_BUSINESS_DB"


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


async def sleep_batch(xs: list[Any]) -> list[dict[str, Any]]:
    """W3 batch handler: sleep 10 ms + 0.1 ms per item, then answer each item."""
    await asyncio.sleep(W3_BASE_S + W3_PER_ITEM_S * len(xs))
    return [{"y": x} for x in xs]


async def first_yield_stream() -> AsyncIterator[str]:
    """One line after STREAM_FIRST_DELAY_S, telling when (wall clock) the generator started
    and when it yielded; the client subtracts to get what the transport added."""
    started = time.time()
    await asyncio.sleep(STREAM_FIRST_DELAY_S)
    yield json.dumps({"gen_start": started, "first_yield": time.time()}) + "\n"


async def many_items_stream(n: int) -> AsyncIterator[str]:
    """``n`` items of 16 bytes, as fast as the consumer takes them."""
    for _ in range(n):
        yield STREAM_ITEM
