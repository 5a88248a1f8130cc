"""How the processes of a shoal instance on a Ray cluster reach each other.

Ray places the replicas; shoal's own sockets carry the requests and the control
messages. On one node they are the Unix sockets of the local runtime; between
nodes, TCP authenticated with the instance secret (:mod:`shoal._transport.auth`):

- the runtime makes the secret (:func:`instance_secret`) and hands it to every
  replica's actor as a constructor argument (:class:`ClusterNetwork`): Ray, which
  already runs the instance's code on every node, is the trust domain. The secret is
  never on a command line, in an environment variable or in a log line; the proxy, a
  process of the controller's node, gets it over its Unix control connection;
- the controller listens on its node's address (as Ray reports it, never a wildcard)
  as well as on its Unix socket; an actor on another node says hello over TCP;
- each replica listens on its node's address (port 0) as well, and advertises it in
  ``ReplicaInfo.tcp_address``; routers reach a replica of their own node over its Unix
  socket and any other over TCP (:class:`~shoal._transport.client.NetworkConnector`).

Nodes are told apart by Ray node id, never by address: the nodes of a local test
cluster share 127.0.0.1, and their replicas still talk over TCP.

A ``shoal start --ray`` server keeps the secret and its control port in its private
directory (mode 0600), so that its replicas on other nodes rejoin a restarted server.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from shoal._transport.auth import new_instance_secret
from shoal._transport.client import NodeNetwork

#: The file in a server's directory that keeps the secret and the control port.
STATE_FILE = "ray-network.json"


@dataclass(frozen=True)
class ClusterNetwork:
    """What a replica's actor is given through Ray: the instance secret and where the
    controller is (its Ray node id, and its authenticated TCP address "host:port")."""

    secret: bytes = field(repr=False)
    controller_node_id: str
    controller_address: str

    def in_this_actor(self) -> tuple[NodeNetwork, str]:
        """Inside the actor: the network of its node (Ray's node id and address), and
        the controller's TCP address if it runs on another node ("": its Unix socket)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        host = ray.util.get_node_ip_address()
        remote = node_id != self.controller_node_id
        return NodeNetwork(node_id, self.secret, host), self.controller_address if remote else ""


def instance_secret(directory: str | None) -> tuple[bytes, int]:
    """The instance secret and the control port to bind (0: any).

    ``directory``: a server's, where a restarted server finds the secret and port of
    the one before (its replicas rejoin it); None: a new secret, never written down."""
    if directory is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(os.path.join(directory, STATE_FILE)) as file:
                state: dict[str, Any] = json.load(file)
            return bytes.fromhex(state["secret"]), int(state["port"])
    return new_instance_secret(), 0


def keep_secret(directory: str, secret: bytes, port: int) -> None:
    """Write the secret and the control port to ``directory`` (readable by this user
    only; replaced atomically)."""
    path = os.path.join(directory, STATE_FILE)
    partial = f"{path}.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"secret": secret.hex(), "port": port}, file)
    os.replace(partial, path)


def forget_secret(directory: str) -> None:
    """Remove what :func:`keep_secret` wrote (the server stopped: no replica rejoins)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, STATE_FILE))
