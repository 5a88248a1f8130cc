"""``from shoal.serve.config import HTTPOptions``: Ray Serve's ``ray.serve.config``."""

from shoal._config import AutoscalingConfig, DeploymentConfig, HTTPOptions

__all__ = ["AutoscalingConfig", "DeploymentConfig", "HTTPOptions"]
