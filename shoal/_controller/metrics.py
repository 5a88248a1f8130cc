"""The controller's metrics, computed from its state each time they are collected:
replica health, replica counts by state, autoscaling target and raw decision.

Computed rather than recorded, so they can never disagree with ``serve.status()``,
and a deleted deployment's or stopped replica's series disappear with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from shoal._controller.status import ReplicaState
from shoal._observe.metrics.registry import FamilyData, Registry
from shoal._observe.metrics.standard import (
    AUTOSCALING_DESIRED_REPLICAS,
    AUTOSCALING_TARGET_REPLICAS,
    DEPLOYMENT_REPLICAS,
    REPLICA_HEALTHY,
    define,
)

if TYPE_CHECKING:
    from shoal._controller.deployment_state import DeploymentState

#: Replicas whose health is reported (a starting one has not been checked yet).
_CHECKED = (ReplicaState.RUNNING, ReplicaState.RECOVERING, ReplicaState.STOPPING)


def controller_collector(
    deployments: Callable[[], Iterable[DeploymentState]],
) -> Callable[[], list[FamilyData]]:
    """A collector over the deployments ``deployments()`` returns when it runs."""

    def collect() -> list[FamilyData]:
        registry = Registry()
        healthy = define(REPLICA_HEALTHY, registry)
        replicas = define(DEPLOYMENT_REPLICAS, registry)
        target = define(AUTOSCALING_TARGET_REPLICAS, registry)
        desired = define(AUTOSCALING_DESIRED_REPLICAS, registry)
        for state in deployments():
            if state.spec is None:
                continue  # not deployed yet
            app, name = state.app, state.name
            counts: dict[str, int] = {}
            for record in state.replicas:
                counts[record.state] = counts.get(record.state, 0) + 1
                if record.state in _CHECKED:
                    ok = record.state is ReplicaState.RUNNING and not record.health_failures
                    healthy.labels(name, record.handle.info.replica_id, app).set(float(ok))
            counts[ReplicaState.STARTING] = counts.get(ReplicaState.STARTING, 0) + len(
                state.starting
            )
            counts[ReplicaState.PENDING] = len(state.pending)
            for replica_state, count in counts.items():
                replicas.labels(name, app, str(replica_state)).set(count)
            replicas.labels(name, app, "target").set(state.target)
            if state.autoscaler is not None:
                target.labels(name, app).set(state.target)
                if state.autoscaler.desired is not None:
                    desired.labels(name, app).set(state.autoscaler.desired)
        return registry.data()

    return collect
