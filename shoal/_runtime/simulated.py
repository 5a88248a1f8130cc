"""A simulated cluster in memory: a capacity-planning and testing tool, never for serving.

``create_runtime("simulated", nodes=100)`` gives the real controller a runtime whose
replicas are cheap objects spread over ``nodes`` simulated nodes (``ReplicaInfo.node_id``
names theirs), so that the control plane can be measured at cluster sizes this machine
could never run (``bench/scale.py``, ``tests/test_scale.py``, ``docs/scaling.md``).
Replicas run no user code: a call returns ``Result(None)``, pings and health checks
succeed at once (after one turn of the event loop, as a reply would).

What is simulated, process by process, as the multi-process and Ray runtimes have them:

- **one process per replica plus one proxy per node**, each with its own
  :class:`RouterRegistry` (2,000 replicas on 100 nodes: 2,100 registries, plus the
  controller's own);
- **publish**: every replica-set update goes to every one of those processes. The
  frame is encoded with the real codec (``shoal._transport.codec.encode``) once per
  recipient, as ``ProcessRuntime._deliver`` does (``conn.call`` per target), or once
  per update (``encode="per_update"``, what a shared frame would cost); messages and
  bytes are counted per recipient. The frames are identical, so the simulation
  decodes one (timed: each recipient pays that in its own process, in parallel) and
  every registry applies the decoded update (``RouterRegistry.apply``, for real);
- **a new process** first gets every current replica set (the process runtime's
  snapshot before ``StartReplica``): counted as catch-up messages;
- **placement**: each node has ``cpus_per_node`` CPUs; a replica goes to the node
  with the most free CPUs that fits its ``num_cpus`` (spread). One that fits nowhere
  waits, PENDING with the reason (``on_waiting``), until a replica stops;
- **failures**: :meth:`SimulatedRuntime.crash_replica` (its process died) and
  :meth:`SimulatedRuntime.fail_node` (every replica on it, and its proxy, gone).

Everything runs on the controller's event loop, one CPU: a delivery's wall time is the
sum of every recipient's work, where a real cluster does it in parallel. Each
:class:`UpdateStats` therefore splits the controller's share (encoding) from the
recipients' (decoding, applying).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal._errors import ConfigError, NotFoundError, TransportError
from shoal._router.router import RouterRegistry
from shoal._runtime.without_proxy import WithoutProxy
from shoal._seam.clients import ClosableClient
from shoal._seam.protocols import MetricsSink, ReplicaHandle
from shoal._seam.specs import ReplicaSpec
from shoal._transport.codec import HEADER, HEADER_SIZE, decode, encode
from shoal._transport.messages import (
    LoadReport,
    Message,
    ReplicaInfo,
    ReplicaSetUpdate,
    Request,
    Result,
)

ENCODINGS = ("per_recipient", "per_update")


@dataclass
class UpdateStats:
    """What one replica-set update cost (times in seconds, from ``time.perf_counter``)."""

    app: str
    deployment: str
    replicas: int  # in the set
    messages: int  # one per recipient process
    bytes: int  # all frames together
    frame_bytes: int  # one frame
    encode_s: float  # the controller's process: every frame it encoded
    decode_s: float  # one recipient decoding its frame
    apply_s: float  # every registry applying it (serially here)
    started: float
    ended: float  # every registry has applied it


@dataclass
class _Process:
    """A simulated process holding routers: a replica's, or a node's proxy."""

    process_id: str
    node_id: str
    registry: RouterRegistry


@dataclass
class _Node:
    node_id: str
    address: str  # its IP, in the replicas' tcp_address
    cpus: float
    free_cpus: float
    replicas: set[str] = field(default_factory=set)
    alive: bool = True


class _SimClient(ClosableClient):
    """A connection from a router to a simulated replica."""

    def __init__(self, replica: SimulatedReplica) -> None:
        super().__init__(replica.info.replica_id)

    def call(self, request: Request) -> asyncio.Future[Message]:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self.closed:
            future.set_exception(TransportError(f"replica {self.replica_id} is gone"))
        else:
            future.set_result(Result(None))
        return future

    def stream(self, request: Request) -> Any:
        raise NotFoundError("simulated replicas do not stream")


class SimulatedReplica:
    """ReplicaHandle of a simulated replica: answers at once, runs no user code."""

    def __init__(self, runtime: SimulatedRuntime, info: ReplicaInfo, cpus: float) -> None:
        self.info = info
        self.pid: int | None = None
        self.cpus = cpus
        self.clients: list[_SimClient] = []
        self._runtime = runtime

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None:
        await asyncio.sleep(0)

    async def check_health(self, timeout_s: float) -> dict[str, Any] | None:
        await asyncio.sleep(0)  # a reply takes at least one turn of the loop
        return None

    async def ping(self, timeout_s: float) -> None:
        await asyncio.sleep(0)

    async def autoscaling_stats(self, timeout_s: float) -> dict[str, float] | None:
        return None

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        self._runtime.remove(self)

    def kill(self) -> None:
        self._runtime.crash_replica(self.info.replica_id)


class SimulatedRuntime(WithoutProxy):
    """Runtime over ``nodes`` simulated nodes (see the module's docstring)."""

    no_proxy_message = "the simulated runtime serves no HTTP"

    supports_http = False  # the per-node proxies only hold routers: nothing listens
    places_replicas = True  # the simulated cluster places replicas, per node

    def __init__(
        self, nodes: int = 100, cpus_per_node: float = 64.0, encode: str = "per_recipient"
    ) -> None:
        if not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"simulated runtime: nodes must be an integer >= 1, got {nodes!r}")
        if cpus_per_node <= 0:
            raise ConfigError(
                f"simulated runtime: cpus_per_node must be > 0, got {cpus_per_node!r}"
            )
        if encode not in ENCODINGS:
            raise ConfigError(
                f"simulated runtime: encode must be one of {', '.join(ENCODINGS)}, got {encode!r}"
            )
        self.encoding = encode
        self.nodes = {
            f"sim-node-{i:04d}": _Node(f"sim-node-{i:04d}", f"10.{i // 65536}.{i // 256 % 256}"
                                       f".{i % 256}", float(cpus_per_node), float(cpus_per_node))
            for i in range(nodes)
        }  # fmt: skip
        self.replicas: dict[str, SimulatedReplica] = {}
        self.processes: dict[str, _Process] = {}
        self.membership: dict[tuple[str, str], ReplicaSetUpdate] = {}
        self._decoded: dict[tuple[str, str], ReplicaSetUpdate] = {}  # as recipients read it
        self._frame_bytes: dict[tuple[str, str], int] = {}
        self.updates: list[UpdateStats] = []  # every replica-set update delivered
        self.catch_up_messages = 0  # current sets sent to a process before it serves
        self.catch_up_bytes = 0
        self.connections = 0  # made by routers (they connect once used)
        self.connector = self
        self._on_died: Callable[[ReplicaHandle], None] = lambda handle: None
        self._freed: asyncio.Event | None = None
        self._watchers: list[tuple[Callable[[ReplicaSetUpdate], bool], asyncio.Future[float]]] = []
        self._corr = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the seam ------------------------------------------------------------------

    async def start(
        self,
        on_replica_died: Callable[[ReplicaHandle], None],
        on_load: Callable[[LoadReport], None],
        metrics: MetricsSink | None = None,
    ) -> None:
        """Start the nodes' proxies (router holders). Load and metrics reports of the
        simulated processes are not simulated: their routers report nothing."""
        self._on_died = on_replica_died
        self._loop = asyncio.get_running_loop()
        self._freed = asyncio.Event()
        for node in self.nodes.values():
            self._add_process(f"proxy@{node.node_id}", node.node_id)

    async def start_replica(
        self, spec: ReplicaSpec, on_waiting: Callable[[str | None], None] | None = None
    ) -> ReplicaHandle:
        cpus = spec.config.ray_actor_options.num_cpus
        node = self._place(cpus)
        if node is None:
            assert self._freed is not None
            while node is None:
                if on_waiting is not None:
                    on_waiting(self._shortage(cpus))
                self._freed.clear()
                await self._freed.wait()
                node = self._place(cpus)
            if on_waiting is not None:
                on_waiting(None)
        node.free_cpus -= cpus
        node.replicas.add(spec.replica_id)
        info = ReplicaInfo(
            spec.replica_id,
            f"/tmp/shoal-1000/{node.node_id}/replica-{spec.replica_id[-6:]}.sock",
            spec.config.max_ongoing_requests,
            node.node_id,
            f"{node.address}:{20000 + len(node.replicas)}",
        )
        replica = self.replicas[spec.replica_id] = SimulatedReplica(self, info, cpus)
        self._add_process(spec.replica_id, node.node_id)
        await asyncio.sleep(0)  # the start's reply
        return replica

    async def connect(self, info: ReplicaInfo) -> _SimClient:
        replica = self.replicas.get(info.replica_id)
        if replica is None:
            raise TransportError(f"replica {info.replica_id} is not running")
        client = _SimClient(replica)
        replica.clients.append(client)
        self.connections += 1
        return client

    async def publish(self, update: ReplicaSetUpdate) -> None:
        """Deliver ``update`` to every simulated process (see the module's docstring)."""
        key = (update.app, update.deployment)
        stats, decoded = self._deliver(update, list(self.processes.values()))
        if update.exists:
            self.membership[key] = update
            self._decoded[key], self._frame_bytes[key] = decoded, stats.frame_bytes
        else:
            for table in (self.membership, self._decoded, self._frame_bytes):
                table.pop(key, None)
        self.updates.append(stats)
        for watcher in list(self._watchers):
            predicate, future = watcher
            if not future.done() and predicate(update):
                future.set_result(stats.ended)
                self._watchers.remove(watcher)
        await asyncio.sleep(0)  # the acknowledgements

    async def shutdown(self, timeout_s: float) -> None:
        for replica in list(self.replicas.values()):
            self.remove(replica)
        self.processes.clear()

    # --- simulation ------------------------------------------------------------------

    def when_applied(self, predicate: Callable[[ReplicaSetUpdate], bool]) -> asyncio.Future[float]:
        """A future of the ``time.perf_counter()`` at which every process had applied the
        first update from now on for which ``predicate(update)`` is true."""
        assert self._loop is not None
        future: asyncio.Future[float] = self._loop.create_future()
        self._watchers.append((predicate, future))
        return future

    def crash_replica(self, replica_id: str) -> None:
        """The replica's process dies: routers lose their connections, the controller
        hears of it (``on_replica_died``)."""
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise NotFoundError(f"no simulated replica {replica_id!r}")
        self.remove(replica)
        self._on_died(replica)

    def fail_node(self, node_id: str) -> list[str]:
        """Node ``node_id`` is lost: its replicas die, its proxy is gone, nothing more is
        placed there. Returns the ids of the replicas that died."""
        node = self.nodes.get(node_id)
        if node is None or not node.alive:
            raise NotFoundError(f"no live simulated node {node_id!r}")
        node.alive = False
        self.processes.pop(f"proxy@{node_id}", None)
        died = sorted(node.replicas)
        for replica_id in died:
            self.crash_replica(replica_id)
        return died

    def remove(self, replica: SimulatedReplica) -> None:
        """The replica ended: its node's CPUs are free again, its process is gone."""
        replica_id = replica.info.replica_id
        if self.replicas.pop(replica_id, None) is None:
            return
        self.processes.pop(replica_id, None)
        node = self.nodes[replica.info.node_id]
        node.replicas.discard(replica_id)
        node.free_cpus = min(node.cpus, node.free_cpus + replica.cpus)
        for client in replica.clients:
            client.close()
        if self._freed is not None:
            self._freed.set()

    def registries(self) -> list[RouterRegistry]:
        """The registry of every simulated process."""
        return [process.registry for process in self.processes.values()]

    # --- internals -------------------------------------------------------------------

    def _place(self, cpus: float) -> _Node | None:
        """The node with the most free CPUs that fits, then the fewest replicas (spread)."""
        fits = [n for n in self.nodes.values() if n.alive and n.free_cpus + 1e-9 >= cpus]
        return max(fits, key=lambda n: (n.free_cpus, -len(n.replicas)), default=None)

    def _shortage(self, cpus: float) -> str:
        alive = [node for node in self.nodes.values() if node.alive]
        most = max((node.free_cpus for node in alive), default=0.0)
        return (
            f"no simulated node has num_cpus={cpus:g} free (the most free on one of "
            f"{len(alive)} nodes: {most:g})"
        )

    def _add_process(self, process_id: str, node_id: str) -> None:
        assert self._loop is not None
        registry = RouterRegistry(self, self._loop)
        for key, update in list(self.membership.items()):  # the snapshot before it serves
            if self.encoding == "per_recipient":
                chunks = encode(self._next_corr(), update)
                self.catch_up_bytes += _size(chunks)
            else:
                self.catch_up_bytes += self._frame_bytes[key]
            self.catch_up_messages += 1
            # The same frame as the last delivery's: its decoded update is shared (memory).
            registry.apply(self._decoded[key])
        self.processes[process_id] = _Process(process_id, node_id, registry)

    def _next_corr(self) -> int:
        self._corr += 1
        return self._corr

    def _deliver(
        self, update: ReplicaSetUpdate, targets: list[_Process]
    ) -> tuple[UpdateStats, ReplicaSetUpdate]:
        started = time.perf_counter()
        frames = 1 if self.encoding == "per_update" else len(targets)
        chunks: list[Any] = []
        for _ in range(frames):
            chunks = encode(self._next_corr(), update)
        frame_bytes = _size(chunks)
        encoded = time.perf_counter()
        decoded = _decoded(chunks)
        decoded_at = time.perf_counter()
        for target in targets:
            target.registry.apply(decoded)
        ended = time.perf_counter()
        stats = UpdateStats(
            update.app, update.deployment, len(update.replicas), len(targets),
            frame_bytes * len(targets), frame_bytes, encoded - started,
            decoded_at - encoded, ended - decoded_at, started, ended,
        )  # fmt: skip
        return stats, decoded


def _size(chunks: list[Any]) -> int:
    return sum(memoryview(chunk).nbytes for chunk in chunks)


def _decoded(chunks: list[Any]) -> ReplicaSetUpdate:
    """What a recipient reads off ``chunks``: the frame decoded with the real codec."""
    frame = b"".join(bytes(chunk) for chunk in chunks)
    _length, _corr, nbuf = HEADER.unpack_from(frame)
    message = decode(memoryview(frame)[HEADER_SIZE:], nbuf)
    assert isinstance(message, ReplicaSetUpdate)
    return message
