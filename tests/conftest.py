"""Shared fixtures: a free port, a running multi-process shoal, and a runtime switch.

Tests that only use handles take the ``deploy`` fixture and run against both
runtimes (in-process and multi-process). Every application a test deploys is
deleted afterwards; the multi-process instance is shut down at session end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal import serve

_names = itertools.count()

# Every instance a test (or a driver it starts) creates gets a free admin port, and
# `shoal start` servers keep their state in this session's own directory, so tests
# never meet each other's instances or a developer's running server. Tests of the
# defaults remove these variables in the process they start.
os.environ["SHOAL_ADMIN_PORT"] = "0"
# Ray clusters the tests start (tests/test_ray_runtime.py) bind 127.0.0.1 only: Ray reads
# this when it is imported, in this process and the ones it starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["SHOAL_HOME"] = tempfile.mkdtemp(prefix="shoal-test-home-")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout_s``.

    The one way tests wait for state another thread or process reaches on its own.
    """
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.01)
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
