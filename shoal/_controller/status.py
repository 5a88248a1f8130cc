"""``serve.status()``: applications -> deployments -> replicas, with Ray Serve's strings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from shoal._controller.status_text import render_application, render_deployment, render_status

if TYPE_CHECKING:
    from shoal._controller.deployment_state import DeploymentState


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
    #: What the replica reported at its last health check: its ``status_details()`` and
    #: its batchers (JSON values; docs/status-details.md). None: nothing to report.
    details: dict[str, Any] | None = None
    #: The node (machine, or Ray node) it runs on; "" while it has none.
    node_id: str = ""
    #: Where routers on other nodes reach it ("host:port", authenticated TCP: the Ray
    #: runtime); "" when it is reached over its Unix socket only.
    tcp_address: str = ""


@dataclass(frozen=True)
class ScalingDecision:
    """One change of an autoscaled deployment's replica count: when (``time.time()``),
    from and to how many replicas, and why."""

    time: float
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(frozen=True)
class DeploymentStatusOverview:
    status: DeploymentStatus
    message: str = ""
    replica_states: dict[str, int] = field(default_factory=dict)
    replicas: list[ReplicaStatus] = field(default_factory=list)
    target_replicas: int = 0
    config_version: int = 0  # bumped by every user_config change
    autoscaling: bool = False  # whether the replica count is the autoscaler's
    scaling_decisions: list[ScalingDecision] = field(default_factory=list)  # oldest first

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        """Each replica's reported details, by replica id (replicas with none left out)."""
        return {r.replica_id: r.details for r in self.replicas if r.details is not None}

    def __str__(self) -> str:
        return render_deployment("deployment", self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))  # IPython and Jupyter show the summary


@dataclass(frozen=True)
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    route_prefix: str | None = None
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)
    #: shoal's own: the port where the ingress replicas serve HTTP themselves besides the
    #: proxy (docs/direct-ingress.md); None without one.
    direct_ingress_port: int | None = None

    def __str__(self) -> str:
        return render_application("application", self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


class ProxyStatus(str):
    """A proxy's status, one of Ray Serve's strings (``serve.status().proxies[node]``).

    It compares equal to the string ("HEALTHY"...), as Ray's ``ProxyStatus`` enum
    members do, and also carries where the proxy listens: ``.host`` and ``.port``,
    and ``.pid``, its process (None while none runs).

    STARTING until it serves; UNHEALTHY once its process died or its event loop
    stopped answering, then STARTING while a replacement starts; DRAINING while
    shoal shuts down.
    """

    STARTING: ClassVar[str] = "STARTING"
    HEALTHY: ClassVar[str] = "HEALTHY"
    UNHEALTHY: ClassVar[str] = "UNHEALTHY"
    DRAINING: ClassVar[str] = "DRAINING"
    DRAINED: ClassVar[str] = "DRAINED"

    host: str
    port: int
    pid: int | None

    def __new__(
        cls, host: str, port: int, status: str = "HEALTHY", pid: int | None = None
    ) -> ProxyStatus:
        if status not in _PROXY_STATUSES:
            raise ValueError(f"unknown proxy status {status!r}; one of {_PROXY_STATUSES}")
        value = super().__new__(cls, status)
        value.host, value.port, value.pid = host, port, pid
        return value

    @property
    def status(self) -> str:
        """The status as a plain string."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"ProxyStatus({self.status!r}, host={self.host!r}, port={self.port}, pid={self.pid})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ProxyStatus, (self.host, self.port, self.status, self.pid))


_PROXY_STATUSES = ("STARTING", "HEALTHY", "UNHEALTHY", "DRAINING", "DRAINED")


@dataclass(frozen=True)
class ServeStatus:
    proxies: dict[str, ProxyStatus] = field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    target_capacity: float | None = None  # percent of every deployment's replicas

    def __str__(self) -> str:
        """The indented summary ``print(serve.status())`` shows (``shoal._controller.
        status_text``); ``repr()`` stays the structured dataclass repr."""
        return render_status(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(str(self))


def deployment_overview(state: DeploymentState) -> DeploymentStatusOverview:
    """What ``serve.status()`` says of one deployment: its replicas, running, starting
    and pending, and the autoscaler's decisions."""
    states = Counter(str(r.state) for r in state.replicas)
    replicas = [
        ReplicaStatus(
            r.handle.info.replica_id,
            r.state,
            r.handle.pid,
            r.code_version,
            r.config_version,
            details=r.details,
            node_id=r.handle.info.node_id,
            tcp_address=r.handle.info.tcp_address,
        )
        for r in state.replicas
    ]
    version = state.spec.code_version if state.spec else ""
    for replica_id in state.starting:
        states[str(ReplicaState.STARTING)] += 1
        replicas.append(
            ReplicaStatus(replica_id, ReplicaState.STARTING, None, version, state.config_version)
        )
    for replica_id, reason in state.pending.items():
        states[str(ReplicaState.PENDING)] += 1
        replicas.append(
            ReplicaStatus(
                replica_id, ReplicaState.PENDING, None, version, state.config_version, reason
            )
        )
    decisions = list(state.autoscaler.decisions) if state.autoscaler is not None else []
    return DeploymentStatusOverview(
        state.status, state.message, dict(states), replicas, state.target, state.config_version,
        state.autoscaler is not None, decisions,
    )  # fmt: skip
