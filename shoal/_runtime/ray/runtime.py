"""The Ray runtime: every replica a Ray actor, placed and supervised by Ray.

It is the multi-process runtime with one difference: a replica's worker is a
:class:`~.actor.WorkerActor` created with the deployment's ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``resources``, ``runtime_env``), on whichever node of
the cluster Ray chooses, instead of a child process of this one. Everything above
the seam (controller, routers, proxy, control messages, the data plane's sockets)
is the same, so requests never take Ray's task path: Unix sockets within a node,
TCP authenticated with the instance secret between nodes (see :mod:`.network`).
The proxy is a process of the controller's node; with ``proxy_location`` EveryNode
(the default) every other node runs one more, in an actor (see :mod:`.proxies`).
``docs/ray.md`` is the user's guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from shoal._config import TIMEOUTS, HTTPOptions
from shoal._errors import ConfigError, ShoalError
from shoal._observe.options import Telemetry
from shoal._runtime.process.adopt import Rejoined
from shoal._runtime.process.runtime import ProcessRuntime
from shoal._runtime.process.workers import WorkerProcess
from shoal._runtime.ray.actor import (
    ActorProcess,
    WorkerActor,
    actor_worker,
    remove_placement_group,
)
from shoal._runtime.ray.network import ClusterNetwork, forget_secret, instance_secret, keep_secret
from shoal._runtime.ray.proxies import NodeProxies, node_of
from shoal._seam.protocols import MetricsSink, ReplicaHandle
from shoal._seam.specs import NodeProxy, ReplicaSpec
from shoal._transport.auth import bound_address, join_host_port, serve_tcp
from shoal._transport.client import NetworkConnector, NodeNetwork
from shoal._transport.connection import Connection
from shoal._transport.messages import LoadReport, Rejoin, RoutesUpdate

logger = logging.getLogger("shoal.runtime")

#: The namespace of shoal's actors in the cluster.
NAMESPACE = "shoal"
#: How long Ray may take to place a replica's actor before it is listed as PENDING.
PLACEMENT_REPORT_S = 2.0
# A restarted controller waits (TIMEOUTS.ray_rejoin_wait_s), past its adoption window,
# for the actors Ray lists by name (its replicas and node proxies) to rejoin: those on
# other nodes rejoin over TCP, a busy machine may take seconds, and one that comes late
# is replaced.
_PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")
#: Connections tried through Ray Client (see ``_init_client``).
_CLIENT_ATTEMPTS = 3


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            'the Ray runtime needs Ray: pip install "shoal[ray]" (or ray[serve])'
        ) from None
    return ray


def connect(
    address: str | None, log_to_driver: bool = True, client: bool = False
) -> tuple[Any, bool]:
    """The ``ray`` module, connected to the cluster at ``address`` (see
    :class:`RayRuntime`) unless this process already is; and whether it connected here.

    ``client``: a Ray Client address (``ray://``) is accepted (only ``shoal start
    --ray``, which runs nothing of its own in this process, passes it); otherwise it is
    refused by name."""
    ray = import_ray()
    if not client:
        _refuse_ray_client(ray, address)
    if ray.is_initialized():
        return ray, False
    if ray_client_address(address):
        _init_client(ray, address)
        return ray, True
    # Ray's dashboard would take 8265, the admin API's port: a cluster that wants one
    # is started with `ray start`, not here.
    ray.init(
        address=address,
        namespace=NAMESPACE,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=log_to_driver,
    )
    return ray, True


def _init_client(ray: Any, address: str | None) -> None:
    """``ray.init`` through Ray Client, tried up to ``_CLIENT_ATTEMPTS`` times: Ray's
    per-connection server intermittently dies as it starts (ray-project/ray#63202, about
    1 connection in 13 on this machine; Ray reports it after about 40 s), and a new
    connection gets a new one. Other ``ray.init`` arguments would be handed to the
    cluster side's own ``ray.init``: none are passed."""
    for attempt in range(1, _CLIENT_ATTEMPTS + 1):
        try:
            ray.init(address=address, namespace=NAMESPACE)
            return
        except ConnectionAbortedError as exc:
            if attempt == _CLIENT_ATTEMPTS or not _client_server_died(str(exc)):
                raise
            logger.warning("Ray Client's server for this connection failed to start "
                           "(ray-project/ray#63202): connecting again")  # fmt: skip
            with contextlib.suppress(Exception):
                ray.shutdown()


def _client_server_died(message: str) -> bool:
    """Whether Ray Client's answer says its per-connection server died as it started: as
    Ray reports it, or as its proxier stumbles on it (it reads the command line of the
    process it started, which has just become a zombie: psutil.ZombieProcess)."""
    return "client server failed" in message or (
        "start_specific_server" in message and "ZombieProcess" in message
    )


def ray_client_address(address: str | None) -> str | None:
    """The Ray Client address (``ray://...``) that ``address``, else ``RAY_ADDRESS``,
    names; None if it names a cluster address (or nothing)."""
    target = address or os.environ.get("RAY_ADDRESS") or ""
    return target if target.startswith("ray://") else None


def _refuse_ray_client(ray: Any, address: str | None) -> None:
    """ConfigError for Ray Client (``ray://``, given or in ``RAY_ADDRESS``, or this
    process already connected so): an embedded controller (``serve.start``, ``shoal
    run``) and its proxy must run on a node of the cluster, where the replicas' actors
    connect back to them. ``shoal start --ray`` accepts it (see ``ray_controller``)."""
    target = ray_client_address(address) or ""
    connected = False
    if ray.is_initialized():
        with contextlib.suppress(Exception):  # no client module in this Ray
            from ray.util.client import ray as client

            connected = bool(client.is_connected())
    if target or connected:
        raise ConfigError(
            f"the Ray runtime does not support Ray Client (address {target or 'ray://...'!r}) "
            "here: this process would run shoal's controller, which must run on a node of "
            "the cluster, where the replicas connect back to it; start the server on the "
            "cluster from here with `shoal start --ray --address ray://HOST:PORT`, then "
            "deploy with `shoal deploy` on that node (docs/ray.md), or run this on a node "
            "of the cluster with address='auto' (or the GCS address, 'host:6379')"
        )


class RayRuntime(ProcessRuntime):
    """Replicas as Ray actors on a Ray cluster; the proxy and controller on this node."""

    # Actors waiting for Ray to place them must not hold up the others.
    spawn_slots = 256
    places_replicas = True

    def __init__(
        self,
        address: str | None = None,
        telemetry: Telemetry | None = None,
        directory: str | None = None,
        orphan_grace_s: float = 0.0,
        proxy_location: str = "EveryNode",
    ) -> None:
        """``address``: the cluster's (``auto``, ``host:port``; ``ray://`` is refused:
        see :func:`connect`); None: the cluster this process is connected to, or
        ``RAY_ADDRESS``'s, or a new local one, as ``ray.init()`` decides.
        ``proxy_location``: EveryNode (a proxy on every node), HeadOnly (on the
        controller's only) or Disabled (no proxy is started: the controller is not asked
        to)."""
        if proxy_location not in _PROXY_LOCATIONS:
            raise ConfigError(
                f"proxy_location={proxy_location!r}: expected one of {list(_PROXY_LOCATIONS)}"
            )
        super().__init__(directory, orphan_grace_s, telemetry, fork_server=False)
        self.rejoined = _RayRejoined(self._named_workers)
        # The head proxy's port is shared with the nodes' on a one-machine cluster.
        self.shares_proxy_port = proxy_location == "EveryNode"
        self._node_proxies: NodeProxies | None = None
        if proxy_location == "EveryNode":
            self._node_proxies = NodeProxies(
                self._spawn, lambda: self._routes, self._cluster_state, self._end_actors
            )
        self._address = address
        self._ray = import_ray()
        self._started_ray = False
        # The instance secret (a server's survives its restart: see .network).
        self._keeps_secret = directory is not None
        self._secret, self._control_port = instance_secret(directory)
        self._node_id = ""  # this process's Ray node, once connected
        self._node_ip = ""
        self._control_tcp: asyncio.AbstractServer | None = None
        self._cluster_network: ClusterNetwork | None = None
        # The routers of this process (driver handles): the node id is set once connected.
        self._network_connector = NetworkConnector("", self._secret)
        self.connector = self._network_connector
        self._actor_class: Any = None
        self._waiting: dict[str, Callable[[str | None], None]] = {}  # replica id -> on_waiting

    async def start(
        self,
        on_replica_died: Callable[[ReplicaHandle], None],
        on_load: Callable[[LoadReport], None],
        metrics: MetricsSink | None = None,
    ) -> None:
        await asyncio.to_thread(self._connect)
        await super().start(on_replica_died, on_load, metrics)
        await self._serve_control_tcp()

    async def _serve_control_tcp(self) -> None:
        """Listen for actors on other nodes: authenticated TCP on this node's address, on
        the port a server had before its restart if it is free (see .network)."""
        ip, server = self._node_ip, None
        for port in dict.fromkeys((self._control_port, 0)):
            try:
                server = await serve_tcp(ip, port, self._secret, self._on_control, "controller")
                break
            except OSError as exc:
                if not port:
                    raise ShoalError(
                        f"the controller cannot listen on {ip}, this node's address as Ray "
                        f"reports it: {exc}"
                    ) from exc
                logger.warning(
                    "the controller's TCP port %d is taken (%s): replicas on other nodes "
                    "cannot rejoin this server, and are replaced", port, exc,
                )  # fmt: skip
        assert server is not None
        self._control_tcp = server
        host, self._control_port = bound_address(server)
        if self._keeps_secret:
            keep_secret(self.directory, self._secret, self._control_port)
        address = join_host_port(host, self._control_port)
        self._cluster_network = ClusterNetwork(self._secret, self._node_id, address)

    def _connect(self) -> None:
        ray, self._started_ray = connect(self._address)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._node_ip = ray.util.get_node_ip_address()
        self._network_connector.node_id = self._node_id
        self._actor_class = ray.remote(WorkerActor)
        resources = ray.cluster_resources()
        logger.info(
            "connected to the Ray cluster: %d node(s), %g CPUs, %g GPUs",
            len([n for n in ray.nodes() if n.get("Alive")]),
            resources.get("CPU", 0.0),
            resources.get("GPU", 0.0),
        )

    async def _start_process(
        self,
        kind: str,
        argv: list[str],
        env_vars: dict[str, str] | None,
        listen_fd: int | None,
        spec: ReplicaSpec | None = None,
    ) -> WorkerProcess:
        if node_of(argv[1]) is not None:  # another node's proxy: an actor there
            return await self._place_node_proxy(argv)
        if kind != "replica" or spec is None:  # the proxy: a process of this node
            return await super()._start_process(kind, argv, env_vars, listen_fd, spec)
        directory, worker_id, orphan_grace_s = argv[0], argv[1], float(argv[2])
        options = actor_options(spec)
        if orphan_grace_s > 0:
            # A server's replica outlives it (Ray ends the actors a dead owner made), and
            # its restarted successor finds the actor by name to adopt it.
            options.update(lifetime="detached", name=worker_id, namespace=NAMESPACE)
        if spec.config.placement_group_bundles is not None:
            options["scheduling_strategy"] = self._placement_group(spec, worker_id, options)
        actor = self._actor_class.options(**options).remote(
            directory, worker_id, spec.replica_id, orphan_grace_s, self._cluster_network
        )
        on_waiting = self._waiting.get(spec.replica_id)
        try:
            placed = asyncio.wrap_future(actor.where.remote().future())
            done, _ = await asyncio.wait({placed}, timeout=PLACEMENT_REPORT_S)
            if not done and on_waiting is not None:
                on_waiting(await asyncio.to_thread(self._why_waiting, options))
            pid, node_id = await placed
        except BaseException:
            self._ray.kill(actor, no_restart=True)
            remove_placement_group(worker_id)
            raise
        if on_waiting is not None:
            on_waiting(None)
        return actor_worker(worker_id, ActorProcess(actor, pid, node_id, worker_id))

    def _placement_group(self, spec: ReplicaSpec, name: str, options: dict[str, Any]) -> Any:
        """A placement group of the deployment's bundles for one replica, named ``name``,
        whose actor runs in the first bundle (as Ray Serve does); it lives as long as the
        actor (a server's outlives the server, as its actors do)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        config = spec.config
        group = self._ray.util.placement_group(
            config.placement_group_bundles,
            strategy=config.placement_group_strategy or "PACK",
            name=name,
            lifetime=options.get("lifetime"),
        )
        return PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )

    def _why_waiting(self, options: dict[str, Any]) -> str:
        """Why Ray has not placed an actor with ``options`` yet, as Ray Serve says it."""
        demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
        demand = {key: amount for key, amount in demand.items() if amount}
        strategy = options.get("scheduling_strategy")
        if strategy is not None and hasattr(strategy, "placement_group"):
            demand["placement group bundles"] = strategy.placement_group.bundle_specs
        free = {k: round(v, 3) for k, v in self._ray.available_resources().items()
                if not k.startswith("node:") and k != "object_store_memory"}  # fmt: skip
        return (
            f"Ray has not placed its actor within {PLACEMENT_REPORT_S:g} s: each replica needs "
            f"{demand or 'no resources'}, the cluster has {free} free (waiting for resources, "
            "the cluster to scale up, or its runtime_env to be installed)"
        )

    async def start_replica(
        self, spec: ReplicaSpec, on_waiting: Callable[[str | None], None] | None = None
    ) -> ReplicaHandle:
        if on_waiting is not None:
            self._waiting[spec.replica_id] = on_waiting
        try:
            return await super().start_replica(spec)
        finally:
            self._waiting.pop(spec.replica_id, None)

    # --- proxies of the other nodes (EveryNode; see .proxies) --------------------------

    def _cluster_state(self) -> tuple[set[str], set[str]]:
        """The alive nodes of the cluster but this one, and the names of the node proxy
        actors in shoal's namespace (blocking: asks Ray's GCS)."""
        alive = {node["NodeID"] for node in self._ray.nodes() if node.get("Alive")}
        named = {
            actor["name"]
            for actor in self._ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == NAMESPACE and node_of(actor["name"]) is not None
        }
        return alive - {self._node_id}, named

    def _end_actors(self, names: list[str]) -> None:
        """End the actors of shoal's namespace named ``names`` (blocking)."""
        for name in names:
            with contextlib.suppress(Exception):  # already gone
                self._ray.kill(self._ray.get_actor(name, namespace=NAMESPACE), no_restart=True)

    async def _place_node_proxy(self, argv: list[str]) -> WorkerProcess:
        """The actor of a node's proxy (its worker id says which node), pinned there."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        directory, worker_id, orphan_grace_s = argv[0], argv[1], float(argv[2])
        node_id = node_of(worker_id) or ""
        options: dict[str, Any] = {
            "num_cpus": 0,
            "max_concurrency": 4,  # `where` and `wait` run while the worker's thread serves
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        }
        if orphan_grace_s > 0:  # a server's: outlives it, and its successor adopts it
            options.update(lifetime="detached", name=worker_id, namespace=NAMESPACE)
        actor = self._actor_class.options(**options).remote(
            directory, worker_id, "", orphan_grace_s, self._cluster_network
        )
        try:
            placed = asyncio.wrap_future(actor.where.remote().future())
            pid, _ = await asyncio.wait_for(placed, TIMEOUTS.ray_node_proxy_place_s)
        except BaseException:
            self._ray.kill(actor, no_restart=True)
            raise
        return actor_worker(worker_id, ActorProcess(actor, pid, node_id))

    async def start_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None] | None = None
    ) -> tuple[str, int]:
        """The head proxy, then (EveryNode) one on every other node, on the same port."""
        host, port = await super().start_proxy(options, on_died)
        if self._node_proxies is not None:
            self._node_proxies.start(options, port)
        return host, port

    def adopt_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None]
    ) -> tuple[str, int] | None:
        where = super().adopt_proxy(options, on_died)
        if where is not None and self._node_proxies is not None:
            self._node_proxies.start(options, where[1])
        return where

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """Install ``routes`` in every proxy, the nodes' included."""
        self._routes = routes
        proxies = [self._proxy] if self._proxy is not None else []
        if self._node_proxies is not None:
            proxies += self._node_proxies.serving()
        await self._updates.deliver([p for p in proxies if not p.stopping], RoutesUpdate(routes))

    async def drain_proxy(self, timeout_s: float = 0.0) -> None:
        """Every proxy drains at once (the nodes' stop being supervised first)."""
        if self._node_proxies is None:
            await super().drain_proxy(timeout_s)
            return
        nodes = self._node_proxies.drain(timeout_s)
        await asyncio.gather(super().drain_proxy(timeout_s), nodes)

    @property
    def proxy_node_id(self) -> str:
        return self._node_id or super().proxy_node_id

    def node_proxies(self) -> dict[str, NodeProxy]:
        return self._node_proxies.status() if self._node_proxies is not None else {}

    def _named_workers(self) -> set[str]:
        """The worker ids of the actors in shoal's namespace (a server's replicas and node
        proxies, which rejoin a restarted server; blocking: asks Ray's GCS)."""
        return {
            actor["name"]
            for actor in self._ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == NAMESPACE and actor["name"].startswith(_WORKER_KINDS)
        }

    def _adopt(self, conn: Connection, msg: Rejoin) -> None:
        """A node's proxy that rejoined a restarted controller is adopted (one per node:
        a duplicate is stopped); other workers as the process runtime adopts them."""
        assert isinstance(self.rejoined, _RayRejoined)
        self.rejoined.ids.add(msg.worker_id)
        node_id = node_of(msg.worker_id)
        if self._rejoined_again(conn, msg):
            return
        if node_id is None:
            super()._adopt(conn, msg)
            return
        try:  # by name only: a call to the actor would hold up this loop (other rejoins)
            actor = self._ray.get_actor(msg.worker_id, namespace=NAMESPACE)
        except Exception as exc:  # not an actor Ray knows (any more): nothing to adopt
            logger.warning("node proxy %s rejoined but Ray does not know it: %r",
                           msg.worker_id, exc)  # fmt: skip
            conn.close()
            return
        worker = actor_worker(msg.worker_id, ActorProcess(actor, msg.pid, node_id))
        self._watch_connection(worker, conn)
        self._workers[msg.worker_id] = worker
        nodes = self._node_proxies
        if msg.proxy is None or nodes is None or not nodes.adopt(node_id, worker):
            logger.info("stopping node proxy %s: not serving, or its node has one already",
                        msg.worker_id)  # fmt: skip
            worker.stopping = True
            worker.process.kill()
        self.rejoined.add()

    def _adopted_worker(self, msg: Rejoin) -> WorkerProcess:
        """A replica that rejoined is a detached actor, found by its name (its worker id);
        the proxy is a process of this node."""
        if msg.replica is None:
            return super()._adopted_worker(msg)
        actor = self._ray.get_actor(msg.worker_id, namespace=NAMESPACE)
        pid, node_id = msg.pid, msg.replica.node_id  # its worker says where it runs
        if not node_id:  # not said: ask the actor (blocks this loop, other rejoins wait)
            pid, node_id = self._ray.get(actor.where.remote(), timeout=TIMEOUTS.ray_adopt_lookup_s)
        return actor_worker(msg.worker_id, ActorProcess(actor, pid, node_id, msg.worker_id))

    def _node_of(self, worker: WorkerProcess) -> str:
        node_id: str = getattr(worker.process, "node_id", "") or super()._node_of(worker)
        return node_id

    def _network_of(self, worker: WorkerProcess | None) -> NodeNetwork | None:
        """The proxy and attached drivers, processes of this node, learn the secret over
        their Unix socket; an actor has it from Ray (its constructor), never over TCP."""
        if worker is not None and isinstance(worker.process, ActorProcess):
            return None
        return NodeNetwork(self._node_id, self._secret)

    async def shutdown(self, timeout_s: float) -> None:
        if self._node_proxies is not None:  # stopped, then their actors end with the rest
            await self._node_proxies.stop(timeout_s)
        await super().shutdown(timeout_s)
        if self._control_tcp is not None:
            self._control_tcp.close()
        if self._keeps_secret:
            forget_secret(self.directory)  # stopped: no replica is left to rejoin
        if self._started_ray:
            await asyncio.to_thread(self._ray.shutdown)


_WORKER_KINDS = ("replica-", "node-proxy-")


class _RayRejoined(Rejoined):
    """The process runtime's adoption window, then (at most ``TIMEOUTS.ray_rejoin_wait_s``) until
    every worker actor Ray lists by name has rejoined."""

    def __init__(self, named: Callable[[], set[str]]) -> None:
        super().__init__()
        self.named = named
        self.ids: set[str] = set()  # worker ids that rejoined

    async def settle(self, window_s: float) -> None:
        await super().settle(window_s)
        deadline = time.monotonic() + TIMEOUTS.ray_rejoin_wait_s
        try:
            missing = await asyncio.to_thread(self.named)
        except Exception as exc:  # Ray's GCS did not answer: the usual window only
            logger.warning("could not list shoal's actors: %r", exc)
            return
        while missing - self.ids and time.monotonic() < deadline:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())
        if missing - self.ids:
            late = sorted(missing - self.ids)
            logger.warning("%d actor(s) did not rejoin within %g s: %s", len(late),
                           TIMEOUTS.ray_rejoin_wait_s, ", ".join(late))  # fmt: skip


def actor_options(spec: ReplicaSpec) -> dict[str, Any]:
    """The options of a replica's actor, from its deployment's ``ray_actor_options``."""
    options = spec.config.ray_actor_options
    result: dict[str, Any] = {
        "num_cpus": options.num_cpus,
        "num_gpus": options.num_gpus,
        "resources": dict(options.resources),
        # `where` and `wait` must run while the worker's thread serves.
        "max_concurrency": 4,
    }
    runtime_env = _for_ray(options.runtime_env or {})
    if runtime_env:  # Ray applies it: pip, conda, remote working_dir, ...
        result["runtime_env"] = runtime_env
    for name in ("memory", "object_store_memory", "accelerator_type"):  # Ray-only options
        if getattr(options, name) is not None:
            result[name] = getattr(options, name)
    most = spec.config.max_replicas_per_node
    if most is not None:
        # As Ray Serve does: every node implicitly has 1 of each resource with this
        # prefix, so a replica taking 1/most of one lets at most `most` share a node.
        import importlib

        # Not in Ray's type stubs: read it from the module.
        prefix = importlib.import_module("ray._raylet").IMPLICIT_RESOURCE_PREFIX
        result["resources"][f"{prefix}{spec.app}:{spec.deployment}"] = 1 / most
    return result


def _for_ray(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """What of a replica's ``runtime_env`` Ray applies: all but the local (not URI)
    ``working_dir`` and ``py_modules``, which the replica puts on its path itself, as on
    the local runtime (``UserCode.prepare_imports``), and which Ray refuses for an actor."""
    env = {k: v for k, v in runtime_env.items() if k not in ("working_dir", "py_modules")}
    if "://" in str(runtime_env.get("working_dir", "")):
        env["working_dir"] = runtime_env["working_dir"]
    remote = [m for m in runtime_env.get("py_modules") or [] if "://" in str(m)]
    if remote:
        env["py_modules"] = remote
    return env
