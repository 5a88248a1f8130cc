"""The instance-wide observability options, as one validated model (:class:`Telemetry`).

The controller's process builds it from ``serve.start`` (or a config file, or the
CLI) and every worker process receives it, before it hosts anything, in a
:class:`~shoal._transport.messages.ConfigureProcess` message.
"""

from __future__ import annotations

from pydantic import Field

from shoal._config import _Strict


class MetricsOptions(_Strict):
    """Prometheus metrics (on by default, as in Ray Serve)."""

    enabled: bool = Field(True, description="Record and export metrics.")
    report_interval_s: float = Field(
        1.0, gt=0, description="Seconds between two reports of a process's metrics."
    )


class TracingOptions(_Strict):
    """OpenTelemetry tracing (off by default)."""


class LoggingOptions(_Strict):
    """Instance-wide logging (Ray's ``logging_config`` given to ``serve.start``)."""


class Telemetry(_Strict):
    """Everything a process needs to know to report on itself."""

    metrics: MetricsOptions = Field(default_factory=MetricsOptions)
    tracing: TracingOptions = Field(default_factory=TracingOptions)
    logging: LoggingOptions = Field(default_factory=LoggingOptions)
