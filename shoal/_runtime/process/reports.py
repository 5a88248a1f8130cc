"""Other processes' metrics reports, as the controller's runtime receives them."""

from __future__ import annotations

from shoal._seam.protocols import MetricsSink
from shoal._transport.connection import Connection
from shoal._transport.messages import MetricsReport


class MetricsReports:
    """Passes each report to ``sink``; a source is forgotten when the connection it
    reported on closes (its process stopped or died), so its counts leave /metrics
    with it."""

    def __init__(self) -> None:
        self.sink: MetricsSink | None = None  # None: reports are dropped
        self._sources: set[str] = set()  # whose connection forgets them on close

    def record(self, conn: Connection, report: MetricsReport) -> None:
        sink = self.sink
        if sink is None:
            return
        if report.source not in self._sources:
            self._sources.add(report.source)
            conn.close_callbacks.append(lambda _conn: self._gone(report.source))
        sink.record(report)

    def _gone(self, source: str) -> None:
        self._sources.discard(source)
        if self.sink is not None:
            self.sink.forget(source)
