"""Shared fixtures: a free port, a running multi-process shoal, and a runtime switch.

Tests that only use handles take the ``deploy`` fixture and run against both
runtimes (in-process and multi-process). Every application a test deploys is
deleted afterwards; the multi-process instance is shut down at session end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from shoal import serve
from shoal._instance.home import ServerInfo

_names = itertools.count()
_T = TypeVar("_T")

# Every instance a test (or a driver it starts) creates gets a free admin port, and
# `shoal start` servers keep their state in this session's own directory, so tests
# never meet each other's instances or a developer's running server. Tests of the
# defaults remove these variables in the process they start.
os.environ["SHOAL_ADMIN_PORT"] = "0"
# Ray clusters the tests start (tests/test_ray_runtime.py) bind 127.0.0.1 only: Ray reads
# this when it is imported, in this process and the ones it starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["SHOAL_HOME"] = tempfile.mkdtemp(prefix="shoal-test-home-")


# scripts/check runs the suite on two xdist workers, a module at a time each (--dist
# loadfile), in collection order: the longest modules go first so that the two finish
# together rather than one waiting out the Ray cluster's module at the end.
_LONGEST_FIRST = (
    "test_ray_runtime.py", "test_examples.py", "test_mlflow.py", "test_faults.py",
    "test_server.py", "test_ray_doc_examples.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "", every_s: float = 0.01
) -> Any:
    """Poll ``predicate`` every ``every_s`` until it returns a truthy value (returned); fail
    after ``timeout_s``.

    The one way tests wait for state another thread or process reaches on its own.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(every_s)
    return value


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any]], timeout_s: float = 10.0, what: str = ""
) -> Any:
    """``wait_until`` for an async predicate, without blocking the event loop."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        await asyncio.sleep(0.01)
    return value


class InProcessReplicas:
    """The replica connector of a router under test without processes: ``connect``
    returns the fake itself, whose ``stream(request)`` (the subclass's) answers; closing
    does nothing."""

    async def connect(self, _info: Any) -> Any:
        return self

    def on_close(self, _callback: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run_driver(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as a separate driver script (its own shoal), with a free port as argv[1].

    The tests directory is importable from it. Fails the test if it exits non-zero.
    """
    script = tmp_path / "driver.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, str(script), str(free_port()), *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


class Driver:
    """``run_driver`` in two halves: the driver starts now and runs on its own (its own
    shoal) while the test process does other work; ``result()`` waits. Unlike with
    ``run_driver`` there is no port in argv: the test process binds ports meanwhile, so
    the driver takes its own (``from conftest import free_port``) just before binding."""

    def __init__(self, tmp_path: Path, source: str, *args: str) -> None:
        script = tmp_path / "driver.py"
        script.write_text(source)
        self.args = [sys.executable, str(script), *args]
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
        )  # fmt: skip
        self._result: subprocess.CompletedProcess[str] | None = None

    def result(self) -> subprocess.CompletedProcess[str]:
        """What ``run_driver`` returns, once the driver exited; fails the test if it exited
        non-zero."""
        if self._result is None:
            try:
                stdout, stderr = self.process.communicate(timeout=120)
            finally:
                self.stop()
            self._result = subprocess.CompletedProcess(
                self.args, self.process.returncode, stdout, stderr
            )
        assert self._result.returncode == 0, self._result.stderr
        return self._result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


def started_drivers(
    tmp_path_factory: pytest.TempPathFactory, **scripts: tuple[str, ...]
) -> Iterator[dict[str, Driver]]:
    """For a module-scoped fixture: a ``Driver`` per ``name=(source, *args)``, started now
    (each in a directory of its own), stopped at the latest when the fixture ends."""
    started = {
        name: Driver(tmp_path_factory.mktemp(name), source, *args)
        for name, (source, *args) in scripts.items()
    }
    try:
        yield started
    finally:
        for driver in started.values():
            driver.stop()


def start_early(request: pytest.FixtureRequest, *fixtures: str) -> None:
    """For a module-scoped autouse fixture: set up the module-scoped ``fixtures`` (say, ones
    starting a ``Driver``) now, before the module's first test, when a test selected in
    this module uses them: what they start then runs alongside the module's other tests."""
    used = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for name in getattr(item, "fixturenames", ())
    }
    for fixture in fixtures:
        if fixture in used:
            request.getfixturevalue(fixture)


def in_background(
    request: pytest.FixtureRequest, jobs: dict[str, Callable[[], _T]], workers: int = 3
) -> Iterator[dict[str, Future[_T]]]:
    """For a module-scoped fixture: start the ``jobs`` (keyed by test name) of this module's
    selected tests now, at most ``workers`` at a time in threads, and yield their futures;
    each test reads its own (``.result()``) while the later ones run on. For subprocesses
    (examples, drivers) that only wait on the machine's cores: the module's wall time is
    then about that of its longest jobs, not their sum. Each job must end on its own (a
    subprocess timeout)."""
    selected = {
        getattr(item, "originalname", item.name)
        for item in request.session.items
        if getattr(item, "module", None) is request.module
    }
    pool = ThreadPoolExecutor(workers, thread_name_prefix="in-background")
    try:
        yield {name: pool.submit(job) for name, job in jobs.items() if name in selected}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- a `shoal start` server's REST API (tests/test_server.py and others) -----------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A new empty directory with a short path, removed afterwards: for a SHOAL_HOME,
    whose sockets' paths must fit in 108 bytes (pytest's ``tmp_path`` under xdist, e.g.
    ``/tmp/pytest-of-root/pytest-12/popen-gw1/test_a_long_name0/home``, may not)."""
    directory = tempfile.mkdtemp(prefix="shoal-")
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def shoal_home(home: str) -> Iterator[None]:
    """SHOAL_HOME is ``home`` inside the block (``read_server_info`` and attaching use it)."""
    previous = os.environ.get("SHOAL_HOME")
    os.environ["SHOAL_HOME"] = home
    try:
        yield
    finally:
        if previous is None:
            del os.environ["SHOAL_HOME"]
        else:
            os.environ["SHOAL_HOME"] = previous


# The admin API's client of app_details, which tests poll: httpx.get() builds a client, and
# loads the CA bundle into an SSL context, on every call (~60 ms of CPU), so a poll loop
# took most of a core from the servers it waited for (on 2 cores, their replicas' start).
# No keep-alive: a restarted server listens on the same port.
_admin_client = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))


def app_details(info: ServerInfo) -> dict[str, Any]:
    """GET /api/serve/applications/ of ``info``'s server (Ray's ServeInstanceDetails)."""
    response = _admin_client.get(f"{info.admin_url}/api/serve/applications/")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def app_running(info: ServerInfo, app: str, timeout_s: float = 60) -> dict[str, Any]:
    """``app``'s details once it is RUNNING; fails at once (with its message) if its
    deploy failed."""

    def ready() -> dict[str, Any] | None:
        details = app_details(info)["applications"].get(app)
        if details is not None and details["status"] == "DEPLOY_FAILED":
            raise AssertionError(details["message"])
        return details if details is not None and details["status"] == "RUNNING" else None

    # Every 50 ms: each poll costs the server building its details too, while it starts
    # the application's replicas.
    return wait_until(ready, timeout_s, f"application {app} RUNNING", every_s=0.05)  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def http_port() -> Iterator[int]:
    """Port of the HTTP proxy of the session's multi-process shoal (started lazily)."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture
def base_url(http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}"


Deploy = Callable[..., Any]


@pytest.fixture(params=["inprocess", "process"])
def deploy(request: pytest.FixtureRequest) -> Iterator[Deploy]:
    """``deploy(app, **run_kwargs)``: serve.run on the parametrized runtime, cleaned up after."""
    local = request.param == "inprocess"
    if not local:
        request.getfixturevalue("http_port")
    names: list[str] = []

    def run(app: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("name", f"t{os.getpid()}-{next(_names)}")
        kwargs.setdefault("route_prefix", None)
        names.append(kwargs["name"])
        return serve.run(app, _local_testing_mode=local, **kwargs)

    yield run
    for name in names:
        with contextlib.suppress(serve.NotFoundError):
            serve.delete(name)
