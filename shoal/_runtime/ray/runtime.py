"""The Ray runtime: every replica a Ray actor, placed and supervised by Ray.

It is the multi-process runtime with one difference: a replica's worker is a
:class:`~.actor.WorkerActor` created with the deployment's ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``resources``, ``runtime_env``), on whichever node of
the cluster Ray chooses, instead of a child process of this one. Everything above
the seam (controller, routers, proxy, control messages, the data plane's sockets)
is the same, so requests never take Ray's task path: Unix sockets within a node,
TCP authenticated with the instance secret between nodes (see :mod:`.network`).
The proxy is a process of the driver's node (``proxy_location`` ``HeadOnly``).
``docs/ray.md`` is the user's guide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from shoal._errors import ConfigError, ShoalError
from shoal._observe.options import Telemetry
from shoal._runtime.process.runtime import ProcessRuntime
from shoal._runtime.process.workers import WorkerProcess
from shoal._runtime.ray.actor import ActorProcess, WorkerActor, remove_placement_group
from shoal._runtime.ray.network import ClusterNetwork, forget_secret, instance_secret, keep_secret
from shoal._seam.protocols import MetricsSink, ReplicaHandle
from shoal._seam.specs import ReplicaSpec
from shoal._transport.auth import bound_address, join_host_port, serve_tcp
from shoal._transport.client import NetworkConnector, NodeNetwork
from shoal._transport.messages import LoadReport, Rejoin

logger = logging.getLogger("shoal.runtime")

#: The namespace of shoal's actors in the cluster.
NAMESPACE = "shoal"
#: How long Ray may take to place a replica's actor before it is listed as PENDING.
PLACEMENT_REPORT_S = 2.0
#: How long a restarted controller waits for Ray to say where an actor that rejoined is.
_ADOPT_LOOKUP_S = 5.0


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            'the Ray runtime needs Ray: pip install "shoal[ray]" (or ray[serve])'
        ) from None
    return ray


def connect(address: str | None, log_to_driver: bool = True) -> tuple[Any, bool]:
    """The ``ray`` module, connected to the cluster at ``address`` (see
    :class:`RayRuntime`) unless this process already is; and whether it connected here."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
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
    ) -> None:
        """``address``: the cluster's (``auto``, ``ray://host:port``, ``host:port``);
        None: the cluster this process is connected to, or ``RAY_ADDRESS``'s, or a new
        local one, as ``ray.init()`` decides."""
        super().__init__(directory, orphan_grace_s, telemetry, fork_server=False)
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
        return _actor_worker(worker_id, ActorProcess(actor, pid, node_id, worker_id))

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

    def _adopted_worker(self, msg: Rejoin) -> WorkerProcess:
        """A replica that rejoined is a detached actor, found by its name (its worker id);
        the proxy is a process of this node."""
        if msg.replica is None:
            return super()._adopted_worker(msg)
        actor = self._ray.get_actor(msg.worker_id, namespace=NAMESPACE)
        # Once per adopted replica, while a restarted controller recovers.
        pid, node_id = self._ray.get(actor.where.remote(), timeout=_ADOPT_LOOKUP_S)
        return _actor_worker(msg.worker_id, ActorProcess(actor, pid, node_id, msg.worker_id))

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
        await super().shutdown(timeout_s)
        if self._control_tcp is not None:
            self._control_tcp.close()
        if self._keeps_secret:
            forget_secret(self.directory)  # stopped: no replica is left to rejoin
        if self._started_ray:
            await asyncio.to_thread(self._ray.shutdown)


def _actor_worker(worker_id: str, process: ActorProcess) -> WorkerProcess:
    """The runtime's handle on a worker actor. Once Ray reports the actor dead (killed,
    its node lost), its control connection is dropped: a TCP connection to a lost node
    would not close by itself, and its close is how the runtime learns of the end."""
    worker = WorkerProcess(worker_id, process, process.exited)

    def ended(_exited: asyncio.Future[int]) -> None:
        if worker.conn is not None:
            worker.conn.abort()

    process.exited.add_done_callback(ended)
    return worker


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
    if options.runtime_env:  # Ray applies it: pip, conda, remote working_dir, ...
        result["runtime_env"] = dict(options.runtime_env)
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
