"""Process-level guarantees of the multi-process runtime: deaths, orphans, restarts, permissions."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Driver, start_early, wait_until

from bench.procs import descendants, is_alive
from shoal import serve


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _workers(driver: int) -> list[int]:
    """The worker processes (replicas, proxies) of ``driver``'s instance: forked by its
    fork server, or its own children when started with python -m."""
    return [
        pid for pid in descendants(driver) if "shoal._runtime.process.zygote" not in _command(pid)
    ]


@serve.deployment(max_ongoing_requests=1)
class Worker:
    async def hold(self, marker: str) -> str:
        Path(marker).touch()
        await asyncio.sleep(60)
        return "held"

    async def quick(self, i: int) -> int:
        return i

    def pid(self) -> int:
        return os.getpid()


def test_killed_replica_is_replaced_and_queued_requests_survive(
    http_port: int, tmp_path: Path
) -> None:
    handle = serve.run(Worker.bind(), name="victim", route_prefix=None)
    old_pid = handle.pid.remote().result(timeout_s=30)
    marker = tmp_path / "started"
    held = handle.hold.remote(str(marker))
    wait_until(marker.exists, 30, "the first request to start")
    queued = [handle.quick.remote(i) for i in range(4)]  # wait in the router: the slot is taken
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(serve.ReplicaDiedError):
        held.result(timeout_s=30)
    assert [r.result(timeout_s=60) for r in queued] == [0, 1, 2, 3]
    new_pid = handle.pid.remote().result(timeout_s=30)
    assert new_pid != old_pid
    deployment = serve.status().applications["victim"].deployments["Worker"]
    assert deployment.replica_states == {"RUNNING": 1}
    serve.delete("victim")


@serve.deployment
class HeldOverHttp:
    async def __call__(self, request: Any) -> str:
        Path(request.query_params["marker"]).write_text(str(os.getpid()))
        await asyncio.sleep(60)
        return "held"


def test_a_replica_killed_mid_request_answers_502_with_what_happened(
    http_port: int, tmp_path: Path
) -> None:
    """Over HTTP the caller learns the replica died (it may have run in part) rather than
    a bare 500, with the request id the server log names the replica under."""
    serve.run(HeldOverHttp.bind(), name="held", route_prefix="/held")
    marker = tmp_path / "pid"
    url = f"http://127.0.0.1:{http_port}/held"
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.get, url, params={"marker": str(marker)}, headers={"x-request-id": "r-42"}
        )
        pid = int(wait_until(lambda: marker.exists() and marker.read_text(), 30, "the call"))
        os.kill(pid, signal.SIGKILL)
        response = pending.result(timeout=30)
    assert response.status_code == 502
    assert "died before answering" in response.text and "may have run" in response.text
    assert response.headers["x-request-id"] == "r-42"
    serve.delete("held")


def test_socket_directory_is_private(http_port: int) -> None:
    handle = serve.run(Worker.bind(), name="private", route_prefix=None)
    pid = handle.pid.remote().result(timeout_s=30)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
    directory = Path(argv[argv.index(b"shoal._runtime.process.worker") + 1].decode())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    sockets = [p for p in directory.iterdir() if p.is_socket()]
    assert sockets and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in sockets)
    serve.delete("private")


def test_shutdown_then_start_again_in_the_same_process(http_port: int) -> None:
    for round_number in range(2):
        serve.shutdown()
        assert serve.status().applications == {}
        serve.start(http_options={"port": http_port})
        serve.run(Worker.bind(), name="again", route_prefix=None)
        assert (
            serve.get_app_handle("again").quick.remote(round_number).result(timeout_s=30)
            == round_number
        )
        serve.delete("again")


DRIVER = textwrap.dedent(
    """
    import threading
    from conftest import free_port
    from shoal import serve

    @serve.deployment(num_replicas=2)
    def model(request):
        return "ok"

    port = free_port()
    serve.start(http_options={"port": port})
    serve.run(model.bind(), route_prefix="/m")
    pids = [r.pid for d in serve.status().applications["default"].deployments.values()
            for r in d.replicas]
    print(port, *pids, flush=True)  # the port, then the replicas' pids
    threading.Event().wait()
    """
)


@pytest.fixture(scope="module")
def serving_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """DRIVER, started, and killed at the latest when the module ends."""
    script = tmp_path_factory.mktemp("serving") / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    yield driver
    driver.kill()
    driver.wait(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _start_the_drivers_first(request: pytest.FixtureRequest) -> None:
    start_early(request, "serving_driver", "main_classes")  # they start while tests run


def test_no_process_outlives_a_killed_driver(serving_driver: subprocess.Popen[str]) -> None:
    driver = serving_driver
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline()
        port, *replica_pids = [int(number) for number in line.split()]
        assert len(replica_pids) == 2, line
        assert httpx.get(f"http://127.0.0.1:{port}/m", timeout=30).text == "ok"
        # + the proxy and the standby process of its replacement (started a moment later)
        workers = wait_until(
            lambda: found if len(found := _workers(driver.pid)) == 4 else None,
            15, "the standby proxy process",
        )  # fmt: skip
        assert set(replica_pids) <= set(workers)
        children = descendants(driver.pid)  # the workers and the fork server
        driver.kill()
        driver.wait(timeout=10)
        wait_until(lambda: not any(is_alive(pid) for pid in children), 15, "workers to exit")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/m", timeout=5)
    finally:
        driver.kill()
        driver.wait(timeout=10)


@serve.deployment
def tiny(request: object) -> str:
    return "ok"


def test_many_workers_do_not_starve_shutdown(http_port: int) -> None:
    """Regression: one blocked thread per worker once exhausted the default executor."""
    serve.run(tiny.options(num_replicas=9).bind(), name="many", route_prefix=None)
    serve.run(tiny.bind(), name="one", route_prefix=None)
    started = time.monotonic()
    serve.delete("one")
    serve.delete("many")
    assert time.monotonic() - started < 30


MAIN_CLASSES = textwrap.dedent(
    """
    from dataclasses import dataclass
    from conftest import free_port
    from shoal import serve

    @dataclass
    class Point:
        x: int

    @serve.deployment
    class Mover:
        def move(self, point):
            return Point(point.x + 1)

    serve.start(http_options={"port": free_port()})
    handle = serve.run(Mover.bind(), route_prefix=None)
    print(handle.move.remote(Point(1)).result(timeout_s=30))
    serve.shutdown()
    """
)


@pytest.fixture(scope="module")
def main_classes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    driver = Driver(tmp_path_factory.mktemp("main-classes"), MAIN_CLASSES)
    yield driver
    driver.stop()


def test_classes_defined_in_main_travel_by_value(main_classes: Driver) -> None:
    assert main_classes.result().stdout.strip() == "Point(x=2)"
