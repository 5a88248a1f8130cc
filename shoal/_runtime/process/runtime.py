"""The local multi-process runtime (the default): one OS process per replica, plus the proxy.

Every shoal process talks over Unix sockets in a per-instance directory
created with mode 0700 (sockets 0600, peers checked with SO_PEERCRED); no TCP
port is opened except the HTTP proxy's. Workers exit when the controller's
connection closes, so none outlives the driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

from shoal._config import HTTPOptions
from shoal._errors import RequestTimeoutError, ShoalError, TransportError
from shoal._runtime.process.client import UnixConnector
from shoal._seam.protocols import ReplicaHandle
from shoal._seam.specs import ReplicaSpec
from shoal._seam.startup import startup_failed
from shoal._transport.connection import Connection, serve_unix
from shoal._transport.failures import exception_from
from shoal._transport.messages import (
    DrainProxy,
    Failure,
    HealthCheck,
    Hello,
    Message,
    Reconfigure,
    ReplicaInfo,
    ReplicaSetUpdate,
    RoutesUpdate,
    StartProxy,
    StartReplica,
    StopReplica,
)

logger = logging.getLogger("shoal.runtime")

_SPAWN_TIMEOUT_S = 60.0
_CONTROL_TIMEOUT_S = 30.0
_EXIT_GRACE_S = 3.0


class _WorkerProcess:
    """A worker OS process and its control connection (controller side)."""

    def __init__(self, worker_id: str, process: subprocess.Popen[bytes]) -> None:
        self.worker_id = worker_id
        self.process = process
        self.conn: Connection | None = None
        self.stopping = False
        self.exited: asyncio.Future[int] = _exit_future(process)

    async def request(self, msg: Message, timeout_s: float) -> Any:
        if self.conn is None or self.conn.closed:
            raise TransportError(f"worker {self.worker_id} is not connected")
        reply = await self.conn.request(msg, timeout_s)
        if isinstance(reply, Failure):
            raise exception_from(reply)
        return reply.value  # type: ignore[attr-defined]

    async def wait_exit(self, timeout_s: float) -> None:
        """Wait for the process to end; SIGKILL it after ``timeout_s``."""
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except TimeoutError:
            self.process.kill()
            await asyncio.wait_for(asyncio.shield(self.exited), _EXIT_GRACE_S)


def _exit_future(process: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future resolved with the exit code once ``process`` ends (and is reaped).

    Uses a pidfd watched by the event loop: no thread is parked per worker (a
    blocking ``wait()`` per worker in the default executor would exhaust it).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: one daemon thread per worker
        threading.Thread(target=lambda: _resolve(loop, future, process.wait()), daemon=True).start()
        return future

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _resolve(loop, future, process.wait())

    loop.add_reader(pidfd, on_exit)
    return future


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], code: int) -> None:
    def set_code() -> None:
        if not future.done():
            future.set_result(code)

    loop.call_soon_threadsafe(set_code)


class _ProcessReplica:
    """ReplicaHandle for a replica in a worker process."""

    def __init__(self, worker: _WorkerProcess, info: ReplicaInfo) -> None:
        self.worker = worker
        self.info = info
        self.pid: int | None = worker.process.pid

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None:
        await self.worker.request(Reconfigure(user_config), timeout_s)

    async def check_health(self, timeout_s: float) -> None:
        await self.worker.request(HealthCheck(), timeout_s)

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        self.worker.stopping = True
        try:
            await self.worker.request(StopReplica(wait_loop_s, timeout_s), timeout_s + 5.0)
        except (ShoalError, TransportError) as exc:
            logger.debug("replica %s did not stop cleanly: %s", self.info.replica_id, exc)
        await self.worker.wait_exit(_EXIT_GRACE_S)

    def kill(self) -> None:
        self.worker.process.kill()


def _paths(env: dict[str, Any]) -> tuple[list[str], str]:
    """The replica's sys.path and cwd: the driver's, with runtime_env's local paths first.

    ``working_dir`` becomes the cwd and the first sys.path entry; a ``py_modules``
    directory or ``.py`` file is importable by its name (its parent goes on
    sys.path, as Ray makes the module importable); a ``.zip``/``.whl`` goes on
    sys.path itself. Relative paths are relative to the driver's cwd.
    """
    cwd = os.getcwd()
    front = []
    if env.get("working_dir") is not None:
        cwd = os.path.abspath(env["working_dir"])
        front.append(cwd)
    for module in env.get("py_modules", []):
        path = os.path.abspath(module)
        zipped = os.path.isfile(path) and path.endswith((".zip", ".whl"))
        front.append(path if zipped else os.path.dirname(path.rstrip(os.sep)))
    return [*front, *sys.path], cwd


class ProcessRuntime:
    """Runtime with one process per replica and one for the HTTP proxy."""

    supports_http = True

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="shoal-")  # mode 0700
        self.connector = UnixConnector()
        self._workers: dict[str, _WorkerProcess] = {}
        self._hellos: dict[str, asyncio.Future[Connection]] = {}
        self._membership: dict[tuple[str, str], ReplicaSetUpdate] = {}
        self._replicas: dict[str, _ProcessReplica] = {}
        self._proxy: _WorkerProcess | None = None
        self._server: asyncio.AbstractServer | None = None
        self._on_died: Callable[[ReplicaHandle], None] = lambda handle: None

    async def start(self, on_replica_died: Callable[[ReplicaHandle], None]) -> None:
        self._on_died = on_replica_died
        path = os.path.join(self.directory, "controller.sock")
        self._server = await serve_unix(path, self._on_control, "controller")

    def _on_control(self, conn: Connection, corr: int, msg: Message) -> None:
        if type(msg) is Hello:
            waiter = self._hellos.pop(msg.worker_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(conn)

    async def _spawn(self, kind: str, env_vars: dict[str, str] | None = None) -> _WorkerProcess:
        worker_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        hello: asyncio.Future[Connection] = loop.create_future()
        self._hellos[worker_id] = hello
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal._runtime.process.worker", self.directory, worker_id],
            stdin=subprocess.DEVNULL,
            close_fds=True,
            # runtime_env env_vars: set before the worker imports anything (shoal or user code).
            env={**os.environ, **env_vars} if env_vars else None,
        )
        worker = self._workers[worker_id] = _WorkerProcess(worker_id, process)
        exited: asyncio.Future[Any] = asyncio.shield(worker.exited)
        done, _ = await asyncio.wait({hello, exited}, timeout=_SPAWN_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if hello not in done:
            self._hellos.pop(worker_id, None)
            self._workers.pop(worker_id, None)
            process.kill()
            why = f"exited with code {process.returncode}" if exited in done else "did not start"
            raise ShoalError(f"worker process {worker_id} {why} within {_SPAWN_TIMEOUT_S:.0f} s")
        worker.conn = hello.result()
        worker.conn.close_callbacks.append(lambda _conn: self._worker_lost(worker))
        snapshot = [
            worker.request(update, _CONTROL_TIMEOUT_S) for update in self._membership.values()
        ]
        await asyncio.gather(*snapshot)
        return worker

    def _worker_lost(self, worker: _WorkerProcess) -> None:
        self._workers.pop(worker.worker_id, None)
        asyncio.get_running_loop().create_task(worker.wait_exit(_EXIT_GRACE_S))
        for replica_id, replica in list(self._replicas.items()):
            if replica.worker is worker:
                del self._replicas[replica_id]
                if not worker.stopping:
                    self._on_died(replica)

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaHandle:
        import cloudpickle

        env = spec.config.ray_actor_options.runtime_env or {}
        worker = await self._spawn("replica", env.get("env_vars"))
        try:
            blob = cloudpickle.dumps(spec)
            start = StartReplica(blob, *_paths(env))
            address = await worker.request(start, _SPAWN_TIMEOUT_S * 10)
        except BaseException as exc:
            worker.stopping = True
            worker.process.kill()
            if isinstance(exc, TransportError | RequestTimeoutError | asyncio.CancelledError):
                raise
            notes = "".join(getattr(exc, "__notes__", []))
            raise startup_failed(spec.deployment, exc, notes) from exc
        info = ReplicaInfo(spec.replica_id, address, spec.config.max_ongoing_requests)
        replica = self._replicas[spec.replica_id] = _ProcessReplica(worker, info)
        return replica

    async def publish(self, update: ReplicaSetUpdate) -> None:
        key = (update.app, update.deployment)
        if update.exists:
            self._membership[key] = update
        else:
            self._membership.pop(key, None)
        workers = [w for w in self._workers.values() if w.conn is not None and not w.conn.closed]
        results = await asyncio.gather(
            *(w.request(update, _CONTROL_TIMEOUT_S) for w in workers), return_exceptions=True
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, Exception) and not worker.stopping:
                logger.debug("worker %s missed an update: %s", worker.worker_id, result)

    async def start_proxy(self, options: HTTPOptions) -> tuple[str, int]:
        self._proxy = await self._spawn("proxy")
        try:
            host, port = await self._proxy.request(
                StartProxy(options.model_dump()), _CONTROL_TIMEOUT_S
            )
        except BaseException:
            self._proxy.stopping = True
            self._proxy.process.kill()
            raise
        return host, port

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        if self._proxy is not None:
            await self._proxy.request(RoutesUpdate(routes), _CONTROL_TIMEOUT_S)

    async def drain_proxy(self) -> None:
        if self._proxy is None:
            return
        try:
            await self._proxy.request(DrainProxy(), _CONTROL_TIMEOUT_S)
        except (ShoalError, TransportError) as exc:  # a dead proxy has nothing to drain
            logger.debug("proxy did not acknowledge the drain: %s", exc)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop the proxy, end every remaining worker, remove the socket directory."""
        if self._proxy is not None:
            self._proxy.stopping = True
            try:
                await self._proxy.request(StopReplica(0.0, timeout_s), timeout_s)
            except Exception as exc:
                logger.debug("proxy did not stop cleanly: %s", exc)
        for worker in self._workers.values():
            worker.stopping = True
            if worker.process.poll() is None:
                worker.process.terminate()
        await asyncio.gather(*(w.wait_exit(timeout_s) for w in list(self._workers.values())))
        if self._proxy is not None:
            await self._proxy.wait_exit(timeout_s)
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.directory, ignore_errors=True)
