"""Entry point of a shoal worker process: one replica, or the HTTP proxy.

``python -m shoal._runtime.process.worker INSTANCE_DIR WORKER_ID``

The worker connects to the controller's socket, says hello, and obeys control
messages. It exits on its own as soon as that connection closes (the driver
died), so no worker outlives its driver. SIGINT is ignored: the driver
coordinates shutdown on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import signal
import sys
import types
from typing import Any

from shoal._api.context import set_default_registry
from shoal._config import HTTPOptions
from shoal._errors import RequestCancelledError
from shoal._replica.logs import configure_worker_logging, set_process_component
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import new_event_loop
from shoal._runtime.process.client import UnixConnector
from shoal._transport.codec import SerializationError
from shoal._transport.connection import STREAM_WINDOW, Connection, connect_unix, serve_unix
from shoal._transport.failures import failure_from
from shoal._transport.http import WEBSOCKET, HttpRequestData
from shoal._transport.messages import (
    Cancel,
    DrainProxy,
    HealthCheck,
    Hello,
    Message,
    Reconfigure,
    ReplicaSetUpdate,
    Request,
    Result,
    RoutesUpdate,
    StartProxy,
    StartReplica,
    StopReplica,
    StreamCredit,
    StreamInput,
    StreamItem,
)

logger = logging.getLogger("shoal.worker")


class Worker:
    """Holds this process's router registry and its replica or proxy."""

    def __init__(self, instance_dir: str, worker_id: str) -> None:
        self.instance_dir = instance_dir
        self.worker_id = worker_id
        self.loop = asyncio.get_running_loop()
        self.registry = RouterRegistry(UnixConnector(), self.loop)
        self.replica: Any = None
        self.proxy: Any = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._tasks: dict[tuple[int, int], asyncio.Task[Any]] = {}
        self._credits: dict[tuple[int, int], _Credit] = {}
        # Messages a caller sends into its running stream (a websocket's client side).
        self._inboxes: dict[tuple[int, int], asyncio.Queue[Any]] = {}
        self._data_server: asyncio.AbstractServer | None = None
        set_default_registry(self.registry)

    async def run(self) -> None:
        path = os.path.join(self.instance_dir, "controller.sock")
        control = await connect_unix(path, self._on_control, "controller")
        control.close_callbacks.append(lambda _conn: self._driver_gone())
        control.send(0, Hello(self.worker_id, os.getpid()))
        await self.done

    def _driver_gone(self) -> None:
        # The driver died or dropped us: leave now, without waiting for user code.
        os._exit(0)

    # --- control plane -------------------------------------------------------------

    def _on_control(self, conn: Connection, corr: int, msg: Message) -> None:
        if type(msg) is ReplicaSetUpdate:
            self.registry.apply(msg)
            conn.send(corr, Result())
        elif type(msg) is RoutesUpdate:
            self.proxy.set_routes(msg.routes)
            conn.send(corr, Result())
        elif type(msg) is DrainProxy:
            self.proxy.drain()
            conn.send(corr, Result())
        else:
            self.loop.create_task(self._control(conn, corr, msg))

    async def _control(self, conn: Connection, corr: int, msg: Message) -> None:
        try:
            value = await self._handle_control(msg)
            reply: Message = Result(value)
        except Exception as exc:
            reply = failure_from(exc)
        conn.send(corr, reply)
        if type(msg) is StopReplica:
            self.loop.call_later(0.01, self._exit)

    async def _handle_control(self, msg: Message) -> Any:
        kind = type(msg)
        if kind is HealthCheck:
            if self.replica is not None:
                await self.replica.check_health()
            return None
        if kind is StartReplica:
            return await self._start_replica(msg)  # type: ignore[arg-type]
        if kind is Reconfigure:
            await self.replica.reconfigure(msg.user_config)  # type: ignore[attr-defined]
            return None
        if kind is StopReplica:
            await self._stop(msg)  # type: ignore[arg-type]
            return None
        if kind is StartProxy:
            from shoal._proxy.proxy import Proxy

            options = HTTPOptions(**msg.http_options)  # type: ignore[attr-defined]
            self.proxy = Proxy(self.registry, options)
            return await self.proxy.serve()
        raise TypeError(f"unexpected control message {kind.__name__}")

    async def _start_replica(self, msg: StartReplica) -> str:
        sys.path[:] = msg.sys_path
        if msg.cwd:
            os.chdir(msg.cwd)
        spec = _SpecUnpickler(io.BytesIO(msg.spec)).load()
        set_process_component(spec.deployment, spec.replica_id)
        from shoal._replica.replica import Replica

        replica = Replica(spec)
        await replica.initialize()
        self.replica = replica
        address = os.path.join(self.instance_dir, f"{self.worker_id}.sock")
        self._data_server = await serve_unix(address, self._on_request, spec.replica_id)
        return address

    async def _stop(self, msg: StopReplica) -> None:
        if self.replica is not None:
            await self.replica.drain(msg.wait_loop_s, msg.timeout_s)
            await self.replica.close()
        if self.proxy is not None:
            await self.proxy.stop(msg.timeout_s)

    def _exit(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # --- data plane ----------------------------------------------------------------

    def _on_request(self, conn: Connection, corr: int, msg: Message) -> None:
        key = (id(conn), corr)
        if isinstance(msg, Request):
            if msg.stream and _is_websocket(msg):
                self._inboxes[key] = asyncio.Queue()  # before any client message can arrive
            run = self._stream(conn, corr, msg) if msg.stream else self._call(conn, corr, msg)
            self._tasks[key] = self.loop.create_task(run, context=self.replica.task_context())
        elif isinstance(msg, Cancel):
            running = self._tasks.get(key)
            if running is not None:
                running.cancel()
        elif isinstance(msg, StreamCredit):
            credit = self._credits.get(key)
            if credit is not None:
                credit.grant(msg.items)
        elif isinstance(msg, StreamInput):
            inbox = self._inboxes.get(key)
            if inbox is not None:
                inbox.put_nowait(msg.value)

    async def _call(self, conn: Connection, corr: int, request: Request) -> None:
        try:
            try:
                reply = await self.replica.handle(request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller cancelled: it expects no reply
                # The user's code let a CancelledError escape: the caller must still hear.
                reply = failure_from(
                    RequestCancelledError(
                        f"method '{request.method}' raised CancelledError without being cancelled"
                    )
                )
            _send_reply(conn, corr, reply)
        finally:
            self._tasks.pop((id(conn), corr), None)

    async def _stream(self, conn: Connection, corr: int, request: Request) -> None:
        key = (id(conn), corr)
        credit = self._credits[key] = _Credit(STREAM_WINDOW)
        stream = self.replica.handle_stream(request, self._inboxes.get(key))
        try:
            async for reply in stream:
                if type(reply) is StreamItem:
                    await credit.take()
                _send_reply(conn, corr, reply)
                if conn.closed:
                    break
        finally:
            await stream.aclose()
            self._credits.pop(key, None)
            self._inboxes.pop(key, None)
            self._tasks.pop(key, None)


class _SpecUnpickler(pickle.Unpickler):
    """Unpickles a replica spec, giving code sent by value its source file back.

    cloudpickle sends the code of classes and functions it cannot pickle by
    reference (those of the driver's ``__main__``, or defined inside a function)
    with the file name ``<dynamic-code>``, so tracebacks and logs would show no
    file, line text or source. Such a function still carries its module's
    ``__file__``: its code is renamed back to that file.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module == "cloudpickle.cloudpickle" and name == "_make_function":
            return _with_source_file(found)
        return found


_DYNAMIC_CODE = "<dynamic-code>"


def _with_source_file(make_function: Any) -> Any:
    def make(code: types.CodeType, globals_: dict[str, Any], *args: Any) -> Any:
        path = globals_.get("__file__")
        if code.co_filename == _DYNAMIC_CODE and isinstance(path, str):
            code = _renamed(code, path)
        return make_function(code, globals_, *args)

    return make


def _renamed(code: types.CodeType, path: str) -> types.CodeType:
    """``code`` and the code nested in it (inner functions, comprehensions) with ``path``."""
    consts = tuple(
        _renamed(c, path) if isinstance(c, types.CodeType) and c.co_filename == _DYNAMIC_CODE else c
        for c in code.co_consts
    )
    return code.replace(co_filename=path, co_consts=consts)


def _is_websocket(request: Request) -> bool:
    args = request.args
    return bool(args) and type(args[0]) is HttpRequestData and args[0].method == WEBSOCKET


def _send_reply(conn: Connection, corr: int, reply: Message) -> None:
    try:
        conn.send(corr, reply)
    except SerializationError as exc:
        conn.send(corr, failure_from(exc))


class _Credit:
    """How many more stream items the consumer accepts (back-pressure)."""

    def __init__(self, initial: int) -> None:
        self._available = initial
        self._event = asyncio.Event()

    def grant(self, items: int) -> None:
        self._available += items
        self._event.set()

    async def take(self) -> None:
        while self._available <= 0:
            self._event.clear()
            await self._event.wait()
        self._available -= 1


def main() -> None:
    instance_dir, worker_id = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_worker_logging(worker_id)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def run() -> None:
        await Worker(instance_dir, worker_id).run()

    try:
        loop.run_until_complete(run())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)  # do not wait for the replica's threads: it has been drained


if __name__ == "__main__":
    main()
