"""The in-process runtime: every replica is an object on the driver's shoal event loop.

Selected with ``serve.run(app, _local_testing_mode=True)``. No process or socket
is created, so applications can be unit tested in milliseconds; there is no HTTP
proxy (call the ingress handle). As in Ray Serve's local testing mode:
- call arguments are copied (pickled and unpickled) as a remote call would copy
  them, so a replica never mutates the caller's objects and unpicklable
  arguments fail here as they would in production; handles pass as themselves;
- the ``"ray.serve"`` logger writes to stderr at INFO, each line naming the
  deployment and the replica (``shoal/_replica/logs.py``, as in worker processes).
"""

from __future__ import annotations

import asyncio
import functools
import io
import pickle
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from shoal._api.handle import DeploymentHandle
from shoal._errors import SerializationError, ShoalError, TransportError
from shoal._replica.logs import configure_serve_logger, set_local_replica_level
from shoal._replica.replica import Replica
from shoal._replica.server import takes_input
from shoal._runtime.node import local_node_id
from shoal._runtime.without_proxy import WithoutProxy
from shoal._seam.clients import ClosableClient
from shoal._seam.protocols import MetricsSink, ReplicaHandle
from shoal._seam.specs import ReplicaSpec
from shoal._seam.startup import constructor_failed
from shoal._transport.failures import failure_from
from shoal._transport.messages import LoadReport, Message, ReplicaInfo, ReplicaSetUpdate, Request


class _LocalReplica:
    """ReplicaHandle for an in-process replica."""

    def __init__(self, replica: Replica, runtime: InProcessRuntime) -> None:
        self.replica = replica
        self.info = ReplicaInfo(
            replica.spec.replica_id,
            f"inprocess:{replica.spec.replica_id}",
            replica.spec.config.max_ongoing_requests,
            local_node_id(),
        )
        self.pid: int | None = None
        self.clients: list[_LocalClient] = []
        self._runtime = runtime

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None:
        await asyncio.wait_for(self.replica.reconfigure(user_config), timeout_s)

    async def check_health(self, timeout_s: float) -> dict[str, Any] | None:
        return await asyncio.wait_for(self.replica.health_report(), timeout_s)

    async def autoscaling_stats(self, timeout_s: float) -> dict[str, float] | None:
        return await asyncio.wait_for(self.replica.autoscaling_stats(), timeout_s)

    async def ping(self, timeout_s: float) -> None:
        """Always alive: the replica runs on the controller's own loop."""

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        await self.replica.drain(wait_loop_s, timeout_s)
        await self.replica.close()
        self._runtime.forget(self)

    def kill(self) -> None:
        self._runtime.forget(self)
        asyncio.get_running_loop().create_task(self.replica.close())
        self._runtime.on_died(self)


class _LocalClient(ClosableClient):
    """ReplicaClient calling a replica object directly (closed when the replica stops or
    is killed)."""

    def __init__(self, local: _LocalReplica) -> None:
        super().__init__(local.info.replica_id)
        self._replica = local.replica

    def call(self, request: Request) -> asyncio.Future[Message]:
        """Run ``request`` in a task; SerializationError if its arguments cannot be copied."""
        replica = self._replica
        request = copy_arguments(request)
        return replica.loop.create_task(replica.handle(request), context=replica.task_context())

    def stream(self, request: Request) -> _LocalStream:
        return _LocalStream(self._replica, copy_arguments(request))


class _LocalStream:
    """A streaming call run on the caller's loop.

    The method starts at once, as in the multi-process runtime (where the request
    is sent when the stream opens): the first item is fetched eagerly, so a batched
    generator joins its batch when called, not when first read. Input sent to a
    request that reads some (a websocket) is queued for it, as a replica process does.
    """

    def __init__(self, replica: Replica, request: Request) -> None:
        context = replica.task_context()
        self._inbox: asyncio.Queue[Any] | None = asyncio.Queue() if takes_input(request) else None
        self._iterator: AsyncGenerator[Message, None] = context.run(
            replica.handle_stream, request, self._inbox
        )
        self._context = context
        self._pending: asyncio.Task[Message] | None = self._fetch()

    def _fetch(self) -> asyncio.Task[Message]:
        loop = asyncio.get_running_loop()
        return loop.create_task(_anext(self._iterator), context=self._context)

    async def next(self) -> Message:
        task, self._pending = self._pending, None
        return await (task if task is not None else self._fetch())

    def send_input(self, value: Any) -> None:
        if self._inbox is not None:
            self._inbox.put_nowait(value)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        asyncio.get_running_loop().create_task(self._iterator.aclose())


@functools.cache
def _keeping_handles(base: type[pickle.Pickler]) -> Callable[[io.BytesIO, list[Any]], Any]:
    """A ``base`` pickler that pickles handles by reference (they stay bound to this process)."""

    class Pickler(base):  # type: ignore[valid-type, misc]
        def __init__(self, file: io.BytesIO, kept: list[Any]) -> None:
            super().__init__(file, protocol=5)
            self._kept = kept

        def persistent_id(self, obj: Any) -> int | None:
            if isinstance(obj, DeploymentHandle):
                self._kept.append(obj)
                return len(self._kept) - 1
            return None

    return Pickler


_Pickler = _keeping_handles(pickle.Pickler)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, kept: list[Any]) -> None:
        super().__init__(file)
        self._kept = kept

    def persistent_load(self, pid: Any) -> Any:
        return self._kept[pid]


def copy_arguments(request: Request) -> Request:
    """``request`` with copies of its arguments, made as a remote call makes them (pickle).

    Values plain pickle refuses (lambdas, local classes) are copied with cloudpickle.
    Raises SerializationError (a TypeError) if they cannot be pickled at all, or the
    ShoalError a value raises to refuse being sent (a nested DeploymentResponse).
    """
    if not request.args and not request.kwargs:
        return request
    kept: list[Any] = []
    try:
        data = _dumps((request.args, request.kwargs), kept)
    except ShoalError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize the arguments of a call to method '{request.method}': {exc}. "
            "Pass plain data (numbers, strings, lists, dicts, numpy arrays, dataclasses) "
            "or objects that can be pickled, as a replica in another process needs them."
        ) from exc
    args, kwargs = _Unpickler(io.BytesIO(data), kept).load()
    return Request(
        request.method, args, kwargs, request.request_id, request.stream,
        request.multiplexed_model_id, request.remaining_s, request.priority,
        request.traceparent,
    )  # fmt: skip


def _dumps(value: Any, kept: list[Any]) -> bytes:
    file = io.BytesIO()
    try:
        _Pickler(file, kept).dump(value)
    except (pickle.PicklingError, AttributeError, TypeError):
        import cloudpickle

        kept.clear()
        file = io.BytesIO()
        _keeping_handles(cloudpickle.CloudPickler)(file, kept).dump(value)
    return file.getvalue()


async def _anext(iterator: AsyncIterator[Message]) -> Message:
    return await iterator.__anext__()


class InProcessRuntime(WithoutProxy):
    """Runtime whose replicas live in the driver's event loop."""

    no_proxy_message = "the in-process runtime has no HTTP proxy; call the ingress handle"

    supports_http = False
    places_replicas = False

    def __init__(self) -> None:
        self._replicas: dict[str, _LocalReplica] = {}
        self.connector = self
        self.on_died: Callable[[ReplicaHandle], None] = lambda handle: None

    async def start(
        self,
        on_replica_died: Callable[[ReplicaHandle], None],
        on_load: Callable[[LoadReport], None],
        metrics: MetricsSink | None = None,
    ) -> None:
        """Every router is in this process: its registry reports load to ``on_load`` itself,
        and the controller reads this process's metrics directly (``metrics`` gets nothing)."""
        self.on_died = on_replica_died
        configure_serve_logger()

    async def start_replica(
        self, spec: ReplicaSpec, on_waiting: Callable[[str | None], None] | None = None
    ) -> ReplicaHandle:
        set_local_replica_level(spec.replica_id, spec.config.logging_config)
        replica = Replica(spec)
        try:
            await replica.initialize()
        except Exception as exc:
            raise constructor_failed(spec.deployment, exc, failure_from(exc).traceback) from exc
        local = _LocalReplica(replica, self)
        self._replicas[spec.replica_id] = local
        return local

    def forget(self, local: _LocalReplica) -> None:
        self._replicas.pop(local.info.replica_id, None)
        for client in local.clients:
            client.close()

    async def connect(self, info: ReplicaInfo) -> _LocalClient:
        local = self._replicas.get(info.replica_id)
        if local is None:
            raise TransportError(f"replica {info.replica_id} is not running")
        client = _LocalClient(local)
        local.clients.append(client)
        return client

    async def publish(self, update: ReplicaSetUpdate) -> None:
        """Nothing to do: the controller already updated this process's routers."""

    async def shutdown(self, timeout_s: float) -> None:
        for local in list(self._replicas.values()):
            await local.replica.close()
            self.forget(local)
