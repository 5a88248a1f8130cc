"""Where replicas run: the id runtimes on this machine put in ``ReplicaInfo.node_id``."""

from __future__ import annotations

import functools
import socket


@functools.cache
def local_node_id() -> str:
    """This machine's id: its host name, the same in every process and instance on it.

    Stable across restarts, so a restarted controller can tell its own machine's
    replicas from others'; a runtime spanning machines (Ray) uses its own node ids.
    """
    return socket.gethostname()
