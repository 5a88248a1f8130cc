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
