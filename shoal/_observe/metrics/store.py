"""The controller's view of every process's metrics (``MetricsStore``) and their export.

Guarantees:

- the latest report of each source (a worker, an attached process) is kept until
  that process stops or dies (``forget``): its counts leave the endpoint with it;
- the controller's own process is read directly at collection time (so the
  in-process runtime, where everything is one process, needs no report at all);
- samples with the same name and labels from several processes are summed (counts,
  histogram buckets and gauges alike: see ``shoal._observe.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shoal._observe import metrics
from shoal._observe.metrics.recent import ErrorData, as_dict
from shoal._observe.metrics.registry import FamilyData
from shoal._transport.messages import MetricsReport

DISABLED_EXPOSITION = (
    b"# shoal metrics are disabled (serve.start(metrics_options={'enabled': False})): "
    b"nothing is recorded\n"
)


class MetricsStore:
    """The latest metrics report of every process, merged on demand."""

    def __init__(self) -> None:
        self._reports: dict[str, MetricsReport] = {}

    # --- what the runtime feeds it ----------------------------------------------------

    def record(self, report: MetricsReport) -> None:
        """Keep ``report`` as its source's latest."""
        self._reports[report.source] = report

    def forget(self, source: str) -> None:
        """The process ``source`` stopped or died: drop what it reported."""
        self._reports.pop(source, None)

    def sources(self) -> list[str]:
        """The processes whose reports are kept (besides this one)."""
        return list(self._reports)

    # --- what readers get --------------------------------------------------------------

    def families(self) -> list[FamilyData]:
        """Every family of every process, merged, as plain tuples."""
        merged: dict[str, tuple[str, str, dict[tuple[str, Any], float]]] = {}
        for name, kind, help_text, samples in self._all_families():
            entry = merged.get(name)
            if entry is None:
                entry = merged[name] = (kind, help_text, {})
            elif entry[0] != kind:
                continue  # two processes disagree on a type: keep the first one's
            values = entry[2]
            for sample_name, labels, value in samples:
                key = (sample_name, labels)
                values[key] = values.get(key, 0.0) + value
        return [
            (name, kind, help_text, [(s, labels, v) for (s, labels), v in values.items()])
            for name, (kind, help_text, values) in merged.items()
        ]

    def collect(self) -> Iterator[Any]:
        """The merged families as prometheus_client ``Metric`` objects."""
        from prometheus_client.metrics_core import Metric

        for name, kind, help_text, samples in self.families():
            family = Metric(name, help_text, kind)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, dict(labels), value)
            yield family

    def recent_errors(self) -> list[dict[str, Any]]:
        """Every process's recent request failures, newest first, as dicts with keys
        time, application, deployment, replica, request_id, type, message, traceback."""
        errors: list[ErrorData] = []
        if metrics.enabled():
            errors += metrics.snapshot()[1]
        for report in list(self._reports.values()):
            errors += report.recent_errors
        errors.sort(key=lambda error: error[0], reverse=True)
        return [as_dict(error) for error in errors]

    def exposition(self) -> bytes:
        """The Prometheus text format of everything (a comment only when disabled)."""
        if not metrics.enabled():
            return DISABLED_EXPOSITION
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)

    def _all_families(self) -> Iterator[FamilyData]:
        if metrics.enabled():
            yield from metrics.snapshot()[0]
        for report in list(self._reports.values()):
            yield from report.families


def content_type() -> str:
    """The content type of the Prometheus text format (``exposition()``)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)


class _Collector:
    """prometheus_client's view of a store."""

    def __init__(self, store: MetricsStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        return self.store.collect()
