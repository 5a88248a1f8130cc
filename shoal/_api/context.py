"""Per-process and per-request context: which replica is running, which request it serves."""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal._errors import NotRunningError, ShoalError
from shoal._observe.metrics.custom import set_identity_provider

if TYPE_CHECKING:
    from shoal._router.router import RouterRegistry


@dataclass(frozen=True)
class ReplicaContext:
    """Identity of the replica running the current code (``serve.get_replica_context()``)."""

    app_name: str
    deployment: str
    replica_id: str
    servable_object: Any = None

    @property
    def replica_tag(self) -> str:
        """Ray Serve's older name for ``replica_id``."""
        return self.replica_id


@dataclass(frozen=True)
class RequestContext:
    """The request being served: its id (from ``x-request-id`` or generated) and route.

    ``deadline``: when the request's time runs out, on this process's
    ``time.monotonic()`` clock, or None when it has none (see docs/deadlines.md).
    ``priority``: its class, ``"high"``, ``"normal"`` or ``"low"`` (docs/priorities.md).
    Handle calls made while serving the request inherit both.
    """

    request_id: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    deadline: float | None = None
    priority: str = "normal"

    @property
    def remaining_s(self) -> float | None:
        """Seconds left before the request's deadline (0.0 once it passed), or None
        when the request has no deadline."""
        deadline = self.deadline
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic())


_new = object.__new__


def new_request_context(
    request_id: str, app_name: str, multiplexed_model_id: str, deadline: float | None,
    priority: str,
) -> RequestContext:  # fmt: skip
    """``RequestContext(request_id, app_name, multiplexed_model_id, deadline, priority)``
    at a third of the cost, for the request path: the frozen dataclass's ``__init__``
    sets each field with ``object.__setattr__`` (~1.5 us for the five); this fills the
    new instance's ``__dict__`` at once, bypassing only that ``__init__``. The result is
    the same: equal to (and hashed as) the one ``__init__`` makes, frozen all the same.
    """
    context = _new(RequestContext)
    context.__dict__.update(
        request_id=request_id, app_name=app_name, multiplexed_model_id=multiplexed_model_id,
        deadline=deadline, priority=priority,
    )  # fmt: skip
    return context


replica_context: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "shoal_replica_context", default=None
)
_NO_REQUEST = RequestContext()
request_context: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "shoal_request_context",
    default=_NO_REQUEST,
)


def _replica_identity() -> tuple[str, str, str] | None:
    """(application, deployment, replica id) of the replica running the caller, or None."""
    context = replica_context.get()
    if context is None:
        return None
    return (context.app_name, context.deployment, context.replica_id)


# Users' custom metrics (shoal.serve.metrics) get the replica's tags from here.
set_identity_provider(_replica_identity)


def get_replica_context() -> ReplicaContext:
    """Return the current replica's context; raises outside a replica."""
    context = replica_context.get()
    if context is None:
        raise ShoalError(
            "serve.get_replica_context() can only be called from code running in a "
            "deployment's replica (its constructor or a method)"
        )
    return context


def get_request_context() -> RequestContext:
    """Return the context of the request being served (empty outside a request)."""
    return request_context.get()


# The registry of routers that handles deserialized in this process attach to:
# the worker's own in a replica or proxy process, the process runtime's in the driver.
_default_registry: RouterRegistry | None = None


def set_default_registry(registry: RouterRegistry | None) -> None:
    global _default_registry
    _default_registry = registry


def default_registry() -> RouterRegistry:
    if _default_registry is None:
        raise NotRunningError(
            "shoal is not running in this process: call serve.run(app) or serve.start() first"
        )
    return _default_registry
