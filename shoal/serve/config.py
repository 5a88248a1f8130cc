"""``from shoal.serve.config import HTTPOptions``: Ray Serve's ``ray.serve.config``."""

from shoal._config import (
    AutoscalingConfig,
    AutoscalingPolicy,
    DeploymentConfig,
    HTTPOptions,
    gRPCOptions,
)
from shoal._controller.policy import AutoscalingContext, DeploymentID

__all__ = [
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "DeploymentConfig",
    "DeploymentID",
    "HTTPOptions",
    "gRPCOptions",
]
