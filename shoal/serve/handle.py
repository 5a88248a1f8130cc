"""``from shoal.serve.handle import DeploymentHandle``: Ray Serve's ``ray.serve.handle``."""

from shoal._api.handle import DeploymentHandle
from shoal._api.responses import DeploymentResponse, DeploymentResponseGenerator

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]
