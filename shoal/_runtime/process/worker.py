"""Entry point of a shoal worker process: one replica, or the HTTP proxy.

``python -m shoal._runtime.process.worker INSTANCE_DIR WORKER_ID [ORPHAN_GRACE_S]``

The worker connects to the controller's socket, says hello, and obeys control
messages. Without a grace period it exits as soon as that connection closes
(the driver died), so no worker outlives its driver; with one (a ``shoal
start`` server's workers) it keeps serving and rejoins the restarted
controller, or exits when the grace period ends (see ``adopt.py``). SIGINT is ignored: the driver
coordinates shutdown on Ctrl-C. Serving requests is not this module's job: a
started replica is served by :class:`shoal._replica.server.ReplicaServer`,
which any host process can run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from shoal._api.context import set_default_registry
from shoal._config import TIMEOUTS, ProxyOptions
from shoal._errors import ShoalError
from shoal._observe import tracing
from shoal._observe.logs import Component, configure_component, flush_files
from shoal._observe.metrics.reporter import REPORTER
from shoal._observe.options import Telemetry
from shoal._observe.process import configure_process
from shoal._replica.logs import configure_worker_logging
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import new_event_loop
from shoal._runtime.process.client import UnixConnector
from shoal._runtime.process.learned import ImportsDuring
from shoal._seam.startup import DIRECT_INGRESS, mark_startup_step
from shoal._transport.auth import connect_tcp, join_host_port, split_host_port
from shoal._transport.client import NodeNetwork
from shoal._transport.connection import Connection, MessageHandler, connect_unix
from shoal._transport.failures import failure_from
from shoal._transport.messages import (
    AutoscalingStats,
    ConfigureProcess,
    DrainProxy,
    HealthCheck,
    Hello,
    LoadReport,
    Message,
    Ping,
    ProxyIdle,
    Reconfigure,
    Rejoin,
    ReplicaInfo,
    ReplicaSetUpdate,
    ReplicaStarted,
    Result,
    RoutesUpdate,
    StartProxy,
    StartReplica,
    StopReplica,
)

if TYPE_CHECKING:
    from shoal._proxy.direct import DirectIngress
    from shoal._proxy.proxy import Proxy
    from shoal._replica.replica import Replica
    from shoal._replica.server import ReplicaServer

logger = logging.getLogger("shoal.worker")

_REJOIN_RETRY_S = 0.05  # how often an orphaned worker tries the controller's socket


class Worker:
    """This process's control connection, its routers, and the replica or proxy it hosts."""

    def __init__(
        self,
        instance_dir: str,
        worker_id: str,
        orphan_grace_s: float = 0.0,
        network: NodeNetwork | None = None,
        controller: str = "",
    ) -> None:
        """``network``: this process's node and the instance secret (an instance whose
        replicas span nodes); ``controller``: the controller's authenticated TCP address
        ("host:port") if it runs on another node, "" to use its Unix socket."""
        self.instance_dir = instance_dir
        self.worker_id = worker_id
        self.orphan_grace_s = orphan_grace_s
        self.network = network
        self.controller = controller
        # What this worker tells a restarted controller (see _rejoin).
        self.hosting = Rejoin(worker_id, os.getpid())
        self.loop = asyncio.get_running_loop()
        connector = network.connector() if network is not None else UnixConnector()
        self.registry = RouterRegistry(connector, self.loop)
        self.replica: Replica | None = None
        self.server: ReplicaServer | None = None
        self.proxy: Proxy | None = None
        self.direct: DirectIngress | None = None  # the replica's own HTTP server, if any
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._terminating = False
        set_default_registry(self.registry)

    async def run(self) -> None:
        control = await self._connect_control(self._on_control)
        control.close_callbacks.append(lambda _conn: self._controller_gone())
        control.send(0, Hello(self.worker_id, os.getpid()))
        self._report_load_to(control)
        await self.done

    async def _connect_control(
        self, on_message: MessageHandler, timeout_s: float = 10.0
    ) -> Connection:
        """The control connection: the controller's Unix socket, or its authenticated TCP
        port when it runs on another node (``controller``)."""
        if not self.controller:
            path = os.path.join(self.instance_dir, "controller.sock")
            return await connect_unix(path, on_message, "controller", timeout_s)
        assert self.network is not None  # the secret to prove
        host, port = split_host_port(self.controller)
        return await connect_tcp(
            host, port, self.network.secret, on_message, "controller", timeout_s
        )

    def _report_load_to(self, control: Connection) -> None:
        """This process's routers report their load to the controller on ``control``."""
        self.registry.load.source = self.worker_id
        self.registry.load.sink = lambda report: control.send(0, report)
        REPORTER.connect(self.loop, self.worker_id, lambda report: control.send(0, report))

    def _report_load(self, report: LoadReport) -> None:
        """Send ``report`` where this process's routers report (nowhere while none)."""
        sink = self.registry.load.sink
        if sink is not None:
            sink(report)

    def _controller_gone(self) -> None:
        if self.orphan_grace_s <= 0:
            # The driver died or dropped us: leave now, without waiting for user code
            # (the lines logged until now are written first).
            flush_files()
            os._exit(0)
        self.loop.create_task(self._rejoin())

    async def _rejoin(self) -> None:
        """Keep serving with the routing we have, and say who we are to the controller
        that restarts on the same socket (or TCP port); exit if none does within the
        grace period."""
        deadline = self.loop.time() + self.orphan_grace_s
        while self.loop.time() < deadline:
            try:
                control = await self._connect_control(self._on_control, 1.0)
                # A controller that took the connection answers however busy it is (it
                # may be adopting many workers): wait for it, not rejoin on another one.
                answer_s = max(TIMEOUTS.rejoin_answer_s, deadline - self.loop.time())
                await control.request(self.hosting, answer_s)
            except (OSError, ShoalError, TimeoutError):
                # Nobody listens yet, or the dying controller's socket took the
                # connection before closing: try again.
                await asyncio.sleep(_REJOIN_RETRY_S)
                continue
            control.close_callbacks.append(lambda _conn: self._controller_gone())
            self._report_load_to(control)
            logger.warning("rejoined the restarted controller")
            return
        logger.warning("no controller came back within %.0f s; exiting", self.orphan_grace_s)
        flush_files()
        os._exit(0)

    def _exit(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def terminate(self) -> None:
        """SIGTERM: stop as the controller's StopReplica would (a replica within its own
        ``graceful_shutdown_*`` limits, the proxy within ``TIMEOUTS.shutdown_s``), then
        exit. A service manager stopping shoal (systemd, ``timeout``, kill -- -PGID)
        signals every process of the group at once: the requests in flight are answered,
        not cut off. A replica terminated alone is replaced once it has exited."""
        if not self._terminating:
            self._terminating = True
            self.loop.create_task(self._terminated())

    async def _terminated(self) -> None:
        limits = StopReplica(0.0, TIMEOUTS.shutdown_s)
        if self.replica is not None:
            config = self.replica.spec.config
            limits = StopReplica(
                config.graceful_shutdown_wait_loop_s, config.graceful_shutdown_timeout_s
            )
        try:
            await self._stop(limits)
        except Exception:
            logger.exception("%s did not stop cleanly on SIGTERM", self.worker_id)
        finally:
            self._exit()

    # --- control messages ----------------------------------------------------------

    def _on_control(self, conn: Connection, corr: int, msg: Message) -> None:
        # Routing changes apply at once, in arrival order: the controller waits for
        # every process's acknowledgement before it relies on them.
        match msg:
            case ReplicaSetUpdate():
                self.registry.apply(msg)
                if self.direct is not None:
                    self.direct.apply(msg)
            case RoutesUpdate():
                self._hosted_proxy().set_routes(msg.routes)
            case DrainProxy():
                self._hosted_proxy().drain()
            case Ping():
                pass  # liveness: answered by this loop itself, no user code runs
            case ConfigureProcess():
                if msg.network is not None and self.network is None:  # the Ray runtime's proxy
                    self.network = msg.network
                    self.registry.connector = msg.network.connector()  # before any router
                try:
                    configure_process(Telemetry.model_validate(msg.telemetry), self.worker_id)
                except Exception as exc:  # e.g. a tracing setup_hook this process cannot import
                    conn.send(corr, failure_from(exc))  # the start fails with its message
                    return
            case _:
                self.loop.create_task(self._control(conn, corr, msg))
                return
        conn.send(corr, Result())

    async def _control(self, conn: Connection, corr: int, msg: Message) -> None:
        try:
            reply: Message = Result(await self._handle_control(msg))
        except Exception as exc:
            reply = failure_from(exc)
        conn.send(corr, reply)
        if type(msg) is StopReplica:
            self.loop.call_later(0.01, self._exit)  # after the reply has been written

    async def _handle_control(self, msg: Message) -> Any:
        match msg:
            case HealthCheck():  # the reply carries the replica's status details
                if self.replica is not None:
                    return await self.replica.health_report()
            case Reconfigure():
                await self._hosted_replica().reconfigure(msg.user_config)
                self.hosting.user_config = msg.user_config
            case StartReplica():
                return await self._start_replica(msg)
            case StartProxy():
                return await self._start_proxy(msg)
            case StopReplica():
                await self._stop(msg)
            case ProxyIdle():
                return await self._hosted_proxy().wait_idle(msg.timeout_s)
            case AutoscalingStats():
                replica = self._hosted_replica()
                return await asyncio.wait_for(replica.autoscaling_stats(), msg.timeout_s)
            case _:
                raise TypeError(f"unexpected control message {type(msg).__name__}")
        return None

    def _hosted_replica(self) -> Replica:
        if self.replica is None:
            raise ShoalError(f"worker {self.worker_id} hosts no replica")
        return self.replica

    def _hosted_proxy(self) -> Proxy:
        if self.proxy is None:
            raise ShoalError(f"worker {self.worker_id} hosts no proxy")
        return self.proxy

    # --- what this worker hosts ----------------------------------------------------

    async def _start_replica(self, msg: StartReplica) -> ReplicaStarted:
        """Start the replica, then serve it on this worker's socket (and on authenticated
        TCP on its node's address, for routers on other nodes); returns where, and what
        its start imported."""
        imports = ImportsDuring()
        try:
            spec = pickle.loads(msg.spec)
            spec.code.prepare_imports(spec.config.ray_actor_options.runtime_env)
            # Before any user code runs: its records carry the replica and go to its file.
            component = Component("replica", spec.app, spec.deployment, spec.replica_id)
            configure_component(component, spec.config.logging_config)
            # Imported here: a proxy worker never loads the replica's modules.
            from shoal._replica.replica import Replica
            from shoal._replica.server import ReplicaServer

            replica = Replica(spec)
            await replica.initialize()
        finally:
            imported = imports.stop()
        self.replica = replica
        self.server = ReplicaServer(replica)
        address = os.path.join(self.instance_dir, f"{self.worker_id}.sock")
        await self.server.listen(address)
        if spec.direct_ingress is not None:  # docs/direct-ingress.md
            from shoal._proxy.direct import DirectIngress

            self.direct = DirectIngress(
                replica, spec.direct_ingress, self._report_load, f"{self.worker_id}:direct"
            )
            try:
                await self.direct.start()
            except Exception as exc:  # the port is taken: the error says so, not "constructor"
                mark_startup_step(exc, DIRECT_INGRESS)
                raise
        tcp_address = ""
        if self.network is not None and self.network.host:
            host, port = await self.server.listen_tcp(self.network.host, 0, self.network.secret)
            tcp_address = join_host_port(host, port)
        node = self.network.node_id if self.network is not None else ""  # told on a rejoin
        info = ReplicaInfo(
            spec.replica_id, address, spec.config.max_ongoing_requests, node, tcp_address
        )
        self.hosting = Rejoin(
            self.worker_id, os.getpid(), info, spec.app, spec.deployment,
            spec.code_version, spec.config.user_config,
        )  # fmt: skip
        return ReplicaStarted(info, imported)

    async def _start_proxy(self, msg: StartProxy) -> tuple[str, int]:
        from shoal._proxy.proxy import Proxy

        configure_component(Component("proxy", "-", "proxy", self.worker_id), None)
        self.proxy = Proxy(self.registry, ProxyOptions(**msg.http_options))  # gRPC's too
        host, port = await self.proxy.serve(msg.reuse_port)
        self.hosting = Rejoin(self.worker_id, os.getpid(), proxy=(host, port))
        return host, port

    async def _stop(self, msg: StopReplica) -> None:
        timeout_s = msg.timeout_s
        if self.direct is not None:  # no new connection comes here, then the replica drains
            started = time.monotonic()
            await self.direct.stop(timeout_s)
            timeout_s = max(0.0, timeout_s - (time.monotonic() - started))  # one limit for both
        if self.replica is not None:
            await self.replica.drain(msg.wait_loop_s, timeout_s)
            await self.replica.close()
        if self.proxy is not None:
            await self.proxy.stop(msg.timeout_s)


def run_worker(
    instance_dir: str,
    worker_id: str,
    orphan_grace_s: float = 0.0,
    exit_process: bool = True,
    network: NodeNetwork | None = None,
    controller: str = "",
) -> None:
    """Run a worker on a new event loop in this thread until it is told to stop.

    ``exit_process``: end the process then, without waiting for the replica's threads
    (it has been drained); a worker hosted by a Ray actor returns instead, and the
    runtime ends the actor. ``network``, ``controller``: see :class:`Worker`.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_worker_logging(worker_id)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def run() -> None:
        worker = Worker(instance_dir, worker_id, orphan_grace_s, network, controller)
        if exit_process and threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGTERM, worker.terminate)
        await worker.run()

    try:
        loop.run_until_complete(run())
    finally:
        tracing.flush()  # spans a batching exporter still holds: os._exit skips atexit
        sys.stdout.flush()
        sys.stderr.flush()
    if exit_process:
        os._exit(0)


def main() -> None:
    # What shoal's imports allocated lives as long as the process: frozen, a full
    # collection no longer walks it (about 40,000 objects, 35-60 ms per collection). A
    # freeze is one list splice; the fork server's children come frozen already.
    gc.freeze()
    instance_dir, worker_id = sys.argv[1], sys.argv[2]
    orphan_grace_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    run_worker(instance_dir, worker_id, orphan_grace_s)


if __name__ == "__main__":
    main()
