"""Data-plane clients of the process runtime: routers reach replicas over Unix sockets.

The client itself (:class:`SocketClient`) lives in :mod:`shoal._transport.client`,
shared with runtimes whose replicas span nodes (``NetworkConnector``).
"""

from __future__ import annotations

from shoal._transport.client import SocketClient, SocketStream
from shoal._transport.connection import connect_unix
from shoal._transport.messages import ReplicaInfo

__all__ = ["SocketClient", "SocketStream", "UnixConnector"]


class UnixConnector:
    """Connects to replicas by the socket path they advertise; one connection per replica."""

    async def connect(self, info: ReplicaInfo) -> SocketClient:
        conn = await connect_unix(info.address, None, info.replica_id)
        return SocketClient(conn, info.replica_id)
