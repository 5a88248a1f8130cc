"""``serve.status()``: applications -> deployments -> replicas, with Ray Serve's strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ApplicationStatus(StrEnum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(StrEnum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(StrEnum):
    PENDING = "PENDING"  # waiting for resources (num_cpus, num_gpus, resources) to free up
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    STOPPING = "STOPPING"


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    state: ReplicaState
    pid: int | None
    code_version: str
    config_version: int = 0  # which user_config (counted from 0) the replica has applied
    message: str = ""  # why a PENDING replica waits (the short resource)


@dataclass(frozen=True)
class DeploymentStatusOverview:
    status: DeploymentStatus
    message: str = ""
    replica_states: dict[str, int] = field(default_factory=dict)
    replicas: list[ReplicaStatus] = field(default_factory=list)
    target_replicas: int = 0
    config_version: int = 0  # bumped by every user_config change


@dataclass(frozen=True)
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    route_prefix: str | None = None
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)


@dataclass(frozen=True)
class ProxyStatus:
    host: str
    port: int
    status: str = "HEALTHY"


@dataclass(frozen=True)
class ServeStatus:
    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
