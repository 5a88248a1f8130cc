"""The proxy's metrics: Ray Serve's HTTP request counters, latency and ongoing requests.

Labels as Ray's: ``route`` is the matched route prefix (never the full path: the
number of series stays bounded), ``application`` its application ("" for a path no
route matches), ``method`` the HTTP method, ``status_code`` the response's status
(499, as in Ray, when the client left before any response). A response is an error when its
status is 400 or more. Children are made once per label combination
(:meth:`ProxyMetrics.children`, kept by ``shoal._proxy.observe`` per path, method and
status), and the request counter counts the latency histogram's observations, so a
request that succeeds costs one histogram update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shoal._observe import metrics
from shoal._observe.metrics import counter, gauge, histogram
from shoal._observe.metrics.standard import requests_shed

Scope = dict[str, Any]
Route = tuple[str, str, str]  # (prefix, app, ingress)
NO_ROUTE: Route = ("", "", "")  # a path no route matches
#: What one request updates: the latency histogram's child, the error counters' children.
Children = tuple[Any, tuple[Any, ...]]


class ProxyMetrics:
    """What the proxy records per HTTP request."""

    def __init__(self, node_id: str, node_ip_address: str, ongoing: Callable[[], float]) -> None:
        http = ("route", "method", "application", "status_code")
        self._requests = counter(
            "ray_serve_num_http_requests", "The number of HTTP requests processed.", http
        )
        self._latency = histogram(
            "ray_serve_http_request_latency_ms",
            "The end-to-end latency of HTTP requests (measured from the Serve HTTP proxy).",
            ("method", "route", "application", "status_code"),
        )
        self._errors = counter(
            "ray_serve_num_http_error_requests",
            "The number of errored HTTP responses.",
            ("route", "error_code", "method", "application"),
        )
        self._deployment_errors = counter(
            "ray_serve_num_deployment_http_error_requests",
            "The number of errored HTTP responses returned by each deployment.",
            ("deployment", "error_code", "method", "route", "application"),
        )
        gauge(
            "ray_serve_num_ongoing_http_requests",
            "The number of ongoing requests in this HTTP proxy.",
            ("node_id", "node_ip_address"),
        ).watch(ongoing, node_id, node_ip_address)  # read when collected: free per request
        self._shed = requests_shed()
        # (route, method, status) -> the children one request updates
        self._children: dict[tuple[Route, str, int], Children] = {}

    def children(self, route: Route, method: str, status: int) -> Children:
        """What a request to ``route`` (NO_ROUTE: none matched) answered ``status`` (0:
        the client left first) updates: its latency histogram's child (which the request
        counter counts) and, for an error, the two error counters' children."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._new_children(key)
        return children

    def record(self, route: Route, method: str, status: int, started: float) -> None:
        """One request, started at ``perf_counter()`` ``started``."""
        latency, errors = self.children(route, method, status)
        latency.observe((time.perf_counter() - started) * 1000.0)
        for child in errors:
            child.inc()

    def proxy_full(self, scope: Scope, match: Callable[[str], Route | None]) -> None:
        """A request refused because the proxy holds ``max_ongoing_requests`` already."""
        route = match(scope["path"]) or NO_ROUTE
        self._shed.labels(route[1], route[2], "proxy_max_ongoing_requests").inc()
        self.record(route, scope["method"], 503, time.perf_counter())

    def _new_children(self, key: tuple[Route, str, int]) -> Children:
        (prefix, app, ingress), method, status = key
        code = str(status or 499)
        latency = self._latency.labels(method, prefix, app, code)
        self._requests.count_of(latency, prefix, method, app, code)
        if 0 < status < 400:
            return latency, ()
        errors = self._errors.labels(prefix, code, method, app)
        deployment_errors = self._deployment_errors.labels(ingress, code, method, prefix, app)
        return latency, (errors, deployment_errors)


def proxy_metrics(
    node_id: str, node_ip_address: str, ongoing: Callable[[], float]
) -> ProxyMetrics | None:
    """The proxy's metrics, or None when this process records none. ``ongoing()``: the
    HTTP requests the proxy holds (read when the metrics are collected)."""
    if not metrics.enabled():
        return None
    return ProxyMetrics(node_id, node_ip_address, ongoing)
