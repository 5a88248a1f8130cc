"""What the controller deploys and what a runtime starts: plain data, no behaviour.

The bottom of shoal's layers: the API builds these from a bound graph (or a
config file), the controller keeps them as desired state, and a runtime turns a
:class:`ReplicaSpec` into a running replica, in whichever process hosts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal._config import DeploymentConfig, HTTPOptions
from shoal._seam.code import UserCode


@dataclass
class DeploymentSpec:
    """One deployment of an application, with handles in place of bound deployments."""

    name: str
    code: UserCode
    config: DeploymentConfig
    code_version: str
    #: Set (by the controller) on an ingress that serves HTTP itself (docs/direct-ingress.md).
    direct_ingress: DirectIngressSpec | None = None


@dataclass
class AppSpec:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, DeploymentSpec]
    #: Import path of an application-level autoscaling policy (a config file's), or None.
    autoscaling_policy: str | None = None
    #: The port on which the ingress replicas accept HTTP themselves (docs/direct-ingress.md),
    #: or None: only through the proxy.
    direct_ingress_port: int | None = None


@dataclass(frozen=True)
class DirectIngressSpec:
    """How an ingress replica accepts HTTP itself: the instance's ``http_options`` with
    the application's port, and the application's route prefix."""

    options: HTTPOptions
    route_prefix: str


@dataclass
class ReplicaSpec:
    """Everything needed to construct one replica, in any process."""

    app: str
    deployment: str
    replica_id: str
    code: UserCode
    config: DeploymentConfig
    is_ingress: bool = False
    code_version: str = ""  # told to a restarted controller, which adopts matching replicas
    direct_ingress: DirectIngressSpec | None = None  # an ingress replica serving HTTP itself


@dataclass(frozen=True)
class NodeProxy:
    """A proxy a runtime runs on another node than the controller's (``proxy_location``
    EveryNode on a cluster): where it listens, its state (one of Ray Serve's proxy
    statuses: STARTING, HEALTHY, UNHEALTHY, DRAINING) and its process id (None while
    none runs)."""

    host: str
    port: int
    state: str
    pid: int | None = None
