"""The instance-wide observability options, as one validated model (:class:`Telemetry`).

The controller's process builds it from ``serve.start`` (or a config file, or the
CLI) and every worker process receives it, before it hosts anything, in a
:class:`~shoal._transport.messages.ConfigureProcess` message.
"""

from __future__ import annotations

from pydantic import Field

from shoal._config import LoggingConfig, TracingOptions, _Strict, describe_fields_of


class MetricsOptions(_Strict):
    """Prometheus metrics (on by default, as in Ray Serve)."""

    enabled: bool = Field(True, description="Record and export metrics.")
    report_interval_s: float = Field(
        1.0, gt=0, description="Seconds between two reports of a process's metrics."
    )


class LoggingOptions(LoggingConfig):
    """Instance-wide logging: Ray's ``logging_config`` given to ``serve.start`` (the
    proxy's and the controller's, and the default of deployments that set none), and
    where the instance writes its log files (see docs/logging.md)."""

    directory: str | None = Field(
        None,
        description="The instance's log directory, chosen by shoal when it starts "
        "(logs_dir overrides it); null: no log files.",
    )


class Telemetry(_Strict):
    """Everything a process needs to know to report on itself."""

    metrics: MetricsOptions = Field(default_factory=MetricsOptions)
    tracing: TracingOptions = Field(default_factory=TracingOptions)
    logging: LoggingOptions = Field(default_factory=LoggingOptions)


describe_fields_of(MetricsOptions, LoggingOptions, Telemetry)
