"""Shoal's own spans: recorded on the request path in a few microseconds each.

The OpenTelemetry SDK's spans cost tens of microseconds each to start and end
(attribute validation, a lock per span, the sampler and processor chain): several
times more than shoal's whole proxy-to-replica hop. Shoal's spans are plain objects
instead; they become SDK ``ReadableSpan`` objects only in the export thread, which
hands them to the same span processor (and exporter) as the user's own SDK spans.
Guarantees:
- a :class:`FastSpan` is an ``opentelemetry.trace.Span``: current in a context, it is
  the parent of the user's SDK spans; ``set_attribute``, ``add_event``,
  ``set_status``, ``record_exception`` work on it as on an SDK span;
- sampling is the SDK's ``ParentBased(TraceIdRatioBased(ratio))``: a span with a parent
  follows the parent's sampled flag; a root is sampled when the low 64 bits of its
  trace id are below ``ratio * 2**64``; an unsampled span still has ids (its
  traceparent says "not sampled") but records nothing;
- ended spans wait in a bounded queue and are handed to the processor every
  ``delay_s``, and by :meth:`Recorder.flush`; past ``max_queue`` waiting, the oldest
  are dropped, and a warning says so (at most one a minute).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from random import getrandbits
from time import time_ns
from typing import Any

from opentelemetry import trace as api
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags

logger = logging.getLogger("shoal.tracing")

_LOW_64 = (1 << 64) - 1
_SAMPLED, _NOT_SAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
#: How long a flush waits for the exporter (a collector that does not answer must not
#: hold a stopping worker for the SDK's default of 30 s).
_FLUSH_TIMEOUT_MS = 2000
#: Seconds between two warnings that spans were dropped.
_DROP_WARNING_EVERY_S = 60.0


class Recorder:
    """Starts shoal's spans and hands the ended ones to ``processor`` (an SDK span
    processor: its ``on_end`` takes ReadableSpans) from a thread of its own."""

    def __init__(
        self,
        ratio: float,
        resource: Any,
        processor: Any,
        delay_s: float,
        max_queue: int = 8192,
        writer: Any = None,
    ) -> None:
        """``writer``: a function given the ended spans themselves, which then skip the
        processor (the file exporter writes them without making SDK spans first)."""
        self._bound = round(ratio * (_LOW_64 + 1))
        self._writer = writer
        self.resource = resource
        self._processor = processor
        self._scope = InstrumentationScope("shoal")
        self.ended: collections.deque[FastSpan] = collections.deque(maxlen=max_queue)
        self._delay_s = delay_s
        self._full = 0  # hand-overs that found the queue full since the last warning
        self._warn_after = 0.0  # (monotonic) no drop warning before then
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="shoal-spans", daemon=True).start()

    def start(
        self, shape: SpanShape, parent: SpanContext | None, extra: dict[str, Any]
    ) -> FastSpan:
        """A started span of ``shape`` (``extra``: its other attributes); ``parent``
        None: the root of a new trace."""
        if parent is None:
            trace_id = getrandbits(128) or 1
            sampled = (trace_id & _LOW_64) < self._bound
            return FastSpan(self, shape, trace_id.to_bytes(16).hex(), "", sampled, extra)
        span = FastSpan(
            self, shape, parent.trace_id.to_bytes(16).hex(), parent.span_id.to_bytes(8).hex(),
            bool(parent.trace_flags & TraceFlags.SAMPLED), extra,
            parent.is_remote, parent.trace_state,
        )  # fmt: skip
        span._parent = parent
        return span

    def start_child(
        self,
        shape: SpanShape,
        trace_hex: str,
        parent_hex: str,
        sampled: bool,
        extra: dict[str, Any],
        remote: bool,
        trace_state: Any = None,
    ) -> FastSpan:
        """A started span, child of the span ``trace_hex``/``parent_hex`` (its ids in
        lowercase hex, as a traceparent writes them; the parent's ``SpanContext`` is made
        only if asked for)."""
        return FastSpan(self, shape, trace_hex, parent_hex, sampled, extra, remote, trace_state)

    def stop(self) -> None:
        """Stop the export thread (after handing its last spans over)."""
        self._stopped.set()
        self._hand_over()

    def _run(self) -> None:
        while not self._stopped.wait(self._delay_s):
            self._hand_over()

    def flush(self) -> None:
        """Hand every ended span over, then make the processor export what it holds (the
        user's own spans too)."""
        self._hand_over()
        try:
            self._processor.force_flush(_FLUSH_TIMEOUT_MS)
        except Exception:
            logger.exception("flushing the span processor failed")

    def _hand_over(self) -> None:
        """Give the ended spans to the writer, or to the processor (which exports them on
        its own schedule)."""
        with self._lock:
            ended, batch = self.ended, []
            while ended:
                batch.append(ended.popleft())
            if not batch:
                return
            if len(batch) == ended.maxlen:
                self._dropped_some()
            try:
                if self._writer is not None:
                    self._writer(batch)
                    return
                for span in batch:
                    self._processor.on_end(self._readable(span))
            except Exception:  # an exporter's trouble must not end the thread
                logger.exception("exporting %d spans failed", len(batch))

    def _dropped_some(self) -> None:
        """The queue was full when handed over: spans were (or may have been) dropped.
        Counted in ``shoal_tracing_span_queue_full`` (for alerts) and warned of."""
        from shoal._observe.metrics.standard import span_queue_full  # (rare: never at import)

        span_queue_full().labels().inc()  # only this thread records it, under self._lock
        self._full += 1
        now = time.monotonic()
        if now >= self._warn_after:
            logger.warning(
                "tracing: this process ended %d or more sampled spans within %.1f s (%d "
                "time(s) since the last warning), as many as it holds for export; any beyond "
                "were dropped, the oldest first. Lower tracing_options.sampling_ratio.",
                self.ended.maxlen, self._delay_s, self._full,
            )  # fmt: skip
            self._full, self._warn_after = 0, now + _DROP_WARNING_EVERY_S

    def _readable(self, span: FastSpan) -> ReadableSpan:
        return ReadableSpan(
            name=span.name,
            context=span.get_span_context(),
            parent=span.parent,
            resource=self.resource,
            attributes=span.attributes,
            events=span.events or (),
            kind=span.kind,
            status=span.status or _UNSET,
            start_time=span.start_ns,
            end_time=span.end_ns,
            instrumentation_scope=self._scope,
        )


class SpanShape:
    """What the spans of one kind of call share: their name, kind and fixed attributes
    (never changed once made). ``tracing`` keeps one per kind of call, so a span starts
    without building them, and the exporters encode them once (``json``, ``otlp``)."""

    __slots__ = ("attributes", "json", "kind", "name", "otlp")

    def __init__(self, name: str, kind: Any, attributes: dict[str, Any]) -> None:
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.json: Any = None  # set by the file exporter, for the file exporter
        self.otlp: bytes | None = None  # set by the OTLP exporter (shoal._observe.otlp)


class FastSpan(api.Span):
    """One of shoal's spans (see the module's guarantees)."""

    # What a span starts with, until set on it (a class attribute: one store fewer each).
    end_ns: int | None = None
    status: Status | None = None
    events: list[Event] | None = None
    #: Whether an attribute of the shape was set again (its value is then extra's).
    reshaped = False
    _parent: SpanContext | None = None
    _context: SpanContext | None = None

    def __init__(
        self,
        recorder: Recorder,
        shape: SpanShape,
        trace_hex: str,
        parent_hex: str,
        sampled: bool,
        extra: dict[str, Any],
        remote: bool = False,
        trace_state: Any = None,
    ) -> None:
        """A span of ``shape``, with the attributes ``extra`` besides the shape's.
        ``trace_hex``: the trace id in 32 lowercase hex digits; ``parent_hex``: "" for
        a root, else the parent's span id in 16 (``remote``: the parent is another
        process's; ``trace_state``: the W3C tracestate it came with, which its children
        keep). Ids stay hex: the traceparents and the file exporter's lines are made of
        them, and the ints of a ``SpanContext`` are made only when one is asked for."""
        self._recorder = recorder
        self.shape = shape
        self.name = shape.name
        self.trace_hex = trace_hex
        self.span_hex = (getrandbits(64) or 1).to_bytes(8).hex()  # (format(): 1.5x the cost)
        self.parent_hex = parent_hex
        self.sampled = sampled
        self.trace_state = trace_state
        self.extra = extra
        self._remote = remote
        self.start_ns = time_ns()

    @property
    def kind(self) -> Any:
        return self.shape.kind

    @property
    def attributes(self) -> dict[str, Any]:
        """The span's attributes: its shape's, and those set on it."""
        return {**self.shape.attributes, **self.extra}

    @property
    def parent(self) -> SpanContext | None:
        """The parent's span context (None: a root), made when first asked for."""
        parent = self._parent
        if parent is None and self.parent_hex:
            flags = _SAMPLED if self.sampled else _NOT_SAMPLED
            parent = self._parent = SpanContext(
                int(self.trace_hex, 16), int(self.parent_hex, 16), self._remote, flags,
                self.trace_state,
            )  # fmt: skip
        return parent

    def traceparent(self) -> str:
        """The span's W3C traceparent."""
        return f"00-{self.trace_hex}-{self.span_hex}-{'01' if self.sampled else '00'}"

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            flags = _SAMPLED if self.sampled else _NOT_SAMPLED
            context = self._context = SpanContext(
                int(self.trace_hex, 16), int(self.span_hex, 16), False, flags, self.trace_state
            )
        return context

    def is_recording(self) -> bool:
        return self.sampled and self.end_ns is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self.sampled:
            self.extra[key] = value
            if key in self.shape.attributes:
                self.reshaped = True

    def set_attributes(self, attributes: Any) -> None:
        for key, value in dict(attributes).items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self.sampled:
            if self.events is None:
                self.events = []
            self.events.append(Event(name, attributes or {}, timestamp or time_ns()))

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Any, description: str | None = None) -> None:
        self.status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        recorded = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        recorded.update(attributes or {})
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_ns is None:
            self.end_ns = end_time or time_ns()
            if self.sampled:
                self._recorder.ended.append(self)


class SdkStarter:
    """The same ``start`` and ``start_child`` as :class:`Recorder`, with a
    TracerProvider's tracer (the provider a ``setup_hook`` installed: its spans cost what
    the SDK's cost)."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self._empty = api.set_span_in_context(api.INVALID_SPAN)

    def start(self, shape: SpanShape, parent: SpanContext | None, extra: dict[str, Any]) -> Any:
        context = self._empty
        if parent is not None:
            context = api.set_span_in_context(api.NonRecordingSpan(parent))
        attributes = {**shape.attributes, **extra}
        return self._tracer.start_span(
            shape.name, context=context, kind=shape.kind, attributes=attributes
        )

    def start_child(
        self,
        shape: SpanShape,
        trace_hex: str,
        parent_hex: str,
        sampled: bool,
        extra: dict[str, Any],
        remote: bool,
        trace_state: Any = None,
    ) -> Any:
        flags = _SAMPLED if sampled else _NOT_SAMPLED
        parent = SpanContext(int(trace_hex, 16), int(parent_hex, 16), remote, flags, trace_state)
        return self.start(shape, parent, extra)
