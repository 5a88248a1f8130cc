"""The one way shoal listens on TCP (the HTTP proxy and the admin API), and the one
test of whether an address keeps a server to this machine (:func:`is_loopback`)."""

from __future__ import annotations

import ipaddress
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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is a loopback address: a server
    bound to anything else (``0.0.0.0``, a name, an interface's address) may be reached
    from other machines."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
