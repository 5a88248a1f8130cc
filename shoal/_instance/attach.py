"""Other processes attach to a running ``shoal start`` server.

``serve.run/status/delete/get_app_handle`` in a second Python process work
against the server (Ray Serve's behaviour when a cluster is running): admin
calls go over the server's ``admin.sock``; the process also says hello on the
controller's socket as a router host, so it receives every replica set and its
handles route directly to the replicas. Both sockets accept only processes of
the same user (directory mode 0700, ``SO_PEERCRED``), so nothing is unpickled
from an unauthenticated peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from shoal._config import TIMEOUTS
from shoal._controller.controller import failed_to_deploy
from shoal._controller.status import ServeStatus
from shoal._errors import NotFoundError, ShoalError
from shoal._instance.background import deploying, logged_failure
from shoal._instance.home import ServerInfo
from shoal._observe.metrics.reporter import REPORTER
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import LoopThread
from shoal._runtime.process.client import UnixConnector
from shoal._runtime.process.workers import SUBSCRIBER_PREFIX
from shoal._seam.specs import AppSpec
from shoal._transport.connection import Connection, connect_unix, serve_unix
from shoal._transport.failures import exception_from, failure_from
from shoal._transport.messages import (
    AttachApps,
    AttachDelete,
    AttachDeploy,
    AttachShutdown,
    AttachStatus,
    ConfigureProcess,
    Failure,
    Hello,
    Message,
    ReplicaSetUpdate,
    Result,
)

if TYPE_CHECKING:
    from shoal._instance.instance import Instance

logger = logging.getLogger("shoal")


class AttachServer:
    """The instance side: answers admin calls on ``admin.sock``."""

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        self._path = path
        self._server = await serve_unix(path, self._on_message, "admin")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    def _on_message(self, conn: Connection, corr: int, msg: Message) -> None:
        asyncio.get_running_loop().create_task(self._answer(conn, corr, msg))

    async def _answer(self, conn: Connection, corr: int, msg: Message) -> None:
        try:
            reply: Message = Result(await self._handle(msg))
        except Exception as exc:
            reply = failure_from(exc)
        if not conn.closed:
            conn.send(corr, reply)

    async def _handle(self, msg: Message) -> Any:
        controller = self._instance.controller
        match msg:
            case AttachApps():
                return {name: app.spec.ingress for name, app in controller.apps.items()}
            case AttachStatus():
                return self._instance.status_now()
            case AttachDeploy(apps=blob):
                specs: list[AppSpec] = pickle.loads(blob)  # same-user peer (SO_PEERCRED)
                await self._instance.deploy_many_async(specs)
                return None
            case AttachDelete(name=name):
                if name in controller.apps:
                    await controller.delete(name)
                return None
            case AttachShutdown():
                await self._instance.services.plane.shutdown()
                return None
        raise TypeError(f"unexpected admin message {type(msg).__name__}")


class AttachedInstance:
    """The attaching side: what ``serve.*`` uses when a server runs instead of an embedded
    instance. It has the same methods as :class:`~shoal._instance.instance.Instance`."""

    kind = "attached"

    def __init__(self, info: ServerInfo) -> None:
        self.info = info
        self.http = None
        self.thread = LoopThread("shoal-attached")
        self.registry = RouterRegistry(UnixConnector(), self.thread.loop)
        self._admin: Connection | None = None
        self._routing: Connection | None = None
        try:
            self.thread.run(self._connect(), TIMEOUTS.admin_call_s)
        except BaseException:
            self.detach()
            raise

    async def _connect(self) -> None:
        self._admin = await connect_unix(self.info.admin_socket, None, "admin")
        ready = asyncio.get_running_loop().create_future()

        def on_control(conn: Connection, corr: int, msg: Message) -> None:
            if type(msg) is ReplicaSetUpdate:
                self.registry.apply(msg)
                conn.send(corr, Result())
            elif type(msg) is ConfigureProcess:  # replicas on other nodes (the Ray runtime)
                if msg.network is not None:
                    self.registry.connector = msg.network.connector()
                conn.send(corr, Result())
            elif type(msg) is Result and corr == 0 and not ready.done():
                ready.set_result(None)  # every current replica set is applied

        path = os.path.join(self.info.directory, "run", "controller.sock")
        routing = self._routing = await connect_unix(path, on_control, "controller")
        source = f"{SUBSCRIBER_PREFIX}{uuid.uuid4().hex[:8]}"
        routing.send(0, Hello(source, os.getpid()))
        await ready
        # This process's handles count for autoscaling: their load goes to the controller.
        self.registry.load.source = source
        self.registry.load.sink = lambda report: routing.send(0, report)
        # Its routers' and custom metrics too (the server's options apply: see metrics.md).
        REPORTER.connect(asyncio.get_running_loop(), source, lambda r: routing.send(0, r))

    def _call(self, msg: Message, timeout_s: float = TIMEOUTS.admin_call_s) -> Any:
        return self.thread.run(self._ask(msg, timeout_s), timeout_s + 5)

    async def _ask(self, msg: Message, timeout_s: float) -> Any:
        """The server's answer to ``msg`` (its Failure raised), on the attach loop."""
        if self._admin is None or self._admin.closed:
            raise ShoalError(
                f"the shoal server (pid {self.info.pid}) is gone; start one with "
                "`shoal start`, or call serve.shutdown() to run embedded again"
            )
        reply = await self._admin.request(msg, timeout_s)
        if isinstance(reply, Failure):
            raise exception_from(reply)
        return reply.value  # type: ignore[attr-defined]

    def app_names(self) -> list[str]:
        return list(self._call(AttachApps()))

    def ingress_of(self, name: str) -> str:
        apps = self._call(AttachApps())
        if name not in apps:
            failed = self.status().applications.get(name)
            if failed is not None and failed.status == "DEPLOY_FAILED" and not failed.deployments:
                raise failed_to_deploy(name, failed.message)
            raise NotFoundError(
                f"application '{name}' does not exist; running: {', '.join(apps) or 'none'}"
            )
        return str(apps[name])

    def deploy(self, spec: AppSpec) -> None:
        self.deploy_many([spec])

    def deploy_many(self, specs: list[AppSpec], wait: bool = True) -> Future[None] | None:
        """Deploy ``specs`` side by side in the server; raises the first failure.
        ``wait=False``: returns at once the future of that deploy (as ``Instance``'s)."""
        import cloudpickle

        message = AttachDeploy(cloudpickle.dumps(specs))
        if not wait:
            future = self.thread.submit(self._ask(message, TIMEOUTS.deploy_s))
            return logged_failure(future, deploying(specs))
        self._call(message, TIMEOUTS.deploy_s)
        return None

    def delete(self, name: str, wait: bool = True) -> None:
        """Delete application ``name`` in the server; ``wait=False``: return once asked (a
        failure is logged)."""
        if not wait:
            future = self.thread.submit(self._ask(AttachDelete(name), TIMEOUTS.admin_call_s))
            logged_failure(future, f"deleting {name!r}")
            return
        self._call(AttachDelete(name))

    def status(self) -> ServeStatus:
        status: ServeStatus = self._call(AttachStatus())
        return status

    def stop(self) -> None:
        """``serve.shutdown()``: as in Ray Serve, shut the whole server down."""
        from shoal._instance.server import wait_stopped

        try:
            self._call(AttachShutdown())
        finally:
            self.detach()
        if not wait_stopped(self.info, TIMEOUTS.shutdown_s + 10):
            logger.warning("the shoal server (pid %d) did not stop in time", self.info.pid)

    def detach(self) -> None:
        """Leave the server running; close this process's connections."""
        for conn in (self._admin, self._routing):
            if conn is not None:
                conn.close()
        self.thread.stop()
