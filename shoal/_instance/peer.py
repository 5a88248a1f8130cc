"""Who may call the admin API, and serving it with uvicorn on the current loop.

Guarantees:
- a request from a loopback address is served only if the client socket belongs
  to this process's Unix user (its owner uid is read from ``/proc/net/tcp`` and
  ``/proc/net/tcp6``), or if it carries the instance's bearer token;
- a request from any other address is served only with ``Authorization: Bearer
  <token>`` (compared in constant time); an instance without a token refuses to
  bind the admin API to a non-loopback address;
- everything else is answered 403 with a message saying what to do, before the
  request reaches a route.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import logging
import os
import socket
import struct
from typing import Any

import uvicorn

from shoal._config import AdminOptions
from shoal._errors import ConfigError
from shoal._transport.tcp import is_loopback, listen_tcp

logger = logging.getLogger("shoal")

_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_ESTABLISHED = "01"

Address = tuple[str, int]


def _normalize(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _parse_endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """One ``ADDR:PORT`` column of ``/proc/net/tcp{,6}``.

    The kernel prints each 32-bit word of the address as a native-endian integer,
    so packing the words back in native order gives the address bytes.
    """
    hex_address, hex_port = text.split(":")
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    raw = struct.pack(f"={len(words)}I", *words)
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(hex_port, 16)


def socket_owner_uid(
    local: Address, remote: Address, tables: tuple[str, ...] = _TCP_TABLES
) -> int | None:
    """The uid owning the TCP socket whose local end is ``local`` and remote end ``remote``.

    Called with the client's address as ``local`` and the server's as ``remote``,
    this finds the client's socket (not the server's accepted one, which has the
    same addresses the other way round). None if no such socket is listed
    (another network namespace, or it closed meanwhile).
    """
    want_local = (_normalize(local[0]), local[1])
    want_remote = (_normalize(remote[0]), remote[1])
    for table in tables:
        try:
            with open(table) as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    if len(fields) < 8 or fields[3] != _ESTABLISHED:
                        continue
                    if (
                        _parse_endpoint(fields[1]) == want_local
                        and _parse_endpoint(fields[2]) == want_remote
                    ):
                        return int(fields[7])
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
    return None


def bearer_matches(headers: list[tuple[bytes, bytes]], token: str | None) -> bool:
    """Whether the ASGI ``headers`` carry ``Authorization: Bearer <token>`` (constant time)."""
    if not token:
        return False
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, given = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return hmac.compare_digest(given.strip().encode(), token.encode())
    return False


async def refusal(scope: dict[str, Any], token: str | None) -> str | None:
    """Why the request in ``scope`` is refused (a message for the 403), or None to serve it."""
    if bearer_matches(scope.get("headers", []), token):
        return None
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return "the admin API could not tell who is calling; connect over TCP"
    if not is_loopback(client[0]):
        return (
            "the admin API needs 'Authorization: Bearer <token>' from another host; "
            "the token is in admin.token in the instance's directory"
        )
    # Reading /proc/net/tcp is file I/O that grows with the host's sockets: off the loop.
    uid = await asyncio.to_thread(socket_owner_uid, tuple(client), tuple(server))
    if uid != os.geteuid():
        return (
            f"the admin API accepts local connections only from user {os.geteuid()} "
            f"(the caller's socket belongs to {'an unknown user' if uid is None else uid}); "
            "run the command as that user, or send 'Authorization: Bearer <token>'"
        )
    return None


class PeerGuard:
    """ASGI middleware: answers 403 unless :func:`refusal` lets the request through."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            reason = await refusal(scope, self.token)
            if reason is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = f"403 Forbidden: {reason}\n".encode()
                await send({
                    "type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())],
                })  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class AdminServer(uvicorn.Server):
    """A uvicorn server started by :func:`serve_admin`; :meth:`stop` ends it."""

    task: asyncio.Task[None] | None = None

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, let running requests finish (at most ``timeout_s``), close."""
        self.should_exit = True
        if self.task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.task), timeout_s)
            if not self.task.done():
                self.task.cancel()


def _bind(host: str, port: int) -> socket.socket:
    try:
        return listen_tcp(host, port, 128)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"admin address {host}:{port} is in use (another shoal or Ray dashboard?); "
                "pass admin_options={'port': ...} (--admin-port on the command line; 0 picks "
                "a free port) or stop the other process"
            ) from None
        raise ConfigError(
            f"cannot serve the admin API on {host}:{port} ({exc.strerror}); "
            "check admin_options host and port"
        ) from None


async def serve_admin(
    app: Any, options: AdminOptions, token: str | None
) -> tuple[AdminServer, str, int]:
    """Serve ``app`` on ``options.host:options.port`` from the running event loop.

    Returns once the socket listens: the server (``await server.stop()`` ends it),
    and the bound host and port (``options.port=0`` picks a free one). Installs no
    signal handlers and runs no lifespan. A busy port raises ConfigError; so does a
    non-loopback host without a token, since anyone could then drive the instance.
    """
    if not is_loopback(options.host):
        if not token:
            raise ConfigError(
                f"admin_options host {options.host!r} exposes the admin API beyond this "
                "machine, which needs a token; start the instance with a token, or bind "
                "it to 127.0.0.1"
            )
        logger.warning(
            "the admin API is exposed on %s:%d: any host that can reach it and holds the "
            "token can deploy and run code on this machine", options.host, options.port,
        )  # fmt: skip
    sock = _bind(options.host, options.port)
    config = uvicorn.Config(
        app, loop="none", lifespan="off", access_log=False, log_level="warning",
        server_header=False,
    )  # fmt: skip
    server = AdminServer(config)
    config.load()
    server.lifespan = config.lifespan_class(config)  # what Server.serve() would set
    # Not Server.serve(): that installs signal handlers on the main thread.
    await server.startup(sockets=[sock])

    async def run() -> None:
        await server.main_loop()
        await server.shutdown(sockets=[sock])

    server.task = asyncio.get_running_loop().create_task(run(), name="shoal-admin")
    host, port = sock.getsockname()[:2]
    return server, host, port
