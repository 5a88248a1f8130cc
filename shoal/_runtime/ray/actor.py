"""The Ray actor that hosts one shoal worker (a replica, or a node's proxy), and the
runtime's grip on it.

Ray places the actor (its ``ray_actor_options``, placement group, runtime_env) and
supervises its process; inside it, a thread runs the same :class:`Worker` as a
``python -m shoal._runtime.process.worker`` process: it says hello on the controller's
socket and obeys the same control messages, and its replica is served on its own
socket. Requests never take Ray's task path. An actor on another node than the
controller's says hello over authenticated TCP, and its replica listens on TCP as
well (``shoal._runtime.ray.network``).

This module imports ``ray`` only inside functions: the actor class is plain Python,
made remote by the runtime (``ray.remote(WorkerActor)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal._runtime.process.workers import WorkerProcess
    from shoal._runtime.ray.network import ClusterNetwork

#: The exit code recorded for an actor Ray reports dead (killed, or its node lost).
ACTOR_DIED = -9


class WorkerActor:
    """Runs a shoal worker on a thread of this actor's process, until it is told to stop."""

    def __init__(
        self,
        instance_dir: str,
        worker_id: str,
        replica_id: str,
        orphan_grace_s: float = 0.0,
        network: ClusterNetwork | None = None,
    ) -> None:
        """``replica_id``: the replica it will host ("": a node's proxy, see
        ``shoal._runtime.ray.proxies``). ``orphan_grace_s`` > 0 (a server's replica, a
        detached actor): the worker
        outlives its controller that long, and rejoins its successor (see
        ``shoal._runtime.process.adopt``); it ends this actor's process if none comes.
        ``network``: the instance secret and where the controller is (see
        ``shoal._runtime.ray.network``); None: Unix sockets only."""
        os.makedirs(instance_dir, mode=0o700, exist_ok=True)
        self._replica_id = replica_id
        self._worker_id = worker_id
        self._ended = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(instance_dir, worker_id, orphan_grace_s, network),
            name="shoal-worker",
            daemon=True,
        )
        self._thread.start()

    def _run(
        self,
        instance_dir: str,
        worker_id: str,
        orphan_grace_s: float,
        network: ClusterNetwork | None,
    ) -> None:
        from shoal._runtime.process.worker import run_worker

        node, controller = network.in_this_actor() if network is not None else (None, "")
        try:
            run_worker(instance_dir, worker_id, orphan_grace_s, False, node, controller)
        finally:
            self._ended.set()

    def __repr__(self) -> str:
        # Ray prefixes the lines this actor prints with it: the replica id, as in status.
        if not self._replica_id:
            return f"Proxy({self._worker_id})"
        return f"Replica({self._replica_id})"

    def where(self) -> tuple[int, str]:
        """This actor's process id and Ray node id."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    async def wait(self) -> int:
        """Return once the worker has ended (it was told to stop); 0."""
        await asyncio.to_thread(self._ended.wait)
        return 0


class ActorProcess:
    """What the process runtime needs of a ``subprocess.Popen``, for a worker actor.

    ``kill()`` and ``terminate()`` end the actor through Ray (never restarted);
    ``exited`` resolves with 0 once its worker stopped as told, or with
    :data:`ACTOR_DIED` once Ray reports the actor dead.
    """

    def __init__(self, actor: Any, pid: int, node_id: str, worker_id: str = "") -> None:
        """``worker_id``: its placement group's name, if it has one (removed with it)."""
        self.actor = actor
        self.worker_id = worker_id
        self.pid = pid
        self.node_id = node_id
        self.returncode: int | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waited = asyncio.wrap_future(actor.wait.remote().future())
        waited.add_done_callback(self._on_end)

    def _on_end(self, waited: asyncio.Future[int]) -> None:
        code = ACTOR_DIED if waited.cancelled() or waited.exception() else waited.result()
        self.returncode = code
        self.kill()  # a stopped worker's actor still holds its resources until it is killed
        if not self.exited.done():
            self.exited.set_result(code)

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone, or Ray is shutting down
            ray.kill(self.actor, no_restart=True)
        remove_placement_group(self.worker_id)

    terminate = kill


def actor_worker(worker_id: str, process: ActorProcess) -> WorkerProcess:
    """The runtime's handle on a worker actor. Once Ray reports the actor dead (killed,
    its node lost), its control connection is dropped: a TCP connection to a lost node
    would not close by itself, and its close is how the runtime learns of the end."""
    from shoal._runtime.process.workers import WorkerProcess

    worker = WorkerProcess(worker_id, process, process.exited)

    def ended(_exited: asyncio.Future[int]) -> None:
        if worker.conn is not None:
            worker.conn.abort()

    process.exited.add_done_callback(ended)
    return worker


def remove_placement_group(name: str) -> None:
    """Remove the placement group named ``name`` (a replica's worker id), if there is one."""
    if not name:
        return
    from ray.util import get_placement_group, remove_placement_group

    with contextlib.suppress(Exception):  # none by that name, or Ray is shutting down
        remove_placement_group(get_placement_group(name))
