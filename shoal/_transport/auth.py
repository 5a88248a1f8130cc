"""Authenticated TCP connections between shoal processes on different machines.

A Unix socket is protected by its directory's mode and ``SO_PEERCRED``; a TCP port
is open to anything that can reach it, and every frame carries a pickle, which runs
code when it is loaded. So before a TCP connection becomes a
:class:`~shoal._transport.connection.Connection`, both ends prove that they hold the
instance's secret (:func:`new_instance_secret`, handed to every process of the
instance), with a mutual HMAC-SHA256 challenge-response:

1. client -> server: ``MAGIC | client nonce`` (32 random bytes);
2. server -> client: ``MAGIC | server nonce | HMAC(secret, "shoal server" | nonces)``;
3. the client checks the server's proof, then sends ``HMAC(secret, "shoal client" | nonces)``;
4. the server checks it and answers ``OK``.

Each proof covers the other side's fresh nonce (no replay) and its own role label (a
proof reflected back to the side that made it does not verify); proofs are compared
with :func:`hmac.compare_digest`. Only then is the transport handed to a
``Connection`` (``transport.set_protocol``): no byte from an unauthenticated peer
reaches the decoder, and afterwards a message costs what it costs on a Unix socket
(the same protocol object on the same kind of transport, no wrapper). A server
drops a peer that has not authenticated within ``Timeouts.transport_handshake_s``
and logs one WARNING naming its address; a client raises :class:`TransportError`.

The handshake authenticates the peer, not each later frame: on a network where
someone could take over an established TCP stream, pass an ``ssl.SSLContext``
(TLS on both sides; the handshake then runs inside TLS). A peer failing the TLS
handshake itself is dropped by asyncio's TLS layer, before this protocol (and its
WARNING) sees the connection; asyncio logs that only in debug mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import ssl as _ssl
from typing import Any, cast

from shoal._config import TIMEOUTS
from shoal._errors import TransportError
from shoal._transport.connection import Connection, MessageHandler
from shoal._transport.tcp import listen_tcp

logger = logging.getLogger("shoal.transport")

MAGIC = b"shoal\x00a1"  # the protocol's name and version: 8 bytes
NONCE_SIZE = 32
MAC_SIZE = hashlib.sha256().digest_size
MIN_SECRET_SIZE = 16
_HELLO_SIZE = len(MAGIC) + NONCE_SIZE
_CHALLENGE_SIZE = len(MAGIC) + NONCE_SIZE + MAC_SIZE
_OK = b"\x01"
_SERVER, _CLIENT = b"shoal server", b"shoal client"
_BACKLOG = 1024
# A peer on a lost node (power, network) never closes its end: TCP keepalive drops an
# idle connection to it after about KEEPIDLE + KEEPCNT * KEEPINTVL s (11 s), and
# TCP_USER_TIMEOUT one whose sent data stays unacknowledged for 15 s, so that routers
# and the controller see the loss as they do a closed Unix socket (at once, locally).
_KEEPIDLE_S, _KEEPINTVL_S, _KEEPCNT = 5, 2, 3
_USER_TIMEOUT_MS = 15_000


def new_instance_secret() -> bytes:
    """32 random bytes: the secret every process of one instance proves it holds."""
    return secrets.token_bytes(32)


def _proof(secret: bytes, label: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, label + client_nonce + server_nonce, hashlib.sha256).digest()


def check_secret(secret: bytes) -> None:
    """Raise ValueError unless ``secret`` is bytes long enough to be one."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_SIZE:
        size = len(secret) if isinstance(secret, bytes) else type(secret).__name__
        raise ValueError(
            f"secret must be at least {MIN_SECRET_SIZE} bytes (new_instance_secret() "
            f"makes 32), got {size}"
        )


def join_host_port(host: str, port: int) -> str:
    """``host:port``; an IPv6 host is bracketed (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(address: str) -> tuple[str, int]:
    """The inverse of :func:`join_host_port`; ValueError names a malformed address."""
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"tcp_address={address!r} is not 'host:port'")
    return host, int(port)


def bound_address(server: asyncio.AbstractServer) -> tuple[str, int]:
    """The (host, port) a server made by :func:`serve_tcp` listens on."""
    bound = cast(Any, server).sockets[0].getsockname()
    return str(bound[0]), int(bound[1])


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    """``TCP_NODELAY``, and the keepalive and user timeout that notice a lost peer."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", _KEEPIDLE_S),
            ("TCP_KEEPINTVL", _KEEPINTVL_S),
            ("TCP_KEEPCNT", _KEEPCNT),
            ("TCP_USER_TIMEOUT", _USER_TIMEOUT_MS),
        ):
            if hasattr(socket, name):  # Linux; elsewhere the system's defaults
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return join_host_port(str(peer[0]), int(peer[1])) if peer else "an unknown address"


def _hand_over(transport: asyncio.Transport, conn: Connection, leftover: bytes | bytearray) -> None:
    """Make ``conn`` the transport's protocol; feed it what arrived after the handshake."""
    transport.set_protocol(conn)
    conn.connection_made(transport)
    view = memoryview(leftover)
    while view and not conn.closed:
        buf = conn.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        conn.buffer_updated(n)
        view = view[n:]


class _ServerHandshake(asyncio.Protocol):
    """Proves the secret to a new TCP peer and checks its proof; then hands over."""

    def __init__(
        self,
        secret: bytes,
        on_message: MessageHandler,
        name: str,
        timeout_s: float,
    ) -> None:
        self._secret = secret
        self._on_message = on_message
        self._name = name
        self._timeout_s = timeout_s
        self._peer = "an unknown address"
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._client_nonce = b""
        self._server_nonce = b""
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._peer = _peer(transport)
        _set_nodelay(transport)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout_s, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        if not self._client_nonce:
            self._on_hello()
        else:
            self._on_proof()

    def _on_hello(self) -> None:
        buf = self._buf
        if buf[: len(MAGIC)] != MAGIC[: len(buf)]:
            self._refuse("it does not speak shoal's protocol (is it a shoal process?)")
        elif len(buf) > _HELLO_SIZE:
            self._refuse("it sent more than a hello before authenticating")
        elif len(buf) == _HELLO_SIZE:
            self._client_nonce = bytes(buf[len(MAGIC) :])
            self._server_nonce = secrets.token_bytes(NONCE_SIZE)
            self._buf = bytearray()
            proof = _proof(self._secret, _SERVER, self._client_nonce, self._server_nonce)
            assert self._transport is not None
            self._transport.write(MAGIC + self._server_nonce + proof)

    def _on_proof(self) -> None:
        if len(self._buf) < MAC_SIZE:
            return
        expected = _proof(self._secret, _CLIENT, self._client_nonce, self._server_nonce)
        if len(self._buf) > MAC_SIZE:
            self._refuse("it sent more than its proof before being accepted")
        elif not hmac.compare_digest(bytes(self._buf), expected):
            self._refuse("its proof of the instance secret is wrong (the instance secret differs)")
        else:
            self._accept()

    def _accept(self) -> None:
        self._done = True
        self._stop_timer()
        transport = self._transport
        assert transport is not None
        transport.write(_OK)
        _hand_over(transport, Connection(self._on_message, name=self._name), b"")

    def _refuse(self, reason: str) -> None:
        self._done = True
        self._stop_timer()
        assert self._transport is not None
        logger.warning("%s refused the TCP connection from %s: %s", self._name, self._peer, reason)
        self._transport.abort()

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse(f"it did not authenticate within {self._timeout_s:g} s")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            self._refuse(
                "it closed the connection before authenticating (a peer with another "
                "instance secret, or not a shoal peer)"
            )


class _ClientHandshake(asyncio.Protocol):
    """Checks the server's proof of the secret, proves it in turn, then hands over."""

    def __init__(
        self, secret: bytes, on_message: MessageHandler | None, name: str, where: str
    ) -> None:
        self._secret = secret
        self._on_message = on_message
        self._name = name
        self._where = where
        self._client_nonce = secrets.token_bytes(NONCE_SIZE)
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._proved = False
        self._succeeded = False
        self.done: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        _set_nodelay(transport)
        self._transport.write(MAGIC + self._client_nonce)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._buf += data
        buf = self._buf
        if not self._proved:
            if buf[: len(MAGIC)] != MAGIC[: len(buf)]:
                self._fail("it does not speak shoal's protocol (is this a shoal replica's port?)")
            elif len(buf) > _CHALLENGE_SIZE:
                self._fail("it sent more than its challenge before authenticating")
            elif len(buf) == _CHALLENGE_SIZE:
                self._on_challenge()
        elif buf[:1] != _OK:
            self._fail("it answered the proof with something other than OK")
        else:
            conn = Connection(self._on_message, name=self._name)
            assert self._transport is not None
            self._succeeded = True
            _hand_over(self._transport, conn, buf[1:])
            self.done.set_result(conn)

    def _on_challenge(self) -> None:
        server_nonce = bytes(self._buf[len(MAGIC) : len(MAGIC) + NONCE_SIZE])
        proof = bytes(self._buf[len(MAGIC) + NONCE_SIZE :])
        expected = _proof(self._secret, _SERVER, self._client_nonce, server_nonce)
        if not hmac.compare_digest(proof, expected):
            self._fail(
                "its proof of the instance secret is wrong (the instance secret differs: "
                "is it a process of another shoal instance, or not a shoal peer?)"
            )
            return
        self._proved = True
        self._buf = bytearray()
        assert self._transport is not None
        self._transport.write(_proof(self._secret, _CLIENT, self._client_nonce, server_nonce))

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            where = f"{self._name} at {self._where}"
            self.done.set_exception(TransportError(f"authentication with {where} failed: {reason}"))
        self.abort()

    def abort(self) -> None:
        """Drop the connection unless the handshake succeeded (nobody waits any more)."""
        if self._succeeded:
            return
        if not self.done.done():
            self.done.cancel()
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            "it closed the connection (the instance secret differs, only one side uses "
            "TLS, or it is not a shoal peer)"
        )


async def serve_tcp(
    host: str,
    port: int,
    secret: bytes,
    on_message: MessageHandler,
    name: str,
    *,
    ssl: _ssl.SSLContext | None = None,
    handshake_timeout_s: float | None = None,
) -> asyncio.AbstractServer:
    """Listen on (host, port) (``port=0``: a free one) for peers proving ``secret``.

    Each peer becomes a :class:`Connection` calling ``on_message`` once it has
    authenticated; one that fails to within ``handshake_timeout_s`` (default:
    ``Timeouts.transport_handshake_s``) is dropped with one WARNING. ``ssl``: a server
    context (TLS first, then the handshake inside it). Raises OSError if it cannot bind.
    """
    check_secret(secret)
    timeout_s = handshake_timeout_s
    if timeout_s is None:
        timeout_s = TIMEOUTS.transport_handshake_s
    loop = asyncio.get_running_loop()
    extra: dict[str, Any] = {}
    if ssl is not None:  # TLS first (a failed TLS handshake is dropped by asyncio's TLS layer)
        extra = {"ssl": ssl, "ssl_handshake_timeout": timeout_s}
    return await loop.create_server(
        lambda: _ServerHandshake(secret, on_message, name, timeout_s),
        sock=listen_tcp(host, port, _BACKLOG),
        **extra,
    )


async def connect_tcp(
    host: str,
    port: int,
    secret: bytes,
    on_message: MessageHandler | None,
    name: str,
    timeout_s: float = 10.0,
    *,
    ssl: _ssl.SSLContext | None = None,
) -> Connection:
    """Connect to a shoal process at (host, port) and authenticate both ways.

    Raises TransportError if it cannot connect, if the peer fails to prove ``secret``
    (nothing it sent is decoded), or if all this takes more than ``timeout_s``.
    ``ssl``: a client context (the server's certificate is checked against ``host``).
    """
    check_secret(secret)
    loop = asyncio.get_running_loop()
    where = join_host_port(host, port)
    handshake = _ClientHandshake(secret, on_message, name, where)
    extra: dict[str, Any] = {"ssl": ssl}
    if ssl is not None:
        extra["server_hostname"] = host
    try:
        async with asyncio.timeout(timeout_s):
            await loop.create_connection(lambda: handshake, host, port, **extra)
            return await handshake.done
    except TransportError:
        raise
    except TimeoutError:
        handshake.abort()
        raise TransportError(
            f"cannot connect to {name} at {where}: not connected and authenticated within "
            f"{timeout_s:g} s (is it a shoal process's TCP port, reachable from here?)"
        ) from None
    except OSError as exc:
        handshake.abort()
        hint = (
            "" if ssl is None else " over TLS (does it use TLS, with a certificate trusted here?)"
        )
        raise TransportError(f"cannot connect to {name} at {where}{hint}: {exc!r}") from exc
    except BaseException:
        handshake.abort()
        raise
