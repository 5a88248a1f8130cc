"""Shoal's standard metrics, defined once (names, help, labels), for the modules that
record them. Names are the ones Ray Serve's metrics have once exported to Prometheus
(``ray_`` prefix), so Ray's Grafana dashboards work; shoal's own start with
``shoal_``. The table with their meaning is in docs/metrics.md.
"""

from __future__ import annotations

from shoal._observe.metrics import counter, gauge, histogram
from shoal._observe.metrics.registry import Family, Kind, NullFamily, Registry

AnyFamily = Family | NullFamily

#: Label names of a replica's metrics (Ray adds them to every metric of a replica).
REPLICA_LABELS = ("deployment", "replica", "application")


def requests_shed() -> AnyFamily:
    """Requests refused by load shedding (reason: queue_full, proxy_max_ongoing_requests,
    no_replica_timeout)."""
    return counter(
        "shoal_requests_shed",
        "Requests refused by load shedding: the router's queue was full (queue_full), "
        "the proxy held http_options.max_ongoing_requests (proxy_max_ongoing_requests), "
        "or no replica could take it within no_replica_timeout_s (no_replica_timeout).",
        ("application", "deployment", "reason"),
    )


def deadline_expired() -> AnyFamily:
    """Requests whose deadline passed (where: queue, running, reply)."""
    return counter(
        "shoal_deadline_expired",
        "Requests whose deadline passed: waiting in a router's queue (queue), running in "
        "the replica (running), or waiting for the replica's answer (reply).",
        ("application", "deployment", "where"),
    )


def span_queue_full() -> AnyFamily:
    """Hand-overs of a process's ended spans that found its queue full (spans dropped)."""
    return counter(
        "shoal_tracing_span_queue_full",
        "Times a process's queue of ended spans was full when handed to the exporter: "
        "spans beyond it were dropped, the oldest first. Lower "
        "tracing_options.sampling_ratio.",
    )


def queued_queries() -> AnyFamily:
    return gauge(
        "ray_serve_deployment_queued_queries",
        "The current number of queries to this deployment waiting to be assigned to a replica.",
        ("deployment", "application"),
    )


def replica_request_counter() -> AnyFamily:
    return counter(
        "ray_serve_deployment_request_counter",
        "The number of queries that have been processed in this replica.",
        ("route", *REPLICA_LABELS),
    )


def replica_error_counter() -> AnyFamily:
    return counter(
        "ray_serve_deployment_error_counter",
        "The number of exceptions that have occurred in this replica.",
        ("route", *REPLICA_LABELS),
    )


def replica_processing_latency() -> AnyFamily:
    return histogram(
        "ray_serve_deployment_processing_latency_ms",
        "The latency for queries to be processed.",
        ("route", *REPLICA_LABELS),
    )


def replica_processing_queries() -> AnyFamily:
    return gauge(
        "ray_serve_replica_processing_queries",
        "The current number of queries being processed.",
        REPLICA_LABELS,
    )


def replica_starts() -> AnyFamily:
    return counter(
        "ray_serve_deployment_replica_starts",
        "The number of times this replica has been restarted due to failure.",
        REPLICA_LABELS,
    )


# --- computed by the controller from its state when collected (see ``Registry.collect``)
Spec = tuple[str, Kind, str, tuple[str, ...]]

REPLICA_HEALTHY: Spec = (
    "ray_serve_deployment_replica_healthy", "gauge",
    "Tracks whether this deployment replica is healthy. 1 means healthy, 0 means unhealthy.",
    REPLICA_LABELS,
)  # fmt: skip
AUTOSCALING_TARGET_REPLICAS: Spec = (
    "ray_serve_autoscaling_target_replicas", "gauge",
    "The target number of replicas for this deployment. This is the number the autoscaler "
    "is trying to reach.",
    ("deployment", "application"),
)  # fmt: skip
AUTOSCALING_DESIRED_REPLICAS: Spec = (
    "ray_serve_autoscaling_desired_replicas", "gauge",
    "The raw autoscaling decision (number of replicas) from the autoscaling policy before "
    "applying min/max bounds.",
    ("deployment", "application"),
)  # fmt: skip
DEPLOYMENT_REPLICAS: Spec = (
    "shoal_deployment_replicas", "gauge",
    "The number of replicas of this deployment by state (PENDING, STARTING, RUNNING, "
    "RECOVERING, STOPPING); target: how many it should run.",
    ("deployment", "application", "state"),
)  # fmt: skip


def define(spec: Spec, registry: Registry) -> Family:
    """The family of ``spec`` in ``registry`` (a collector's own, built per collection)."""
    name, kind, help_text, labels = spec
    return registry.family(name, kind, help_text, labels)
