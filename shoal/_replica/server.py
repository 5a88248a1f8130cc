"""Serving a started replica's data plane over shoal connections, in any host process.

A host (the process runtime's worker today, a Ray actor later) starts a
:class:`~shoal._replica.replica.Replica`, then points a server at a
:class:`ReplicaServer` (``listen`` for a Unix socket, ``listen_tcp`` as well for
authenticated TCP from other nodes, or ``on_message`` as any
:class:`~shoal._transport.connection.Connection`'s handler). Guarantees:
- every Request runs in a fresh copy of the replica's context, as its own task (on
  Python 3.12+, a unary call or an HTTP request without a deadline runs its first
  step at once, in that task: ``shoal._replica.eager``), and gets
  exactly one reply (Result or Failure), or a stream of StreamItem messages ended by
  StreamEnd or a Failure (an HTTP response that is complete is one Result); a reply
  that cannot be encoded is replaced by a Failure saying so;
- a Cancel cancels that request's task and nothing is sent back; a unary call
  whose user code raises CancelledError without a Cancel still gets a Failure;
- a request with ``remaining_s`` (a deadline) is cancelled when it runs out and
  gets a Failure (RequestTimeoutError); for a stream, the deadline covers the whole
  stream, so a stream past it ends with that Failure;
- a stream sends at most the credit its consumer granted (``STREAM_WINDOW``,
  topped up by StreamCredit), so a slow consumer slows the generator down;
- StreamInput values reach the running stream's inbox (a websocket's client
  messages) in order; inputs for a request that takes none are dropped;
- with ``enable_access_log`` (docs/logging.md), one access line per request once
  its reply (or its stream) ended: ``GET /path 200 1.2ms`` for HTTP, ``CALL method
  OK 0.4ms`` for a handle call; when it is off nothing per request is done.
"""

from __future__ import annotations

import asyncio
import os
import ssl as _ssl
import time
from collections.abc import AsyncIterator
from typing import Any

from shoal._errors import ReplicaStoppedError, RequestCancelledError
from shoal._observe.logs import access_log_enabled
from shoal._replica import eager
from shoal._replica.logs import ReplicaAccessLog
from shoal._replica.replica import Replica
from shoal._transport.auth import bound_address, serve_tcp
from shoal._transport.codec import SerializationError
from shoal._transport.connection import STREAM_WINDOW, Connection, serve_unix
from shoal._transport.failures import failure_from
from shoal._transport.http import WEBSOCKET, HttpRequestData
from shoal._transport.messages import (
    Cancel,
    Message,
    Request,
    StreamCredit,
    StreamInput,
    StreamItem,
)

# A request is keyed by its connection and correlation id: ids are per connection.
_Key = tuple[int, int]


class ReplicaServer:
    """Serves one started replica's requests arriving on any number of connections."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._loop = replica.loop
        self._tasks: dict[_Key, asyncio.Task[Any]] = {}
        self._credits: dict[_Key, _Credit] = {}
        # Messages a caller sends into its running stream (a websocket's client side).
        self._inboxes: dict[_Key, asyncio.Queue[Any]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        # Access lines: decided once (the worker's logging_config), not per request.
        enabled = access_log_enabled()
        self._access = ReplicaAccessLog(replica.spec, _ACCESS_WHERE) if enabled else None
        # A loop with its own task factory gets its tasks made the ordinary way.
        self._eager = self._loop.get_task_factory() is None
        self._context = replica.context  # copied for each request (Replica.task_context)

    async def listen(self, path: str) -> None:
        """Accept connections from same-user processes on the Unix socket ``path``."""
        self._server = await serve_unix(path, self.on_message, self.replica.spec.replica_id)

    async def listen_tcp(
        self, host: str, port: int, secret: bytes, *, ssl: _ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        """Also accept TCP connections (routers on other nodes) from peers proving
        ``secret`` (``shoal._transport.auth``); returns the bound (host, port) (``port=0``:
        a free one). Advertise the node's address, not a wildcard such as 0.0.0.0."""
        name = self.replica.spec.replica_id
        self._tcp_server = await serve_tcp(host, port, secret, self.on_message, name, ssl=ssl)
        return bound_address(self._tcp_server)

    def close(self) -> None:
        """Stop accepting connections (connections already open keep being served)."""
        for server in (self._server, self._tcp_server):
            if server is not None:
                server.close()

    def on_message(self, conn: Connection, corr: int, msg: Message) -> None:
        """Handle one data-plane message (a connection's ``on_message``)."""
        key = (id(conn), corr)
        # isinstance, not ``match``: on the hot path a class pattern costs ~0.1 us more.
        if isinstance(msg, Request):
            if self.replica.refusing:  # drained: another replica of the router runs it
                _send_reply(conn, corr, failure_from(self._stopped_error(msg)))
                return
            if not msg.stream:
                run = self._call(conn, corr, msg)
            elif one_shot(msg):
                run = self._http(conn, corr, msg)
            else:
                if takes_input(msg):
                    self._inboxes[key] = asyncio.Queue()  # before any client message can arrive
                stream = self._stream(conn, corr, msg)
                self._tasks[key] = self._loop.create_task(stream, context=self._context.copy())
                return
            context = self._context.copy()  # the replica's: a fresh copy per request
            if msg.remaining_s is None and self._eager:
                # Its first step now where asyncio can (3.12+): no loop turn for a call
                # that needs no wait.
                task = eager.start(self._loop, run, context)
                if task is not None:
                    self._tasks[key] = task
            else:  # with a deadline (or a task factory): a task from the start, as before
                self._tasks[key] = self._loop.create_task(run, context=context)
        elif isinstance(msg, Cancel):
            # Forgotten here, not only in the task's ``finally``: a task cancelled before
            # its first step never runs it (a Cancel read with its Request).
            running = self._tasks.pop(key, None)
            if running is not None:
                running.cancel()
                self._inboxes.pop(key, None)
                self._credits.pop(key, None)
        elif isinstance(msg, StreamCredit):
            credit = self._credits.get(key)
            if credit is not None:
                credit.grant(msg.items)
        elif isinstance(msg, StreamInput):
            inbox = self._inboxes.get(key)
            if inbox is not None:
                inbox.put_nowait(msg.value)

    async def _call(self, conn: Connection, corr: int, request: Request) -> None:
        started = time.perf_counter() if self._access is not None else 0.0
        try:
            try:
                reply = await self.replica.handle(request)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the caller cancelled: it expects no reply
                # The user's code let a CancelledError escape: the caller must still hear.
                reply = failure_from(
                    RequestCancelledError(
                        f"method '{request.method}' raised CancelledError without being cancelled"
                    )
                )
            _send_reply(conn, corr, reply)
            if self._access is not None:
                self._log_access(request, reply, started)
        finally:
            self._tasks.pop((id(conn), corr), None)

    async def _http(self, conn: Connection, corr: int, request: Request) -> None:
        """An HTTP request (no websocket, no deadline): a complete response is sent as
        one Result with no stream machinery; a streamed one is relayed as ``_stream``
        relays (within the consumer's credit)."""
        started = time.perf_counter() if self._access is not None else 0.0
        key = (id(conn), corr)
        try:
            reply = await self.replica.handle_http(request)
            if isinstance(reply, Message):
                _send_reply(conn, corr, reply)
                first: Message | None = reply
            else:
                credit = self._credits[key] = _Credit(STREAM_WINDOW)
                try:
                    first = await _relay(conn, corr, reply, credit)
                finally:
                    await reply.aclose()
                    self._credits.pop(key, None)
            if self._access is not None:
                self._log_access(request, first, started)
        finally:
            self._tasks.pop(key, None)

    async def _stream(self, conn: Connection, corr: int, request: Request) -> None:
        key = (id(conn), corr)
        credit = self._credits[key] = _Credit(STREAM_WINDOW)
        stream = self.replica.handle_stream(request, self._inboxes.get(key))
        started = time.perf_counter() if self._access is not None else 0.0
        first: Message | None = None
        try:
            if request.remaining_s is None:
                first = await _relay(conn, corr, stream, credit)
            else:
                timeout = asyncio.timeout(request.remaining_s)
                try:
                    async with timeout:
                        first = await _relay(conn, corr, stream, credit)
                except TimeoutError:
                    if not timeout.expired():
                        raise
                    _send_reply(conn, corr, failure_from(self.replica.timed_out(request)))
            if self._access is not None:
                self._log_access(request, first, started)
        finally:
            await stream.aclose()
            self._credits.pop(key, None)
            self._inboxes.pop(key, None)
            self._tasks.pop(key, None)

    def _stopped_error(self, request: Request) -> ReplicaStoppedError:
        return ReplicaStoppedError(
            f"replica {self.replica.spec.replica_id} had stopped when request "
            f"{request.request_id} reached it; it did not run there"
        )

    def _log_access(self, request: Request, reply: Message | None, started: float) -> None:
        """One access line, Ray's: ``METHOD ROUTE STATUS LATENCYms`` (``CALL method OK``
        for a handle call) of a request that arrived at ``started`` (``perf_counter()``),
        formatted only if a handler takes it. Written once the reply is sent (an idle
        connection has written it, a busy one writes it at the end of this loop turn):
        writing it is appending the request's figures to the pending lines
        (``shoal._observe.access_lines``), so it is done here rather than in a callback
        of the loop's next turn, which cost more than the line."""
        self._access.write(request, reply, started)  # type: ignore[union-attr]


async def _relay(
    conn: Connection, corr: int, stream: AsyncIterator[Message], credit: _Credit
) -> Message | None:
    """Send a stream's messages, each item within the credit its consumer granted;
    returns the first (what an access line reports)."""
    first: Message | None = None
    async for reply in stream:
        if first is None:
            first = reply
        if type(reply) is StreamItem:
            await credit.take()
        _send_reply(conn, corr, reply)
        if conn.closed:
            break
    return first


def one_shot(request: Request) -> bool:
    """Whether a streamed ``request`` is HTTP that may get a complete response in one
    Result (``ReplicaServer._http``): not a websocket, and no deadline (``_stream`` keeps
    a stream's deadline)."""
    args = request.args
    return (
        bool(args)
        and type(args[0]) is HttpRequestData
        and args[0].method != WEBSOCKET
        and request.remaining_s is None
    )


def takes_input(request: Request) -> bool:
    """Whether a streamed ``request`` reads input from its caller (a websocket does)."""
    args = request.args
    return bool(args) and type(args[0]) is HttpRequestData and args[0].method == WEBSOCKET


def _send_reply(conn: Connection, corr: int, reply: Message) -> None:
    try:
        conn.send(corr, reply)
    except SerializationError as exc:
        conn.send(corr, failure_from(exc))


class _Credit:
    """How many more stream items the consumer accepts (back-pressure). A future is
    made only when the producer has to wait."""

    __slots__ = ("_available", "_waiter")

    def __init__(self, initial: int) -> None:
        self._available = initial
        self._waiter: asyncio.Future[None] | None = None

    def grant(self, items: int) -> None:
        self._available += items
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> None:
        while self._available <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._available -= 1


_ACCESS_WHERE = (os.path.basename(__file__), ReplicaServer._log_access.__code__.co_firstlineno)
