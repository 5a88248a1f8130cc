"""Data-plane clients of the process runtime: routers reach replicas over Unix sockets."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from shoal._transport.connection import Connection, StreamReceiver, connect_unix
from shoal._transport.messages import (
    Cancel,
    Message,
    ReplicaInfo,
    Request,
    StreamInput,
    StreamItem,
)


class SocketClient:
    """ReplicaClient over one multiplexed connection to a replica process."""

    __slots__ = ("_conn", "replica_id")

    def __init__(self, conn: Connection, replica_id: str) -> None:
        self._conn = conn
        self.replica_id = replica_id

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the connection is lost or closed (at once if it is)."""
        if self._conn.closed:
            callback()
            return
        called = False

        def notify(_conn: Connection) -> None:
            nonlocal called  # a connection can report its loss twice (a corrupt frame, then EOF)
            if not called:
                called = True
                callback()

        self._conn.close_callbacks.append(notify)

    def call(self, request: Request) -> asyncio.Future[Message]:
        future = self._conn.call(request)
        future.add_done_callback(functools.partial(_cancel_remote, self._conn))
        return future

    def stream(self, request: Request) -> SocketStream:
        corr, receiver = self._conn.open_stream(request)
        return SocketStream(self._conn, corr, receiver)

    def close(self) -> None:
        self._conn.close()


def _cancel_remote(conn: Connection, future: asyncio.Future[Message]) -> None:
    if future.cancelled() and not conn.closed:
        for corr, waiter in list(conn.pending.items()):
            if waiter is future:
                del conn.pending[corr]
                conn.send(corr, Cancel())
                return
        # Already removed from pending: find nothing to cancel remotely.


class SocketStream:
    """A stream from a replica; closing it early cancels the replica's generator."""

    __slots__ = ("_conn", "_corr", "_ended", "_receiver")

    def __init__(self, conn: Connection, corr: int, receiver: StreamReceiver) -> None:
        self._conn = conn
        self._corr = corr
        self._receiver = receiver
        self._ended = False

    async def next(self) -> Message:
        msg = await self._receiver.next()
        if type(msg) is not StreamItem:
            self._ended = True
        return msg

    def send_input(self, value: Any) -> None:
        """Send a message into the running stream (a websocket's client messages)."""
        if not self._ended and not self._conn.closed:
            self._conn.send(self._corr, StreamInput(value))

    def close(self) -> None:
        self._receiver.close()
        if not self._ended and not self._conn.closed:
            self._ended = True
            self._conn.send(self._corr, Cancel())


class UnixConnector:
    """Connects to replicas by the socket path they advertise; one connection per replica."""

    async def connect(self, info: ReplicaInfo) -> SocketClient:
        conn = await connect_unix(info.address, None, info.replica_id)
        return SocketClient(conn, info.replica_id)
