"""What batching measures and decides: each batcher's stats and the latency planner.

:class:`Stats` keeps counters and ring buffers (bounded memory) and
:class:`BatchStats` is the snapshot users read. :class:`Planner` is the
latency-target mode (``@serve.batch(target_latency_s=...)``), described on the class.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from shoal._api.context import replica_context
from shoal._observe.metrics import histogram

logger = logging.getLogger("shoal.batch")

_HISTORY = 1024  # batches kept for the percentiles in BatchStats

_DECAY = 0.9  # weight of the previous fit per batch: about the last 10 batches count
_RATE_TAU = 2.0  # time constant of the arrival-rate average, in targets (min 20 ms)
_GAPS = 2.0  # a wait ends after this many expected inter-arrival gaps without an arrival
_USABLE = 0.9  # share of the target the plan uses
_SOON = 0.1  # "a companion is coming" means within this share of the target
_MIN_SPREAD = 0.25  # variance of recent sizes below which the slope is not identifiable


@dataclass(frozen=True)
class Summary:
    """Count, mean and nearest-rank percentiles of the values recorded for recent batches."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0


def summarize(values: Iterable[float]) -> Summary:
    ordered = sorted(float(value) for value in values)
    n = len(ordered)
    if not n:
        return Summary()

    def rank(q: float) -> float:
        return ordered[min(n - 1, int(q * n))]

    return Summary(n, sum(ordered) / n, rank(0.5), rank(0.9), rank(0.99), ordered[-1])


@dataclass(frozen=True)
class BatchStats:
    """What one batcher did, from ``Model.method.batch_stats(instance)``.

    (Or ``self.method.batch_stats()`` in the instance, ``function.batch_stats()``.)
    Counters cover the batcher's whole life; ``recent_sizes`` and the summaries
    cover the last 1,024 batches. ``size`` is in ``batch_size_fn`` units when one
    is set; ``wait_s`` is how long each batch's oldest request waited before the
    batch started; ``duration_s`` is the handler's time (to its last step for a
    streaming handler). ``latency`` is the planner's current decision in
    latency-target mode, else None.
    """

    batches: int
    requests: int
    failed_batches: int
    cancelled: int
    queued: int
    running: int
    max_batch_size: int
    batch_wait_timeout_s: float
    recent_sizes: tuple[int, ...]
    size: Summary
    wait_s: Summary
    duration_s: Summary
    latency: LatencyPlan | None


#: Bucket upper bounds of ``shoal_batch_size`` (items, or batch_size_fn units).
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Bucket upper bounds of ``shoal_batch_wait_ms``: waits are often below a millisecond.
WAIT_BUCKETS_MS = (0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_LABELS = ("application", "deployment", "replica", "method")


class BatchRecorder:
    """One batcher's metrics: ``shoal_batch_size`` and ``shoal_batch_wait_ms`` (how long
    each batch's oldest request waited), recorded once per batch on the batcher's loop.
    Built with the batcher (at its first call, in the replica: never at import)."""

    __slots__ = ("size", "wait")

    def __init__(self, method: str) -> None:
        context = replica_context.get()
        labels = ("", "", "") if context is None else (
            context.app_name, context.deployment, context.replica_id,
        )  # fmt: skip
        sizes = histogram(
            "shoal_batch_size", "Size of each batch a @serve.batch batcher ran.",
            _LABELS, buckets=SIZE_BUCKETS,
        )  # fmt: skip
        waits = histogram(
            "shoal_batch_wait_ms",
            "How long each batch's oldest request waited before the batch started (ms).",
            _LABELS, buckets=WAIT_BUCKETS_MS,
        )  # fmt: skip
        self.size = sizes.labels(*labels, method)
        self.wait = waits.labels(*labels, method)

    def observe(self, size: int, wait_s: float) -> None:
        self.size.observe(size)
        self.wait.observe(wait_s * 1000)


def describe(stats: BatchStats) -> dict[str, Any]:
    """A batcher's stats as the JSON values status shows (``batching`` in a replica's
    details): counters, the recent size and wait percentiles, and the latency plan."""
    described: dict[str, Any] = {
        "batches": stats.batches,
        "requests": stats.requests,
        "failed_batches": stats.failed_batches,
        "queued": stats.queued,
        "max_batch_size": stats.max_batch_size,
        "batch_wait_timeout_s": stats.batch_wait_timeout_s,
        "size": {"p50": stats.size.p50, "p99": stats.size.p99, "max": stats.size.max},
        "wait_ms": {
            "p50": round(stats.wait_s.p50 * 1000, 3),
            "p99": round(stats.wait_s.p99 * 1000, 3),
        },
    }
    if stats.latency is not None:
        described["plan"] = {key: _rounded(value) for key, value in asdict(stats.latency).items()}
    return described


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) and math.isfinite(value) else value


class Stats:
    """Counters and ring buffers of one batcher (bounded memory)."""

    def __init__(self) -> None:
        self.batches = self.requests = self.failed = self.cancelled = 0
        self.sizes: deque[int] = deque(maxlen=_HISTORY)
        self.measures: deque[float] = deque(maxlen=_HISTORY)
        self.waits: deque[float] = deque(maxlen=_HISTORY)
        self.durations: deque[float] = deque(maxlen=_HISTORY)

    def record(self, count: int, measure: int, wait: float, duration: float, ok: bool) -> None:
        self.batches += 1
        self.requests += count
        self.failed += not ok
        self.sizes.append(count)
        self.measures.append(measure)
        self.waits.append(wait)
        self.durations.append(duration)


@dataclass(frozen=True)
class LatencyPlan:
    """The latency planner's current decision and the measurements it rests on.

    ``batch_size`` is the size limit now; ``max_wait_s`` the longest a batch of that
    size may wait for companions (0 when none are expected: batches run at once);
    ``cost_intercept_s + cost_per_item_s * size`` is the fitted handler time;
    ``cost_fitted`` is False while it is seeded (no batch yet, or all recent
    batches of one size, when the cost is taken as proportional to the size).
    """

    target_latency_s: float
    batch_size: int
    max_wait_s: float
    arrival_rate_per_s: float
    cost_intercept_s: float
    cost_per_item_s: float
    cost_fitted: bool


class Planner:
    """Chooses each batch's size and wait from what serving measures.

    The model: a batch of ``n`` items (``batch_size_fn`` units when set) takes
    ``a + b·n`` seconds, fitted by exponentially weighted least squares over the
    recent batches; requests arrive at rate ``λ``, an exponentially weighted
    average over time of the arrivals that find the batcher busy (requests queued
    or a batch running), with a time constant of twice the target. Arrivals that
    find it idle are not counted: in a closed
    loop (a caller that sends its next request when the last one returns) they
    follow completions, and waiting for them would only add latency.

    The decisions, with ``usable = 0.9 * target`` (the rest absorbs misprediction):

    * batch size ``S``: the largest ``n ≤ max_batch_size`` with ``a + b·n ≤ usable / 2``.
      Under sustained load a request waits for the batch ahead of it, then runs in
      its own: two batch times, so the pair fits in the target;
    * a batch that has reached ``S`` runs at once;
    * otherwise, if fewer than one arrival is expected within a tenth of the
      target, it runs at once (low load: latency is that of a single call);
    * otherwise it waits for companions until its oldest request could not wait
      longer: ``oldest arrival + usable - cost(current size + one item)``, or
      until two expected inter-arrival gaps pass without an arrival (the load
      dropped; the rate estimate catches up).

    Until the first batch has been measured, batches run at once with whatever is queued.
    """

    def __init__(self, target_latency_s: float) -> None:
        self.target = target_latency_s
        self.usable = _USABLE * target_latency_s
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.a = self.b = 0.0
        self.fitted = False
        self._recent = 1.0  # the last batch's size
        self._tau = max(0.02, _RATE_TAU * target_latency_s)
        self._count = self._time = 0.0
        self._last: float | None = None
        self._warned = False

    # --- measurements --------------------------------------------------------------

    def observe(self, size: float, duration: float) -> None:
        """Record one batch's size and handler time; refit ``a + b·size``."""
        self._w = _DECAY * self._w + 1.0
        self._sx = _DECAY * self._sx + size
        self._sy = _DECAY * self._sy + duration
        self._sxx = _DECAY * self._sxx + size * size
        self._sxy = _DECAY * self._sxy + size * duration
        self._recent = size
        mean_x, mean_y = self._sx / self._w, self._sy / self._w
        spread = self._sxx / self._w - mean_x * mean_x
        if spread > _MIN_SPREAD:
            b = (self._sxy / self._w - mean_x * mean_y) / spread
            # Noise can give b <= 0 (the size does not matter) or a < 0; keeping the
            # slope with a = 0 over-predicts both sides of the mean: the safe side.
            self.b = max(b, 0.0)
            self.a = max(mean_y - self.b * mean_x, 0.0)
            self.fitted = True
        else:  # one size only: proportional cost, which over-predicts larger batches
            self.a, self.b = 0.0, mean_y / max(mean_x, 1e-9)
            self.fitted = False

    def on_arrival(self, now: float, busy: bool) -> None:
        """Record an arrival; only one that found the batcher busy counts toward the rate."""
        self._decay_to(now)
        if busy:
            self._count += 1.0

    def _decay_to(self, now: float) -> None:
        if self._last is not None:
            gain = math.exp(-max(0.0, now - self._last) / self._tau)
            self._count *= gain
            self._time = self._time * gain + self._tau * (1.0 - gain)
        self._last = now

    def rate(self, now: float) -> float:
        """Arrivals per second (as of ``now``)."""
        if self._last is None:
            return 0.0
        gain = math.exp(-max(0.0, now - self._last) / self._tau)
        elapsed = self._time * gain + self._tau * (1.0 - gain)
        return self._count * gain / elapsed if elapsed > 0 else 0.0

    # --- decisions -----------------------------------------------------------------

    def cost(self, size: float) -> float:
        return self.a + self.b * size

    def batch_limit(self, max_batch_size: int, oldest_age: float = 0.0) -> int:
        """The size limit ``S`` (at least 1, at most ``max_batch_size``).

        ``oldest_age`` is how long the oldest queued request has waited: when it
        will miss the target even at size ``S`` (overload), the limit is
        ``max_batch_size``, to drain the queue at the highest throughput.
        """
        if self._w == 0 or self.b <= 0:
            return max_batch_size
        size = self._size()
        if oldest_age + self.cost(size) > self.usable:
            return max_batch_size
        return min(size, max_batch_size)

    def _size(self) -> int:
        size = math.floor((self.usable / 2 - self.a) / self.b)
        if size < 1:  # one batch alone fits, two in a row do not: give up the pipelining
            size = math.floor((self.usable - self.a) / self.b)
        if size < 1:  # the target cannot be met: at least keep throughput up
            if not self._warned:
                self._warned = True
                logger.warning(
                    "target_latency_s=%s is below the handler's time for one item (%.4f s): "
                    "batching for throughput; raise the target",
                    self.target,
                    self.cost(1),
                )
            return 1 << 30
        if not self.fitted:  # seeded: probe larger sizes, or the slope is never measured
            size = max(size, 2 * math.ceil(self._recent))
        return size

    def companions_expected(self, now: float) -> bool:
        return self._w > 0 and self.rate(now) * _SOON * self.target >= 1.0

    def start_by(self, oldest: float, measure: float, count: int, now: float) -> float:
        """When a batch that is not full must start (``now``: at once)."""
        if not self.companions_expected(now):
            return now
        per_item = measure / max(count, 1)
        deadline = oldest + self.usable - self.cost(measure + per_item)
        # Arrivals stopped (the rate estimate is stale): stop waiting for them.
        last = self._last if self._last is not None else now
        return min(deadline, last + _GAPS / self.rate(now))

    def plan(self, max_batch_size: int, now: float) -> LatencyPlan:
        size = self.batch_limit(max_batch_size)
        wait = max(0.0, self.usable - self.cost(size)) if self.companions_expected(now) else 0.0
        return LatencyPlan(
            target_latency_s=self.target,
            batch_size=size,
            max_wait_s=wait,
            arrival_rate_per_s=self.rate(now),
            cost_intercept_s=self.a,
            cost_per_item_s=self.b,
            cost_fitted=self.fitted,
        )
