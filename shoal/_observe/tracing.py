"""Distributed tracing on the request path: the spans shoal makes, and their links.

Off by default. The request path checks one module attribute (:data:`on`) and does
nothing else while it is false; OpenTelemetry is imported only when tracing is
enabled (``tracing_setup``). When on, each request makes:

- in the proxy, a SERVER span per HTTP request (``"POST /route"``), child of the
  incoming W3C ``traceparent``/``tracestate`` if the client sent one;
- in the calling process, a CLIENT span per handle call (``"Deployment/method"``),
  child of the span current where ``.remote()`` is called;
- in the replica, a SERVER span per call, child of the caller's span (the proxy's for
  an HTTP request), current while the user's method runs (threads of sync methods
  included), so spans the user makes and handle calls made meanwhile are its children.

Across processes the parent travels as a W3C traceparent string in
``Request.traceparent`` (``""`` when tracing is off: the wire stays as cheap). Every
span has the request id (``shoal.request_id``); a failed call's span has status
ERROR and the exception as an event; a stream's spans end when the stream ends.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from shoal._transport.messages import Failure

if TYPE_CHECKING:
    from shoal._config import TracingOptions
    from shoal._transport.messages import Request

#: Whether this process traces: the one check the request path makes.
on = False
#: The proxy's span of the HTTP request its task serves.
_http_span: ContextVar[Any] = ContextVar("shoal_http_span")

# Bound by configure() when tracing is on (OpenTelemetry is not imported before).
_starter: Any = None  # starts shoal's spans: a spans.Recorder, or a spans.SdkStarter
_FastSpan: Any = None
_SpanShape: Any = None
#: The shapes of the spans made so far (spans.SpanShape), by the kind of call.
_shapes: dict[tuple[Any, ...], Any] = {}
_MAX_SHAPES = 4096
_api: Any = None  # opentelemetry.trace
_propagator: Any = None
_EMPTY: Any = None  # an empty Context
_SERVER: Any = None
_CLIENT: Any = None
_ERROR: Any = None
_INVALID: Any = None  # opentelemetry.trace.INVALID_SPAN
# OpenTelemetry's current context: what reads it and what makes a new one current (its
# ContextVar's own get and set when the runtime context is the default contextvars one:
# two Python calls fewer each), the Context class and the current span's key in it.
_get_current: Any = None
_set_current: Any = None
_Context: Any = None
_SPAN_KEY: Any = None


def configure(options: TracingOptions, source: str) -> None:
    """Turn tracing on or off in this process, as ``options`` say (``source`` names the
    process in the spans' resource). Raises ConfigError when it cannot be set up."""
    global on, _starter, _FastSpan, _SpanShape, _api, _propagator, _EMPTY, _SERVER, _CLIENT, _ERROR
    global _INVALID, _get_current, _set_current, _Context, _SPAN_KEY
    on = False  # until set up: a configuration that fails leaves tracing off
    if not options.enabled:
        return
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from shoal._observe import tracing_setup
    from shoal._observe.spans import FastSpan, SpanShape

    _starter = tracing_setup.install(options, source)
    _FastSpan, _SpanShape, _api, _INVALID = FastSpan, SpanShape, trace, trace.INVALID_SPAN
    _shapes.clear()  # a configuration's spans get shapes of its own
    _propagator, _EMPTY, _Context = (
        TraceContextTextMapPropagator(),
        context.Context(),
        context.Context,
    )
    _SERVER, _CLIENT, _ERROR = SpanKind.SERVER, SpanKind.CLIENT, StatusCode.ERROR
    (_SPAN_KEY,) = trace.set_span_in_context(trace.INVALID_SPAN, _EMPTY)  # its only key
    variable = getattr(context._RUNTIME_CONTEXT, "_current_context", None)
    if isinstance(variable, ContextVar):
        _get_current, _set_current = variable.get, variable.set
    else:  # another runtime context (OTEL_PYTHON_CONTEXT): through OpenTelemetry's API
        _get_current, _set_current = context.get_current, context.attach
    on = True


def flush() -> None:
    """Export the spans this process still holds (before it exits)."""
    if on:
        from shoal._observe import tracing_setup

        tracing_setup.flush()


# --- the spans (called only when ``on``) --------------------------------------------


def traceparent_of(span: Any) -> str:
    """``span``'s W3C traceparent, or "" for an invalid (no-op) span."""
    if type(span) is _FastSpan:
        return span.traceparent()
    context = span.get_span_context()
    if not context.trace_id:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _current_span() -> Any:
    """The span current here (OpenTelemetry's ``INVALID_SPAN`` if none)."""
    span = _get_current().get(_SPAN_KEY)
    return span if isinstance(span, _api.Span) else _INVALID


def current_traceparent() -> str:
    """The traceparent of the span current here ("" if none)."""
    return traceparent_of(_current_span())


_ODD_HEX = frozenset("13579bdf")  # a traceparent's last digit when it says "sampled"


def _shape(key: tuple[Any, ...], name: str, kind: Any, attributes: dict[str, Any]) -> Any:
    """The kept shape of the spans of ``key`` (made from the rest the first time; past
    :data:`_MAX_SHAPES` kinds of call, a new one each time)."""
    shape = _SpanShape(name, kind, attributes)
    if len(_shapes) < _MAX_SHAPES:
        _shapes[key] = shape
    return shape


def start_call(app: str, deployment: str, method: str, request: Request) -> Any:
    """A handle call's CLIENT span (child of the current span); the request carries it."""
    shape = _shapes.get(key := (_CLIENT, app, deployment, method)) or _shape(
        key, f"{deployment}/{method}", _CLIENT,
        {"rpc.service": deployment, "rpc.method": method, "shoal.application": app},
    )  # fmt: skip
    extra = {"shoal.request_id": request.request_id} if request.request_id else {}
    current = _current_span()
    if type(current) is _FastSpan:  # the usual parent: a replica's span, no SpanContext made
        span = _starter.start_child(
            shape, current.trace_hex, current.span_hex, current.sampled, extra,
            False, current.trace_state,
        )  # fmt: skip
    else:
        parent = current.get_span_context()
        span = _starter.start(shape, parent if parent.trace_id else None, extra)
    request.traceparent = traceparent_of(span)
    return span


def start_replica(app: str, deployment: str, replica_id: str, request: Request) -> Any:
    """A replica call's SERVER span, child of the caller's, made current in the calling
    task's context (the request's own: the user's code runs in it)."""
    method = request.method
    shape = _shapes.get(key := (_SERVER, app, deployment, replica_id, method)) or _shape(
        key, f"{deployment}/{method}", _SERVER,
        {"rpc.service": deployment, "rpc.method": method, "shoal.application": app,
         "shoal.replica_id": replica_id},
    )  # fmt: skip
    extra = {"shoal.request_id": request.request_id}
    traceparent = request.traceparent
    # Only shoal writes a request's traceparent (traceparent_of: the "00" form, 55
    # characters, lowercase hex ids, never zero), over connections only shoal's processes
    # can open: its shape is checked here, its digits are not (int() would cost 2 us).
    if len(traceparent) == 55 and traceparent[:3] == "00-":
        span = _starter.start_child(
            shape, traceparent[3:35], traceparent[36:52], traceparent[54] in _ODD_HEX, extra,
            True,
        )  # fmt: skip
    else:
        span = _starter.start(shape, None, extra)
    # A Context of the span alone: a request's task starts with none (cheaper than copying).
    _set_current(_Context({_SPAN_KEY: span}))
    return span


def start_http(scope: dict[str, Any], route: str | None) -> Any:
    """The proxy's SERVER span of one HTTP request, current in the calling task's
    context (the request's own) for :func:`bind_http`; its parent is the client's
    ``traceparent`` header (with ``tracestate``), if any."""
    method = scope["method"]
    shape = _shapes.get(key := (method, route)) or _shape(
        key, f"{method} {route}" if route is not None else method, _SERVER,
        {"http.request.method": method} if route is None else
        {"http.request.method": method, "http.route": route},
    )  # fmt: skip
    parent = None
    for header, _value in scope["headers"]:
        if header == b"traceparent":
            incoming = _propagator.extract(scope["headers"], _EMPTY, _HEADERS)
            parent = _api.get_current_span(incoming).get_span_context()
            parent = parent if parent.trace_id else None  # an invalid header: a new trace
            break
    span = _starter.start(shape, parent, {"url.path": scope["path"]})
    _http_span.set(span)  # no user code runs in the proxy: OTel's context need not know
    return span


def bind_http(request: Request) -> None:
    """The proxy's ``request`` to the ingress: the request id on the HTTP request's span
    (started in this task), that span as the request's parent."""
    span = _http_span.get()
    span.set_attribute("shoal.request_id", request.request_id)
    request.traceparent = traceparent_of(span)


def end_http(span: Any, status: int | None, error: BaseException | None = None) -> None:
    """End the proxy's span with the response status (a 5xx is an error; none: the
    client left before an answer)."""
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        fail(span, error)
    elif status is not None and status >= 500:
        span.set_status(_ERROR, f"HTTP {status}")
    span.end()


def fail(span: Any, error: BaseException) -> None:
    """Mark ``span`` failed by ``error`` (status ERROR, the exception as an event)."""
    span.record_exception(error)
    span.set_status(_ERROR, f"{type(error).__name__}: {error}")


def fail_current(error: BaseException) -> None:
    """Mark the current span (a replica's, while the user's code runs) failed."""
    fail(_current_span(), error)


def end_reply(span: Any, reply: Any) -> None:
    """End a span with the reply message it got: a Failure marks it failed."""
    if type(reply) is Failure:
        _failed_reply(span, reply)
    span.end()


def end_call(span: Any, future: Any) -> None:
    """End a handle call's span when its reply future completes (a done-callback)."""
    if future.cancelled():
        span.set_attribute("shoal.cancelled", True)
    elif (error := future.exception()) is not None:
        fail(span, error)
    elif type(reply := future.result()) is Failure:
        _failed_reply(span, reply)
    span.end()


def _failed_reply(span: Any, reply: Failure) -> None:
    # The exception as record_exception() would have recorded it, had it been raised here.
    kind = reply.type_name.removeprefix("builtins.")
    span.add_event(
        "exception",
        {
            "exception.type": kind,
            "exception.message": reply.message,
            "exception.stacktrace": reply.traceback,
        },
    )
    span.set_status(_ERROR, f"{kind}: {reply.message}")


class _HeaderGetter:
    """Reads W3C headers from ASGI's ``[(name, value)]`` byte pairs."""

    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [value.decode("latin-1") for k, value in carrier if k == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_HEADERS = _HeaderGetter()
