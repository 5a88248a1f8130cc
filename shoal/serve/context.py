"""``from shoal.serve.context import ReplicaContext``: Ray Serve's ``ray.serve.context``."""

from shoal._api.context import ReplicaContext

__all__ = ["ReplicaContext"]
