"""Shoal's metrics: one registry per process, reported to the controller, served at /metrics.

Usage in a shoal module (the internal API)::

    from shoal._observe.metrics import counter, gauge, histogram, LATENCY_BUCKETS_MS

    class Batcher:
        def __init__(self, app: str, deployment: str, replica: str) -> None:
            # Get families and children when the object is built, never at import:
            # a process whose metrics are disabled gets null objects that record nothing.
            sizes = histogram(
                "ray_serve_batch_size", "Batch sizes.",
                ("application", "deployment", "replica"), buckets=(1, 2, 4, 8, 16, 32),
            )
            self._size = sizes.labels(app, deployment, replica)  # cache the child
            self._flushed = counter("shoal_batches_total_example", "...", ("reason",))

        def flush(self, batch: list, reason: str) -> None:
            self._size.observe(len(batch))          # ~0.1 us
            self._flushed.labels(reason).inc()      # a dict lookup more: cache if hot

Rules:

- ``name`` is the name Prometheus shows: Ray's exported name (``ray_serve_...``) for
  a metric Ray Serve has, ``shoal_...`` for shoal's own. A counter's name has no
  ``_total``: it is added on export (``ray_serve_num_http_requests`` ->
  ``ray_serve_num_http_requests_total``).
- ``counter/gauge/histogram`` return the same family for the same name (kind, labels
  and buckets must agree, else ConfigError). ``family.labels(*values)`` takes the
  values in label order and returns the child (cached); children have ``inc(amount)``
  (counter, gauge), ``dec`` and ``set`` (gauge), ``observe(value)`` (histogram).
  ``family.remove(*values)`` drops a child (a gauge of a replica that stopped).
- Recording is not locked: record from the event loop that owns the object. (User
  metrics, ``shoal.serve.metrics``, lock, since user code runs on threads.)
- Every process's families are summed in the controller by (sample name, labels):
  give a per-process gauge a label that tells processes apart (``replica``), or
  make it a quantity whose sum is meaningful (requests waiting).
- ``record_failure(...)`` keeps a request failure in this process's ring of recent
  errors (shown by the dashboard).
- ``enabled()`` says whether this process records metrics at all (to skip work that
  only feeds metrics, such as taking a timestamp).

Reading them (the controller's side): ``MetricsStore`` (``store.py``), reached from
the control plane as ``control.metrics()``: ``collect()`` yields merged
prometheus_client families; ``recent_errors()`` lists the failures, newest first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shoal._observe.metrics.recent import ERROR_KEYS, ErrorData, RecentErrors
from shoal._observe.metrics.registry import (
    LATENCY_BUCKETS_MS,
    NULL_CHILD,
    NULL_FAMILY,
    Family,
    FamilyData,
    NullFamily,
    Registry,
)
from shoal._observe.options import MetricsOptions

__all__ = [
    "ERROR_KEYS",
    "LATENCY_BUCKETS_MS",
    "NULL_CHILD",
    "add_collector",
    "counter",
    "enabled",
    "gauge",
    "histogram",
    "options",
    "process_registry",
    "record_failure",
    "remove_collector",
    "snapshot",
]


class _State:
    """This process's metrics settings and data (created on first use, not at import)."""

    def __init__(self) -> None:
        self.options = MetricsOptions()
        self.source = ""
        self._registry: Registry | None = None
        self._errors: RecentErrors | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry()
        return self._registry

    @property
    def errors(self) -> RecentErrors:
        if self._errors is None:
            self._errors = RecentErrors()
        return self._errors


_state = _State()


def configure(options: MetricsOptions, source: str) -> None:
    """Apply this process's metrics options (``configure_process`` calls it). Families
    obtained before keep recording where they are; get them after configuring."""
    _state.options = options
    _state.source = source


def enabled() -> bool:
    """Whether this process records metrics."""
    return _state.options.enabled


def options() -> MetricsOptions:
    return _state.options


def process_registry() -> Registry:
    """This process's registry (created on first use)."""
    return _state.registry


def counter(name: str, help: str, labels: Sequence[str] = ()) -> Family | NullFamily:
    """The counter ``name`` of this process (a null family when metrics are disabled)."""
    if not _state.options.enabled:
        return NULL_FAMILY
    return _state.registry.family(name, "counter", help, labels)


def gauge(name: str, help: str, labels: Sequence[str] = ()) -> Family | NullFamily:
    """The gauge ``name`` of this process (a null family when metrics are disabled)."""
    if not _state.options.enabled:
        return NULL_FAMILY
    return _state.registry.family(name, "gauge", help, labels)


def histogram(
    name: str,
    help: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS_MS,
) -> Family | NullFamily:
    """The histogram ``name`` of this process, with these bucket upper bounds (Ray
    Serve's latency buckets in milliseconds by default)."""
    if not _state.options.enabled:
        return NULL_FAMILY
    return _state.registry.family(name, "histogram", help, labels, buckets)


def record_failure(
    application: str,
    deployment: str,
    replica: str,
    request_id: str,
    type_name: str,
    message: str,
    traceback: str,
) -> None:
    """Keep one request failure among this process's recent errors (nothing when
    metrics are disabled)."""
    if _state.options.enabled:
        _state.errors.record(
            application, deployment, replica, request_id, type_name, message, traceback
        )


def add_collector(collect: Callable[[], list[FamilyData]]) -> None:
    """Add families computed by ``collect()`` each time this process's metrics are
    collected (nothing when metrics are disabled)."""
    if _state.options.enabled:
        _state.registry.collectors.append(collect)


def remove_collector(collect: Callable[[], list[FamilyData]]) -> None:
    collectors = _state.registry.collectors
    if collect in collectors:
        collectors.remove(collect)


def snapshot() -> tuple[list[FamilyData], list[ErrorData]]:
    """This process's families and recent errors, as plain tuples (what a report carries)."""
    if not _state.options.enabled:
        return [], []
    return _state.registry.data(), _state.errors.data()
