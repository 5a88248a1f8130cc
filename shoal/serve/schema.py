"""``from shoal.serve.schema import ServeDeploySchema``: Ray Serve's ``ray.serve.schema``.

The status classes ``serve.status()`` returns, and the config-file schemas
(``ServeDeploySchema`` for a whole file, ``ServeApplicationSchema`` for one of its
applications, ``DeploymentSchema`` for a deployment's overrides, ``LoggingConfig`` for
``logging_config``), with Ray's names.
"""

from shoal._config import LoggingConfig
from shoal._controller.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ReplicaState,
    ServeStatus,
)
from shoal._deploy_config import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "LoggingConfig",
    "ReplicaState",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeStatus",
]
