"""Workers that outlive their controller, and the successor that adopts them.

In a ``shoal start`` server, workers are spawned with an orphan grace period:
when the controller's connection breaks (the server was killed), a worker
keeps serving with the routing it has and tries to reconnect to the same
socket; a restarted server adopts what rejoins (:class:`Rejoined`) within its
adoption window. A worker nobody adopts within the grace period exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from shoal._transport.messages import Rejoin

#: After the last rejoin, how long a restarted controller waits for more.
QUIET_S = 0.3


class AdoptedProcess:
    """What the runtime needs of a ``subprocess.Popen`` for a worker it did not start
    (it rejoined after a controller restart), by pid: the OS will not let us wait()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -1  # its exit status went to its old parent
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still runs")
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


@dataclass
class Rejoined:
    """The workers that rejoined a restarted controller, and when the last one came."""

    replicas: list[tuple[Any, Rejoin]] = field(default_factory=list)  # (handle, what it said)
    proxy: tuple[Any, Rejoin] | None = None  # (worker, what it said)
    last_at: float = field(default_factory=time.monotonic)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def listening(self) -> None:
        """The controller's socket is open: workers can rejoin from now on (a runtime
        that first connects to a cluster may open it well after it was made)."""
        self.last_at = time.monotonic()

    def add(self) -> None:
        self.last_at = time.monotonic()
        self.arrived.set()

    async def settle(self, window_s: float) -> None:
        """Return once no worker has rejoined for ``QUIET_S`` (at most ``window_s``)."""
        deadline = time.monotonic() + window_s
        while True:
            quiet_until = self.last_at + QUIET_S
            now = time.monotonic()
            if now >= quiet_until or now >= deadline:
                return
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), min(quiet_until, deadline) - now)

    async def wait_for_proxy(self, until: float) -> None:
        """Return once the proxy has rejoined, or at ``until`` (``time.monotonic()``): a
        proxy that still holds the HTTP port can take longer to rejoin than the quiet
        time (its loop is serving requests), and missed, it would keep the port."""
        while self.proxy is None and (left := until - time.monotonic()) > 0:
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
