"""Proxies on every node of a Ray cluster (``proxy_location: EveryNode``, the default).

The controller's node has the proxy of the process runtime (a process that serves a
listening socket the controller keeps, supervised by the controller). Every other
alive node gets one more: a :class:`~shoal._runtime.ray.actor.WorkerActor` pinned to
it (``NodeAffinitySchedulingStrategy``, hard; ``num_cpus=0``), whose worker receives
the same messages as the head proxy (the replica sets, ``StartProxy``,
``RoutesUpdate``), so each has its own routers. It binds the HTTP port itself, with
``SO_REUSEPORT``: the nodes of a one-machine cluster share 127.0.0.1, and the kernel
spreads new connections over their proxies (the head proxy's socket sets it too).

:class:`NodeProxies` supervises them, as the controller does the head proxy: one
whose actor dies (its control connection closes) or whose event loop has not answered
a ``Ping`` for ``TIMEOUTS.proxy_check_timeout_s`` is replaced on the same node; Ray's
node table is read every ``TIMEOUTS.ray_nodes_poll_s``: a node that joins gets a
proxy, a node that left loses its entry. A restarted ``shoal start --ray`` server
adopts the node proxies that rejoin it (detached actors, named by their worker id): it
waits up to ``TIMEOUTS.ray_rejoin_wait_s`` for a node's proxy actor that Ray still
lists to rejoin before it ends that actor and starts another, and stops any duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal._config import TIMEOUTS, HTTPOptions
from shoal._errors import ShoalError, TransportError
from shoal._runtime.process.workers import WorkerProcess
from shoal._seam.specs import NodeProxy
from shoal._transport.messages import (
    DrainProxy,
    Ping,
    ProxyIdle,
    RoutesUpdate,
    StartProxy,
    StopReplica,
)

logger = logging.getLogger("shoal.runtime")

#: Worker ids of node proxies: ``node-proxy-<Ray node id>-<8 hex digits>``.
NODE_PROXY = "node-proxy"
_RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)

STARTING, HEALTHY, UNHEALTHY, DRAINING = "STARTING", "HEALTHY", "UNHEALTHY", "DRAINING"


def node_proxy_kind(node_id: str) -> str:
    """The worker kind of the proxy of node ``node_id`` (its worker id's prefix)."""
    return f"{NODE_PROXY}-{node_id}"


def node_of(worker_id: str) -> str | None:
    """The node of a node proxy's worker id; None if ``worker_id`` is not a node proxy's."""
    prefix = f"{NODE_PROXY}-"
    if not worker_id.startswith(prefix):
        return None
    return worker_id[len(prefix) :].rsplit("-", 1)[0]


@dataclass
class _Entry:
    """One node's proxy: its worker once it serves, and what supervises it."""

    node_id: str
    state: str = STARTING
    worker: WorkerProcess | None = None
    task: asyncio.Task[None] | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event)


class NodeProxies:
    """The proxies of the nodes other than the controller's, and their supervision."""

    def __init__(
        self,
        spawn: Callable[[str], Awaitable[WorkerProcess]],
        routes: Callable[[], dict[str, tuple[str, str]]],
        cluster: Callable[[], tuple[set[str], set[str]]],
        end_actors: Callable[[list[str]], None],
    ) -> None:
        """``spawn(kind)``: a worker of that kind (:func:`node_proxy_kind`) placed on its
        node, said hello, with the replica sets applied; ``routes()``: the current route
        table; ``cluster()``: the alive nodes but the controller's, and the worker ids of
        the node proxy actors Ray lists by name (a server's); ``end_actors(worker_ids)``
        ends those actors. Both block (they ask Ray's GCS): they run on a thread."""
        self._spawn = spawn
        self._routes = routes
        self._cluster = cluster
        self._end_actors = end_actors
        self._started_at = 0.0
        self._entries: dict[str, _Entry] = {}
        self._options: dict[str, Any] | None = None  # StartProxy's, once started
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = False

    # --- what the runtime asks ------------------------------------------------------

    def status(self) -> dict[str, NodeProxy]:
        """Every node's proxy but the controller's, by node id."""
        if self._options is None:
            return {}
        host, port = self._options["host"], self._options["port"]
        return {
            node: NodeProxy(host, port, e.state, e.worker.process.pid if e.worker else None)
            for node, e in self._entries.items()
        }

    def serving(self) -> list[WorkerProcess]:
        """The node proxies that serve (route tables go to them)."""
        return [e.worker for e in self._entries.values() if e.worker is not None]

    def start(self, options: HTTPOptions, port: int) -> None:
        """Start a proxy on every other node, on ``port`` (the head proxy's, bound), and
        keep them there. Node proxies serve HTTP only (gRPC: the head proxy)."""
        if self._options is not None or self._stopped:
            return
        http = options.model_dump(exclude={"grpc_options"})
        self._options = {**http, "port": port}
        self._started_at = asyncio.get_running_loop().time()
        for entry in self._entries.values():  # adopted before the proxy options were known
            entry.task = asyncio.ensure_future(self._keep(entry))
        self._watcher = asyncio.ensure_future(self._watch_nodes())

    def adopt(self, node_id: str, worker: WorkerProcess) -> bool:
        """Take over the proxy of ``node_id`` that rejoined a restarted controller (one
        that was starting there meanwhile is ended); False if that node has one serving
        already (the caller stops this one)."""
        entry = self._entries.get(node_id)
        if self._stopped or (entry is not None and entry.worker is not None):
            return False
        if entry is not None and entry.task is not None:
            entry.task.cancel()  # a proxy being started there is ended (see _start_one)
        entry = self._entries[node_id] = _Entry(node_id, HEALTHY, worker)
        if self._options is not None:
            entry.task = asyncio.ensure_future(self._keep(entry))
        return True

    # --- supervision -----------------------------------------------------------------

    async def _watch_nodes(self) -> None:
        """Follow Ray's node table: a proxy for each node that joins, none for one that
        left."""
        while True:
            try:
                nodes, named = await asyncio.to_thread(self._cluster)
                await self._follow(nodes, named)
            except Exception as exc:  # Ray's GCS did not answer: try again later
                logger.warning("could not read Ray's node table: %r", exc)
            await asyncio.sleep(TIMEOUTS.ray_nodes_poll_s)

    async def _follow(self, nodes: set[str], named: set[str]) -> None:
        """Start a proxy on each node of ``nodes`` that has none, unless one of ``named``
        (node proxy actors Ray still lists) may still rejoin; forget the nodes that left."""
        waited = asyncio.get_running_loop().time() - self._started_at
        for node in nodes - self._entries.keys():
            stale = [worker_id for worker_id in named if node_of(worker_id) == node]
            if stale and waited < TIMEOUTS.ray_rejoin_wait_s:
                continue  # the proxy a controller before this one started may rejoin
            if stale:
                logger.warning("node proxy %s did not rejoin: replacing it", ", ".join(stale))
                await asyncio.to_thread(self._end_actors, stale)
            entry = self._entries[node] = _Entry(node)
            entry.task = asyncio.ensure_future(self._keep(entry))
        for node in self._entries.keys() - nodes:
            self._forget(node)

    def _forget(self, node_id: str) -> None:
        """The node left the cluster: its proxy (gone with it) is no longer listed."""
        entry = self._entries.pop(node_id, None)
        if entry is None:
            return
        logger.info("node %s left the cluster: its proxy is no longer supervised", node_id)
        if entry.task is not None:
            entry.task.cancel()
        if entry.worker is not None:
            entry.worker.stopping = True
            entry.worker.process.kill()

    async def _keep(self, entry: _Entry) -> None:
        """Keep a serving proxy on ``entry``'s node: start one (with backoff while that
        fails), watch it, replace it when it dies or hangs."""
        for failures in itertools.count():
            if entry.worker is None:
                entry.state = STARTING
                try:
                    entry.worker = await self._start_one(entry.node_id)
                except Exception as exc:  # Ray's errors too: the node may be leaving
                    entry.state = UNHEALTHY
                    delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
                    logger.warning(
                        "the proxy of node %s failed to start (%r); retrying in %g s",
                        entry.node_id, exc, delay,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                logger.info("the proxy of node %s serves", entry.node_id)
            entry.state = HEALTHY
            why = await self._until_unhealthy(entry, entry.worker)
            logger.warning("the proxy of node %s is unhealthy: %s; replacing it",
                           entry.node_id, why)  # fmt: skip
            entry.state = UNHEALTHY
            worker, entry.worker = entry.worker, None
            worker.stopping = True
            worker.process.kill()
            with contextlib.suppress(Exception):
                await worker.wait_exit(TIMEOUTS.worker_exit_s)

    async def _until_unhealthy(self, entry: _Entry, worker: WorkerProcess) -> str:
        """Return why, once ``worker`` died or its event loop did not answer a ping."""
        entry.died.clear()
        if worker.conn is None or worker.conn.closed:
            return "its actor died"
        worker.conn.close_callbacks.append(lambda _conn: entry.died.set())
        while True:
            try:
                await asyncio.wait_for(entry.died.wait(), TIMEOUTS.proxy_check_period_s)
                return "its actor died"
            except TimeoutError:
                try:
                    await worker.request(Ping(), TIMEOUTS.proxy_check_timeout_s)
                except (ShoalError, TransportError) as exc:
                    return f"it did not answer its health check ({exc})"

    async def _start_one(self, node_id: str) -> WorkerProcess:
        """A new proxy on ``node_id``, serving the current routes."""
        assert self._options is not None
        worker = await self._spawn(node_proxy_kind(node_id))
        try:
            await worker.request(StartProxy(self._options, True), TIMEOUTS.control_call_s)
            routes = None  # the proxy waits for a first table before answering 404
            while routes is not self._routes():  # and tables published meanwhile
                routes = self._routes()
                await worker.request(RoutesUpdate(routes), TIMEOUTS.control_call_s)
        except BaseException:
            worker.stopping = True
            worker.process.kill()
            raise
        return worker

    # --- shutdown ----------------------------------------------------------------------

    def _stop_supervising(self) -> None:
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
        for entry in self._entries.values():
            if entry.task is not None:
                entry.task.cancel()
            if entry.worker is not None:
                entry.worker.stopping = True  # its end is expected now

    async def drain(self, timeout_s: float) -> None:
        """Stop supervising; make every node proxy answer new requests 503, then wait at
        most ``timeout_s`` for those it accepted (as the head proxy's drain)."""
        self._stop_supervising()
        entries = list(self._entries.values())
        await asyncio.gather(*(self._drain_one(entry, timeout_s) for entry in entries))

    async def _drain_one(self, entry: _Entry, timeout_s: float) -> None:
        if entry.worker is None:
            return
        entry.state = DRAINING
        try:
            await entry.worker.request(DrainProxy(), TIMEOUTS.update_ack_s)
            await entry.worker.request(ProxyIdle(timeout_s), timeout_s + TIMEOUTS.update_ack_s)
        except (ShoalError, TransportError) as exc:  # dead or hung: nothing to wait for
            logger.debug("the proxy of node %s did not drain: %s", entry.node_id, exc)

    async def stop(self, timeout_s: float) -> None:
        """Stop every node proxy (its actor is ended by the runtime's shutdown)."""
        self._stop_supervising()
        workers = self.serving()
        stop = StopReplica(0.0, timeout_s)
        results = await asyncio.gather(
            *(worker.request(stop, timeout_s) for worker in workers), return_exceptions=True
        )
        for worker, result in zip(workers, results, strict=True):
            if isinstance(result, BaseException):
                logger.debug("node proxy %s did not stop cleanly: %r", worker.worker_id, result)
