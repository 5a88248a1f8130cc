"""What the controller deploys and what a runtime starts: plain data, no behaviour.

The bottom of shoal's layers: the API builds these from a bound graph (or a
config file), the controller keeps them as desired state, and a runtime turns a
:class:`ReplicaSpec` into a running replica, in whichever process hosts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal._config import DeploymentConfig


@dataclass
class DeploymentSpec:
    """One deployment of an application, with handles in place of bound deployments."""

    name: str
    target: Any
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: DeploymentConfig
    code_version: str


@dataclass
class AppSpec:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, DeploymentSpec]


@dataclass
class ReplicaSpec:
    """Everything needed to construct one replica, in any process."""

    app: str
    deployment: str
    replica_id: str
    target: Any  # the user's class or function
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: DeploymentConfig
    is_ingress: bool = False
