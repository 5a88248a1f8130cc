"""OpenTelemetry tracing (docs/tracing.md): the span tree of a request through the
proxy and three deployments, in one process and across processes.

In-process: the pipeline runs in local testing mode, served over real HTTP by a
``Proxy`` on the same event loop, with tracing configured in this process through a
``setup_hook`` that installs an in-memory exporter. Multi-process (the same tree
assembled from the JSON lines every process appends to one file): the tracing example's
test, ``tests/test_examples.py::test_tracing_example_assembles_the_tree_of_every_process``
(one multi-process run serves both).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, run_driver, wait_until

pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'shoal[tracing]'")

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from starlette.requests import Request

from shoal import serve
from shoal._config import HTTPOptions, TracingOptions
from shoal._errors import ConfigError
from shoal._observe import tracing
from shoal._observe.tracing_setup import span_record
from shoal._proxy.proxy import Proxy

EXPORTER = InMemorySpanExporter()
CLIENT_SPAN = "00f067aa0ba902b7"


def install_tracing() -> TracerProvider:
    """The setup_hook: an in-memory exporter behind this process's TracerProvider."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # for the user's own spans (once per process)
    return provider  # shoal's own spans: this provider, whatever the global one is


@serve.deployment
class C:
    def __call__(self, x: int) -> int:  # sync: runs in a thread, the span still current
        with trace.get_tracer("test").start_as_current_span("user-work"):
            return x + 1


@serve.deployment
class B:
    def __init__(self, c: Any) -> None:
        self.c = c

    async def __call__(self, x: int) -> int:
        return int(await self.c.remote(x)) * 2


@serve.deployment
class A:
    def __init__(self, b: Any) -> None:
        self.b = b

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"y": await self.b.remote(int((await request.json())["x"]))}


@serve.deployment
class Broken:
    def __call__(self, x: int) -> int:
        raise ValueError(f"cannot take {x}")


@serve.deployment
class Front:
    def __init__(self, broken: Any) -> None:
        self.broken = broken

    async def __call__(self, request: Request) -> int:
        return int(await self.broken.remote(1))


def chain(spans: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(kind, name) from the root down, each span the only child of the one before."""
    ids = {span["span_id"]: span for span in spans}
    roots = [s for s in spans if s["parent_span_id"] not in ids]
    assert len(roots) == 1, roots
    path, span = [], roots[0]
    while True:
        path.append((span["kind"], span["name"]))
        children = [s for s in spans if s["parent_span_id"] == span["span_id"]]
        if not children:
            return path
        assert len(children) == 1, children
        span = children[0]


PIPELINE = [
    ("SERVER", "POST /traced"),
    ("SERVER", "A/__call__"),
    ("CLIENT", "B/__call__"),
    ("SERVER", "B/__call__"),
    ("CLIENT", "C/__call__"),
    ("SERVER", "C/__call__"),
    ("INTERNAL", "user-work"),
]


@pytest.fixture(scope="module")
def local_http() -> Iterator[str]:
    """The base URL of a traced proxy in this process, serving /traced (A -> B -> C)
    and /failing (Front -> Broken) from local testing mode."""
    handle = serve.run(A.bind(B.bind(C.bind())), name="traced", route_prefix=None,
                       _local_testing_mode=True)  # fmt: skip
    serve.run(Front.bind(Broken.bind()), name="failing", route_prefix=None,
              _local_testing_mode=True)  # fmt: skip
    router = handle._get_router()
    tracing.configure(
        TracingOptions(enabled=True, setup_hook="test_tracing:install_tracing"), "controller"
    )
    options = HTTPOptions(host="127.0.0.1", port=free_port())

    async def start() -> Proxy:
        proxy = Proxy(router._registry, options)
        proxy.set_routes({"/traced": ("traced", "A"), "/failing": ("failing", "Front")})
        await proxy.serve()
        return proxy

    proxy = asyncio.run_coroutine_threadsafe(start(), router.loop).result(30)
    try:
        yield f"http://127.0.0.1:{options.port}"
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop(5), router.loop).result(30)
        tracing.configure(TracingOptions(), "controller")
        for name in ("traced", "failing"):
            serve.delete(name)


def memory_spans(trace_id: str, count: int) -> list[dict[str, Any]]:
    """The in-memory exporter's spans of ``trace_id``, once there are ``count``."""

    def found() -> list[dict[str, Any]] | None:
        spans = [span_record(s) for s in EXPORTER.get_finished_spans()]
        ours = [s for s in spans if s["trace_id"] == trace_id]
        return ours if len(ours) >= count else None

    spans: list[dict[str, Any]] = wait_until(found, what=f"{count} spans of trace {trace_id}")
    return spans


def test_span_tree_of_a_pipeline_in_process(local_http: str) -> None:
    request_id = uuid.uuid4().hex
    response = httpx.post(f"{local_http}/traced", json={"x": 1},
                          headers={"x-request-id": request_id})  # fmt: skip
    assert response.status_code == 200 and response.json() == {"y": 4}

    def trace_of_request() -> str | None:
        for span in EXPORTER.get_finished_spans():
            if span.attributes and span.attributes.get("shoal.request_id") == request_id:
                return f"{span.context.trace_id:032x}"
        return None

    spans = memory_spans(wait_until(trace_of_request), len(PIPELINE))
    assert chain(spans) == PIPELINE
    proxy = spans_named(spans, "POST /traced")
    assert proxy["parent_span_id"] is None  # no traceparent came in: a new trace
    assert proxy["attributes"]["http.request.method"] == "POST"
    assert proxy["attributes"]["http.route"] == "/traced"
    assert proxy["attributes"]["http.response.status_code"] == 200
    for span in spans:
        assert span["status"] == "UNSET", span
        if span["kind"] != "INTERNAL":  # the user's own span says what the user says
            assert span["attributes"]["shoal.request_id"] == request_id, span
    assert spans_named(spans, "SERVER C/__call__")["attributes"]["shoal.replica_id"]


def spans_named(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The one span called ``name`` (``"KIND name"`` to tell a client from a server)."""
    kind, _, bare = (
        name.rpartition(" ") if name.split(" ")[0] in ("SERVER", "CLIENT") else ("", "", name)
    )
    found = [s for s in spans if s["name"] == bare and (not kind or s["kind"] == kind)]
    assert len(found) == 1, (name, spans)
    return found[0]


def test_incoming_traceparent_is_the_parent(local_http: str) -> None:
    trace_id = uuid.uuid4().hex
    response = httpx.post(
        f"{local_http}/traced", json={"x": 2},
        headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01", "tracestate": "vendor=1"},
    )  # fmt: skip
    assert response.status_code == 200
    spans = memory_spans(trace_id, len(PIPELINE))
    assert chain(spans) == PIPELINE
    assert spans_named(spans, "POST /traced")["parent_span_id"] == CLIENT_SPAN


def test_unsampled_incoming_traceparent_records_nothing(local_http: str) -> None:
    trace_id = uuid.uuid4().hex
    response = httpx.post(f"{local_http}/traced", json={"x": 2},
                          headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-00"})  # fmt: skip
    assert response.status_code == 200
    marker = uuid.uuid4().hex  # a sampled request after it: its spans prove the first ended
    httpx.post(f"{local_http}/traced", json={"x": 2},
               headers={"traceparent": f"00-{marker}-{CLIENT_SPAN}-01"})  # fmt: skip
    memory_spans(marker, len(PIPELINE))
    assert not [
        s for s in EXPORTER.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id
    ]


def test_a_failing_deployment_marks_its_spans_error(local_http: str) -> None:
    trace_id = uuid.uuid4().hex
    response = httpx.post(f"{local_http}/failing", content=b"",
                          headers={"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"})  # fmt: skip
    assert response.status_code == 500
    spans = memory_spans(trace_id, 4)
    assert chain(spans) == [
        ("SERVER", "POST /failing"), ("SERVER", "Front/__call__"),
        ("CLIENT", "Broken/__call__"), ("SERVER", "Broken/__call__"),
    ]  # fmt: skip
    assert all(span["status"] == "ERROR" for span in spans), spans
    assert spans_named(spans, "POST /failing")["attributes"]["http.response.status_code"] == 500
    replica = spans_named(spans, "SERVER Broken/__call__")
    (event,) = replica["events"]
    assert event["name"] == "exception"
    assert event["attributes"]["exception.type"] == "ValueError"
    assert event["attributes"]["exception.message"] == "cannot take 1"
    client = spans_named(spans, "CLIENT Broken/__call__")
    assert client["events"][0]["attributes"]["exception.type"] == "ValueError"
    assert "ValueError: cannot take 1" in client["status_description"]


def test_a_stream_span_ends_with_the_stream() -> None:
    @serve.deployment
    class Counter:
        def __call__(self, n: int) -> Iterator[int]:
            yield from range(n)

    @serve.deployment
    class Reader:
        def __init__(self, counter: Any) -> None:
            self.counter = counter.options(stream=True)

        async def __call__(self, n: int) -> list[int]:
            return [item async for item in self.counter.remote(n)]

    handle = serve.run(Reader.bind(Counter.bind()), name="streaming", route_prefix=None,
                       _local_testing_mode=True)  # fmt: skip
    tracing.configure(
        TracingOptions(enabled=True, setup_hook="test_tracing:install_tracing"), "controller"
    )
    try:
        with trace.get_tracer("test").start_as_current_span("driver") as driver:
            assert handle.remote(3).result() == [0, 1, 2]
        trace_id = f"{driver.get_span_context().trace_id:032x}"
        spans = memory_spans(trace_id, 5)
        assert chain(spans) == [
            ("INTERNAL", "driver"), ("CLIENT", "Reader/__call__"), ("SERVER", "Reader/__call__"),
            ("CLIENT", "Counter/__call__"), ("SERVER", "Counter/__call__"),
        ]  # fmt: skip
        client = spans_named(spans, "CLIENT Counter/__call__")
        server = spans_named(spans, "SERVER Counter/__call__")
        assert client["end_ns"] > server["start_ns"]  # ended (it was exported) with the stream
    finally:
        tracing.configure(TracingOptions(), "controller")
        serve.delete("streaming")


def test_sampling_ratio_zero_exports_nothing(local_http: str, tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    tracing.configure(
        TracingOptions(enabled=True, exporter="file", path=str(path), sampling_ratio=0.0),
        "controller",
    )
    unsampled = uuid.uuid4().hex
    assert httpx.post(f"{local_http}/traced", json={"x": 1},
                      headers={"x-request-id": unsampled}).status_code == 200  # fmt: skip
    # The same file at ratio 1: the next request's spans appear, the first's never do.
    tracing.configure(TracingOptions(enabled=True, exporter="file", path=str(path)), "controller")
    sampled = uuid.uuid4().hex
    try:
        assert httpx.post(f"{local_http}/traced", json={"x": 1},
                          headers={"x-request-id": sampled}).status_code == 200  # fmt: skip

        def request_ids() -> list[str] | None:
            records = [json.loads(line) for line in path.read_text().splitlines()]
            ids = [r["attributes"].get("shoal.request_id") for r in records]
            return ids if ids.count(sampled) >= len(PIPELINE) - 1 else None

        assert unsampled not in wait_until(request_ids, what="the sampled request's spans")
    finally:
        tracing.configure(
            TracingOptions(enabled=True, setup_hook="test_tracing:install_tracing"), "controller"
        )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"enabled": True, "sampling_ratio": 1.5}, "tracing.sampling_ratio=1.5"),
        ({"enabled": True, "exporter": "jaeger"}, "tracing.exporter='jaeger'"),
        ({"exporter": "console"}, "['exporter'] set while tracing is off"),
        ({"enabled": True, "exporter": "file"}, "exporter='file' needs a path"),
        ({"enabled": True, "exporter": "console", "path": "x"}, "['path'] do not apply"),
        ({"enabled": True, "setup_hook": "no_colon"}, "tracing.setup_hook='no_colon'"),
        ({"enabled": True, "setup_hook": "m:f", "sampling_ratio": 0.5}, "['sampling_ratio']"),
        ({"enabled": True, "sample": 1}, "unknown option 'tracing.sample'"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        serve.start(tracing_options=options)


def test_a_setup_hook_that_cannot_be_imported_is_refused() -> None:
    options = TracingOptions(enabled=True, setup_hook="no_such_module:setup")
    with pytest.raises(ConfigError, match="setup_hook='no_such_module:setup' cannot be imported"):
        tracing.configure(options, "controller")
    assert not tracing.on


def test_tracing_without_the_sdk_says_what_to_install() -> None:
    script = (
        "import sys; sys.modules['opentelemetry.sdk'] = None\n"
        "from shoal._config import TracingOptions\n"
        "from shoal._observe import tracing\n"
        "try:\n"
        "    tracing.configure(TracingOptions(enabled=True, exporter='console'), 'x')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    assert proc.stdout.startswith("ConfigError tracing_options.enabled=True needs"), proc.stdout
    assert "pip install 'shoal[tracing]'" in proc.stdout


def test_a_config_file_takes_tracing_options() -> None:
    from shoal._deploy_config import parse_config

    config = parse_config(
        {"applications": [], "tracing_options": {"enabled": True, "exporter": "console"}}, "f.yaml"
    )
    assert config.tracing_options == TracingOptions(enabled=True, exporter="console")
    with pytest.raises(ConfigError, match="sampling_ratio"):
        parse_config({"applications": [], "tracing_options": {"sampling_ratio": 3}}, "f.yaml")


def test_shoal_start_refuses_bad_tracing_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shoal", "start", "--tracing-options", '{"enabled": true, "x": 1}'],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "unknown option 'x' for shoal start --tracing-options" in proc.stderr, proc.stderr


HOOK_ONLY_IN_THE_DRIVER = """
import sys
from shoal import serve

sys.path.insert(0, sys.argv[2])  # the hook's module: importable here, not in the workers
try:
    serve.start(http_options={"port": int(sys.argv[1])}, admin_options={"port": 0},
                tracing_options={"enabled": True, "setup_hook": "driver_only_hook:setup"})
except Exception as exc:
    print(type(exc).__name__, exc)
serve.shutdown()
"""


def test_a_worker_that_cannot_import_the_hook_fails_the_start(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "driver_only_hook.py").write_text("def setup():\n    pass\n")
    result = run_driver(tmp_path, HOOK_ONLY_IN_THE_DRIVER, str(hooks))
    assert result.stdout.startswith(
        "ConfigError tracing_options.setup_hook='driver_only_hook:setup' cannot be imported in "
        "process "
    ), result.stdout


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key twice in one JSON object: {keys}"
    return dict(pairs)


def test_the_file_exporter_writes_shoal_s_spans_as_the_sdk_sees_them(tmp_path: Path) -> None:
    """Shoal's own spans (a shape's fixed attributes, encoded once, and each span's own)
    reach the file exporter's fast lines and the SDK's processors (OTLP, console) as
    the same records, whatever the user's code did to them."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import SpanKind, StatusCode

    from shoal._observe.spans import Recorder, SpanShape
    from shoal._observe.tracing_setup import JsonLinesExporter

    path = tmp_path / "spans.jsonl"
    exporter = JsonLinesExporter(str(path))
    recorder = Recorder(1.0, Resource({"service.name": "t"}), None, delay_s=3600)
    shape = SpanShape("Model/predict", SpanKind.SERVER, {"rpc.method": "predict", "n": 1})
    try:
        root = recorder.start(shape, None, {"shoal.request_id": 'r"1\u00e9'})
        child = recorder.start_child(shape, root.trace_hex, root.span_hex, True, {}, True)
        child.set_attributes({"batch": [1, 2], "ok": True, "score": 0.5, "note": "a\nb"})
        child.set_attribute("rpc.method", "predict_v2")  # a shape's attribute, set again
        renamed = recorder.start(shape, None, {})
        renamed.update_name("Model/renamed")
        renamed.record_exception(ValueError("bad 'x'"))
        renamed.set_status(StatusCode.ERROR, "ValueError: bad 'x'")
        for span in (root, child, renamed):
            span.end()
        ended = list(recorder.ended)
        assert ended == [root, child, renamed]
        exporter.write_spans(ended)
        lines = path.read_text().splitlines()
        written = [json.loads(line, object_pairs_hook=_unique_keys) for line in lines]
        assert written == [span_record(recorder._readable(span)) for span in ended]
    finally:
        recorder.stop()
        exporter.shutdown()
    assert written[1]["parent_span_id"] == root.span_hex == written[0]["span_id"]
    assert written[1]["attributes"]["rpc.method"] == "predict_v2"
    assert written[2]["name"] == "Model/renamed" and written[2]["status"] == "ERROR"
    assert written[0]["attributes"] == {
        "rpc.method": "predict",
        "n": 1,
        "shoal.request_id": 'r"1\u00e9',
    }
