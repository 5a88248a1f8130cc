"""``from shoal import serve``: the same public names as ``import shoal``.

Written so that a Ray Serve program runs after changing ``from ray import serve``
to ``from shoal import serve``. Ray Serve's public submodules exist under the
same names (``shoal.serve.handle``, ``.exceptions``, ``.config``, ``.schema``,
``.context``, ``.metrics``) and re-export what shoal has of theirs.
"""

import importlib
from typing import TYPE_CHECKING, Any

# Ray's serve imports starlette.requests; programs rely on `import starlette` then
# `starlette.requests.Request` working, so load it too.
import starlette.requests  # noqa: F401

from shoal._api.batching import batch
from shoal._api.context import ReplicaContext, RequestContext, get_request_context
from shoal._api.deployment import Application, Deployment, deployment
from shoal._api.handle import DeploymentHandle
from shoal._api.ingress import ingress
from shoal._api.multiplex import get_multiplexed_model_id, multiplexed
from shoal._api.responses import DeploymentResponse, DeploymentResponseGenerator
from shoal._config import AutoscalingConfig, DeploymentConfig, HTTPOptions
from shoal._controller.status import ApplicationStatus, DeploymentStatus, ReplicaState
from shoal._errors import (
    BatchSizeMismatchError,
    ConfigError,
    DeploymentError,
    NotFoundError,
    NotRunningError,
    ReplicaDiedError,
    ReplicaError,
    RequestCancelledError,
    RequestTimeoutError,
    RouteConflictError,
    ShoalError,
    TransportError,
    UnavailableError,
)

# The instance API (the controller, its runtime) and Ray's submodules (the config-file
# schemas: pydantic models, yaml) are imported on first use (PEP 562): a replica's
# deployment module runs `from shoal import serve` and needs only the decorators, so its
# process starts about 80 ms sooner (issue 15's cold start).
if TYPE_CHECKING:
    from shoal._instance.api import (
        RunTarget,
        delete,
        get_app_handle,
        get_deployment_handle,
        get_replica_context,
        run,
        run_many,
        shutdown,
        start,
        status,
    )
    from shoal.serve import (  # noqa: F401 - serve.handle.X
        config,
        context,
        exceptions,
        handle,
        metrics,
        schema,
    )

_INSTANCE_API = frozenset(
    ("RunTarget", "delete", "get_app_handle", "get_deployment_handle", "get_replica_context",
     "run", "run_many", "shutdown", "start", "status")
)  # fmt: skip
_SUBMODULES = frozenset(("config", "context", "exceptions", "handle", "metrics", "schema"))


def __getattr__(name: str) -> Any:
    """The lazily imported names: the same objects an eager import would bind."""
    if name in _INSTANCE_API:
        value = getattr(importlib.import_module("shoal._instance.api"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"shoal.serve.{name}")
    else:
        raise AttributeError(f"module 'shoal.serve' has no attribute {name!r}")
    globals()[name] = value  # later lookups find it without calling here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_INSTANCE_API, *_SUBMODULES})


__all__ = [
    "Application",
    "ApplicationStatus",
    "AutoscalingConfig",
    "BatchSizeMismatchError",
    "ConfigError",
    "Deployment",
    "DeploymentConfig",
    "DeploymentError",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "DeploymentStatus",
    "HTTPOptions",
    "NotFoundError",
    "NotRunningError",
    "ReplicaContext",
    "ReplicaDiedError",
    "ReplicaError",
    "ReplicaState",
    "RequestCancelledError",
    "RequestContext",
    "RequestTimeoutError",
    "RouteConflictError",
    "RunTarget",
    "ShoalError",
    "TransportError",
    "UnavailableError",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_request_context",
    "ingress",
    "multiplexed",
    "run",
    "run_many",
    "shutdown",
    "start",
    "status",
]
