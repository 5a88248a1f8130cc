"""Ray Serve compatibility: constructors, reconfigure, health checks and deploy failures.

Each test follows Ray Serve's documented (or source-defined) behaviour:
- an ``async def __init__`` is awaited;
- a replica starts with its constructor, an ASGI lifespan startup, ``reconfigure``
  and a first health check; any of them failing fails the deploy with a
  ``RuntimeError`` that names the step (a ``DeploymentError``);
- in local testing mode a constructor's own exception propagates from serve.run;
- a replica is replaced after 3 consecutive failed health checks
  (``REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD``), not after one;
- ``/-/healthz`` answers 503 with Ray's texts until a route table was installed
  and while the proxy drains, 200 "success" otherwise;
- ``serve.run_many(..., wait_for_applications_running=False)`` returns before the
  applications run (once their ingress deployments exist, by default);
- ``serve.delete(name, _blocking=False)`` returns before the application is gone.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Deploy, Driver, start_early, wait_until
from fastapi import FastAPI

from shoal import serve

# --- run_many's waits --------------------------------------------------------------------------


async def _until_opened(gate: str) -> None:
    """Wait (in a replica) until the test creates the file ``gate``; 60 s at most."""
    path, deadline = Path(gate), time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


@serve.deployment
class GatedStart:
    async def __init__(self, gate: str, fail: bool = False) -> None:
        await _until_opened(gate)
        if fail:
            raise ValueError("the constructor failed after the gate")

    def __call__(self) -> str:
        return "up"


@pytest.fixture(params=["inprocess", "process"])
def runtime(request: pytest.FixtureRequest) -> str:
    """The runtime a test runs on: local testing mode, or the session's multi-process one."""
    if request.param == "process":
        request.getfixturevalue("http_port")
    return str(request.param)


def test_run_many_returns_before_the_applications_run_when_told_not_to_wait(
    runtime: str, tmp_path: Path
) -> None:
    local = runtime == "inprocess"
    gate = tmp_path / "gate"
    names = [f"t{os.getpid()}-gated-{runtime}", f"t{os.getpid()}-gated-fails-{runtime}"]
    targets = [
        serve.RunTarget(GatedStart.bind(str(gate)), name=names[0], route_prefix=None),
        serve.RunTarget(GatedStart.bind(str(gate), True), name=names[1], route_prefix=None),
    ]
    try:
        handle, _ = serve.run_many(
            targets, wait_for_applications_running=False, _local_testing_mode=local
        )
        applications = serve.status().applications
        for name in names:  # created (the default wait), not running: the gate is shut
            assert applications[name].status == "DEPLOYING", applications[name]
            assert "GatedStart" in applications[name].deployments
        response = handle.remote()  # waits for the replica
        gate.touch()
        assert response.result(timeout_s=60) == "up"

        def failed() -> str | None:
            app = serve.status().applications[names[1]]
            return app.message if app.status == "DEPLOY_FAILED" else None

        assert "the constructor failed after the gate" in wait_until(failed, 60, "the failure")
        # (its replica answers once published; the app is RUNNING when its deploy ends)
        wait_until(lambda: serve.status().applications[names[0]].status == "RUNNING", 30,
                   "the gated app running")  # fmt: skip
    finally:
        gate.touch()
        for name in names:
            serve.delete(name)


@serve.deployment(graceful_shutdown_timeout_s=10)
class HeldCall:
    async def __call__(self, gate: str) -> str:
        Path(gate + ".started").touch()
        await _until_opened(gate)
        return "done"


def test_delete_without_blocking_returns_while_the_application_drains(
    runtime: str, tmp_path: Path
) -> None:
    local = runtime == "inprocess"
    name, gate = f"t{os.getpid()}-held-{runtime}", tmp_path / "gate"
    handle = serve.run(HeldCall.bind(), name=name, route_prefix=None, _local_testing_mode=local)
    try:
        response = handle.remote(str(gate))
        wait_until(lambda: Path(f"{gate}.started").exists(), 30, "the call in the replica")
        serve.delete(name, _blocking=False)  # the drain waits for the call: not this
        assert name in serve.status().applications
        gate.touch()
        assert response.result(timeout_s=30) == "done"  # drained, not cut
        wait_until(lambda: name not in serve.status().applications, 30, "the app gone")
    finally:
        gate.touch()
        serve.delete(name)


# --- constructors ------------------------------------------------------------------------------


@serve.deployment
class AsyncInit:
    async def __init__(self, value: str) -> None:
        await asyncio.sleep(0)  # really awaited: code after an await runs
        self.value = value

    def __call__(self) -> str:
        return self.value


def test_async_constructor_is_awaited(deploy: Deploy) -> None:
    handle = deploy(AsyncInit.bind("ready"))
    assert handle.remote().result(timeout_s=30) == "ready"


class WeightsMissing(Exception):
    pass


@serve.deployment
class BrokenConstructor:
    def __init__(self) -> None:
        raise WeightsMissing("no weights at /models/x")


def test_local_testing_mode_raises_the_constructors_own_exception() -> None:
    with pytest.raises(WeightsMissing, match="no weights"):
        serve.run(BrokenConstructor.bind(), name="broken-local", _local_testing_mode=True)


def test_constructor_failure_is_a_runtime_error_naming_the_constructor(
    http_port: int,
) -> None:
    with pytest.raises(RuntimeError) as info:
        serve.run(BrokenConstructor.bind(), name="broken-process", route_prefix=None)
    assert isinstance(info.value, serve.DeploymentError)
    assert "the constructor of deployment 'BrokenConstructor' raised WeightsMissing" in str(
        info.value
    )
    assert isinstance(info.value.__cause__, WeightsMissing)


# --- reconfigure -------------------------------------------------------------------------------


@serve.deployment(user_config={"threshold": -1})
class Thresholded:
    def reconfigure(self, config: dict[str, Any]) -> None:
        if config["threshold"] < 0:
            raise ValueError(f"threshold must be >= 0, got {config['threshold']}")
        self.threshold = config["threshold"]

    def __call__(self) -> int:
        return int(self.threshold)


def test_reconfigure_failing_at_start_fails_the_deploy_naming_reconfigure(
    deploy: Deploy,
) -> None:
    with pytest.raises(RuntimeError) as info:
        deploy(Thresholded.bind())
    message = str(info.value)
    assert isinstance(info.value, serve.DeploymentError)
    assert "reconfigure() of deployment 'Thresholded' raised ValueError" in message, message
    assert "threshold must be >= 0, got -1" in message
    assert "constructor" not in message


def test_reconfigure_failing_on_update_fails_the_deploy_and_keeps_serving(
    deploy: Deploy,
) -> None:
    handle = deploy(Thresholded.options(user_config={"threshold": 3}).bind(), name="thr")
    assert handle.remote().result(timeout_s=30) == 3
    with pytest.raises(RuntimeError, match=r"reconfigure\(\) of deployment 'Thresholded'"):
        deploy(Thresholded.options(user_config={"threshold": -2}).bind(), name="thr")
    status = serve.status().applications["thr"]
    assert status.status == "DEPLOY_FAILED"
    assert "reconfigure()" in status.message
    assert handle.remote().result(timeout_s=30) == 3  # the old replicas keep serving


# --- lifespan ----------------------------------------------------------------------------------


def _failing_lifespan_app() -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        raise ConnectionError("feature store unreachable")
        yield  # pragma: no cover

    return FastAPI(lifespan=lifespan)


failing_app = _failing_lifespan_app()


@serve.deployment
@serve.ingress(failing_app)
class FailingLifespan:
    pass


def test_lifespan_startup_failure_fails_the_deploy_naming_the_lifespan(deploy: Deploy) -> None:
    with pytest.raises(RuntimeError) as info:
        deploy(FailingLifespan.bind())
    message = str(info.value)
    assert isinstance(info.value, serve.DeploymentError)
    assert "the lifespan startup of deployment 'FailingLifespan'" in message, message
    assert "feature store unreachable" in message


# --- health checks -----------------------------------------------------------------------------


@serve.deployment
class NeverHealthy:
    def check_health(self) -> None:
        raise RuntimeError("GPU lost")

    def __call__(self) -> str:
        return "unreachable"


def test_failing_initial_health_check_fails_the_deploy(deploy: Deploy) -> None:
    with pytest.raises(RuntimeError) as info:
        deploy(NeverHealthy.bind())
    message = str(info.value)
    assert "the initial health check of deployment 'NeverHealthy' raised RuntimeError" in message
    assert "GPU lost" in message


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=5)
class Scripted:
    """Each health check takes the next outcome from a file ("F" fails); then succeeds.

    Every check appends "<replica> <outcome>" to a log, so tests can wait for checks.
    """

    def __init__(self, script: str, log: str) -> None:
        self.script, self.log, self.me = Path(script), Path(log), f"{os.getpid()}-{id(self)}"

    def check_health(self) -> None:
        outcomes = self.script.read_text().split() if self.script.exists() else []
        outcome = outcomes.pop(0) if outcomes else "S"
        if outcomes or self.script.exists():
            _write(self.script, " ".join(outcomes))
        with self.log.open("a") as log:
            log.write(f"{self.me} {outcome}\n")
        if outcome == "F":
            raise RuntimeError("scripted failure")

    def __call__(self) -> str:
        return self.me


def _write(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)  # never read half-written


def _checks(log: Path, replica: str) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split()[1] for line in lines if line.split()[0] == replica]


def _scripted(checks: list[str]) -> list[str]:
    """The outcomes from the first scripted one on: the checks before it passed (the
    initial one, and any periodic one that ran before the test wrote its script: every
    0.1 s, so a loaded machine sees some)."""
    assert "F" in checks and set(checks[: checks.index("F")]) == {"S"}, checks
    return checks[checks.index("F") :]


def test_two_failed_health_checks_in_a_row_keep_the_replica(deploy: Deploy, tmp_path: Path) -> None:
    script, log = tmp_path / "script", tmp_path / "log"
    handle = deploy(Scripted.bind(str(script), str(log)))
    replica = handle.remote().result(timeout_s=30)
    _write(script, "F F S F F S F")
    # Wait until every scripted outcome was used and two more checks succeeded.
    wait_until(lambda: not script.read_text().split() and _checks(log, replica)[-2:] == ["S", "S"],
               30, "every scripted outcome used, then two more checks")  # fmt: skip
    assert _scripted(_checks(log, replica))[:7] == ["F", "F", "S", "F", "F", "S", "F"]
    assert handle.remote().result(timeout_s=30) == replica  # never replaced


def test_three_failed_health_checks_in_a_row_replace_the_replica(
    deploy: Deploy, tmp_path: Path
) -> None:
    script, log = tmp_path / "script", tmp_path / "log"
    handle = deploy(Scripted.bind(str(script), str(log)))
    replica = handle.remote().result(timeout_s=30)
    _write(script, "F F F")
    replacement = wait_until(
        lambda: (r := handle.remote().result(timeout_s=30)) != replica and r, 30, "a replacement"
    )
    assert _scripted(_checks(log, replica)) == ["F", "F", "F"]  # replaced after the third
    assert _checks(log, replacement)[0] == "S"  # its initial health check passed


# --- /-/healthz --------------------------------------------------------------------------------


# One driver takes its shoal through every state the two tests below look at: before any
# route, running, deleted, then shutting down with a request in flight.
PROXY_STATES_DRIVER = """
import pathlib, sys, threading
import httpx
from conftest import free_port, wait_until
from shoal import serve

marker = pathlib.Path(sys.argv[1])
started = pathlib.Path(sys.argv[1] + ".started")
port = free_port()
serve.start(http_options={"host": "127.0.0.1", "port": port})
base = f"http://127.0.0.1:{port}"

def probe(label):
    for path in ("/-/healthz", "/-/routes"):
        response = httpx.get(base + path, timeout=30)
        print(label, path, response.status_code, response.text)

@serve.deployment
def hello():
    return "hi"

probe("before")
serve.run(hello.bind(), name="hello", route_prefix="/hello")
probe("running")
serve.delete("hello")
probe("deleted")


@serve.deployment(graceful_shutdown_timeout_s=60)
class Slow:
    async def __call__(self, request):
        import asyncio
        started.touch()
        while not marker.exists():  # released by the driver once it has looked around
            await asyncio.sleep(0.01)
        return "finished"


serve.run(Slow.bind(), route_prefix="/slow")
answers = {}
client = threading.Thread(target=lambda: answers.update(slow=httpx.get(base + "/slow", timeout=60)))
client.start()
wait_until(started.exists, 30, "the slow request to start")
stopper = threading.Thread(target=serve.shutdown)
stopper.start()
health = wait_until(
    lambda: (r := httpx.get(base + "/-/healthz", timeout=10)).status_code == 503 and r, 30
)
print("healthz", health.status_code, health.text)
other = httpx.get(base + "/elsewhere", timeout=10)
print("new request", other.status_code, other.headers.get("retry-after"))
marker.touch()
client.join(60)
print("in flight", answers["slow"].status_code, answers["slow"].text)
stopper.join(60)
print("stopped", not stopper.is_alive())
"""


@pytest.fixture(scope="module")
def proxy_states_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    directory = tmp_path_factory.mktemp("proxy-states")
    driver = Driver(directory, PROXY_STATES_DRIVER, str(directory / "release"))
    yield driver
    driver.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_the_driver_first(request: pytest.FixtureRequest) -> None:
    start_early(request, "proxy_states_driver")  # it runs while the tests above do


@pytest.fixture(scope="module")
def proxy_states(proxy_states_driver: Driver) -> list[str]:
    """What PROXY_STATES_DRIVER printed, line by line."""
    return proxy_states_driver.result().stdout.splitlines()


def test_healthz_answers_rays_status_codes_in_each_state(proxy_states: list[str]) -> None:
    assert proxy_states[:6] == [
        "before /-/healthz 503 Route table is not populated yet.",
        "before /-/routes 503 Route table is not populated yet.",
        "running /-/healthz 200 success",
        'running /-/routes 200 {"/hello":"hello"}',
        "deleted /-/healthz 200 success",  # populated once: ready (Ray's head-node proxy)
        "deleted /-/routes 200 {}",
    ]


def test_while_shutting_down_the_proxy_drains_and_serves_what_it_accepted(
    proxy_states: list[str],
) -> None:
    assert proxy_states[6:] == [
        "healthz 503 This node is being drained.",
        "new request 503 1",  # not 404: the route is gone because shoal is stopping
        "in flight 200 finished",
        "stopped True",
    ]
