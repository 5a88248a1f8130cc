"""Load reports: what the routers of one process ask of an autoscaled deployment.

The routers of a deployment that autoscales (``metrics_interval_s`` > 0 in its
replica sets) are sampled every ``SAMPLE_S``; every ``metrics_interval_s`` the
mean of the samples since the last report is sent to the controller (a
:class:`LoadReport`). Guarantees:

- nothing runs for a deployment that does not autoscale, nor for a router this
  process never used;
- a router whose load stays at zero reports once, then is silent until it has
  load again (idle processes send nothing);
- a request that has to wait while the deployment has no replica is reported at
  once (at most every ``STARVED_EVERY_S``), so a deployment scaled to zero starts a
  replica without waiting for the next report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from shoal._transport.messages import LoadReport

if TYPE_CHECKING:
    from shoal._router.router import Router

logger = logging.getLogger("shoal.router")

#: How often a router's load is sampled (Ray Serve records handle metrics every 0.5 s).
SAMPLE_S = 0.1
#: Least time between two immediate reports of a router waiting with no replica.
STARVED_EVERY_S = 0.05

Sink = Callable[[LoadReport], None]


class LoadReporter:
    """Samples and reports the load of this process's autoscaled routers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Where reports go: the controller's autoscaler, or a connection to it. None:
        #: nowhere (reports are dropped; the process is not connected yet).
        self.sink: Sink | None = None
        self.source = "local"
        self._tracked: dict[int, asyncio.Task[None]] = {}
        self._starved_at: dict[int, float] = {}

    def track(self, router: Router) -> None:
        """Report ``router``'s load while its deployment autoscales (idempotent)."""
        if id(router) not in self._tracked:
            task = self.loop.create_task(self._sample(router))
            self._tracked[id(router)] = task
            task.add_done_callback(lambda _t: self._tracked.pop(id(router), None))

    def starved(self, router: Router) -> None:
        """A request waits and ``router`` has no replica: report now."""
        now = self.loop.time()
        if now - self._starved_at.get(id(router), -1.0) < STARVED_EVERY_S:
            return
        self._starved_at[id(router)] = now
        queued, running = router.load_sample()
        self._send(router, float(queued), {k: float(v) for k, v in running.items()}, 0.0)

    def stop(self) -> None:
        for task in list(self._tracked.values()):
            task.cancel()

    async def _sample(self, router: Router) -> None:
        queued_sum = 0.0
        running_sum: dict[str, float] = {}
        samples = 0
        last_sent = self.loop.time()
        reported_zero = False
        while router.exists and router.metrics_interval_s > 0:
            await asyncio.sleep(min(SAMPLE_S, router.metrics_interval_s))
            queued, running = router.load_sample()
            queued_sum += queued
            for replica_id, count in running.items():
                running_sum[replica_id] = running_sum.get(replica_id, 0.0) + count
            samples += 1
            now = self.loop.time()
            if now - last_sent < router.metrics_interval_s:
                continue
            idle = queued_sum == 0 and not any(running_sum.values())
            if not (idle and reported_zero):
                means = {k: v / samples for k, v in running_sum.items()}
                self._send(router, queued_sum / samples, means, now - last_sent)
            reported_zero = idle
            queued_sum, running_sum, samples, last_sent = 0.0, {}, 0, now

    def _send(
        self, router: Router, queued: float, running: dict[str, float], period_s: float
    ) -> None:
        sink = self.sink
        if sink is None:
            return
        report = LoadReport(router.app, router.deployment, self.source, queued, running, period_s)
        try:
            sink(report)
        except Exception as exc:  # the controller is gone or going: the next one will do
            logger.debug("load report for %s/%s not sent: %r", router.app, router.deployment, exc)
