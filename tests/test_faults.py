"""Faults of the multi-process runtime, with real processes: a killed or hung proxy, a
failed update, a replica whose event loop is blocked, shutdown with requests in flight,
and the instance directories of drivers killed with ``kill -9``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import async_wait_until, free_port, run_driver, wait_until

from bench.procs import is_alive
from shoal import serve
from shoal._errors import ShoalError
from shoal._runtime.loop import StopRequest, wait_responsive

NODE = socket.gethostname()  # serve.status().proxies is keyed by node, as in Ray


def _replicas(app: str, deployment: str) -> list[serve.schema.ReplicaStatus]:
    return serve.status().applications[app].deployments[deployment].replicas


# --- the proxy --------------------------------------------------------------------------

PROXY_DRIVER = textwrap.dedent(
    """
    import json, os, signal, socket, sys, threading, time
    import httpx
    from shoal import serve
    from shoal._controller import controller
    from shoal._instance import api

    # A hung proxy is noticed within a second (the defaults are 1 s and 5 s).
    controller.TIMEOUTS = controller.TIMEOUTS.model_copy(
        update={"proxy_check_period_s": 0.2, "proxy_check_timeout_s": 1.0}
    )

    @serve.deployment
    def hello(request):
        return "hello"

    port = int(sys.argv[1])
    serve.start(http_options={"port": port})
    serve.run(hello.bind(), route_prefix="/hello")
    url = f"http://127.0.0.1:{port}/hello"
    runtime = api._instances["process"].controller.runtime
    NODE = socket.gethostname()  # serve.status().proxies is keyed by node, as in Ray
    client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=10)
    assert client.get(url).text == "hello"

    def outage(signum, standby=True):
        while hasattr(runtime, "_standby") and not (runtime._standby and runtime._standby.done()):
            time.sleep(0.01)  # the usual state: the next proxy's process is ready
        if not standby:  # it died too: the replacement is a new process
            os.kill(runtime._standby.result().process.pid, signal.SIGKILL)
        before = serve.status().proxies[NODE]
        seen, done = [], threading.Event()

        def watch():  # the statuses the driver reports until HTTP works again
            while not done.wait(0.005):
                seen.append(serve.status().proxies[NODE].status)

        watcher = threading.Thread(target=watch)
        watcher.start()
        os.kill(before.pid, signum)
        started = time.monotonic()
        while True:  # a new connection each time: the old ones died with the proxy
            try:
                reply = client.get(url)
                if reply.status_code == 200 and reply.text == "hello":
                    break
            except httpx.HTTPError:
                pass
        elapsed = time.monotonic() - started
        done.set()
        watcher.join()
        while serve.status().proxies[NODE] != "HEALTHY":
            time.sleep(0.01)
        after = serve.status().proxies[NODE]
        return {"seconds": elapsed, "seen": sorted(set(seen)), "old_pid": before.pid,
                "new_pid": after.pid, "port": after.port, "status": after.status}

    results = {"kill": outage(signal.SIGKILL), "hang": outage(signal.SIGSTOP),
               "cold": outage(signal.SIGKILL, standby=False)}
    print(json.dumps(results), flush=True)
    serve.shutdown()
    """
)


def test_a_killed_or_hung_proxy_is_replaced_on_the_same_port(tmp_path: Path) -> None:
    """kill -9: serving again within 1 s (from the kill to the first 200 on a new
    connection, which waits in the listening socket's backlog meanwhile). SIGSTOP (a
    hung proxy): replaced once its health check times out. Without a standby process
    (it died too) the replacement starts from scratch, and status says STARTING."""
    result = run_driver(tmp_path, PROXY_DRIVER)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    port = int(result.args[2])
    for case in ("kill", "hang", "cold"):
        outcome = report[case]
        assert outcome["port"] == port and outcome["status"] == "HEALTHY", report
        assert outcome["new_pid"] != outcome["old_pid"], report
        assert not is_alive(outcome["old_pid"]), report
    assert report["kill"]["seconds"] <= 1.0, report
    # Hung: 1 s without an answer, checked every 0.2 s, then a restart like the kill's.
    assert report["hang"]["seconds"] <= 1.0 + 0.2 + 1.0, report
    assert "STARTING" in report["cold"]["seen"], report  # never HEALTHY while down
    assert report["cold"]["seconds"] <= 10, report


# --- a failed update ----------------------------------------------------------------------


@serve.deployment(num_replicas=2)
class Versioned:
    def __init__(self, version: str, refuse_if: str) -> None:
        if os.path.exists(refuse_if):
            raise RuntimeError(f"{version} cannot start")
        self.version = version

    def get(self) -> str:
        return self.version

    def pid(self) -> int:
        return os.getpid()


def test_a_failed_update_stays_rolled_back(http_port: int, tmp_path: Path) -> None:
    """After v3 failed to start, a replacement replica is v2 again, not v3."""
    refuse = tmp_path / "refuse"
    handle = serve.run(Versioned.bind("v2", str(refuse)), name="rollback", route_prefix=None)
    refuse.touch()
    with pytest.raises(serve.DeploymentError, match="v3 cannot start"):
        serve.run(Versioned.bind("v3", str(refuse)), name="rollback", route_prefix=None)
    refuse.unlink()  # v3 could start now: only the desired state decides what starts
    victim = _replicas("rollback", "Versioned")[0].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        replicas = _replicas("rollback", "Versioned")
        pids = {r.pid for r in replicas if r.state == "RUNNING"}
        return len(pids) == 2 and victim not in pids

    wait_until(replaced, 30, "the killed replica to be replaced")
    answers = {handle.get.remote().result(timeout_s=30) for _ in range(40)}
    assert answers == {"v2"}
    assert len({handle.pid.remote().result(timeout_s=30) for _ in range(40)}) == 2
    serve.delete("rollback")


@serve.deployment
class Exits:
    def exit(self, code: int) -> None:
        os._exit(code)


def test_a_replica_process_that_ends_by_itself_is_logged_with_how(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The controller hears of a lost replica before its process has ended, so the log
    named no cause ("died; starting a replacement"); the exit code or the signal follows."""
    handle = serve.run(Exits.bind(), name="exits", route_prefix=None)

    def logged(text: str, replica_id: str) -> bool:
        return any(text in r.getMessage() and replica_id in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, "shoal.runtime"):
        first = _replicas("exits", "Exits")[0].replica_id
        with pytest.raises(ShoalError, match="died"):
            handle.exit.remote(3).result(timeout_s=30)
        wait_until(lambda: logged("exited with code 3", first), 30, "the exit code logged")
        wait_until(
            lambda: [r.state for r in _replicas("exits", "Exits")] == ["RUNNING"], 30, "replaced"
        )
        second = _replicas("exits", "Exits")[0]
        assert second.pid is not None and second.replica_id != first
        os.kill(second.pid, signal.SIGKILL)
        wait_until(
            lambda: logged("was killed by SIGKILL", second.replica_id), 30, "the signal logged"
        )
    serve.delete("exits")


async def test_how_a_worker_ended_reads_its_exit_code_or_signal_and_not_an_adopted_ones() -> None:
    from shoal._runtime.process.adopt import AdoptedProcess
    from shoal._runtime.process.workers import WorkerProcess, ending

    def ended(process: Any, code: int) -> WorkerProcess:
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        exited.set_result(code)
        return WorkerProcess("w", process, exited)

    assert ending(ended(object(), 3)) == "exited with code 3"
    assert ending(ended(object(), -signal.SIGKILL)) == "was killed by SIGKILL"
    assert ending(ended(object(), -200)) == "was killed by signal 200"
    # -1 is what an adopted process reports when it is gone: not SIGHUP.
    assert "not known" in ending(ended(AdoptedProcess(os.getpid()), -1))


# --- a blocked event loop -----------------------------------------------------------------

CHECK_TIMEOUT_S = 4.0
#: How late a loaded machine may notice it: the check is sent up to one period (0.5 s)
#: after the loop blocked, and the controller's timer and this test's poll run late when
#: another worker of the suite shares the two cores (CI runs saw 4.73 s, then 6.13 s: the
#: controller logged "answered nothing for 6.2 s", its loop ~2 s late).
NOTICED_LATE_S = 2.5


@serve.deployment(num_replicas=2, health_check_period_s=0.5, health_check_timeout_s=CHECK_TIMEOUT_S)
class Blocking:
    async def block(self, marker: str) -> None:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(1000)  # blocks the replica's event loop

    async def pid(self) -> int:
        return os.getpid()


@serve.deployment
def unrelated(request: object) -> str:
    return "unrelated"


def test_a_blocked_replica_leaves_routing_and_is_killed(http_port: int, tmp_path: Path) -> None:
    handle = serve.run(Blocking.bind(), name="blocking", route_prefix=None)
    marker = tmp_path / "blocked"
    blocked_call = handle.block.remote(str(marker))
    wait_until(lambda: marker.exists() and marker.read_text(), 30, "the loop to block")
    blocked_at, blocked = time.monotonic(), int(marker.read_text())

    started = time.monotonic()
    serve.run(unrelated.bind(), name="unrelated", route_prefix=None)
    unrelated_s = time.monotonic() - started

    def out_of_routing() -> bool:
        return all(
            r.state != "RUNNING" for r in _replicas("blocking", "Blocking") if r.pid == blocked
        )

    wait_until(out_of_routing, 30, "the blocked replica to leave routing")
    out_s = time.monotonic() - blocked_at
    others = {handle.pid.remote().result(timeout_s=5) for _ in range(10)}  # the other serves
    wait_until(lambda: not is_alive(blocked), 30, "the blocked replica to be killed")
    killed_s = time.monotonic() - blocked_at
    with pytest.raises(serve.ReplicaDiedError):
        blocked_call.result(timeout_s=30)
    timings = f"unrelated serve.run {unrelated_s:.2f} s, out {out_s:.2f} s, killed {killed_s:.2f} s"
    print(timings)
    assert blocked not in others and len(others) >= 1, timings
    assert unrelated_s < CHECK_TIMEOUT_S - 0.5, timings  # before the blocked replica is noticed
    assert out_s <= CHECK_TIMEOUT_S + NOTICED_LATE_S, timings
    assert killed_s <= CHECK_TIMEOUT_S + 5, timings
    wait_until(
        lambda: [r.state for r in _replicas("blocking", "Blocking")] == ["RUNNING"] * 2,
        30,
        "a replacement",
    )
    serve.delete("unrelated")
    serve.delete("blocking")


# --- shutdown -----------------------------------------------------------------------------

SHUTDOWN_DRIVER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from shoal import serve

    directory = Path(sys.argv[2])

    @serve.deployment(max_ongoing_requests=1)
    class Slow:
        async def __call__(self, request):
            (directory / "arrived").touch()
            while not (directory / "release").exists():
                await asyncio.sleep(0.02)
            return "served"

    serve.start(http_options={"port": int(sys.argv[1])})
    serve.run(Slow.bind(), route_prefix="/slow")
    print("ready", flush=True)
    sys.stdin.readline()
    serve.shutdown()
    print("stopped", flush=True)
    """
)


def _send(port: int, path: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: shoal\r\n\r\n".encode())
    return conn


def _response(conn: socket.socket) -> tuple[int, dict[str, str], str]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body.decode()


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length":
            return int(value)
    return 0


def _unread_by_server(port: int) -> list[int]:
    """Bytes waiting to be read in each established connection accepted on ``port``."""
    waiting = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            waiting.append(int(fields[4].split(":")[1], 16))
    return waiting


def test_shutdown_serves_accepted_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "driver.py"
    script.write_text(SHUTDOWN_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    driver = subprocess.Popen(
        [sys.executable, str(script), str(port), str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert driver.stdin is not None and driver.stdout is not None
    try:
        assert driver.stdout.readline().strip() == "ready"
        running = _send(port, "/slow")
        wait_until((tmp_path / "arrived").exists, 30, "the first request to reach the replica")
        queued = [_send(port, "/slow") for _ in range(2)]  # wait in the proxy's router
        wait_until(
            lambda: (lambda w: len(w) == 3 and not any(w))(_unread_by_server(port)),
            30,
            "the proxy to read the queued requests",
        )
        driver.stdin.write("shutdown\n")
        driver.stdin.flush()

        def draining() -> bool:
            return _response(_send(port, "/-/healthz"))[0] == 503

        wait_until(draining, 30, "the proxy to drain")
        status, headers, _ = _response(_send(port, "/slow"))  # arrives during shutdown
        assert status == 503 and headers.get("retry-after") == "1", (status, headers)
        (tmp_path / "release").touch()
        answers = [_response(conn)[::2] for conn in [running, *queued]]
        assert answers == [(200, "served")] * 3
        assert driver.stdout.readline().strip() == "stopped"
        assert driver.wait(timeout=30) == 0
    finally:
        driver.kill()
        driver.wait(timeout=30)


# --- instance directories -----------------------------------------------------------------

SLEEPING_DRIVER = textwrap.dedent(
    """
    import sys, threading, time
    from shoal import serve
    from shoal._instance import api

    serve.start(http_options={"port": int(sys.argv[1])})
    runtime = api._instances["process"].controller.runtime
    while hasattr(runtime, "_standby") and not (runtime._standby and runtime._standby.done()):
        time.sleep(0.01)  # every worker has connected
    print(runtime.directory, flush=True)
    threading.Event().wait()
    """
)


def test_directories_of_killed_drivers_are_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal._runtime.process.runtime import ProcessRuntime

    home = Path(tempfile.mkdtemp(prefix="shoal-home-"))  # short: socket paths live in it
    monkeypatch.setenv("SHOAL_HOME", str(home))
    script = tmp_path / "driver.py"
    script.write_text(SLEEPING_DRIVER)
    driver = subprocess.Popen(
        [sys.executable, str(script), str(free_port())],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    try:
        assert driver.stdout is not None
        dead = Path(driver.stdout.readline().strip())
        assert dead.parent == home and dead.is_dir(), dead
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        live = home / f"{os.getpid()}-0-0123abcd"  # this process's: it runs
        live.mkdir()
        server = home / "server"  # not an instance directory: never touched
        server.mkdir()
        driver.kill()  # kill -9: it cannot clean up
        driver.wait(timeout=30)
        assert dead.is_dir()
        runtime = ProcessRuntime()  # the next start
        assert not dead.exists()
        assert live.is_dir() and server.is_dir()
        assert Path(runtime.directory).parent == home
        os.rmdir(runtime.directory)
        given = tmp_path / "given"
        assert ProcessRuntime(directory=str(given)).directory == str(given)  # used as is
        assert not given.exists()
    finally:
        driver.kill()
        driver.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def test_a_root_others_can_write_to_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal._runtime.process.runtime import ProcessRuntime

    home = tmp_path / "shared"
    home.mkdir(mode=0o700)
    home.chmod(0o777)
    monkeypatch.setenv("SHOAL_HOME", str(home))
    with pytest.raises(ShoalError, match="writable by others"):
        ProcessRuntime()
    if os.geteuid() == 0:  # only root can give a directory away
        home.chmod(0o700)
        os.chown(home, 65534, 65534)
        with pytest.raises(ShoalError, match="another user"):
            ProcessRuntime()


def test_status_pid_survives_pickling() -> None:
    import pickle

    from shoal._controller.status import ProxyStatus

    status = pickle.loads(pickle.dumps(ProxyStatus("127.0.0.1", 8000, "STARTING", 42)))
    assert (status, status.port, status.pid) == ("STARTING", 8000, 42)


async def test_a_worker_that_rejoins_twice_is_adopted_once_and_not_lost(tmp_path: Path) -> None:
    """A worker whose Rejoin a busy restarted controller answered too late for it may
    rejoin again on a new connection (the Ray runtime's controller blocks on Ray while
    adopting). It must be adopted once: with two adoptions its deployment had one
    replica too many, and the controller stopped the only one, failing requests. The
    superseded connection is closed by the controller, and its closing does not count
    as the worker lost (which would replace it and kill its process)."""
    from shoal._runtime.process.runtime import ProcessRuntime
    from shoal._transport.connection import connect_unix
    from shoal._transport.messages import Rejoin, ReplicaInfo

    runtime = ProcessRuntime(directory=str(tmp_path), fork_server=False)
    died: list[Any] = []
    await runtime.start(died.append, lambda report: None)
    # The worker's process: any live process of ours (adopted by pid).
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    path = str(tmp_path / "controller.sock")
    connections = []
    try:
        info = ReplicaInfo("app#Model#abc123", "unix:/nowhere", 5)
        said = Rejoin("replica-0a1b2c3d", worker.pid, info, "app", "Model", "v1")
        for _ in range(2):
            conn = await connect_unix(path, None, "controller", 5.0)
            connections.append(conn)
            await conn.request(said, 5.0)
        assert [s.worker_id for _, s in runtime.rejoined.replicas] == ["replica-0a1b2c3d"]
        first, second = connections

        # The controller's side ends (its close callbacks run) before ours sees the end.
        async def superseded() -> bool:
            return first.closed

        await async_wait_until(superseded, 5.0, "the superseded connection closed")
        assert not died and not second.closed and worker.poll() is None
        second.close()  # now the worker is lost: its replica is reported dead

        async def lost() -> bool:
            return len(died) == 1

        await async_wait_until(lost, 5.0, "the replica reported lost")
    finally:
        for conn in connections:
            conn.close()
        worker.kill()
        worker.wait()
        await runtime.shutdown(1.0)


def test_a_stop_asked_for_in_a_signal_handler_takes_no_lock_and_ends_the_wait() -> None:
    """A SIGTERM or SIGINT handler runs in the main thread between two bytecodes, maybe
    inside the wait while that holds its event's lock (not reentrant): asking for the
    stop there must take no lock, or ``shoal start`` would hang for good."""
    stop = StopRequest()
    with stop._event._cond:  # where the main thread is, inside Event.wait
        stop.from_signal()  # (Event.set here would wait for this lock forever)
    assert stop.is_set()
    wait_responsive(stop, tick_s=0.05)  # returns at its first tick (or the test times out)
    other = StopRequest()  # and another thread's request ends it at once
    threading.Timer(0.01, other.set).start()
    wait_responsive(other, tick_s=60)
