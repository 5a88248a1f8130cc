"""What the proxy observes of each HTTP request: metrics, its access line and its span.

One wrapper around the proxy's request handler does all three, so a request pays
for one status capture, one route match and one clock read however many are on;
with none on (metrics disabled, no access lines, no tracing) the proxy serves
without any wrapper. What each records is described where it is recorded:
``shoal._proxy.metrics``, ``shoal._proxy.access`` and ``shoal._observe.tracing``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from shoal._observe import tracing
from shoal._proxy.access import write_access_line
from shoal._proxy.metrics import NO_ROUTE, ProxyMetrics

Scope = dict[str, Any]
Route = tuple[str, str, str]  # (prefix, app, ingress)
Serve = Callable[[Scope, Any, Any], Coroutine[Any, Any, None]]


class Exchange:
    """Passes a request's ASGI messages on, remembering the response's status and request
    id (0 and b"" until a response starts)."""

    __slots__ = ("request_id", "send", "status")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.status = 0
        self.request_id = b""

    def __call__(self, message: dict[str, Any]) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers")
            if headers and headers[-1][0] == b"x-request-id":  # the proxy appends it last
                self.request_id = headers[-1][1]
        result: Awaitable[None] = self.send(message)
        return result


def observed(
    serve: Serve,
    match: Callable[[str], Route | None],
    metrics: ProxyMetrics | None,
    access: bool,
) -> Serve:
    """``serve`` recording what is on: ``metrics`` (None: off), ``access`` lines, and a
    span when this process traces. ``serve`` itself when nothing is on."""
    traced = tracing.on
    if metrics is None and not access and not traced:
        return serve

    async def serve_observed(scope: Scope, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        route = match(scope["path"])
        exchange = Exchange(send)
        span = tracing.start_http(scope, route[0] if route else None) if traced else None
        error: BaseException | None = None
        try:
            await serve(scope, receive, exchange)
        except BaseException as exc:
            error = exc
            raise
        finally:
            status = exchange.status
            if metrics is not None:
                metrics.record(route or NO_ROUTE, scope["method"], status, started)
            if access:
                write_access_line(scope, route, status or 500, started, exchange.request_id)
            if span is not None:
                tracing.end_http(span, status or None, error)

    return serve_observed
