"""The dashboard: its history maths on a real prometheus_client registry, its JSON
endpoints on a running instance, and the page itself in a real headless chromium."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, wait_until
from prometheus_client import CollectorRegistry, Counter, Histogram

from shoal._config import AdminOptions, HTTPOptions
from shoal._dashboard.history import Family, MetricsHistory, ReplicaCount, bucket_quantile
from shoal._dashboard.server import Dashboard

LABELS = ["application", "deployment", "replica", "route"]
KEY = ("app", "Model")


class Metrics:
    """The metrics one process would export, as Ray names them, in a real registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ray_serve_deployment_request_counter", "", LABELS, registry=self.registry
        )
        self.errors = Counter(
            "ray_serve_deployment_error_counter", "", LABELS, registry=self.registry
        )
        self.latency = Histogram(
            "ray_serve_deployment_processing_latency_ms", "", LABELS,
            buckets=[1, 5, 10, 50, 100], registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram(
            "shoal_batch_size", "", ["application", "deployment", "replica", "method"],
            buckets=[1, 2, 4, 8, 16], registry=self.registry,
        )  # fmt: skip

    def families(self) -> list[Family]:
        """The registry's families as the metrics store gives them (plain tuples)."""
        return [
            (m.name, m.type, m.documentation,
             [(s.name, tuple(s.labels.items()), s.value) for s in m.samples])
            for m in self.registry.collect()
        ]  # fmt: skip

    def serve(self, n: int, latency_ms: float, replica: str = "r1", failed: int = 0) -> None:
        labels = (*KEY, replica, "/")
        self.requests.labels(*labels).inc(n)
        self.errors.labels(*labels).inc(failed)
        for _ in range(n):
            self.latency.labels(*labels).observe(latency_ms)


RUNNING_2 = {KEY: ReplicaCount(2, 2)}


def _last(history: MetricsHistory) -> dict[str, Any]:
    (series,) = history.series()
    return {column: values[-1] for column, values in series["points"].items()}


def test_rates_and_percentiles_come_from_what_changed_between_two_samples() -> None:
    metrics = Metrics()
    metrics.serve(500, 3.0)  # before the first sample: not counted, it is the baseline
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=1)
    history.record(100.0, metrics.families(), RUNNING_2)
    assert history.series() == []  # nothing to take a difference from yet
    metrics.serve(18, 3.0, failed=2)
    metrics.serve(2, 70.0)
    history.record(102.0, metrics.families(), RUNNING_2)
    point = _last(history)
    assert point["t"] == 102.0
    assert point["request_rate"] == pytest.approx(10.0)  # 20 requests in 2 s
    assert point["error_rate"] == pytest.approx(1.0)
    assert point["error_ratio"] == pytest.approx(0.1)
    # 18 requests in (1, 5] ms, 2 in (50, 100]: linear within the bucket, as Prometheus.
    assert point["p50_ms"] == pytest.approx(1 + 4 * 10 / 18)
    assert point["p95_ms"] == pytest.approx(75.0)
    assert point["p99_ms"] == pytest.approx(95.0)
    assert (point["replicas"], point["target_replicas"]) == (2, 2)
    assert point["batch_mean"] is None and point["batch_rate"] == 0.0


def test_a_quiet_deployment_has_zero_rates_and_no_latency() -> None:
    metrics = Metrics()
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=1)
    history.record(100.0, metrics.families(), RUNNING_2)
    history.record(101.0, metrics.families(), RUNNING_2)
    point = _last(history)
    assert point["request_rate"] == 0.0 and point["error_rate"] == 0.0
    assert point["error_ratio"] is None and point["p50_ms"] is None


def test_a_restarted_process_counts_from_zero_never_negative() -> None:
    before, after = Metrics(), Metrics()
    before.serve(100, 3.0)
    after.serve(4, 3.0)  # the same series, started again at zero by a new process
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=1)
    history.record(100.0, before.families(), RUNNING_2)
    history.record(101.0, after.families(), RUNNING_2)
    assert _last(history)["request_rate"] == pytest.approx(4.0)


def test_a_new_replica_counts_whole_and_replicas_add_up() -> None:
    metrics = Metrics()
    metrics.serve(10, 3.0, replica="r1")
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=1)
    history.record(100.0, metrics.families(), RUNNING_2)
    metrics.serve(5, 3.0, replica="r1")
    metrics.serve(3, 3.0, replica="r2")  # a replica that appeared since the last sample
    history.record(101.0, metrics.families(), RUNNING_2)
    assert _last(history)["request_rate"] == pytest.approx(8.0)


def test_smoothing_evens_out_reports_out_of_phase_with_the_sampler() -> None:
    metrics = Metrics()
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=2)
    history.record(100.0, metrics.families(), RUNNING_2)
    rates = []
    for second in range(1, 7):
        if second % 2 == 0:  # a process reporting 2 requests every other sample
            metrics.serve(2, 3.0)
        history.record(100.0 + second, metrics.families(), RUNNING_2)
        rates.append(_last(history)["request_rate"])
    assert rates[1:] == pytest.approx([1.0] * 5)


def test_batch_sizes_per_deployment() -> None:
    metrics = Metrics()
    history = MetricsHistory(window_s=60, interval_s=1, smoothing_s=1)
    history.record(100.0, metrics.families(), RUNNING_2)
    for size in (4, 4, 8, 16):
        metrics.batch.labels(*KEY, "r1", "__call__").observe(size)
    history.record(101.0, metrics.families(), RUNNING_2)
    point = _last(history)
    assert point["batch_rate"] == pytest.approx(4.0)
    assert point["batch_mean"] == pytest.approx(8.0)
    assert point["batch_p95"] == pytest.approx(8 + 8 * (3.8 - 3) / 1)


def test_the_history_is_bounded_and_forgets_deployments_gone_for_a_window() -> None:
    metrics = Metrics()
    history = MetricsHistory(window_s=10, interval_s=1, smoothing_s=1)
    for second in range(30):
        history.record(float(second), metrics.families(), RUNNING_2)
    (series,) = history.series()
    assert series["points"]["t"] == [float(s) for s in range(20, 30)]  # the last 10 s
    assert [s["points"]["t"] for s in history.series(since=27.0)] == [[28.0, 29.0]]
    for second in range(30, 41):  # the deployment was deleted: no longer in the details
        history.record(float(second), metrics.families(), {})
    assert history.series() == []


def test_bucket_quantile_as_prometheus() -> None:
    assert bucket_quantile(0.5, {}) is None
    assert bucket_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert bucket_quantile(0.5, {10.0: 4.0, 20.0: 8.0, math.inf: 8.0}) == pytest.approx(10.0)
    # In the +Inf bucket: the highest finite bound, all that is known.
    assert bucket_quantile(0.99, {10.0: 1.0, math.inf: 10.0}) == 10.0


async def test_the_sampler_runs_until_closed() -> None:
    from shoal._observe.metrics.store import MetricsStore

    details: dict[str, Any] = {"applications": {"app": {"deployments": {"Model": {}}}}}
    store = MetricsStore()
    dashboard = Dashboard(lambda: details, lambda: store, interval_s=0.01)
    dashboard.start()
    deadline = time.monotonic() + 10
    while not dashboard.history.series() or len(dashboard.history.series()[0]["points"]["t"]) < 3:
        assert time.monotonic() < deadline, "the sampler recorded no points"
        await asyncio.sleep(0.01)
    await dashboard.close()
    count = len(dashboard.history.series()[0]["points"]["t"])
    await asyncio.sleep(0.05)
    assert len(dashboard.history.series()[0]["points"]["t"]) == count


# --- a running instance -------------------------------------------------------------

APP = """
import os
import time

from shoal import serve


@serve.deployment
class Echo:
    def __call__(self, request):
        return "ok"


@serve.deployment
class Failing:
    def __call__(self, request):
        raise ValueError("boom for the dashboard")


@serve.deployment
class Gated:
    def __init__(self, gate):
        while not os.path.exists(gate):  # the test opens the gate when it has seen DEPLOYING
            time.sleep(0.02)

    def __call__(self, request):
        return "open"


echo = Echo.bind()
failing = Failing.bind()


def gated(args):
    return Gated.bind(args["gate"])
"""


class Served:
    """A multi-process instance with its proxy and admin API, serving ``APP``."""

    def __init__(self, directory: Path) -> None:
        from shoal._instance.instance import Instance

        (directory / "dashboard_app.py").write_text(APP)
        self.directory = directory
        self.gate = directory / "gate"
        self.http_port = free_port()
        self.instance = Instance(
            "process", HTTPOptions(host="127.0.0.1", port=self.http_port),
            admin=AdminOptions(port=0),
        )  # fmt: skip
        assert self.instance.services is not None
        self.admin_url: str = self.instance.services.admin_url
        self.admin = httpx.Client(base_url=self.admin_url, timeout=30)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)

    def config(self, *, gated: bool) -> dict[str, Any]:
        env = {"working_dir": str(self.directory)}
        apps: list[dict[str, Any]] = [
            {"name": "echo", "route_prefix": "/echo", "import_path": "dashboard_app:echo"},
            {"name": "failing", "route_prefix": "/failing", "import_path": "dashboard_app:failing"},
        ]
        if gated:
            apps.append({
                "name": "gated", "route_prefix": "/gated", "import_path": "dashboard_app:gated",
                "args": {"gate": str(self.gate)},
            })  # fmt: skip
            apps.append({"name": "broken", "import_path": "dashboard_app:missing"})
        return {"applications": [{**app, "runtime_env": env} for app in apps]}

    def deploy(self, *, gated: bool) -> None:
        reply = self.admin.put("/api/serve/applications/", json=self.config(gated=gated))
        assert reply.status_code == 200, reply.text

    def status(self, app: str) -> str | None:
        details = self.admin.get("/api/serve/applications/").json()
        return (details["applications"].get(app) or {}).get("status")

    def close(self) -> None:
        self.admin.close()
        self.http.close()
        self.instance.stop()


def _is_running(served: Served, app: str) -> bool:
    return served.status(app) == "RUNNING"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = Served(tmp_path_factory.mktemp("dashboard"))
    try:
        served.deploy(gated=False)
        for app in ("echo", "failing"):
            wait_until(partial(_is_running, served, app), 60, f"{app} RUNNING")
        yield served
    finally:
        served.close()


class Load:
    """Clients sending requests to ``path`` until stopped."""

    def __init__(self, url: str, path: str, clients: int = 2) -> None:
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(url, path), daemon=True)
            for _ in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, url: str, path: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                client.get(path)
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_the_json_endpoints(served: Served) -> None:
    reply = served.http.get("/failing", headers={"x-request-id": "dash-json-1"})
    assert reply.status_code == 500
    for _ in range(20):
        assert served.http.get("/echo").status_code == 200

    def echo_points() -> list[float]:
        reply = served.admin.get("/api/shoal/dashboard/timeseries")
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["metrics"] is True and body["interval_s"] == 1.0
        assert body["window_s"] == 600.0 and body["now"] == pytest.approx(time.time(), abs=5)
        by_name = {(d["application"], d["deployment"]): d["points"] for d in body["deployments"]}
        return by_name.get(("echo", "Echo"), {}).get("request_rate", [])

    wait_until(lambda: any(rate > 0 for rate in echo_points()), 15, "echo's request rate")
    body = served.admin.get("/api/shoal/dashboard/timeseries").json()
    (echo,) = [d for d in body["deployments"] if d["deployment"] == "Echo"]
    assert set(echo["points"]) >= {"t", "request_rate", "p50_ms", "p99_ms", "replicas"}
    assert echo["points"]["replicas"][-1] == 1
    newest = echo["points"]["t"][-1]
    later = served.admin.get("/api/shoal/dashboard/timeseries", params={"since": newest}).json()
    assert all(t > newest for d in later["deployments"] for t in d["points"]["t"])

    def failure() -> dict[str, Any] | None:
        errors = served.admin.get("/api/shoal/dashboard/errors").json()["errors"]
        return next((e for e in errors if e["request_id"] == "dash-json-1"), None)

    error = wait_until(failure, 15, "the failure among the recent errors")
    assert (error["application"], error["deployment"], error["type"]) == (
        "failing", "Failing", "ValueError"
    )  # fmt: skip
    assert "boom for the dashboard" in error["message"]
    assert "raise ValueError" in error["traceback"]
    assert served.admin.get("/api/shoal/dashboard/errors", params={"limit": 0}).json() == {
        "errors": []
    }


def test_the_page_and_its_files_are_served_and_bad_parameters_refused(served: Served) -> None:
    page = served.admin.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/dashboard/dashboard.js"' in page.text
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        reply = served.admin.get(f"/dashboard/{name}")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind)
    missing = served.admin.get("/dashboard/secrets.txt")
    assert missing.status_code == 404 and "no file 'secrets.txt'" in missing.text
    since = served.admin.get("/api/shoal/dashboard/timeseries", params={"since": "yesterday"})
    assert since.status_code == 400 and "since='yesterday' is not a number" in since.text
    limit = served.admin.get("/api/shoal/dashboard/errors", params={"limit": "-1"})
    assert limit.status_code == 400 and "limit='-1'" in limit.text


# --- the page in a browser ----------------------------------------------------------

BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def chromium() -> str:
    """The system's chromium (session-scoped, so a skip comes before any instance starts)."""
    pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        "no chromium binary on PATH (chromium, chromium-browser, google-chrome): install "
        "Debian's `chromium` package to run the dashboard's browser test (.ci/run does, "
        "when it can)"
    )


@pytest.fixture
def page(chromium: str, served: Served) -> Iterator[Any]:
    """The dashboard open in headless chromium; fails the test on any console error,
    uncaught exception, failed request or error status the page met."""
    from playwright import sync_api

    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=BROWSER_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})

            def console(message: Any) -> None:
                if message.type == "error":
                    problems.append(f"console: {message.text}")

            def response(reply: Any) -> None:
                if reply.status >= 400:
                    problems.append(f"HTTP {reply.status}: {reply.url}")

            page.on("console", console)
            page.on("response", response)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
            page.goto(served.admin_url + "/")
            yield page
            page.close()  # before the instance stops: no poll may fail afterwards
        finally:
            browser.close()
    assert problems == []


def _svg_path(page: Any, app: str, plot: str) -> str:
    selector = f'.deployment[data-app="{app}"] svg[data-plot="{plot}"] path.line'
    return str(
        page.eval_on_selector_all(
            selector, "paths => paths.map(p => p.getAttribute('d')).join('|')"
        )
    )


def test_the_page_follows_a_deployment_and_plots_its_load(
    served: Served, page: Any, tmp_path: Path
) -> None:
    started = time.monotonic()
    page.wait_for_function("() => window.shoalDashboard && window.shoalDashboard.polls > 0")
    page.wait_for_selector('.app[data-app="echo"][data-status="RUNNING"]')
    assert page.title() == "shoal dashboard"
    page.select_option("#view", "60")  # the last minute: this test's few seconds show

    # A deployment whose constructor waits for the test: DEPLOYING, then RUNNING.
    served.deploy(gated=True)
    page.wait_for_selector('.app[data-app="gated"][data-status="DEPLOYING"]', timeout=20_000)
    page.wait_for_selector('.deployment[data-deployment="Gated"][data-status="UPDATING"]')
    broken = page.wait_for_selector('.app[data-app="broken"][data-status="DEPLOY_FAILED"]')
    assert "missing" in broken.inner_text()  # the reason it failed, shown
    assert "null" not in broken.inner_text() and "undefined" not in broken.inner_text()
    assert page.is_visible('.app[data-app="gated"] .app-head .badge[data-status="DEPLOYING"]')
    served.gate.touch()
    page.wait_for_selector('.app[data-app="gated"][data-status="RUNNING"]', timeout=30_000)
    page.wait_for_selector('.deployment[data-deployment="Gated"] tr[data-state="RUNNING"]')

    # Under load, echo's request-rate plot moves.
    before = _svg_path(page, "echo", "request_rate")
    load = Load(f"http://127.0.0.1:{served.http_port}", "/echo")
    try:
        page.wait_for_function(
            """() => {
                const s = window.shoalDashboard.seriesOf("echo", "Echo");
                return s && s.request_rate.some((rate) => rate > 5);
            }""",
            timeout=15_000,
        )
        served.http.get("/failing", headers={"x-request-id": "dash-page-1"})
        page.wait_for_selector('.errors tr[data-request-id="dash-page-1"]', timeout=15_000)
    finally:
        load.stop()
    assert load.sent > 0
    after = _svg_path(page, "echo", "request_rate")
    assert after and after != before
    chart = page.locator('.deployment[data-app="echo"] svg[data-plot="request_rate"]')
    assert float(chart.get_attribute("data-points") or 0) > 0
    assert float(page.locator('.deployment[data-app="echo"] svg[data-plot="latency"]')
                 .get_attribute("data-points") or 0) > 0  # fmt: skip

    # The failure's traceback opens; the deployed config is shown.
    row = page.locator('.errors tr[data-request-id="dash-page-1"]')
    row.locator("summary").click()
    assert "boom for the dashboard" in row.inner_text()
    assert "raise ValueError" in row.locator("pre").inner_text()
    assert "dashboard_app:gated" in page.locator('.config[data-app="gated"] pre').text_content()

    page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the picture
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"dashboard browser test: {time.monotonic() - started:.1f} s; screenshot {shot}")
