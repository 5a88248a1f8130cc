"""Prometheus metrics: every process's, merged at the admin API's /metrics.

One multi-process instance (its own, reporting every 0.1 s) serves the module; the
embedded mode and disabled metrics run in driver scripts, started before the first
test so they run alongside it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Driver, free_port, start_early, wait_until
from prometheus_client.parser import text_string_to_metric_families

from shoal import serve
from shoal._errors import ConfigError
from shoal._observe.metrics.recent import ERROR_KEYS
from shoal._observe.metrics.store import MetricsStore
from shoal._transport.messages import MetricsReport
from shoal.serve import metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@serve.deployment(num_replicas=2)
class Flaky:
    """Fails with ?fail=1; counts its calls in a custom metric."""

    def __init__(self) -> None:
        self.calls = metrics.Counter("test_calls", "Calls to Flaky.", tag_keys=("model",))
        self.calls.set_default_tags({"model": "m1"})

    def __call__(self, request: Any) -> str:
        self.calls.inc()
        if request.query_params.get("fail"):
            raise ValueError("boom on purpose")
        return "ok"


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Gate:
    """Holds each request until the file named by ?until= exists (at most 30 s)."""

    async def __call__(self, request: Any) -> str:
        import asyncio
        import time

        path = request.query_params["until"]
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return "passed"


class Served:
    """A multi-process instance with its admin API, deployed through its controller."""

    def __init__(self) -> None:
        from shoal._config import AdminOptions, HTTPOptions
        from shoal._instance.instance import Instance
        from shoal._observe.options import Telemetry

        self.port = free_port()
        telemetry = Telemetry.model_validate({"metrics": {"report_interval_s": 0.1}})
        self.instance = Instance(
            "process", HTTPOptions(host="127.0.0.1", port=self.port),
            admin=AdminOptions(port=0), telemetry=telemetry,
        )  # fmt: skip
        self.admin_url: str = self.instance.services.admin_url
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def run(self, *apps: tuple[Any, str, str]) -> None:
        """Deploy ``(app, name, route_prefix)`` applications, all at once."""
        import asyncio

        from shoal._api.graph import build_app

        registry, controller = self.instance.registry, self.instance.controller
        specs = [build_app(app, name, prefix, registry) for app, name, prefix in apps]

        async def deploy() -> None:
            await asyncio.gather(*(controller.deploy(spec) for spec in specs))

        self.instance.run(deploy())

    def store(self) -> MetricsStore:
        store: MetricsStore = self.instance.services.plane.metrics()
        return store

    def scrape(self) -> Samples:
        response = httpx.get(self.admin_url + "/metrics", timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=")
        return parse(response.text)

    def replica_ids(self, app: str, deployment: str) -> set[str]:
        overview = self.instance.status().applications[app].deployments[deployment]
        return {replica.replica_id for replica in overview.replicas}

    def close(self) -> None:
        self.http.close()
        self.instance.stop()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= lbl)


def label_values(samples: Samples, name: str, label: str, **labels: str) -> set[str]:
    wanted = set(labels.items())
    return {dict(lbl)[label] for (n, lbl), _ in samples.items() if n == name and wanted <= lbl}


EMBEDDED = """
import sys, httpx
from conftest import free_port
from shoal import serve

admin, http = free_port(), free_port()
options = {"report_interval_s": 0.1} if sys.argv[1] == "on" else {"enabled": False}
serve.start(http_options={"host": "127.0.0.1", "port": http},
            admin_options={"port": admin}, metrics_options=options)

@serve.deployment
def hello(request):
    return "hello"

serve.run(hello.bind(), name="embedded", route_prefix="/hello")
for _ in range(3):
    assert httpx.get(f"http://127.0.0.1:{http}/hello").text == "hello"
import time
deadline = time.monotonic() + 20
def settled(text):  # the proxy and the replica report their counts within an interval
    lines = text.splitlines()
    replica = any(line.startswith("ray_serve_deployment_request_counter_total{")
                  and line.endswith(" 3.0") for line in lines)
    return replica and 'status_code="200"} 3.0' in text
while True:
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
    if sys.argv[1] == "off" or settled(text) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(text)
serve.shutdown()
"""


@pytest.fixture(scope="module")
def embedded_on(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    driver = Driver(tmp_path_factory.mktemp("on"), EMBEDDED, "on")
    yield driver
    driver.stop()


@pytest.fixture(scope="module")
def embedded_off(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    driver = Driver(tmp_path_factory.mktemp("off"), EMBEDDED, "off")
    yield driver
    driver.stop()


@pytest.fixture(scope="module", autouse=True)
def _drivers_first(request: pytest.FixtureRequest) -> None:
    start_early(request, "embedded_on", "embedded_off")


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    try:
        served.run((Flaky.bind(), "flaky", "/flaky"), (Gate.bind(), "gate", "/gate"))
        yield served
    finally:
        served.close()


@pytest.fixture(scope="module")
def traffic(served: Served) -> dict[str, Any]:
    """6 answered and 2 failed requests to Flaky, one to no route."""
    ids = []
    for _ in range(6):
        assert served.http.get("/flaky").status_code == 200
    for index in range(2):
        response = served.http.get("/flaky?fail=1", headers={"x-request-id": f"req-{index}"})
        assert response.status_code == 500
        ids.append(response.headers["x-request-id"])
    assert served.http.get("/nowhere").status_code == 404
    return {"failed_ids": ids}


def _settled(served: Served, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` (summed over ``labels``) reaches ``expected``; the samples."""
    holder: list[Samples] = []

    def reached() -> bool:
        holder[:] = [served.scrape()]
        return total(holder[0], name, **labels) == expected

    wait_until(reached, 15, f"{name} {labels} == {expected}")
    return holder[0]


def test_http_requests_are_counted_per_route_method_and_status(
    served: Served, traffic: dict[str, Any]
) -> None:
    ok = {"application": "flaky", "route": "/flaky", "method": "GET"}
    # The 404 was the proxy's last request: once it is reported, so is everything before it.
    samples = _settled(served, "ray_serve_num_http_requests_total", 1, status_code="404", route="")
    assert total(samples, "ray_serve_num_http_requests_total", status_code="200", **ok) == 6
    assert total(samples, "ray_serve_num_http_requests_total", status_code="500", **ok) == 2
    latency = "ray_serve_http_request_latency_ms"
    assert total(samples, latency + "_count", status_code="200", **ok) == 6
    assert total(samples, latency + "_bucket", status_code="200", le="+Inf", **ok) == 6
    assert total(samples, latency + "_sum", status_code="200", **ok) > 0
    errors = "ray_serve_num_http_error_requests_total"
    assert total(samples, errors, error_code="500", **ok) == 2
    assert total(samples, errors, error_code="404") == 1
    assert total(samples, "ray_serve_num_deployment_http_error_requests_total",
                 deployment="Flaky", error_code="500") == 2  # fmt: skip


def test_replica_metrics_carry_the_replica_ids_of_serve_status(
    served: Served, traffic: dict[str, Any]
) -> None:
    ids = served.replica_ids("flaky", "Flaky")
    assert len(ids) == 2
    labels = {"application": "flaky", "deployment": "Flaky"}
    samples = _settled(served, "ray_serve_deployment_request_counter_total", 8, **labels)
    name = "ray_serve_deployment_request_counter_total"
    assert label_values(samples, name, "replica", **labels) <= ids
    assert total(samples, "ray_serve_deployment_error_counter_total", route="/flaky", **labels) == 2
    latency = "ray_serve_deployment_processing_latency_ms_count"
    assert total(samples, latency, route="/flaky", **labels) == 8
    per_replica = (
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_replica_starts_total",
        "ray_serve_replica_processing_queries",
    )
    for name in per_replica:
        assert label_values(samples, name, "replica", **labels) == ids, name
    for replica in ids:
        assert total(samples, "ray_serve_deployment_replica_healthy", replica=replica) == 1
        assert total(samples, "ray_serve_deployment_replica_starts_total", replica=replica) == 1
    assert total(samples, "shoal_deployment_replicas", state="RUNNING", **labels) == 2


def test_a_custom_metric_gets_the_replicas_tags(served: Served, traffic: dict[str, Any]) -> None:
    labels = {"application": "flaky", "deployment": "Flaky", "model": "m1"}
    samples = _settled(served, "ray_test_calls_total", 8, **labels)
    replicas = label_values(samples, "ray_test_calls_total", "replica", **labels)
    assert replicas <= served.replica_ids("flaky", "Flaky") and replicas


def test_recent_errors_name_the_request_and_keep_the_traceback(
    served: Served, traffic: dict[str, Any]
) -> None:
    def failures() -> list[dict[str, Any]]:
        return [e for e in served.store().recent_errors() if e["application"] == "flaky"]

    errors = wait_until(lambda: len(failures()) == 2 and failures(), 15, "two recent errors")
    assert [e["request_id"] for e in errors] == list(reversed(traffic["failed_ids"]))
    assert errors[0]["time"] >= errors[1]["time"]  # newest first
    for error in errors:
        assert set(error) == set(ERROR_KEYS)
        assert error["type"] == "ValueError" and error["message"] == "boom on purpose"
        assert "raise ValueError" in error["traceback"]
        assert error["replica"] in served.replica_ids("flaky", "Flaky")


def test_queued_ongoing_and_shed_requests(served: Served, tmp_path: Path) -> None:
    """One request runs, one waits in the proxy's router, one is refused (queue full)."""
    gate = tmp_path / "open"
    answers: list[int] = []

    def call() -> None:
        answers.append(served.http.get("/gate", params={"until": str(gate)}).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    labels = {"application": "gate", "deployment": "Gate"}
    try:
        # The proxy and the replica report at their own moments: wait for both reports.
        expected = {
            ("ray_serve_deployment_queued_queries", True): 1,
            ("ray_serve_replica_processing_queries", True): 1,
            ("ray_serve_num_ongoing_http_requests", False): 2,
        }

        def all_reported() -> bool:
            samples = served.scrape()
            return all(
                total(samples, name, **(labels if labelled else {})) == value
                for (name, labelled), value in expected.items()
            )

        wait_until(all_reported, 15, f"{expected} in one scrape")
        assert served.http.get("/gate", params={"until": str(gate)}).status_code == 503
    finally:
        gate.touch()
        for thread in threads:
            thread.join(30)
    assert sorted(answers) == [200, 200]
    _settled(served, "shoal_requests_shed_total", 1, reason="queue_full", **labels)
    samples = _settled(served, "ray_serve_deployment_queued_queries", 0, **labels)
    assert total(samples, "ray_serve_num_ongoing_http_requests") == 0


def test_a_killed_replicas_reports_are_dropped(served: Served, traffic: dict[str, Any]) -> None:
    overview = served.instance.status().applications["flaky"].deployments["Flaky"]
    victim = overview.replicas[0]
    assert victim.pid is not None
    name = "ray_serve_replica_processing_queries"
    assert victim.replica_id in label_values(served.scrape(), name, "replica")
    os.kill(victim.pid, signal.SIGKILL)
    wait_until(
        lambda: victim.replica_id not in label_values(served.scrape(), name, "replica"),
        15, "the killed replica's series to leave /metrics",
    )  # fmt: skip
    # Its replacement reports under its own id (the one serve.status() shows).
    wait_until(
        lambda: label_values(served.scrape(), name, "replica", application="flaky")
        == served.replica_ids("flaky", "Flaky"),
        30, "the replacement's series",
    )  # fmt: skip


def test_the_embedded_mode_serves_metrics(embedded_on: Driver) -> None:
    samples = parse(embedded_on.result().stdout)
    labels = {"application": "embedded", "route": "/hello", "status_code": "200"}
    assert total(samples, "ray_serve_num_http_requests_total", **labels) == 3
    assert total(samples, "ray_serve_deployment_request_counter_total", deployment="hello") == 3
    assert total(samples, "ray_serve_deployment_replica_healthy", deployment="hello") == 1


def test_disabled_metrics_record_and_export_nothing(embedded_off: Driver) -> None:
    text = embedded_off.result().stdout
    assert "metrics are disabled" in text
    assert parse(text) == {}


# --- without processes ---------------------------------------------------------------


@serve.deployment
class Local:
    def __init__(self) -> None:
        self.seen = metrics.Histogram("test_local_sizes", boundaries=[1, 10])

    def __call__(self, size: int) -> int:
        self.seen.observe(size)
        if size < 0:
            raise ValueError("negative size")
        return size


def test_the_in_process_runtime_is_read_directly() -> None:
    from shoal._instance import api

    handle = serve.run(Local.bind(), name="metrics-local", route_prefix=None,
                       _local_testing_mode=True)  # fmt: skip
    try:
        assert [handle.remote(n).result() for n in (1, 5, 50)] == [1, 5, 50]
        with pytest.raises(ValueError, match="negative size"):
            handle.remote(-1).result()
        store = api._instances["local"].controller.metrics
        samples = parse(store.exposition().decode())
        labels = {"application": "metrics-local", "deployment": "Local"}
        counter = "ray_serve_deployment_request_counter_total"
        assert total(samples, counter, route="__call__", **labels) == 4
        assert total(samples, "ray_serve_deployment_error_counter_total", **labels) == 1
        assert total(samples, "ray_test_local_sizes_bucket", le="10.0", **labels) == 3
        assert total(samples, "ray_test_local_sizes_count", **labels) == 4
        errors = [e for e in store.recent_errors() if e["application"] == "metrics-local"]
        assert [e["message"] for e in errors] == ["negative size"]
    finally:
        serve.delete("metrics-local")


def test_the_store_sums_equal_series_and_forgets_a_source() -> None:
    sample = ("x_total", (("a", "1"),), 2.0)
    store = MetricsStore()
    for source in ("one", "two"):
        store.record(MetricsReport(source, [("x", "counter", "help", [sample])], []))
    merged = {name: samples for name, _kind, _help, samples in store.families()}
    assert merged["x"] == [("x_total", (("a", "1"),), 4.0)]
    store.forget("one")
    merged = {name: samples for name, _kind, _help, samples in store.families()}
    assert merged["x"] == [("x_total", (("a", "1"),), 2.0)]


def test_custom_metrics_refuse_what_ray_refuses() -> None:
    counter = metrics.Counter("test_refusals", tag_keys=("model",))
    with pytest.raises(ValueError, match="Missing value for tag key model"):
        counter.inc()
    with pytest.raises(ValueError, match=r"Unrecognized tag keys: \['other'\]"):
        counter.inc(tags={"model": "a", "other": "b"})
    with pytest.raises(ValueError, match="Unrecognized tag key other"):
        counter.set_default_tags({"other": "b"})
    with pytest.raises(ValueError, match="value must be >0"):
        counter.inc(0, tags={"model": "a"})
    with pytest.raises(TypeError, match="tag_keys should be a tuple"):
        metrics.Gauge("test_list_keys", tag_keys=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boundaries argument should be provided"):
        metrics.Histogram("test_no_buckets")
    with pytest.raises(ConfigError, match="already defined as a counter"):
        metrics.Gauge("test_refusals", tag_keys=("model",))


def test_custom_metrics_reserve_the_replica_tags_inside_a_replica() -> None:
    from shoal._api.context import ReplicaContext, replica_context

    token = replica_context.set(ReplicaContext("app", "Dep", "app#Dep#abc"))
    try:
        with pytest.raises(ValueError, match="'replica' tag is reserved for Ray Serve metrics"):
            metrics.Counter("test_reserved", tag_keys=("replica",))
        gauge = metrics.Gauge("test_in_replica")
        assert gauge.info["default_tags"] == {
            "deployment": "Dep", "replica": "app#Dep#abc", "application": "app",
        }  # fmt: skip
    finally:
        replica_context.reset(token)


def test_a_histogram_counts_every_value_in_its_bucket_however_many_wait() -> None:
    """Values are counted into buckets in bulk (a fold per FOLD_AT values, and before
    every export): the buckets must be those of counting each value on its own, a value
    equal to a bound in that bound's bucket, while another thread observes meanwhile."""
    from shoal._observe.metrics import snapshot
    from shoal._observe.metrics.registry import FOLD_AT

    histogram = metrics.Histogram("test_folded", boundaries=[1.0, 2.0, 5.0], tag_keys=("k",))
    values = [0.5, 1.0, 1.5, 2.0, 4.999, 5.0, 7.0, 1e9] * (FOLD_AT // 3)  # folds midway
    expected = {"1.0": 0, "2.0": 0, "5.0": 0, "+Inf": 0}
    for value in values:
        for bound in ("1.0", "2.0", "5.0", "+Inf"):
            expected[bound] += bound == "+Inf" or value <= float(bound)

    def observe_all(tag: str) -> None:
        for value in values:
            histogram.observe(value, tags={"k": tag})

    other = threading.Thread(target=observe_all, args=("other",))
    other.start()
    observe_all("main")
    other.join()

    def exported() -> Samples:
        families, _errors = snapshot()
        wanted = [f for f in families if f[0] == "ray_test_folded"]
        return {(name, frozenset(labels)): value for f in wanted for name, labels, value in f[3]}

    samples = exported()
    for tag in ("main", "other"):
        buckets = {le: total(samples, "ray_test_folded_bucket", k=tag, le=le) for le in expected}
        assert buckets == expected
        assert total(samples, "ray_test_folded_count", k=tag) == len(values)
        assert total(samples, "ray_test_folded_sum", k=tag) == pytest.approx(sum(values))
    histogram.observe(float("nan"), tags={"k": "main"})  # counted as before: first bucket
    histogram.observe(3.0, tags={"k": "main"})
    samples = exported()
    assert total(samples, "ray_test_folded_bucket", k="main", le="1.0") == expected["1.0"] + 1
    assert total(samples, "ray_test_folded_bucket", k="main", le="5.0") == expected["5.0"] + 2
