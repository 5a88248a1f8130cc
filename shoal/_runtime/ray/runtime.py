"""The Ray runtime: every replica a Ray actor, placed and supervised by Ray.

It is the multi-process runtime with one difference: a replica's worker is a
:class:`~.actor.WorkerActor` created with the deployment's ``ray_actor_options``
(``num_cpus``, ``num_gpus``, ``resources``, ``runtime_env``), on whichever node of
the cluster Ray chooses, instead of a child process of this one. Everything above
the seam (controller, routers, proxy, control messages, the data plane's sockets)
is the same, so requests never take Ray's task path. The proxy is a process of
the driver's node (``proxy_location`` ``HeadOnly``). ``docs/ray.md`` is the
user's guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any

from shoal._errors import ConfigError
from shoal._observe.options import Telemetry
from shoal._runtime.process.runtime import ProcessRuntime
from shoal._runtime.process.workers import WorkerProcess
from shoal._runtime.ray.actor import ActorProcess, WorkerActor
from shoal._seam.protocols import MetricsSink, ReplicaHandle
from shoal._seam.specs import ReplicaSpec
from shoal._transport.messages import LoadReport

logger = logging.getLogger("shoal.runtime")

#: The namespace of shoal's actors in the cluster.
NAMESPACE = "shoal"
#: How long Ray may take to place a replica's actor before it is listed as PENDING.
PLACEMENT_REPORT_S = 2.0


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            'the Ray runtime needs Ray: pip install "shoal[ray]" (or ray[serve])'
        ) from None
    return ray


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

    def _connect(self) -> None:
        ray = self._ray
        if not ray.is_initialized():
            # Ray's dashboard would take 8265, the admin API's port: a cluster that
            # wants one is started with `ray start`, not here.
            ray.init(
                address=self._address,
                namespace=NAMESPACE,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=True,
            )
            self._started_ray = True
        self._refuse_other_machines()
        self._actor_class = ray.remote(WorkerActor)
        resources = ray.cluster_resources()
        logger.info(
            "connected to the Ray cluster: %d node(s), %g CPUs, %g GPUs",
            len([n for n in ray.nodes() if n.get("Alive")]),
            resources.get("CPU", 0.0),
            resources.get("GPU", 0.0),
        )

    def _refuse_other_machines(self) -> None:
        """A ConfigError if a node of the cluster runs on another machine: replicas and
        routers still talk over this machine's Unix sockets (authenticated TCP between
        machines, ``shoal._transport.auth``, is not wired in yet)."""
        ray = self._ray
        here = {"127.0.0.1", "localhost", ray.util.get_node_ip_address()}
        with contextlib.suppress(OSError):
            here.add(socket.gethostbyname(socket.gethostname()))
        remote = sorted(
            node["NodeManagerAddress"]
            for node in ray.nodes()
            if node.get("Alive") and node["NodeManagerAddress"] not in here
        )
        if remote:
            if self._started_ray:
                ray.shutdown()
            raise ConfigError(
                f"the Ray cluster has nodes on other machines ({', '.join(remote)}): shoal's "
                "Ray runtime runs on clusters whose nodes share this machine for now "
                "(issue 13; docs/ray.md)"
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
        directory, worker_id = argv[0], argv[1]
        options = actor_options(spec)
        actor = self._actor_class.options(**options).remote(directory, worker_id, spec.replica_id)
        on_waiting = self._waiting.get(spec.replica_id)
        try:
            placed = asyncio.wrap_future(actor.where.remote().future())
            done, _ = await asyncio.wait({placed}, timeout=PLACEMENT_REPORT_S)
            if not done and on_waiting is not None:
                on_waiting(await asyncio.to_thread(self._why_waiting, options))
            pid, node_id = await placed
        except BaseException:
            self._ray.kill(actor, no_restart=True)
            raise
        if on_waiting is not None:
            on_waiting(None)
        process = ActorProcess(actor, pid, node_id)
        return WorkerProcess(worker_id, process, process.exited)

    def _why_waiting(self, options: dict[str, Any]) -> str:
        """Why Ray has not placed an actor with ``options`` yet, as Ray Serve says it."""
        demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
        demand = {key: amount for key, amount in demand.items() if amount}
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

    def _node_of(self, worker: WorkerProcess) -> str:
        node_id: str = getattr(worker.process, "node_id", "") or super()._node_of(worker)
        return node_id

    async def shutdown(self, timeout_s: float) -> None:
        await super().shutdown(timeout_s)
        if self._started_ray:
            await asyncio.to_thread(self._ray.shutdown)


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
    if options.runtime_env:
        result["runtime_env"] = dict(options.runtime_env)
    return result
