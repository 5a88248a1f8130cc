"""OTLP over gRPC for shoal's own spans: their export request put together as protobuf
bytes from their parts.

The OTLP exporter's encoder builds each span's message field by field in Python, about
37 µs a span (more than the proxy's whole part of a request). Shoal's spans
(``spans.FastSpan``) are encoded here instead, a few microseconds each: what the spans
of one shape share (name, kind, fixed attributes) once per shape, the rest (ids, times,
the span's own attributes, status, flags) per span. Guarantees:

- the request parses to the message the SDK's encoder makes of the same spans (as SDK
  ``ReadableSpan`` objects), field for field (``tests/test_tracing_export.py``);
- a span this encoder does not cover (events, a trace state, an attribute value other
  than str, bool, int or float) is encoded by the SDK's encoder, alone;
- the user's own SDK spans, which the exporter gets from the batch processor, go
  through the SDK's encoder as before;
- transport, retries, headers, TLS and compression are the SDK exporter's own.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from struct import Struct
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import StatusCode

from shoal._observe.spans import FastSpan, SpanShape

_U64, _I64_DOUBLE, _U32 = Struct("<Q"), Struct("<d"), Struct("<I")
# The span flags the SDK sets: whether the parent is remote is known (always), and is it.
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_FLAGS_LOCAL = b"\x85\x01" + _U32.pack(_HAS_IS_REMOTE)  # field 16, fixed32
_FLAGS_REMOTE = b"\x85\x01" + _U32.pack(_HAS_IS_REMOTE | _IS_REMOTE)
_EMPTY_STATUS = b"\x7a\x00"  # field 15: the SDK's Status for UNSET (present, empty)
#: Spans per export request (the SDK's batch processor's default batch).
MAX_BATCH = 512


def _varint(value: int) -> bytes:
    if value < 0x80:  # (most are: tags, lengths)
        return bytes((value,))
    if value < 0x4000:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    """Field ``number`` holding ``payload`` (a string, bytes or a message)."""
    size = len(payload)
    if size < 0x80 and number < 16:  # a byte each for the tag and the length
        return bytes((number << 3 | 2, size)) + payload
    return _varint(number << 3 | 2) + _varint(size) + payload


_KEYS: dict[str, bytes] = {}  # an attribute's name -> its KeyValue field 1, encoded
_MAX_KEYS = 4096


def _key(key: str) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = _delimited(1, key.encode())
        if len(_KEYS) < _MAX_KEYS:
            _KEYS[key] = encoded
    return encoded


def _any_value(value: Any) -> bytes | None:
    """An ``AnyValue`` message, or None for a value this encoder leaves to the SDK."""
    kind = type(value)
    if kind is str:
        return _delimited(1, value.encode())
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int and -(1 << 63) <= value < 1 << 63:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if kind is float:
        return b"\x21" + _I64_DOUBLE.pack(value)
    return None


def _attributes(values: Any) -> bytes | None:
    """Span field 9 (``KeyValue``) for each attribute, in order; None if one is not
    covered."""
    parts = []
    for key, value in values.items():
        encoded = _any_value(value)
        if encoded is None or type(key) is not str:
            return None
        parts.append(_delimited(9, _key(key) + _delimited(2, encoded)))
    return b"".join(parts)


def _shape_bytes(shape: SpanShape) -> bytes | None:
    """The fields of a shape's spans: name, kind and the shape's attributes (kept on it)."""
    attributes = _attributes(shape.attributes)
    if attributes is None:
        return None
    encoded = _delimited(5, shape.name.encode()) + b"\x30" + _varint(shape.kind.value + 1)
    shape.otlp = encoded + attributes
    return shape.otlp


def _status(span: FastSpan) -> bytes:
    status = span.status
    if status is None or (status.status_code is StatusCode.UNSET and status.description is None):
        return _EMPTY_STATUS
    message = status.description
    body = _delimited(2, message.encode()) if message else b""
    code = status.status_code.value
    if code:
        body += b"\x18" + _varint(code)
    return _delimited(15, body)


def span_bytes(span: FastSpan) -> bytes | None:
    """``span`` as an OTLP ``Span`` message, or None if this encoder does not cover it."""
    if span.events or span.trace_state is not None:
        return None
    shape = span.shape
    if span.name is shape.name and not span.reshaped:
        fixed = shape.otlp or _shape_bytes(shape)
        own = _attributes(span.extra) if span.extra else b""
    else:  # renamed, or one of the shape's attributes set again: every field anew
        fixed = _delimited(5, str(span.name).encode()) + b"\x30" + _varint(shape.kind.value + 1)
        own = _attributes(span.attributes)
    end = span.end_ns
    if fixed is None or own is None or type(end) is not int:
        return None
    parent = span.parent_hex
    return b"".join((
        b"\x0a\x10", bytes.fromhex(span.trace_hex), b"\x12\x08", bytes.fromhex(span.span_hex),
        b"\x22\x08" + bytes.fromhex(parent) if parent else b"",
        fixed, own,
        b"\x39", _U64.pack(span.start_ns), b"\x41", _U64.pack(end),
        _status(span),
        _FLAGS_REMOTE if parent and span._remote else _FLAGS_LOCAL,
    ))  # fmt: skip


class _Envelope:
    """What a recorder's spans share in a request: their resource and scope, encoded."""

    def __init__(self, readable: Any) -> None:
        """``readable``: the SDK span of one of the recorder's spans."""
        (resource_spans,) = encode_spans([readable]).resource_spans
        (scope_spans,) = resource_spans.scope_spans
        self.resource = _delimited(1, resource_spans.resource.SerializeToString())
        self.resource_schema = (
            _delimited(3, resource_spans.schema_url.encode()) if resource_spans.schema_url else b""
        )
        self.scope = _delimited(1, scope_spans.scope.SerializeToString())
        self.scope_schema = (
            _delimited(3, scope_spans.schema_url.encode()) if scope_spans.schema_url else b""
        )

    def request(self, spans: Sequence[bytes]) -> bytes:
        scope_spans = self.scope + b"".join(_delimited(2, s) for s in spans) + self.scope_schema
        resource_spans = self.resource + _delimited(2, scope_spans) + self.resource_schema
        return _delimited(1, resource_spans)


class ShoalSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP exporter over gRPC, encoding shoal's spans itself (see the module's
    guarantees); ``export`` takes shoal's spans or SDK spans, not both at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The resource and scope of the recorder's spans (an exporter serves one recorder:
        # a process configured again gets a new exporter), encoded on the first export.
        self._envelope: _Envelope | None = None
        # Two threads export: shoal's recorder and the SDK's batch processor (the user's
        # own spans); the SDK's exporter expects one at a time.
        self._exporting_lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        with self._exporting_lock:
            return super().export(spans)

    def export_fast(self, spans: Sequence[FastSpan]) -> None:
        """Export shoal's spans (the recorder's writer), ``MAX_BATCH`` to a request."""
        for start in range(0, len(spans), MAX_BATCH):
            self.export(spans[start : start + MAX_BATCH])

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        if not data or type(data[0]) is not FastSpan:
            return super()._translate_data(data)
        return ExportTraceServiceRequest.FromString(self._request(data))

    def _request(self, spans: Sequence[FastSpan]) -> bytes:
        recorder = spans[0]._recorder
        envelope = self._envelope
        if envelope is None:
            envelope = self._envelope = _Envelope(recorder._readable(spans[0]))
        encoded = []
        for span in spans:
            one = span_bytes(span)
            if one is None:  # not covered here: the SDK's encoder, for this span alone
                (resource_spans,) = encode_spans([recorder._readable(span)]).resource_spans
                one = resource_spans.scope_spans[0].spans[0].SerializeToString()
            encoded.append(one)
        return envelope.request(encoded)
