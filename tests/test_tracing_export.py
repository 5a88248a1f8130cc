"""Tracing's export path (docs/tracing.md): spans ended at a few thousand a second all
reach a real OTLP collector (a gRPC server speaking OpenTelemetry's trace service); spans
beyond what a process holds for export are dropped with a warning, not silently; shoal's
own OTLP encoding is the SDK's, field for field; a collector that does not answer holds
neither the spans' ends nor the process's exit."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from conftest import run_driver

pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'shoal[tracing]'")
pytest.importorskip(
    "opentelemetry.exporter.otlp.proto.grpc", reason="OTLP needs pip install 'shoal[tracing]'"
)

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shoal._observe.metrics import snapshot
from shoal._observe.spans import Recorder, SpanShape

# A driver: a collector in a thread of its own process, tracing exported to it by OTLP
# over gRPC, spans ended at RATE a second for SECONDS (the proxy's HTTP span, as a
# request makes it), then the count the collector received.
SOURCE = """
import json, sys, threading, time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from shoal._config import TracingOptions
from shoal._observe import tracing
from shoal._transport.messages import Request

received = [0]
lock = threading.Lock()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with lock:
            received[0] += count
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(2))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
tracing.configure(
    TracingOptions(enabled=True, exporter="otlp", endpoint=f"http://127.0.0.1:{port}"), "proxy-1"
)
rate, seconds = int(sys.argv[2]), float(sys.argv[3])
scope = {"method": "POST", "path": "/echo", "headers": []}
ended = 0
started = time.perf_counter()
while ended < rate * seconds:
    for _ in range(rate // 100):  # a hundredth of a second's spans, then wait for the next
        span = tracing.start_http(scope, "/")
        tracing.bind_http(Request("__call__", (), {}, f"request-{ended}"))
        tracing.end_http(span, 200)
        ended += 1
    time.sleep(max(0.0, started + ended / rate - time.perf_counter()))
tracing.flush()  # hands the last spans over and waits for their export (at most 2 s)
server.stop(None)
print(json.dumps({"ended": ended, "received": received[0],
                  "seconds": time.perf_counter() - started}))
"""


def test_spans_ended_at_thousands_a_second_all_reach_the_otlp_collector(tmp_path: Path) -> None:
    # 4,000 a second for 1.5 s: before 2026-12-02 shoal handed its spans to the SDK's
    # processor once a second, into the SDK's queue of 2,048, and a third were dropped.
    result = run_driver(tmp_path, SOURCE, "4000", "1.5")
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["ended"] == 6000
    assert counts["received"] == counts["ended"], (counts, result.stderr[-2000:])
    assert "dropp" not in result.stderr.lower(), result.stderr[-2000:]


def test_spans_beyond_the_export_queue_are_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def times_full() -> float:
        families, _ = snapshot()
        found = [f for f in families if f[0] == "shoal_tracing_span_queue_full"]
        return sum(value for _, _, value in found[0][3]) if found else 0.0

    before = times_full()
    exported = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exported)
    # A queue of 10 handed over every 10 minutes: only flush() hands it over.
    recorder = Recorder(1.0, Resource.create({}), processor, 600.0, max_queue=10)
    shape = SpanShape("POST /", SpanKind.SERVER, {})
    try:
        for number in range(25):
            recorder.start(shape, None, {"n": number}).end()
        with caplog.at_level(logging.WARNING, logger="shoal.tracing"):
            recorder.flush()
    finally:
        recorder.stop()
    kept = [(span.attributes or {})["n"] for span in exported.get_finished_spans()]
    assert kept == list(range(15, 25))  # the newest 10; the oldest were dropped
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "10 or more sampled spans" in warnings[0]
    assert "tracing_options.sampling_ratio" in warnings[0]
    assert times_full() == before + 1  # and counted, for an alert on /metrics


def test_shoal_s_otlp_encoding_is_the_sdk_s(tmp_path: Path) -> None:
    """Shoal encodes its own spans for OTLP over gRPC (``shoal._observe.otlp``): the
    request parses to the message the SDK's encoder makes of the same spans, whatever
    the span (root, remote and local parents, renamed, an attribute of its shape set
    again, an error status, an exception, attribute values of every kind)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.trace import StatusCode

    from shoal._observe.otlp import ShoalSpanExporter, span_bytes

    resource = Resource.create({"service.name": "shoal", "shoal.process": "replica-1"})
    recorder = Recorder(1.0, resource, SimpleSpanProcessor(InMemorySpanExporter()), 600.0)
    http = SpanShape("POST /", SpanKind.SERVER, {"http.request.method": "POST"})
    call = SpanShape("B/__call__", SpanKind.CLIENT, {"rpc.service": "B", "rpc.method": "x"})
    try:
        root = recorder.start(http, None, {"url.path": "/echo", "shoal.request_id": "r-1"})
        root.set_attribute("http.response.status_code", 500)
        root.set_status(StatusCode.ERROR, "HTTP 500")
        remote = recorder.start_child(call, root.trace_hex, root.span_hex, True, {}, True)
        remote.set_attributes({"ok": True, "no": False, "ratio": 0.25, "minus": -7,
                               "big": 1 << 62, "empty": ""})  # fmt: skip
        local = recorder.start_child(call, root.trace_hex, remote.span_hex, True, {}, False)
        local.set_attribute("rpc.method", "__call__")  # the shape's, set again
        renamed = recorder.start(call, None, {})
        renamed.update_name("renamed")
        failed = recorder.start(call, None, {"n": 1})
        failed.record_exception(ValueError("bad input"))
        failed.set_status(StatusCode.ERROR, "ValueError: bad input")
        listed = recorder.start(call, None, {"sizes": [1, 2, 3]})
        spans = [root, remote, local, renamed, failed, listed]
        for span in spans:
            span.end()
        # The last two are the SDK's to encode (an event; a list): the others are shoal's.
        assert [span_bytes(span) is None for span in spans] == [False] * 4 + [True] * 2
        exporter = ShoalSpanExporter(endpoint="http://127.0.0.1:9")  # never connected
        ours = exporter._translate_data(spans)
        theirs = encode_spans([recorder._readable(span) for span in spans])
        assert ExportTraceServiceRequest.FromString(ours.SerializeToString()) == theirs
        assert ours == theirs
    finally:
        recorder.stop()


# A driver whose collector does not answer (nothing listens on its port).
SILENT_COLLECTOR = """
import json, sys, time

from conftest import free_port
from shoal._config import TracingOptions
from shoal._observe import tracing
from shoal._transport.messages import Request

tracing.configure(
    TracingOptions(enabled=True, exporter="otlp", endpoint=f"http://127.0.0.1:{free_port()}"),
    "proxy-1",
)
scope = {"method": "POST", "path": "/echo", "headers": []}
started = time.perf_counter()
ending = 0.0
for number in range(3000):  # over 3 s: exports are tried (and retried) meanwhile
    begun = time.perf_counter()
    span = tracing.start_http(scope, "/")
    tracing.bind_http(Request("__call__", (), {}, f"request-{number}"))
    tracing.end_http(span, 200)
    ending = max(ending, time.perf_counter() - begun)
    time.sleep(max(0.0, started + (number + 1) / 1000 - time.perf_counter()))
flushed = time.perf_counter()
tracing.flush()
print(json.dumps({"slowest_span_s": ending, "flush_s": time.perf_counter() - flushed}))
"""


def test_a_collector_that_does_not_answer_holds_neither_requests_nor_exit(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    result = run_driver(tmp_path, SILENT_COLLECTOR)
    times = json.loads(result.stdout.strip().splitlines()[-1])
    assert times["slowest_span_s"] < 0.5, times  # spans end while exports retry
    assert times["flush_s"] < 3.0, times  # a flush waits at most 2 s for the exporter
    assert time.monotonic() - started < 60  # and the process exits (run_driver: 120 s)
