"""A bounded history per deployment, computed from successive samples of the metrics.

Each :meth:`MetricsHistory.record` reads the cumulative counters and histograms
of every process (the metrics store's merged families, as plain tuples: see
:data:`Family`) and turns what changed since the previous sample into one point
per deployment: request rate, error rate and ratio, latency percentiles, batch
sizes, and replica counts. Only the four families it plots are looked at.

Guarantees:
- memory is bounded: at most ``window_s / interval_s`` points per deployment, and a
  deployment no longer seen is forgotten once its last point leaves the window;
- a counter that goes down (a replica restarted, its process's counters anew) counts
  from zero, never as a negative rate; a series seen for the first time counts whole,
  except in the very first sample, which is only the baseline (its counts are since
  the instance started, not since the previous sample);
- rates and percentiles are over the last ``smoothing_s`` (a few samples), so that
  processes reporting once a second, out of phase with the sampler, do not make the
  curves alternate between zero and double; a window without requests has no
  latency (None), not zero;
- percentiles are Prometheus's ``histogram_quantile``: linear within a bucket, and
  the highest finite bucket bound when the rank falls in the ``+Inf`` bucket.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

#: (application, deployment): how a deployment is known in the metrics' labels.
DeploymentKey = tuple[str, str]
#: One metric family as the metrics store gives it (``MetricsStore.families()``): name,
#: kind, help, and its samples as (sample name, ((label, value), ...), value).
Family = tuple[str, str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]


class _Signal(enum.IntEnum):  # int hashing: looked up for every sample, every second
    REQUESTS = enum.auto()
    ERRORS = enum.auto()
    LATENCY = enum.auto()  # histogram buckets, milliseconds
    BATCH = enum.auto()  # histogram buckets, requests per batch
    BATCH_COUNT = enum.auto()
    BATCH_SUM = enum.auto()


# Family and sample names with Ray's ``ray_`` prefix removed (both spellings are read):
# counters as exported (``_total``) and as a hand-written collector might name them.
_FAMILIES = frozenset({
    "serve_deployment_request_counter", "serve_deployment_error_counter",
    "serve_deployment_processing_latency_ms", "shoal_batch_size",
})  # fmt: skip
_SAMPLES: dict[str, _Signal] = {
    "serve_deployment_request_counter_total": _Signal.REQUESTS,
    "serve_deployment_request_counter": _Signal.REQUESTS,
    "serve_deployment_error_counter_total": _Signal.ERRORS,
    "serve_deployment_error_counter": _Signal.ERRORS,
    "serve_deployment_processing_latency_ms_bucket": _Signal.LATENCY,
    "shoal_batch_size_bucket": _Signal.BATCH,
    "shoal_batch_size_count": _Signal.BATCH_COUNT,
    "shoal_batch_size_sum": _Signal.BATCH_SUM,
}
_SAMPLES.update({"ray_" + name: signal for name, signal in _SAMPLES.items()})
_FAMILIES = _FAMILIES | {"ray_" + name for name in _FAMILIES}

#: One series of one process: (signal, its label set without ``le`` as a number, ``le``).
_SeriesKey = tuple[_Signal, int, float]
#: Label sets remembered at most (a bound on memory; past it the next sample is a baseline).
_LABEL_SETS = 100_000


class ReplicaCount(NamedTuple):
    running: int
    target: int | None


class Point(NamedTuple):
    """One deployment at one sample (rates per second, latencies in milliseconds)."""

    t: float  # wall-clock time of the sample (time.time())
    request_rate: float
    error_rate: float
    error_ratio: float | None  # errors / requests; None without requests
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    replicas: int | None  # RUNNING replicas; None if the deployment was not in the details
    target_replicas: int | None
    batch_mean: float | None  # requests per batch; None without batches
    batch_p95: float | None
    batch_rate: float  # batches per second


#: The JSON names of the columns of :meth:`MetricsHistory.series`, in Point's order.
COLUMNS = Point._fields


@dataclass
class _Delta:
    """What changed in one deployment between two samples."""

    dt: float
    requests: float = 0.0
    errors: float = 0.0
    latency: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    batch: dict[float, float] = field(default_factory=dict)
    batches: float = 0.0
    batch_sum: float = 0.0

    def add(self, signal: _Signal, le: float, amount: float) -> None:
        match signal:
            case _Signal.REQUESTS:
                self.requests += amount
            case _Signal.ERRORS:
                self.errors += amount
            case _Signal.LATENCY:
                self.latency[le] = self.latency.get(le, 0.0) + amount
            case _Signal.BATCH:
                self.batch[le] = self.batch.get(le, 0.0) + amount
            case _Signal.BATCH_COUNT:
                self.batches += amount
            case _Signal.BATCH_SUM:
                self.batch_sum += amount

    def merge(self, other: _Delta) -> None:
        self.dt += other.dt
        self.requests += other.requests
        self.errors += other.errors
        self.batches += other.batches
        self.batch_sum += other.batch_sum
        for le, amount in other.latency.items():
            self.latency[le] = self.latency.get(le, 0.0) + amount
        for le, amount in other.batch.items():
            self.batch[le] = self.batch.get(le, 0.0) + amount


def bucket_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile (0..1) of a histogram given as cumulative counts per upper bound
    (``le``, ``math.inf`` included), as Prometheus's ``histogram_quantile``; None if empty."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower  # the highest finite bound: nothing more is known
            if upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None if math.isinf(lower) else lower


def replica_counts(details: Mapping[str, Any]) -> dict[DeploymentKey, ReplicaCount]:
    """RUNNING replicas and target per deployment, from ``GET /api/serve/applications/``."""
    counts: dict[DeploymentKey, ReplicaCount] = {}
    for app_name, app in (details.get("applications") or {}).items():
        for name, deployment in (app.get("deployments") or {}).items():
            running = sum(r.get("state") == "RUNNING" for r in deployment.get("replicas") or [])
            counts[(app_name, name)] = ReplicaCount(running, deployment.get("target_num_replicas"))
    return counts


class _Reader:
    """Reads the samples the history uses, remembering what each label set means (the
    same sets come back every second: parsing them once keeps a sample cheap)."""

    def __init__(self) -> None:
        self._meaning: dict[tuple[tuple[str, str], ...], tuple[int, float]] = {}
        self._ids: dict[tuple[tuple[str, str], ...], int] = {}
        self.deployments: list[DeploymentKey] = []  # by label set number

    def full(self) -> bool:
        return len(self._meaning) > _LABEL_SETS

    def read(self, families: Iterable[Family]) -> dict[_SeriesKey, float]:
        """The samples of the four families plotted, by series (others are skipped whole)."""
        values: dict[_SeriesKey, float] = {}
        meanings = self._meaning
        for name, _, _, samples in families:
            if name not in _FAMILIES:
                continue
            for sample_name, labels, value in samples:
                signal = _SAMPLES.get(sample_name)
                if signal is None:
                    continue
                meaning = meanings.get(labels)
                if meaning is None:
                    meaning = meanings[labels] = self._parse(labels)
                values[(signal, *meaning)] = float(value)
        return values

    def _parse(self, labels: tuple[tuple[str, str], ...]) -> tuple[int, float]:
        found = dict(labels)
        le = float(found.pop("le", 0.0))
        rest = tuple(pair for pair in labels if pair[0] != "le")
        number = self._ids.get(rest)
        if number is None:
            number = self._ids[rest] = len(self.deployments)
            self.deployments.append((found.get("application", ""), found.get("deployment", "")))
        return number, le


class MetricsHistory:
    """Points per deployment over the last ``window_s``, one per :meth:`record` call.

    Not thread-safe: one owner (the dashboard's sampler task) records and reads.
    """

    def __init__(
        self, window_s: float = 600.0, interval_s: float = 1.0, smoothing_s: float = 3.0
    ) -> None:
        self.window_s = window_s
        self.interval_s = interval_s
        self._points_kept = max(2, math.ceil(window_s / interval_s))
        self._smoothing = max(1, round(smoothing_s / interval_s))
        self._reader = _Reader()
        self._previous: dict[_SeriesKey, float] | None = None
        self._last_t = 0.0
        self._recent: dict[DeploymentKey, deque[_Delta]] = {}
        self._points: dict[DeploymentKey, deque[Point]] = {}

    def record(
        self,
        now: float,
        families: Iterable[Family],
        replicas: Mapping[DeploymentKey, ReplicaCount],
    ) -> None:
        """Add one sample taken at ``now`` (wall clock, seconds): ``families`` are the
        metric families of every process (cumulative), ``replicas`` the counts in the details."""
        if self._reader.full():
            self._reader, self._previous = _Reader(), None
        values = self._reader.read(families)
        previous, self._previous = self._previous, values
        last_t, self._last_t = self._last_t, now
        dt = now - last_t
        if previous is None or dt <= 0:
            return  # the baseline: nothing to take a difference from yet
        deltas: dict[DeploymentKey, _Delta] = {}
        moved: set[DeploymentKey] = set()
        deployment_of = self._reader.deployments
        for series, value in values.items():
            before = previous.get(series)
            change = value if before is None or value < before else value - before
            signal, number, le = series
            key = deployment_of[number]
            delta = deltas.get(key)
            if delta is None:
                delta = deltas[key] = _Delta(dt)
            # Unchanged buckets too: a percentile interpolates from the bound below.
            delta.add(signal, le, change)
            if change:
                moved.add(key)
        # A deployment is followed while the details list it or its counts move.
        for key in replicas.keys() | moved:
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque(maxlen=self._smoothing)
            recent.append(deltas.get(key) or _Delta(dt))
            points = self._points.get(key)
            if points is None:
                points = self._points[key] = deque(maxlen=self._points_kept)
            points.append(_point(now, recent, replicas.get(key)))
        self._forget(now - self.window_s)

    def _forget(self, before: float) -> None:
        for key in [k for k, points in self._points.items() if points[-1].t < before]:
            del self._points[key]
            self._recent.pop(key, None)

    def series(self, since: float | None = None) -> list[dict[str, Any]]:
        """Per deployment, its points newer than ``since`` (all if None) as columns:
        ``{"application", "deployment", "points": {column: [values, oldest first]}}``."""
        result = []
        for (application, deployment), points in sorted(self._points.items()):
            chosen = [p for p in points if since is None or p.t > since]
            columns = {name: [p[i] for p in chosen] for i, name in enumerate(COLUMNS)}
            result.append({"application": application, "deployment": deployment, "points": columns})
        return result


def _point(now: float, recent: Iterable[_Delta], count: ReplicaCount | None) -> Point:
    total = _Delta(0.0)
    for delta in recent:
        total.merge(delta)
    dt = total.dt or 1.0
    requests = total.requests
    return Point(
        t=now,
        request_rate=requests / dt,
        error_rate=total.errors / dt,
        error_ratio=min(1.0, total.errors / requests) if requests else None,
        p50_ms=bucket_quantile(0.50, total.latency),
        p95_ms=bucket_quantile(0.95, total.latency),
        p99_ms=bucket_quantile(0.99, total.latency),
        replicas=count.running if count is not None else None,
        target_replicas=count.target if count is not None else None,
        batch_mean=total.batch_sum / total.batches if total.batches else None,
        batch_p95=bucket_quantile(0.95, total.batch),
        batch_rate=total.batches / dt,
    )
