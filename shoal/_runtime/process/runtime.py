"""The local multi-process runtime (the default): one OS process per replica, plus the proxy.

Every shoal process talks over Unix sockets in a per-instance directory
created with mode 0700 (sockets 0600, peers checked with SO_PEERCRED); no TCP
port is opened except the HTTP proxy's. Workers exit when the controller's
connection closes, so none outlives the driver.

Faults: an update (replica set, routes) waits at most ``TIMEOUTS.update_ack_s`` for
each process; one that misses it is *lagging* and is not waited for again
until it answers (see :meth:`ProcessRuntime._deliver`). The proxy serves a
listening socket this process binds and keeps, so a replacement proxy
(:meth:`ProcessRuntime.restart_proxy`) serves the same port, and connections
made while none runs wait in the socket's backlog instead of being refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from shoal._config import TIMEOUTS, HTTPOptions
from shoal._errors import RequestTimeoutError, ShoalError, TransportError
from shoal._observe.options import Telemetry
from shoal._proxy.listener import LISTEN_FD_ENV, bind_listener, port_held
from shoal._runtime.node import local_node_id
from shoal._runtime.process.adopt import AdoptedProcess, Rejoined
from shoal._runtime.process.client import UnixConnector
from shoal._runtime.process.directory import new_instance_directory, remove_sockets
from shoal._runtime.process.forks import (
    ForkedProcess,
    ForkServer,
    ForkServerUnavailable,
    fork_server_supported,
    fork_server_wanted,
)
from shoal._runtime.process.reports import MetricsReports
from shoal._runtime.process.updates import Updates
from shoal._runtime.process.workers import (
    SUBSCRIBER_PREFIX,
    ProcessReplica,
    Subscriber,
    WorkerProcess,
    ignore_failure,
    reap_lost,
    send_in_order,
    started,
)
from shoal._runtime.process.zygote import ENTRY_MODULES
from shoal._seam.protocols import Connector, MetricsSink, ReplicaHandle
from shoal._seam.specs import NodeProxy, ReplicaSpec
from shoal._seam.startup import startup_failed
from shoal._transport.client import NodeNetwork
from shoal._transport.connection import Connection, serve_unix
from shoal._transport.messages import (
    ConfigureProcess,
    DrainProxy,
    Hello,
    LoadReport,
    Message,
    MetricsReport,
    Ping,
    ProxyIdle,
    Rejoin,
    ReplicaSetUpdate,
    ReplicaStarted,
    Result,
    RoutesUpdate,
    StartProxy,
    StartReplica,
    StopReplica,
)

logger = logging.getLogger("shoal.runtime")

#: The replica whose start starts the fork server (see _start_process): with the first,
#: its imports would compete for the cores with those of the first workers, and a cold
#: start of one replica would take longer, not shorter.
_FORK_SERVER_AFTER = 2


_SPAWN_SLOTS = (os.cpu_count() or 1) + 2  # worker processes importing at the same time


class ProcessRuntime:
    """Runtime with one process per replica and one for the HTTP proxy."""

    supports_http = True
    #: Workers starting at once (see :meth:`_spawn`).
    spawn_slots = _SPAWN_SLOTS
    #: The controller's resource ledger places replicas (a Ray cluster places its own).
    places_replicas = False
    #: The proxy's listening socket shares its port (SO_REUSEPORT) with proxies the
    #: runtime runs on other nodes (the Ray runtime's, on a one-machine cluster).
    shares_proxy_port = False

    def __init__(
        self,
        directory: str | None = None,
        orphan_grace_s: float = 0.0,
        telemetry: Telemetry | None = None,
        fork_server: bool | None = None,
        fork_server_on_first_use: bool = False,
    ) -> None:
        """``directory``: where the sockets go, used as is (a server's fixed directory);
        by default a new one of this process (see :mod:`.directory`), removed at shutdown.
        ``orphan_grace_s`` > 0: workers outlive this controller that long, serving, and
        rejoin its successor on the same directory (see :mod:`.adopt`).
        ``fork_server``: start workers by forking a process that has imported shoal
        (see :mod:`.zygote`; Linux only), not each with ``python -m``; by default as
        ``SHOAL_FORK_SERVER`` says (``1``, the default, or ``0``); ``fork_server_on_first_use``:
        started with the first replica or config build, not with the second replica (a
        long-lived server: its first deploy is forked too; not at its start, where a
        restarted server's orphaned workers must rejoin within its adopt window)."""
        if fork_server is None:
            fork_server = fork_server_wanted()
        self._forks = (
            ForkServer(TIMEOUTS.fork_server_ready_s, TIMEOUTS.fork_spawn_s, TIMEOUTS.fork_preload_s)
            if fork_server and fork_server_supported()
            else None
        )
        self._replicas_started = 0  # the fork server starts with the _fork_server_after-th
        # (app, deployment) -> the installed modules its last started replica imported as it
        # started (its constructor's imports): preloaded with the deployment's own modules
        # before its next replicas' forks (shoal._runtime.process.learned).
        self._imported: dict[tuple[str, str], list[str]] = {}
        self._fork_server_after = 1 if fork_server_on_first_use else _FORK_SERVER_AFTER
        self._orphan_grace_s = orphan_grace_s
        # Sent to every worker before anything else (ConfigureProcess).
        self._telemetry = (telemetry or Telemetry()).model_dump()
        self.rejoined = Rejoined()
        self._spawn_slots = asyncio.Semaphore(self.spawn_slots)
        self._owns_directory = directory is None
        self.directory = new_instance_directory() if directory is None else directory
        self.connector: Connector = UnixConnector()
        self._workers: dict[str, WorkerProcess] = {}
        self._hellos: dict[str, asyncio.Future[Connection]] = {}
        self._membership: dict[tuple[str, str], ReplicaSetUpdate] = {}
        self._replicas: dict[str, ProcessReplica] = {}
        self._proxy: WorkerProcess | None = None
        self._subscribers: dict[str, Any] = {}  # id -> _Subscriber (attached processes)
        self._server: asyncio.AbstractServer | None = None
        self._on_died: Callable[[ReplicaHandle], None] = lambda handle: None
        self._on_load: Callable[[LoadReport], None] = lambda report: None
        self._metrics = MetricsReports()  # other processes' metrics, to the controller
        self._updates = Updates()  # sent to many processes, acknowledged or lagging
        self._proxy_options: HTTPOptions | None = None
        self._listener: socket.socket | None = None  # the proxy's, kept across restarts
        # The next proxy's process, started ahead: a restart only has to start serving.
        self._standby: asyncio.Future[WorkerProcess] | None = None
        self._standby_timer: asyncio.TimerHandle | None = None  # when the next one starts
        self._reaping: set[asyncio.Task[None]] = set()  # lost workers waited for (reap_lost)
        self._routes: dict[str, tuple[str, str]] = {}
        self._on_proxy_died: Callable[[], None] = lambda: None

    async def start(
        self,
        on_replica_died: Callable[[ReplicaHandle], None],
        on_load: Callable[[LoadReport], None],
        metrics: MetricsSink | None = None,
    ) -> None:
        self._on_died = on_replica_died
        self._on_load = on_load
        self._metrics.sink = metrics
        path = os.path.join(self.directory, "controller.sock")
        self._server = await serve_unix(path, self._on_control, "controller")
        if self._forks is not None:  # the CLI's, forked before the instance: proxy included
            self._forks.start(early_only=True)
        self.rejoined.listening()

    def _on_control(self, conn: Connection, corr: int, msg: Message) -> None:
        if type(msg) is LoadReport:  # unsolicited, no reply: the routers of another process
            self._on_load(msg)
        elif type(msg) is MetricsReport:  # unsolicited, no reply: another process's metrics
            self._metrics.record(conn, msg)
        elif type(msg) is Hello:
            waiter = self._hellos.pop(msg.worker_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(conn)
            elif msg.worker_id.startswith(SUBSCRIBER_PREFIX):
                asyncio.get_running_loop().create_task(self._subscribe(msg.worker_id, conn))
        elif type(msg) is Rejoin:
            self._adopt(conn, msg)
            conn.send(corr, Result())

    def _adopt(self, conn: Connection, msg: Rejoin) -> None:
        """A worker of the controller before this one rejoined: take it over (a standby
        proxy process is not needed: it is stopped)."""
        if self._rejoined_again(conn, msg):
            return
        worker = self._adopted_worker(msg)
        self._watch_connection(worker, conn)
        self._workers[msg.worker_id] = worker
        if msg.replica is not None:
            info = dataclasses.replace(msg.replica, node_id=self._node_of(worker))
            handle = self._replicas[info.replica_id] = ProcessReplica(worker, info)
            self.rejoined.replicas.append((handle, msg))
        elif msg.proxy is not None:
            self.rejoined.proxy = (worker, msg)
        else:
            worker.stopping = True
            worker.process.kill()
        self.rejoined.add()

    def _rejoined_again(self, conn: Connection, msg: Rejoin) -> bool:
        """Whether ``msg`` comes from a worker adopted already, on another connection: one
        whose earlier Rejoin was answered after it stopped waiting (this loop was busy),
        so it tried again. It is adopted once: its new connection replaces the earlier
        one, which is closed, and whose closing does not count as the worker lost."""
        worker = self._workers.get(msg.worker_id)
        if worker is None or worker.conn is None or worker.conn is conn:
            return False
        stale = worker.conn
        self._watch_connection(worker, conn)
        stale.close()
        logger.info("worker %s rejoined again: adopted on its new connection", msg.worker_id)
        self.rejoined.add()
        return True

    def _watch_connection(self, worker: WorkerProcess, conn: Connection) -> None:
        """``conn`` is now ``worker``'s: its closing means the worker is lost."""
        worker.conn = conn
        conn.close_callbacks.append(lambda closed: self._connection_lost(worker, closed))

    def _connection_lost(self, worker: WorkerProcess, closed: Connection) -> None:
        if worker.conn is closed:  # (not a connection a rejoin replaced)
            self._worker_lost(worker)

    def _adopted_worker(self, msg: Rejoin) -> WorkerProcess:
        """The handle on a worker that rejoined (a process of this machine, by pid)."""
        return WorkerProcess(msg.worker_id, AdoptedProcess(msg.pid))

    async def settle_rejoins(self, window_s: float, http: HTTPOptions | None) -> None:
        """Give the previous controller's workers up to ``window_s`` to rejoin
        (:meth:`Rejoined.settle`), and its proxy, while the HTTP port is held, the rest
        of that window."""
        deadline = time.monotonic() + window_s
        await self.rejoined.settle(window_s)
        if http is not None and self.rejoined.proxy is None and port_held(http.host, http.port):
            await self.rejoined.wait_for_proxy(deadline)

    def adopt_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None]
    ) -> tuple[str, int] | None:
        """Make the proxy that rejoined this runtime's proxy; None if none rejoined.

        Its listening socket stays in its process: should it die, the port is bound
        again here once it is free (a restart then takes a little longer)."""
        if self.rejoined.proxy is None:
            return None
        worker, msg = self.rejoined.proxy
        self._proxy, self._proxy_options, self._on_proxy_died = worker, options, on_died
        assert msg.proxy is not None
        return msg.proxy

    async def _subscribe(self, subscriber_id: str, conn: Connection) -> None:
        """A process that attached to this instance holds routers too: it gets every
        replica set (the current ones first, before its hello is answered)."""
        subscriber = Subscriber(subscriber_id, conn)
        self._subscribers[subscriber_id] = subscriber
        conn.close_callbacks.append(lambda _conn: self._subscribers.pop(subscriber_id, None))
        try:
            if (network := self._network_of(None)) is not None:  # before any replica set
                await subscriber.request(ConfigureProcess({}, network), TIMEOUTS.control_call_s)
            # Taken and sent at once: an update published meanwhile is in it or comes after.
            updates = list(self._membership.values())
            await send_in_order(subscriber, updates, TIMEOUTS.control_call_s)
        except (ShoalError, TransportError) as exc:
            logger.debug("attached process %s went away: %s", subscriber_id, exc)
            conn.close()
            return
        conn.send(0, Result())  # the snapshot is applied: the process may route

    async def _spawn(
        self,
        kind: str,
        env_vars: dict[str, str] | None = None,
        listen_fd: int | None = None,
        spec: ReplicaSpec | None = None,
    ) -> WorkerProcess:
        # At most a few processes import at once: forty starting together on two cores
        # would each take longer than the hello timeout, and none would start sooner.
        async with self._spawn_slots:
            worker, hello = await self._launch(kind, env_vars, listen_fd, spec)
        worker.conn = hello
        worker.conn.close_callbacks.append(lambda _conn: self._worker_lost(worker))
        configure = ConfigureProcess(self._telemetry, self._network_of(worker))
        try:  # sent now, before any update published later (see send_in_order)
            await send_in_order(
                worker, [configure, *self._membership.values()], TIMEOUTS.control_call_s
            )
        except BaseException:  # cancelled (a scale-down, serve.run gave up) or it died
            worker.stopping = True
            worker.process.kill()
            raise
        return worker

    async def _launch(
        self,
        kind: str,
        env_vars: dict[str, str] | None,
        listen_fd: int | None,
        spec: ReplicaSpec | None = None,
    ) -> tuple[WorkerProcess, Connection]:
        """Start a worker process; returns it once it said hello, with its connection."""
        worker_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        loop = asyncio.get_running_loop()
        hello: asyncio.Future[Connection] = loop.create_future()
        self._hellos[worker_id] = hello
        argv = [self.directory, worker_id, str(self._orphan_grace_s)]
        try:
            worker = await self._start_process(kind, argv, env_vars, listen_fd, spec)
        except BaseException:
            self._hellos.pop(worker_id, None)
            raise
        process = worker.process
        self._workers[worker_id] = worker
        exited: asyncio.Future[Any] = asyncio.shield(worker.exited)
        try:
            done, _ = await asyncio.wait({hello, exited}, timeout=TIMEOUTS.worker_hello_s,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            if not hello.done():  # it exited, timed out, or we were cancelled: none is left
                self._hellos.pop(worker_id, None)
                self._workers.pop(worker_id, None)
                process.kill()
        if hello not in done:
            why = f"exited with code {process.returncode}" if exited in done else "did not start"
            limit = TIMEOUTS.worker_hello_s
            raise ShoalError(f"worker process {worker_id} {why} within {limit:g} s")
        return worker, hello.result()

    async def _start_process(
        self,
        kind: str,
        argv: list[str],
        env_vars: dict[str, str] | None,
        listen_fd: int | None,
        spec: ReplicaSpec | None = None,
    ) -> WorkerProcess:
        """A forked worker if the fork server can make one, else one started with
        ``python -m`` (``spec``: the replica it will host, if it is a replica's). A
        runtime_env's ``env_vars`` must be set before the worker imports anything (numpy
        reads some at import): such workers are never forked."""
        entry = ENTRY_MODULES[kind]  # a proxy's imports its modules before saying hello
        worker_id = argv[1]
        # Once the fork server runs, replicas wait for it: its imports take about as long
        # as one worker's, and the many replicas that started it then fork in
        # milliseconds. The proxy waits only for one the CLI forked before the instance
        # started (see forks.start_early): it is ready about as soon as the proxy starts.
        forks = self._forks
        waits = forks is not None and (
            forks.ready or ((kind != "proxy" or forks.early) and forks.started)
        )
        if forks is not None and waits and not env_vars:
            try:
                forked = await forks.spawn(kind, argv, listen_fd, LISTEN_FD_ENV)
                return WorkerProcess(worker_id, forked, forked.exited)
            except ForkServerUnavailable:
                pass  # logged once by the fork server; python -m below
        environ = {**os.environ, **(env_vars or {})}
        if listen_fd is not None:
            environ[LISTEN_FD_ENV] = str(listen_fd)
        process = subprocess.Popen(
            [sys.executable, "-m", entry, *argv],
            stdin=subprocess.DEVNULL,
            close_fds=True,
            pass_fds=(listen_fd,) if listen_fd is not None else (),
            env=environ,
        )
        return WorkerProcess(worker_id, process)

    async def fork_helper(self, entry: str, argv: list[str]) -> ForkedProcess | None:
        """A short-lived child running ``entry``'s main with ``argv`` (see
        :data:`~.zygote.ENTRY_MODULES`), forked by the fork server: it has imported shoal,
        and the user's modules it imported for replicas are shared, or imported afresh if
        edited. None if it is not running (the caller starts the child with ``python -m``)."""
        forks = self._forks
        if forks is not None and self._fork_server_after == 1:
            forks.start()  # once: the first use (see __init__)
        if forks is None or not forks.started:
            return None
        try:
            return await forks.spawn(entry, argv)
        except ForkServerUnavailable:
            return None

    def _worker_lost(self, worker: WorkerProcess) -> None:
        self._workers.pop(worker.worker_id, None)
        self._updates.forget(worker.worker_id)
        if worker is self._proxy and not worker.stopping:
            self._on_proxy_died()
        hosted = [rid for rid, replica in self._replicas.items() if replica.worker is worker]
        reaping = asyncio.get_running_loop().create_task(reap_lost(worker, hosted))
        self._reaping.add(reaping)  # (the loop keeps only a weak reference to a task)
        reaping.add_done_callback(self._reaping.discard)
        for replica_id in hosted:
            replica = self._replicas.pop(replica_id)
            if not worker.stopping:
                self._on_died(replica)

    async def start_replica(
        self, spec: ReplicaSpec, on_waiting: Callable[[str | None], None] | None = None
    ) -> ReplicaHandle:
        """``on_waiting`` is not called: this machine's ledger placed the replica."""
        import cloudpickle

        env = spec.config.ray_actor_options.runtime_env or {}
        self._replicas_started += 1
        if self._forks is not None and self._replicas_started == self._fork_server_after:
            self._forks.start()  # an instance of one replica never pays for its imports
        if self._forks is not None and self._forks.started and not env.get("env_vars"):
            path, cwd = spec.code.import_path(env)
            with contextlib.suppress(ForkServerUnavailable):  # then it is not forked either
                learned = self._imported.get((spec.app, spec.deployment), [])
                await self._forks.preload(spec.code.imports(), path, cwd, learned)
        worker = await self._spawn("replica", env.get("env_vars"), spec=spec)
        try:
            start = StartReplica(cloudpickle.dumps(spec))
            started: ReplicaStarted = await worker.request(start, TIMEOUTS.replica_start_s)
        except BaseException as exc:
            worker.stopping = True
            worker.process.kill()
            if isinstance(exc, TransportError | RequestTimeoutError | asyncio.CancelledError):
                raise
            notes = "".join(getattr(exc, "__notes__", []))
            raise startup_failed(spec.deployment, exc, notes) from exc
        if started.imported:  # the fork server imports them before the next replica's fork
            self._imported[(spec.app, spec.deployment)] = started.imported
        info = dataclasses.replace(started.info, node_id=self._node_of(worker))
        replica = self._replicas[spec.replica_id] = ProcessReplica(worker, info)
        return replica

    def _node_of(self, worker: WorkerProcess) -> str:
        """The node a worker runs on (ReplicaInfo.node_id): this machine."""
        return local_node_id()

    def _network_of(self, worker: WorkerProcess | None) -> NodeNetwork | None:
        """What ``worker`` (None: a process attached on this node) is told of replicas on
        other nodes (ConfigureProcess): nothing, all are on this machine."""
        return None

    async def publish(self, update: ReplicaSetUpdate) -> None:
        key = (update.app, update.deployment)
        if update.exists:
            self._membership[key] = update
        else:
            self._membership.pop(key, None)
        await self._updates.deliver([*self._workers.values(), *self._subscribers.values()], update)

    # --- the proxy -------------------------------------------------------------------

    @property
    def proxy_pid(self) -> int | None:
        return self._proxy.process.pid if self._proxy is not None else None

    @property
    def proxy_node_id(self) -> str:
        """The proxy is a process of this machine."""
        return local_node_id()

    def node_proxies(self) -> dict[str, NodeProxy]:
        """One machine, one node: its proxy is the only one (EveryNode is HeadOnly)."""
        return {}

    async def start_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None] | None = None
    ) -> tuple[str, int]:
        """Bind the HTTP port here (kept until shutdown) and start a proxy serving it.

        ``on_died`` is called when the proxy's process ends unexpectedly.
        """
        self._proxy_options = options
        if on_died is not None:
            self._on_proxy_died = on_died
        self._listener = bind_listener(options.host, options.port, self.shares_proxy_port)
        return await self._launch_proxy()

    async def restart_proxy(self) -> tuple[str, int]:
        """Replace the proxy: end the old one if it still runs (it is hung), then start
        another on the same socket, with the current replica sets and routes."""
        old = self._proxy
        if old is not None:
            old.stopping = True  # its end is expected now, not a death to report
            if old.process.poll() is None:
                old.process.kill()
            await old.wait_exit(TIMEOUTS.worker_exit_s)
        if self._listener is None and self._proxy_options is not None:
            # An adopted proxy held the socket: its port is free now that it is gone.
            options = self._proxy_options
            self._listener = bind_listener(options.host, options.port, self.shares_proxy_port)
        return await self._launch_proxy()

    async def _launch_proxy(self) -> tuple[str, int]:
        """Make the standby process the proxy (or a new one, if it is not there or does
        not start serving within ``TIMEOUTS.standby_proxy_start_s``); then prepare the next."""
        standby, self._standby = self._standby, None
        self._cancel_standby_timer()
        worker = await started(standby) if standby is not None else None
        if worker is not None:
            try:
                return await self._serve_with(worker, TIMEOUTS.standby_proxy_start_s)
            except (ShoalError, TransportError) as exc:
                logger.warning("the standby proxy process did not start serving: %s", exc)
        return await self._serve_with(await self._spawn_proxy_process(), TIMEOUTS.control_call_s)

    async def _serve_with(self, proxy: WorkerProcess, timeout_s: float) -> tuple[str, int]:
        """Start the proxy in ``proxy``'s process and give it the current routes."""
        assert self._proxy_options is not None
        try:
            start = StartProxy(self._proxy_options.model_dump())
            host, port = await proxy.request(start, timeout_s)
            routes = None  # the proxy waits for a first table before answering 404
            while routes is not self._routes:  # and routes published meanwhile
                routes = self._routes
                await proxy.request(RoutesUpdate(routes), timeout_s)
        except BaseException:
            proxy.stopping = True
            proxy.process.kill()
            raise
        self._proxy = proxy
        self._standby_timer = asyncio.get_running_loop().call_later(
            TIMEOUTS.standby_proxy_delay_s, self._spawn_standby
        )
        return host, port

    def _spawn_standby(self) -> None:
        self._standby_timer = None
        self._standby = asyncio.ensure_future(self._spawn_proxy_process())
        self._standby.add_done_callback(ignore_failure)  # a new one is spawned if needed

    def _cancel_standby_timer(self) -> None:
        if self._standby_timer is not None:
            self._standby_timer.cancel()
            self._standby_timer = None

    async def _spawn_proxy_process(self) -> WorkerProcess:
        assert self._listener is not None
        return await self._spawn("proxy", listen_fd=self._listener.fileno())

    async def check_proxy(self, timeout_s: float) -> None:
        """Return once the proxy's event loop answers; TransportError if it is gone,
        RequestTimeoutError if it did not answer within ``timeout_s``."""
        if self._proxy is None:
            raise TransportError("no proxy is running")
        await self._proxy.request(Ping(), timeout_s)

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """Install ``routes`` in the proxy (at most ``TIMEOUTS.update_ack_s`` of waiting); a
        proxy being replaced gets them when it starts."""
        self._routes = routes
        proxy = self._proxy
        if proxy is not None and not proxy.stopping:
            await self._updates.deliver([proxy], RoutesUpdate(routes))

    async def drain_proxy(self, timeout_s: float = 0.0) -> None:
        """Make the proxy answer new requests 503 (``Retry-After``), then wait at most
        ``timeout_s`` for the requests it had accepted to be answered."""
        if self._proxy is None:
            return
        try:
            await self._proxy.request(DrainProxy(), TIMEOUTS.update_ack_s)
            left = await self._proxy.request(
                ProxyIdle(timeout_s), timeout_s + TIMEOUTS.update_ack_s
            )
        except (ShoalError, TransportError) as exc:  # dead or hung: nothing to wait for
            logger.debug("the proxy did not drain: %s", exc)
            return
        if left:
            logger.warning("%d HTTP request(s) still in flight after %.1f s", left, timeout_s)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop the proxy, end every remaining worker, remove the socket directory."""
        self._cancel_standby_timer()
        if self._standby is not None:
            self._standby.cancel()  # if still spawning; a started one is a worker below
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
        if self._forks is not None:
            await self._forks.stop(TIMEOUTS.worker_exit_s)
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            remove_sockets(self.directory)
