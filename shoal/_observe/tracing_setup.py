"""Installing tracing in one process: the TracerProvider, its exporter, or the user's hook.

Imported only when tracing is enabled (it imports the OpenTelemetry SDK). Guarantees:
- shoal's exporters ("otlp", "console", "file") get a provider of shoal's own with a
  parent-based ratio sampler (a sampled incoming parent is always honoured); it also
  becomes OpenTelemetry's global provider when none was set before, so the user's own
  spans (``trace.get_tracer(...)``) are exported with shoal's;
- ``setup_hook`` is called once per process (a second configuration of the same
  process with the same hook does not call it again); shoal then uses the global
  provider the hook installed (or the provider it returns);
- every exporter batches, off the request's path: shoal's recorder takes its ended
  spans every :data:`_FILE_DELAY_MS` to the file exporter and to OTLP over gRPC, which
  export them then (``write_spans``, ``export_fast``), or to the SDK's
  BatchSpanProcessor (console, OTLP over HTTP), which exports within
  :data:`_BATCH_DELAY_MS` more, as it does the user's own SDK spans; what is left is
  flushed when a worker exits (``flush``) and at the controller's interpreter exit;
- the recorder and the processor each hold :data:`_QUEUE` spans: none is dropped while
  a process ends fewer than that many sampled spans in :data:`_FILE_DELAY_MS` and the
  exporter keeps up; past that, the oldest are dropped and a warning says so;
- every failure is a ConfigError naming the option and what to do.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

from shoal._config import TracingOptions
from shoal._errors import ConfigError
from shoal._seam.imports import import_attribute

try:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import SpanKind

    from shoal._observe.spans import FastSpan, Recorder, SdkStarter, SpanShape
except ImportError as missing:  # pragma: no cover - exercised without the extra installed
    raise ConfigError(
        f"tracing_options.enabled=True needs the OpenTelemetry SDK ({missing.name} is not "
        "installed): pip install 'shoal[tracing]'"
    ) from None

#: The instrumentation scope of shoal's own spans.
TRACER_NAME = "shoal"
#: Milliseconds between two exports of the OTLP and console exporters (the SDK's: 5000).
_BATCH_DELAY_MS = 1000
#: ... and of the file exporter, read by tests and people waiting for their spans; also
#: how often shoal's recorder hands its ended spans to the exporter, whichever it is.
_FILE_DELAY_MS = 100
#: The spans a process holds before their export, in shoal's recorder and in the SDK's
#: processor (whose default, 2048, is fewer than one hand-over brings at a few thousand
#: requests per second).
_QUEUE = 8192

_hooks_called: dict[str, Any] = {}  # hook path -> the provider it returned (or None)
_owned: list[Recorder] = []  # the recorder of shoal's spans in this process, if any


def install(options: TracingOptions, source: str) -> Any:
    """Set tracing up in this process as ``options`` say; returns what starts shoal's
    spans (``spans.Recorder`` for shoal's exporters, ``spans.SdkStarter`` for a hook)."""
    if options.setup_hook is not None:
        provider = _call_hook(options.setup_hook)
        return SdkStarter((provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME))
    resource, processor = _resource(source), _processor(options)
    # The user's own spans: the SDK's, through the same processor (and exporter).
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(options.sampling_ratio)),
        resource=resource,
        shutdown_on_exit=False,  # flush() at exit instead: bounded in time
    )
    provider.add_span_processor(processor)
    if type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":  # none set yet
        trace.set_tracer_provider(provider)
    for old in _owned:  # a process configured again (tests): the last configuration wins
        old.stop()
    exporter = processor.span_exporter
    writer = getattr(exporter, "write_spans", None) or getattr(exporter, "export_fast", None)
    recorder = Recorder(
        options.sampling_ratio, resource, processor, _FILE_DELAY_MS / 1000, _QUEUE, writer
    )
    if not _owned:
        atexit.register(flush)
    _owned[:] = [recorder]
    return recorder


def flush(timeout_s: float = 2.0) -> None:
    """Export what this process still holds (a worker calls it before it exits), waiting
    at most ``timeout_s``: an exporter retrying a collector that does not answer must
    not hold the process."""
    for recorder in _owned:
        done = threading.Thread(target=recorder.flush, name="shoal-spans-flush", daemon=True)
        done.start()
        done.join(timeout_s)


def _resource(source: str) -> Resource:
    resource = Resource.create({"shoal.process": source, "process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        # OTEL_SERVICE_NAME (read by the SDK) names the service; shoal's default otherwise.
        resource = resource.merge(Resource({"service.name": "shoal"}))
    return resource


def _processor(options: TracingOptions) -> Any:
    match options.exporter:
        case "file":
            assert options.path is not None
            exporter = JsonLinesExporter(options.path)
            return BatchSpanProcessor(
                exporter, max_queue_size=_QUEUE, schedule_delay_millis=_FILE_DELAY_MS
            )
        case "console":
            return BatchSpanProcessor(
                ConsoleSpanExporter(), max_queue_size=_QUEUE, schedule_delay_millis=_BATCH_DELAY_MS
            )
        case "otlp":
            return BatchSpanProcessor(
                _otlp(options), max_queue_size=_QUEUE, schedule_delay_millis=_BATCH_DELAY_MS
            )
    raise AssertionError(options.exporter)  # the options' validation refuses any other


def _otlp(options: TracingOptions) -> Any:
    grpc = options.protocol == "grpc"
    package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if grpc else "http")
    try:
        if grpc:  # shoal's spans encoded by shoal (docs/tracing.md): the SDK's at 37 us each
            from shoal._observe.otlp import ShoalSpanExporter as OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError:
        raise ConfigError(
            f"tracing_options.protocol={options.protocol!r} needs {package}: "
            "pip install 'shoal[tracing]'"
        ) from None
    return OTLPSpanExporter(endpoint=options.endpoint)


def _call_hook(path: str) -> Any:
    """Import and call the user's ``module:function``; what it returns if a provider."""
    module_name, _, function_name = path.partition(":")
    try:
        target = import_attribute(module_name, function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"tracing_options.setup_hook={path!r} cannot be imported in process "
            f"{os.getpid()} ({exc}); it must be importable in every shoal process (installed, "
            "or from the working directory or PYTHONPATH)"
        ) from None
    if not callable(target):
        raise ConfigError(f"tracing_options.setup_hook={path!r} is not a function")
    if path not in _hooks_called:
        try:
            provider = target()
        except Exception as exc:
            raise ConfigError(f"tracing_options.setup_hook={path!r} raised {exc!r}") from exc
        _hooks_called[path] = provider if hasattr(provider, "get_tracer") else None
    return _hooks_called[path]


#: JSON of plain values (anything else as its str()): one encoder, not one per call.
_encode = json.JSONEncoder(default=str).encode
#: A string as JSON, as ``_encode`` writes it (C; json's encoder costs ~30x more per call).
_quote = encode_basestring_ascii
#: The JSON name of each span kind, by the kind's id (an enum's hash is Python code).
_KINDS = {id(kind): kind.name for kind in SpanKind}
#: The JSON of each attribute name seen so far (at most _MAX_KEYS).
_KEYS: dict[str, str] = {}
_MAX_KEYS = 4096
#: A span without a status, as JSON.
_NO_STATUS = '"status": "UNSET", "status_description": null'


class JsonLinesExporter(SpanExporter):
    """Appends each span to ``path`` as one JSON object per line (several processes may
    append to the same file: each line is one ``write`` on a file opened for appending).

    Fields: name, kind (SERVER, CLIENT, INTERNAL...), trace_id, span_id, parent_span_id
    (hex; null for a root), start_ns, end_ns, status (UNSET, OK, ERROR) and
    status_description, attributes, events (name, attributes), resource (attributes).
    """

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"tracing_options.path={path!r} cannot be opened for appending ({exc.strerror})"
            ) from None
        self._lock = threading.Lock()
        self._resources: dict[int, str] = {}  # id(resource) -> its JSON: the same every span
        self._last: tuple[Any, str] = (None, "")  # the last recorder seen, its line's end

    def _line(self, span: ReadableSpan) -> str:
        return self._with_resource(span_record(span, with_resource=False), span.resource)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._write("".join(self._line(span) for span in spans))

    def write_spans(self, spans: Sequence[FastSpan]) -> None:
        """Write shoal's own spans (``spans.FastSpan``) as :meth:`export` writes SDK spans."""
        self._write("".join(self._fast_line(span) for span in spans))

    def _write(self, lines: str) -> SpanExportResult:
        with self._lock:
            try:
                os.write(self._fd, lines.encode())
            except OSError:
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _fast_line(self, span: FastSpan) -> str:
        """``span`` as the JSON line :meth:`export` writes, put together from its parts
        (json's encoder costs more per span than a request's whole path in the proxy):
        its shape's, encoded once, and its own."""
        shape, parent, status, events, extra = (
            span.shape, span.parent_hex, span.status, span.events, span.extra
        )  # fmt: skip
        if span.name is shape.name and not span.reshaped:
            head, attributes = shape.json or _shape_json(shape)
            if extra:
                attributes = f"{attributes}, {_pairs(extra)}" if attributes else _pairs(extra)
        else:
            head, attributes = _head(span.name, shape.kind), _pairs(span.attributes)
        parent_json = f'"{parent}"' if parent else "null"
        status_json = _NO_STATUS if status is None else (
            f'"status": "{status.status_code.name}", '
            f'"status_description": {_encode(status.description)}'
        )  # fmt: skip
        events_json = "[]" if not events else _encode([
            {"name": event.name, "attributes": dict(event.attributes or {})} for event in events
        ])  # fmt: skip
        end = span.end_ns
        recorder, tail = self._last
        if span._recorder is not recorder:
            recorder = span._recorder
            tail = f'"resource": {self._resource_json(recorder.resource)}}}\n'
            self._last = (recorder, tail)
        return (
            f'{head}"trace_id": "{span.trace_hex}", "span_id": "{span.span_hex}", '
            f'"parent_span_id": {parent_json}, "start_ns": {span.start_ns}, '
            f'"end_ns": {end if type(end) is int else _encode(end)}, {status_json}, '
            f'"attributes": {{{attributes}}}, "events": {events_json}, {tail}'
        )

    def _resource_json(self, resource: Any) -> str:
        cached = self._resources.get(id(resource))
        if cached is None:
            cached = _encode(dict(resource.attributes))
            self._resources[id(resource)] = cached
        return cached

    def _with_resource(self, record: dict[str, Any], resource: Any) -> str:
        return f'{_encode(record)[:-1]}, "resource": {self._resource_json(resource)}}}\n'

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _head(name: Any, kind: Any) -> str:
    """The start of a span's line: its name and kind."""
    name_json = _quote(name) if type(name) is str else _encode(name)
    return f'{{"name": {name_json}, "kind": "{_KINDS.get(id(kind)) or kind.name}", '


def _shape_json(shape: SpanShape) -> tuple[str, str]:
    """The JSON of what a shape's spans share, kept on the shape: the line's head, and
    the shape's attributes (their pairs, without braces)."""
    shape.json = (_head(shape.name, shape.kind), _pairs(shape.attributes))
    return shape.json


def _pairs(values: Mapping[str, Any]) -> str:
    """``values`` (attributes) as ``_encode`` writes them, without the braces."""
    parts = []
    try:
        for key, value in values.items():
            name = _KEYS.get(key) or _key(key)
            kind = type(value)
            if kind is str:
                parts.append(f"{name}: {_quote(value)}")
            elif kind is int:  # (not a bool: its type is bool)
                parts.append(f"{name}: {value}")
            else:
                parts.append(f"{name}: {_encode(value)}")
    except TypeError:  # a key that is not a string
        return _encode(dict(values))[1:-1]  # as the encoder says (or refuses) it
    return ", ".join(parts)


def _key(key: str) -> str:
    name = _quote(key)  # (TypeError: not a string)
    if len(_KEYS) < _MAX_KEYS:
        _KEYS[key] = name
    return name


def span_record(span: ReadableSpan, with_resource: bool = True) -> dict[str, Any]:
    """One span as the file exporter writes it (plain JSON values)."""
    context = span.get_span_context()
    parent = span.parent
    assert context is not None
    record = {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": None if parent is None else f"{parent.span_id:016x}",
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": event.name, "attributes": dict(event.attributes or {})}
            for event in span.events
        ],
    }
    if with_resource:
        record["resource"] = dict(span.resource.attributes)
    return record
