"""``from shoal.serve.schema import ServeStatus``: Ray Serve's ``ray.serve.schema``.

The status classes ``serve.status()`` returns. The config-file schemas
(``ServeDeploySchema`` and the others) do not exist in shoal yet.
"""

from shoal._controller.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ReplicaState,
    ServeStatus,
)

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "ReplicaState",
    "ServeStatus",
]
