"""A replica's metrics: Ray Serve's per-replica request counters, latency, ongoing
requests and starts, and the ring of recent failures.

Labels: ``deployment``, ``replica`` (the id ``serve.status()`` shows), ``application``,
and ``route``: the route prefix for an HTTP request (as Ray), the method name for a
handle call (Ray leaves it empty; a method is what a handle call targets).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

from shoal._observe import metrics
from shoal._observe.metrics import standard
from shoal._seam.specs import ReplicaSpec
from shoal._transport.http import HttpRequestData
from shoal._transport.messages import Request


def route_of(request: Request) -> str:
    args = request.args
    if args and type(args[0]) is HttpRequestData:
        return args[0].root_path or "/"
    return request.method


class ReplicaMetrics:
    """What one replica records; build it with :func:`replica_metrics`."""

    def __init__(self, spec: ReplicaSpec, ongoing: Callable[[], float]) -> None:
        self.spec = spec
        self._labels = (spec.deployment, spec.replica_id, spec.app)
        standard.replica_processing_queries().watch(ongoing, *self._labels)
        standard.replica_starts().labels(*self._labels).inc()
        self._requests = standard.replica_request_counter()
        self._errors = standard.replica_error_counter()
        self._latency = standard.replica_processing_latency()
        self._expired = standard.deadline_expired().labels(spec.app, spec.deployment, "running")
        # route -> its latency histogram's observe (the request counter counts them)
        self._by_route: dict[str, Any] = {}

    def done(self, request: Request, started: float) -> None:
        """A request ended (successfully or not) ``started`` (``perf_counter``) ago."""
        args = request.args  # route_of(request), without its call: once per request
        route = (
            args[0].root_path or "/"
            if args and type(args[0]) is HttpRequestData
            else request.method
        )
        observe = self._by_route.get(route)
        if observe is None:
            labels = (route, *self._labels)
            latency = self._latency.labels(*labels)
            self._requests.count_of(latency, *labels)
            observe = self._by_route[route] = latency.observe
        observe((time.perf_counter() - started) * 1000.0)

    def failed(self, route: str, request_id: str, exc: BaseException) -> None:
        """User code raised ``exc`` serving a request: count it, keep it among the recent."""
        spec = self.spec
        self._errors.labels(route, *self._labels).inc()
        text = "".join(traceback.format_exception(exc))
        metrics.record_failure(
            spec.app, spec.deployment, spec.replica_id, request_id,
            type(exc).__name__, str(exc), text,
        )  # fmt: skip

    def expired(self) -> None:
        """A request's deadline passed while it ran here."""
        self._expired.inc()

    def close(self) -> None:
        """The replica stopped: its ongoing-requests gauge goes (the process may not)."""
        standard.replica_processing_queries().remove(*self._labels)


def replica_metrics(spec: ReplicaSpec, ongoing: Callable[[], float]) -> ReplicaMetrics | None:
    """The replica's metrics, or None when this process records none."""
    return ReplicaMetrics(spec, ongoing) if metrics.enabled() else None
