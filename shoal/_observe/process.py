"""This process's observability settings: set once, before the process hosts anything."""

from __future__ import annotations

from shoal._observe.options import Telemetry

_current = Telemetry()


def configure_process(telemetry: Telemetry, source: str) -> None:
    """Apply ``telemetry`` to this process; ``source`` names it in reports (a worker id,
    or "controller"). Idempotent: the last call wins."""
    global _current
    _current = telemetry
    from shoal._observe import metrics  # lazily: a process that never configures pays nothing

    metrics.configure(telemetry.metrics, source)
    from shoal._observe import tracing

    tracing.configure(telemetry.tracing, source)
    from shoal._observe import logs

    options = telemetry.logging
    logs.configure(options, options.directory, source)


def current_telemetry() -> Telemetry:
    """The settings this process was configured with (the defaults until then)."""
    return _current
