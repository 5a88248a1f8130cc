"""What the proxy observes of each HTTP request: metrics, its access line and its span.

One wrapper around the proxy's request handler does all three, so a request pays for
two clock reads and one look-up of what to record, however many are on (the
response's first message, its status and request id, is kept by shoal's HTTP protocol,
``Cork.start``, or else by :class:`SeenStart`): what a request records is prepared
once per path, method and status (the route matched, the metric children, the access
line's unchanging parts) and found again by one dictionary look-up. With none on
(metrics disabled, no access lines, no tracing) the proxy serves without any wrapper.
What each records is described where it is recorded: ``shoal._proxy.metrics``,
``shoal._proxy.access`` and ``shoal._observe.tracing``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from shoal._observe import tracing
from shoal._observe.access_lines import AccessLine
from shoal._proxy.access import AccessLines
from shoal._proxy.http_protocol import Cork
from shoal._proxy.metrics import NO_ROUTE, ProxyMetrics

Scope = dict[str, Any]
Message = dict[str, Any]
Route = tuple[str, str, str]  # (prefix, app, ingress)
Serve = Callable[[Scope, Any, Any], Coroutine[Any, Any, None]]
# Paths remembered with what their requests record: beyond, a request finds it anew (a
# service whose paths carry ids, /items/123, still records the same few children).
_MAX_PATHS = 1024
_START = "http.response.start"
_REQUEST_ID = b"x-request-id"


class SeenStart:
    """A request's ``receive`` under a server that does not keep the response's first
    message (uvicorn's own protocol): :meth:`send` keeps it as ``start``, as ``Cork``
    does."""

    __slots__ = ("_receive", "_send", "start")

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive, self._send = receive, send
        self.start: Message | None = None

    def __call__(self) -> Awaitable[Message]:
        return self._receive()

    def send(self, message: Message) -> Awaitable[None]:
        if self.start is None:
            self.start = message
        return self._send(message)


def seeing_start(receive: Any, send: Any) -> tuple[Any, Any]:
    """``receive`` and ``send`` such that ``receive.start`` is the response's first
    message once sent (None before)."""
    kind = type(receive)
    if kind is Cork or kind is SeenStart:
        return receive, send
    seen = SeenStart(receive, send)
    return seen, seen.send


def _status(start: Message | None) -> int:
    """The response's status (0: none was sent)."""
    return start["status"] if start is not None and start["type"] == _START else 0


class Recording:
    """What a request of one path, method and status records: a latency histogram's child
    (None: no metrics), the error counters' children, the access line (None: none)."""

    __slots__ = ("errors", "line", "observe")

    def __init__(self, observe: Any, errors: tuple[Any, ...], line: AccessLine | None) -> None:
        self.observe = observe
        self.errors = errors
        self.line = line


class Recordings:
    """The :class:`Recording` of each path, method and status, made when first needed."""

    def __init__(
        self,
        match: Callable[[str], Route | None],
        metrics: ProxyMetrics | None,
        access: AccessLines | None,
    ) -> None:
        self._match = match
        self._metrics = metrics
        self.access = access
        self.known: dict[tuple[str, str, int], Recording] = {}

    def find(self, path: str, method: str, status: int) -> Recording:
        route = self._match(path)
        observe, errors, line = None, (), None
        if self._metrics is not None:
            latency, errors = self._metrics.children(route or NO_ROUTE, method, status)
            observe = latency.observe
        if self.access is not None:
            line = self.access.line(path, method, route, status)
        recording = Recording(observe, errors, line)
        if len(self.known) < _MAX_PATHS:
            self.known[(path, method, status)] = recording
        return recording


def observed(
    serve: Serve,
    match: Callable[[str], Route | None],
    metrics: ProxyMetrics | None,
    access: AccessLines | None,
) -> Serve:
    """``serve`` recording what is on: ``metrics`` (None: off), ``access`` lines (None:
    off), and a span when this process traces. ``serve`` itself when nothing is on."""
    traced = tracing.on
    if metrics is None and access is None and not traced:
        return serve
    recordings = Recordings(match, metrics, access)
    known, find = recordings.known, recordings.find
    log = access.log if access is not None else None
    perf_counter = time.perf_counter

    async def serve_observed(scope: Scope, receive: Any, send: Any) -> None:
        started = perf_counter()
        if type(receive) is not Cork:  # (shoal's protocol keeps the start itself)
            receive, send = seeing_start(receive, send)
        try:
            await serve(scope, receive, send)
        finally:  # recorded here, not in a call: this runs for every request
            ended = perf_counter()
            start = receive.start  # _status(start), inlined: this runs per request
            status = start["status"] if start is not None and start["type"] == _START else 0
            path, method = scope["path"], scope["method"]
            recording = known.get((path, method, status)) or find(path, method, status)
            latency_ms = (ended - started) * 1000.0
            if recording.observe is not None:
                recording.observe(latency_ms)
                if recording.errors:
                    for child in recording.errors:
                        child.inc()
            if recording.line is not None:
                # The request id as sent (bytes: decoded only when the line is written).
                headers = start.get("headers") if status else None
                rid = headers[-1][1] if headers and headers[-1][0] == _REQUEST_ID else ""
                log.write(recording.line, rid, latency_ms, ended)  # type: ignore[union-attr]

    return _traced(serve_observed, match) if traced else serve_observed


def _traced(serve: Serve, match: Callable[[str], Route | None]) -> Serve:
    """``serve`` (which records the request) within the request's span."""

    async def serve_traced(scope: Scope, receive: Any, send: Any) -> None:
        receive, send = seeing_start(receive, send)
        route = match(scope["path"])
        span = tracing.start_http(scope, route[0] if route else None)
        error: BaseException | None = None
        try:
            await serve(scope, receive, send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            tracing.end_http(span, _status(receive.start) or None, error)

    return serve_traced
