"""Clients of a replica's data plane: one multiplexed connection to its server.

:class:`SocketClient` is a router's ``ReplicaClient`` over a
:class:`~shoal._transport.connection.Connection`, whichever socket carries it.
:class:`NetworkConnector` reaches a replica on this node over its Unix socket and
one on another node over authenticated TCP (:mod:`shoal._transport.auth`).
"""

from __future__ import annotations

import asyncio
import functools
import ssl as _ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shoal._transport.auth import check_secret, connect_tcp, split_host_port
from shoal._transport.connection import Connection, StreamReceiver, connect_unix
from shoal._transport.messages import (
    Cancel,
    Message,
    ReplicaInfo,
    Request,
    StreamInput,
)


class SocketClient:
    """ReplicaClient over one multiplexed connection to a replica process."""

    __slots__ = ("_cancel_remote", "_conn", "replica_id")

    def __init__(self, conn: Connection, replica_id: str) -> None:
        self._conn = conn
        self.replica_id = replica_id
        # Every call's done callback: one object for them all, not one made per call.
        self._cancel_remote = functools.partial(_cancel_remote, conn)

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
        future.add_done_callback(self._cancel_remote)
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
    """A stream from a replica; closing it early cancels the replica's generator.

    It has ended once its receiver got its last message (or failed, or was closed):
    then closing it sends nothing, and inputs are dropped.
    """

    __slots__ = ("_conn", "_corr", "_receiver")

    def __init__(self, conn: Connection, corr: int, receiver: StreamReceiver) -> None:
        self._conn = conn
        self._corr = corr
        self._receiver = receiver

    def next(self) -> Coroutine[Any, Any, Message]:
        """The receiver's next message (its coroutine itself: one frame fewer per wait)."""
        return self._receiver.next()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the replica's last message arrives (or the
        stream fails or is closed), before it is read."""
        self._receiver.on_end(callback)

    def send_input(self, value: Any) -> None:
        """Send a message into the running stream (a websocket's client messages)."""
        if not self._receiver._end and not self._conn.closed:
            self._conn.send(self._corr, StreamInput(value))

    def close(self) -> None:
        ended = self._receiver._end  # (closing the receiver ends it)
        self._receiver.close()
        if not ended and not self._conn.closed:
            self._conn.send(self._corr, Cancel())


class NetworkConnector:
    """A ``Connector`` for replicas spread over nodes: one connection per replica.

    A replica on this node (``info.node_id == node_id``), or one with no
    ``tcp_address``, is reached over its Unix socket (``info.address``); any other
    over TCP to ``info.tcp_address``, proving ``secret`` (the instance's) and
    checking the replica proves it too. ``ssl``: a client context for TLS.
    """

    def __init__(
        self,
        node_id: str,
        secret: bytes,
        *,
        ssl: _ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        check_secret(secret)
        self.node_id = node_id
        self._secret = secret
        self._ssl = ssl
        self._timeout_s = timeout_s

    async def connect(self, info: ReplicaInfo) -> SocketClient:
        if info.node_id == self.node_id or not info.tcp_address:
            conn = await connect_unix(info.address, None, info.replica_id, self._timeout_s)
        else:
            host, port = split_host_port(info.tcp_address)
            conn = await connect_tcp(
                host, port, self._secret, None, info.replica_id, self._timeout_s, ssl=self._ssl
            )
        return SocketClient(conn, info.replica_id)


@dataclass(frozen=True, slots=True)
class NodeNetwork:
    """Where a process of an instance spread over nodes runs, and the instance secret.

    ``node_id`` names the node as ``ReplicaInfo.node_id`` does; ``host`` is the
    node's address, where a replica it hosts listens on TCP ("" if it hosts none).
    The secret never appears in a repr (nor, so, in a log line).
    """

    node_id: str
    secret: bytes = field(repr=False)
    host: str = ""

    def connector(self) -> NetworkConnector:
        """The routers' connector of a process on this node."""
        return NetworkConnector(self.node_id, self.secret)
