"""Serving a started replica's data plane over shoal connections, in any host process.

A host (the process runtime's worker today, a Ray actor later) starts a
:class:`~shoal._replica.replica.Replica`, then points a server at a
:class:`ReplicaServer` (``listen`` for a Unix socket, or ``on_message`` as any
:class:`~shoal._transport.connection.Connection`'s handler). Guarantees:
- every Request runs in its own task, in a fresh copy of the replica's context,
  and gets exactly one reply (Result or Failure), or a stream of StreamItem
  messages ended by StreamEnd or a Failure; a reply that cannot be encoded is
  replaced by a Failure saying so;
- a Cancel cancels that request's task and nothing is sent back; a unary call
  whose user code raises CancelledError without a Cancel still gets a Failure;
- a request with ``remaining_s`` (a deadline) is cancelled when it runs out and
  gets a Failure (RequestTimeoutError); for a stream, the deadline covers the whole
  stream, so a stream past it ends with that Failure;
- a stream sends at most the credit its consumer granted (``STREAM_WINDOW``,
  topped up by StreamCredit), so a slow consumer slows the generator down;
- StreamInput values reach the running stream's inbox (a websocket's client
  messages) in order; inputs for a request that takes none are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from shoal._errors import RequestCancelledError
from shoal._replica.replica import Replica
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

    async def listen(self, path: str) -> None:
        """Accept connections from same-user processes on the Unix socket ``path``."""
        self._server = await serve_unix(path, self.on_message, self.replica.spec.replica_id)

    def close(self) -> None:
        """Stop accepting connections (connections already open keep being served)."""
        if self._server is not None:
            self._server.close()

    def on_message(self, conn: Connection, corr: int, msg: Message) -> None:
        """Handle one data-plane message (a connection's ``on_message``)."""
        key = (id(conn), corr)
        # isinstance, not ``match``: on the hot path a class pattern costs ~0.1 us more.
        if isinstance(msg, Request):
            if msg.stream and takes_input(msg):
                self._inboxes[key] = asyncio.Queue()  # before any client message can arrive
            run = self._stream(conn, corr, msg) if msg.stream else self._call(conn, corr, msg)
            self._tasks[key] = self._loop.create_task(run, context=self.replica.task_context())
        elif isinstance(msg, Cancel):
            running = self._tasks.get(key)
            if running is not None:
                running.cancel()
        elif isinstance(msg, StreamCredit):
            credit = self._credits.get(key)
            if credit is not None:
                credit.grant(msg.items)
        elif isinstance(msg, StreamInput):
            inbox = self._inboxes.get(key)
            if inbox is not None:
                inbox.put_nowait(msg.value)

    async def _call(self, conn: Connection, corr: int, request: Request) -> None:
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
        finally:
            self._tasks.pop((id(conn), corr), None)

    async def _stream(self, conn: Connection, corr: int, request: Request) -> None:
        key = (id(conn), corr)
        credit = self._credits[key] = _Credit(STREAM_WINDOW)
        stream = self.replica.handle_stream(request, self._inboxes.get(key))
        try:
            if request.remaining_s is None:
                await _relay(conn, corr, stream, credit)
            else:
                timeout = asyncio.timeout(request.remaining_s)
                try:
                    async with timeout:
                        await _relay(conn, corr, stream, credit)
                except TimeoutError:
                    if not timeout.expired():
                        raise
                    _send_reply(conn, corr, failure_from(self.replica.timed_out(request)))
        finally:
            await stream.aclose()
            self._credits.pop(key, None)
            self._inboxes.pop(key, None)
            self._tasks.pop(key, None)


async def _relay(
    conn: Connection, corr: int, stream: AsyncIterator[Message], credit: _Credit
) -> None:
    """Send a stream's messages, each item within the credit its consumer granted."""
    async for reply in stream:
        if type(reply) is StreamItem:
            await credit.take()
        _send_reply(conn, corr, reply)
        if conn.closed:
            break


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
    """How many more stream items the consumer accepts (back-pressure)."""

    def __init__(self, initial: int) -> None:
        self._available = initial
        self._event = asyncio.Event()

    def grant(self, items: int) -> None:
        self._available += items
        self._event.set()

    async def take(self) -> None:
        while self._available <= 0:
            self._event.clear()
            await self._event.wait()
        self._available -= 1
