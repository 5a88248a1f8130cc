"""Sends this process's metrics to the controller every ``report_interval_s``.

Guarantees: at most one reporting task per process; nothing is sent while metrics are
disabled (the task ends); a report that cannot be sent (the controller is gone or
going) is dropped, the next one carries the same totals (counters are cumulative).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from shoal._observe import metrics
from shoal._transport.messages import MetricsReport

logger = logging.getLogger("shoal.metrics")

Sink = Callable[[MetricsReport], None]


class MetricsReporter:
    """This process's periodic metrics reports (see the module's guarantees)."""

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.source = ""
        self._task: asyncio.Task[None] | None = None

    def connect(self, loop: asyncio.AbstractEventLoop, source: str, sink: Sink) -> None:
        """Report to ``sink`` from now on (a new connection replaces the last one)."""
        self.source, self.sink = source, sink
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def report_now(self) -> None:
        """Send a report at once (a process about to stop: its last counts)."""
        sink = self.sink
        if sink is None or not metrics.enabled():
            return
        families, errors = metrics.snapshot()
        try:
            sink(MetricsReport(self.source, families, errors))
        except Exception as exc:  # the controller is gone or going: nothing to tell
            logger.debug("metrics report not sent: %r", exc)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(metrics.options().report_interval_s)
            if not metrics.enabled():
                return
            self.report_now()


#: This process's reporter (a worker or an attached process has one connection).
REPORTER = MetricsReporter()
