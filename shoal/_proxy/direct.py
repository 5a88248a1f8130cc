"""Direct ingress: an ingress replica that accepts HTTP itself (docs/direct-ingress.md).

The replica's process runs the proxy's own HTTP server (:class:`~shoal._proxy.proxy.Proxy`,
so every rule of the proxy holds: 404 outside the route prefix, 413, 400 for a bad
priority, 504 at ``request_timeout_s``, 503 beyond ``http_options.max_ongoing_requests``,
metrics) on the application's ``direct_ingress_port``; each request's access line is the
replica's own, as for a request the proxy sent. Its route table
has one route, the application's, and its router one replica: the one in this process,
called without a copy, a pickle or a socket. Requests beyond the replica's
``max_ongoing_requests`` wait in that router (``max_queued_requests`` applies).

Every replica of the ingress binds the same port with ``SO_REUSEPORT``: the kernel
spreads new connections over them (a connection stays with the replica that accepted
it). Binding needs the port free or bound so by this user's processes; otherwise the
replica fails to start, naming the port.

Stopping (:meth:`DirectIngress.stop`) closes the listener first, so new connections go
to the other replicas, then lets the requests in flight finish (within the time
limit) and closes the connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
from collections.abc import AsyncGenerator
from typing import Any

from shoal._errors import RequestCancelledError, TransportError
from shoal._observe.access_lines import AccessLine, AccessLog
from shoal._proxy.proxy import Proxy
from shoal._replica.replica import Replica
from shoal._replica.server import one_shot, takes_input
from shoal._router.load import Sink
from shoal._router.router import RouterRegistry
from shoal._seam.clients import ClosableClient
from shoal._seam.specs import DirectIngressSpec
from shoal._transport.messages import Message, ReplicaInfo, ReplicaSetUpdate, Request

_WHAT = "direct ingress (the application's direct_ingress_port)"


class _HereStream:
    """One request run by the replica in this process, as a router's stream.

    A one-shot HTTP request (no deadline, no websocket) runs inline, in the task that
    reads the stream (uvicorn's task of the request, whose context is a copy of the
    replica's: :meth:`DirectIngress.start`): no task, no loop turn of its own. A
    streamed response's later messages, a websocket or a request with a deadline each
    step in a task of the request's context (``Replica.handle_stream``). :meth:`close`
    cancels the request; a reader waiting in :meth:`next` then gets
    RequestCancelledError.
    """

    __slots__ = (
        "_closed", "_context", "_inbox", "_loop", "_messages", "_one_shot", "_reader",
        "_replica", "_step",
    )  # fmt: skip

    def __init__(self, replica: Replica, request: Request) -> None:
        self._replica = replica
        self._loop = replica.loop
        self._closed = False
        self._inbox: asyncio.Queue[Any] | None = None
        self._messages: AsyncGenerator[Message, None] | None = None
        self._step: asyncio.Task[Any] | None = None
        self._reader: asyncio.Task[Any] | None = None  # running the one-shot request inline
        self._one_shot: Request | None = None
        if one_shot(request):
            self._one_shot = request  # run by the first next()
            self._context = None
            return
        self._context = replica.task_context()
        if takes_input(request):
            self._inbox = asyncio.Queue()
        self._messages = self._context.run(replica.handle_stream, request, self._inbox)
        self._step = self._loop.create_task(_anext(self._messages), context=self._context)

    async def next(self) -> Message:
        if self._closed:
            raise RequestCancelledError("the stream was closed")
        if self._one_shot is not None:
            reply = await self._run_inline(self._one_shot)
            if isinstance(reply, Message):
                return reply
            self._messages = reply  # a streamed HTTP response: its context is this task's
            self._context = contextvars.copy_context()
        step = self._step
        if step is None:
            assert self._messages is not None and self._context is not None
            coroutine = _anext(self._messages)
            step = self._step = self._loop.create_task(coroutine, context=self._context)
        try:
            return await step
        except asyncio.CancelledError:
            if self._closed and step.cancelled():
                raise RequestCancelledError("the stream was closed") from None
            raise
        finally:
            self._step = None

    async def _run_inline(self, request: Request) -> Any:
        """``Replica.handle_http`` in this task; RequestCancelledError if :meth:`close`
        cancelled it (the user's code saw the CancelledError)."""
        self._one_shot = None
        reader = self._reader = asyncio.current_task()
        assert reader is not None
        try:
            reply = await self._replica.handle_http(request)
        except asyncio.CancelledError:
            if self._closed and reader.uncancel() == 0:  # our close(), nobody else's cancel
                raise RequestCancelledError("the stream was closed") from None
            raise
        finally:
            self._reader = None
        if self._closed:  # the user's code caught our cancel and returned: nobody reads it
            reader.uncancel()
            if not isinstance(reply, Message):
                self._loop.create_task(reply.aclose())
            raise RequestCancelledError("the stream was closed")
        return reply

    def send_input(self, value: Any) -> None:
        if self._inbox is not None:
            self._inbox.put_nowait(value)

    def close(self) -> None:
        """Cancel the request if it still runs (its generator, if any, is closed)."""
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
        step, self._step = self._step, None
        if step is not None:  # (a step only reads the generator, closed below)
            step.cancel()
            step.add_done_callback(_retrieved)
        if self._messages is not None:
            self._loop.create_task(self._messages.aclose(), context=self._context)


def _retrieved(step: asyncio.Task[Any]) -> None:
    """A step nobody reads (its request was closed): its exception, if any, is taken, so
    asyncio does not log it as never retrieved."""
    if not step.cancelled():
        step.exception()


async def _anext(messages: AsyncGenerator[Message, None]) -> Message:
    return await messages.__anext__()


class _HereClient(ClosableClient):
    """The router's client of the replica in this process."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica.spec.replica_id)
        self._replica = replica

    def call(self, request: Request) -> asyncio.Future[Message]:
        replica = self._replica
        return replica.loop.create_task(replica.handle(request), context=replica.task_context())

    def stream(self, request: Request) -> _HereStream:
        return _HereStream(self._replica, request)


class _HereConnector:
    """Connects the router to the replica in this process, and to nothing else."""

    def __init__(self, client: _HereClient) -> None:
        self._client = client

    async def connect(self, info: ReplicaInfo) -> _HereClient:
        if info.replica_id != self._client.replica_id or self._client.closed:
            raise TransportError(f"replica {info.replica_id} is not in this process")
        return self._client


class _ReplicaAccessLines:
    """The access line of a request on the direct port: the replica's own (``METHOD PATH
    STATUS LATENCYms`` with its application, deployment and id, to the terminal and its
    file), as it writes for a request the proxy sent it; not a proxy's line."""

    def __init__(self, replica: Replica) -> None:
        spec = replica.spec
        self.log = AccessLog(_WHERE)
        self._replica = (spec.app, spec.deployment, spec.replica_id)

    def line(
        self, path: str, method: str, route: tuple[str, str, str] | None, status: int
    ) -> AccessLine:
        return self.log.line(*self._replica, method, path, status or 500)


_WHERE = (os.path.basename(__file__), _ReplicaAccessLines.line.__code__.co_firstlineno)


class DirectIngress:
    """The HTTP server of an ingress replica (see the module's docstring).

    Its router takes its deployment's limits (``max_queued_requests``, and how often to
    report load when it autoscales) from the replica sets the controller publishes
    (:meth:`apply`), and reports its load through ``load_sink``: the requests waiting
    and running here count for the autoscaler as the proxy's do.
    """

    def __init__(
        self, replica: Replica, spec: DirectIngressSpec, load_sink: Sink, source: str
    ) -> None:
        config = replica.spec.config
        self._replica = replica
        self._client = _HereClient(replica)
        self._info = ReplicaInfo(replica.spec.replica_id, "here", config.max_ongoing_requests)
        self.registry = RouterRegistry(_HereConnector(self._client), replica.loop)
        self.registry.load.sink = load_sink
        self.registry.load.source = source
        self._app, self._deployment = app, deployment = replica.spec.app, replica.spec.deployment
        self.apply(
            ReplicaSetUpdate(
                app, deployment, [], max_queued_requests=config.max_queued_requests
            )
        )  # fmt: skip
        self.proxy = Proxy(self.registry, spec.options, lambda: _ReplicaAccessLines(replica))
        self.proxy.set_routes({spec.route_prefix: (app, deployment)})

    def apply(self, update: ReplicaSetUpdate) -> None:
        """Take the limits of this replica's deployment from ``update`` (ignored if it is
        another deployment's), this replica staying the router's only one."""
        if (update.app, update.deployment) == (self._app, self._deployment) and update.exists:
            ours = dataclasses.replace(update, replicas=[self._info], ingress=True)
            self.registry.apply(ours)

    async def start(self) -> tuple[str, int]:
        """Bind the port (shared) and serve; returns (host, port). Raises ShoalError if the
        port cannot be bound. Requests run in the replica's context (its
        ``get_replica_context()``), as they do when they come through the proxy."""
        serving = self.proxy.serve(reuse_port=True, what=_WHAT)
        return await self._replica.loop.create_task(serving, context=self._replica.task_context())

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, let the requests in flight finish (at most ``timeout_s``), close
        the connections; then the replica may drain."""
        await self.proxy.stop(timeout_s)
        self._client.close()
