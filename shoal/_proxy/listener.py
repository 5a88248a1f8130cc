"""The HTTP proxy's listening socket, without the proxy: the controller binds it and
hands it to every proxy process it starts (``LISTEN_FD_ENV``), so importing this
module must stay cheap (no Starlette, no uvicorn: the driver does not serve HTTP)."""

from __future__ import annotations

import socket

from shoal._errors import ShoalError
from shoal._transport.tcp import listen_tcp

#: The environment variable that names the listening socket a proxy process inherits.
LISTEN_FD_ENV = "SHOAL_PROXY_LISTEN_FD"


def bind_listener(host: str, port: int, reuse_port: bool = False, what: str = "") -> socket.socket:
    """A non-blocking listening TCP socket on (host, port); ShoalError if it cannot bind.
    ``reuse_port``: shared with the other sockets of this user that bind it so (see
    :func:`~shoal._transport.tcp.listen_tcp`). ``what``: the server's name in the error
    (default: the HTTP proxy's, with how to choose its port)."""
    try:
        return listen_tcp(host, port, 2048, reuse_port)
    except OSError as exc:
        if what:
            raise ShoalError(
                f"{what} cannot listen on {host}:{port} ({exc.strerror}); choose a free port"
            ) from None
        raise ShoalError(
            f"the HTTP proxy cannot listen on {host}:{port} ({exc.strerror}); "
            "pass another port with serve.start(http_options={'port': ...})"
        ) from None


def port_held(host: str, port: int) -> bool:
    """Whether a socket listens on (host, port) now (port 0 never is)."""
    if port == 0:
        return False
    try:
        listen_tcp(host, port, 1, False).close()
    except OSError:
        return True
    return False
