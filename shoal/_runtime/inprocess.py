"""The in-process runtime: every replica is an object on the driver's shoal event loop.

Selected with ``serve.run(app, _local_testing_mode=True)``. Nothing is
serialized and no process or socket is created, so applications can be unit
tested in milliseconds; there is no HTTP proxy (call the ingress handle).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from shoal._config import HTTPOptions
from shoal._errors import NotFoundError, TransportError
from shoal._replica.replica import Replica
from shoal._runtime.base import ReplicaHandle, ReplicaSpec, constructor_failed
from shoal._transport.failures import failure_from
from shoal._transport.messages import Message, ReplicaInfo, ReplicaSetUpdate, Request


class _LocalReplica:
    """ReplicaHandle for an in-process replica."""

    def __init__(self, replica: Replica, runtime: InProcessRuntime) -> None:
        self.replica = replica
        self.info = ReplicaInfo(
            replica.spec.replica_id,
            f"inprocess:{replica.spec.replica_id}",
            replica.spec.config.max_ongoing_requests,
        )
        self.pid: int | None = None
        self.clients: list[_LocalClient] = []
        self._runtime = runtime

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None:
        await asyncio.wait_for(self.replica.reconfigure(user_config), timeout_s)

    async def check_health(self, timeout_s: float) -> None:
        await asyncio.wait_for(self.replica.check_health(), timeout_s)

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        await self.replica.drain(wait_loop_s, timeout_s)
        await self.replica.close()
        self._runtime.forget(self)

    def kill(self) -> None:
        self._runtime.forget(self)
        asyncio.get_running_loop().create_task(self.replica.close())
        self._runtime.on_died(self)


class _LocalClient:
    """ReplicaClient calling a replica object directly."""

    def __init__(self, local: _LocalReplica) -> None:
        self.replica_id = local.info.replica_id
        self.closed = False
        self.close_callbacks: list[Callable[[Any], None]] = []
        self._replica = local.replica

    def call(self, request: Request) -> asyncio.Future[Message]:
        replica = self._replica
        return replica.loop.create_task(replica.handle(request), context=replica.task_context())

    def stream(self, request: Request) -> _LocalStream:
        return _LocalStream(self._replica, request)

    def close(self) -> None:
        self.closed = True
        for callback in self.close_callbacks:
            callback(self)


class _LocalStream:
    def __init__(self, replica: Replica, request: Request) -> None:
        context = replica.task_context()
        self._iterator: AsyncIterator[Message] = context.run(replica.handle_stream, request)
        self._context = context

    async def next(self) -> Message:
        task = asyncio.get_running_loop().create_task(_anext(self._iterator), context=self._context)
        return await task

    def close(self) -> None:
        asyncio.get_running_loop().create_task(self._iterator.aclose())  # type: ignore[attr-defined]


async def _anext(iterator: AsyncIterator[Message]) -> Message:
    return await iterator.__anext__()


class InProcessRuntime:
    """Runtime whose replicas live in the driver's event loop."""

    supports_http = False

    def __init__(self) -> None:
        self._replicas: dict[str, _LocalReplica] = {}
        self.connector = self
        self.on_died: Callable[[ReplicaHandle], None] = lambda handle: None

    async def start(self, on_replica_died: Callable[[ReplicaHandle], None]) -> None:
        self.on_died = on_replica_died

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaHandle:
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

    async def start_proxy(self, options: HTTPOptions) -> tuple[str, int]:
        raise NotFoundError("the in-process runtime has no HTTP proxy; call the ingress handle")

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """No proxy: routes are not served."""

    async def shutdown(self, timeout_s: float) -> None:
        for local in list(self._replicas.values()):
            await local.replica.close()
            self.forget(local)
