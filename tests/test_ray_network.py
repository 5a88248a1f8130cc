"""The Ray runtime's instance secret: where it is kept, and that it never shows in a repr.

The wiring itself (replicas and the controller over authenticated TCP between Ray
nodes) is tested on a real cluster in tests/test_ray_runtime.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shoal._runtime.ray.network import (
    STATE_FILE,
    ClusterNetwork,
    forget_secret,
    instance_secret,
    keep_secret,
)
from shoal._transport.client import NetworkConnector, NodeNetwork
from shoal._transport.messages import ConfigureProcess

SECRET = bytes(range(32))


def test_a_driver_s_secret_is_new_each_time_and_never_written(tmp_path: Path) -> None:
    first, port = instance_secret(None)
    assert len(first) == 32 and port == 0
    assert instance_secret(None)[0] != first
    assert list(tmp_path.iterdir()) == []


def test_a_server_keeps_its_secret_and_port_for_its_successor(tmp_path: Path) -> None:
    directory = str(tmp_path)
    assert instance_secret(directory)[1] == 0  # nothing kept yet: a new secret
    keep_secret(directory, SECRET, 41234)
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert instance_secret(directory) == (SECRET, 41234)
    forget_secret(directory)
    assert not path.exists()
    forget_secret(directory)  # already gone: nothing to do
    path.write_text("{not json")
    secret, port = instance_secret(directory)  # unreadable: a new one
    assert secret != SECRET and len(secret) == 32 and port == 0


def test_the_secret_never_shows_in_a_repr() -> None:
    node = NodeNetwork("node-a", SECRET, "127.0.0.1")
    shown = [
        repr(node),
        repr(ClusterNetwork(SECRET, "head", "127.0.0.1:41234")),
        repr(ConfigureProcess({}, node)),
    ]
    for text in shown:
        assert SECRET.hex() not in text and repr(SECRET) not in text, text
    assert "node-a" in shown[0]
    connector = node.connector()
    assert isinstance(connector, NetworkConnector) and connector.node_id == "node-a"
