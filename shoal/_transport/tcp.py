"""The one way shoal listens on TCP (the HTTP proxy and the admin API)."""

from __future__ import annotations

import socket


def listen_tcp(host: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking socket listening on (host, port) (``port=0``: a free one).

    ``SO_REUSEADDR`` lets a restarted server take its port back at once. ``reuse_port``:
    ``SO_REUSEPORT`` too, so that other sockets of this user that set it listen on the
    same port, the kernel spreading new connections over them (the Ray runtime's
    proxies of the nodes of a one-machine cluster). Raises the OSError of ``bind`` (the
    socket is closed); callers say which option to change.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
