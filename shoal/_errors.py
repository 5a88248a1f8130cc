"""The shoal exception hierarchy: every error class shoal defines lives here.

Every error shoal raises on its own account is a :class:`ShoalError` (also
available under Ray Serve's name, :data:`RayServeException`). Errors that
stand for a built-in kind keep that base too (``ConfigError`` is a
``ValueError``), so ``except ValueError`` clauses keep working. Errors raised
by user code inside a replica are re-raised in the caller as their original
type when they can be transported; otherwise as :class:`ReplicaError`, which
carries the remote type name and traceback text.
"""

from __future__ import annotations

from typing import Any


class ShoalError(Exception):
    """Base class of every error raised by shoal itself."""


#: Ray Serve's name for the base class: ``except RayServeException`` catches every shoal error.
RayServeException = ShoalError


class ConfigError(ShoalError, ValueError):
    """An option or configuration value is invalid. The message names the option and value."""


class ConfigTypeError(ConfigError, TypeError):
    """An option or handler of the wrong type or kind (where Ray Serve raises TypeError)."""


class DeploymentError(ShoalError, RuntimeError):
    """A deployment could not be deployed (its constructor, ``reconfigure`` or lifespan raised).

    A ``RuntimeError``, as the error Ray Serve raises for a failed deploy.
    """


class SyncCallInEventLoopError(ShoalError, RuntimeError):
    """A blocking call (``.result()``, ``for`` over a response generator) ran on an event loop.

    Use ``await response`` / ``async for`` in async code instead.
    """


class DirectCallError(ShoalError, RuntimeError):
    """A ``Deployment`` was called like its class or function (``Model()``); use ``.bind()``.

    A ``RuntimeError``, as the error Ray Serve raises.
    """


class RouteConflictError(ShoalError, ValueError):
    """Two applications claim the same route prefix."""


class NotFoundError(ShoalError, KeyError):
    """An application, deployment or method does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it verbatim.
        return str(self.args[0]) if self.args else ""


class UnavailableError(ShoalError):
    """A deployment has no replica able to take the request (deleted or shutting down)."""


class DeploymentUnavailableError(UnavailableError):
    """Ray Serve's name for a deployment that cannot take requests (failed to deploy, deleted).

    Also raised when a request waited ``no_replica_timeout_s`` without the deployment
    having any replica able to take it (HTTP 503); such a request never reached a replica.
    """


class ForkServerUnavailable(ShoalError):
    """The fork server cannot start a worker (it died, hangs, or an import made forking
    unsafe): the runtime starts it with ``python -m`` instead. Never reaches a user."""


class ReplicaDiedError(UnavailableError):
    """The replica handling a request died before it answered."""


class ReplicaStoppedError(UnavailableError):
    """The replica had stopped (drained, being shut down) when the request reached it:
    the request never ran there, and the caller's router sends it to another replica
    (a request sent a moment before the router learned of the stop)."""


class BackPressureError(ShoalError):
    """The request was refused because ``max_queued_requests`` requests are already waiting.

    Raised as Ray Serve raises it (HTTP 503), by the caller's router (a process's
    handles, or the proxy) at once, before anything is sent: retrying is safe.
    ``num_queued_requests`` and ``max_queued_requests`` are the counts when the request
    was refused; ``deployment`` and ``app`` name the deployment ("" if unknown).
    """

    def __init__(
        self,
        num_queued_requests: int,
        max_queued_requests: int,
        deployment: str = "",
        app: str = "",
    ) -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.deployment = deployment
        self.app = app
        target = f"deployment '{deployment}' of application '{app}'" if deployment else "deployment"
        super().__init__(
            f"request to {target} dropped: {num_queued_requests} requests are already queued "
            f"in this caller (max_queued_requests={max_queued_requests}); retry later, add "
            "replicas, or raise max_queued_requests"
        )

    @property
    def message(self) -> str:
        """The error message (Ray Serve's attribute)."""
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.num_queued_requests, self.max_queued_requests, self.deployment, self.app)
        return (type(self), args)


class ReplicaError(ShoalError):
    """An exception raised by user code in a replica that could not be re-raised as its own type.

    ``remote_type`` is the qualified name of the original exception type and
    ``remote_traceback`` the formatted traceback from the replica.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        text = f"{remote_type}: {message}"
        if remote_traceback:
            text = f"{text}\n\n{remote_traceback.strip()}"
        super().__init__(text)
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:
        args = (self.remote_type, self.remote_message, self.remote_traceback)
        return (type(self), args, self.__dict__)


class BatchSizeMismatchError(ShoalError, ValueError):
    """A ``@serve.batch`` handler did not return one result per request of its batch.

    Every caller in that batch receives it; the message names both lengths.
    """


class BatchResultTypeError(BatchSizeMismatchError, TypeError):
    """A ``@serve.batch`` handler returned (or yielded) something other than a list.

    A ``TypeError``, as the error Ray Serve raises; every caller in that batch receives it.
    """


class RequestTimeoutError(ShoalError, TimeoutError):
    """A request or a control operation did not complete within its time limit."""


class RequestCancelledError(ShoalError):
    """The request was cancelled before it completed."""


class TransportError(ShoalError, ConnectionError):
    """A connection between shoal processes failed (peer died or stopped reading)."""


class SerializationError(ShoalError, TypeError):
    """A value could not be serialized to cross a process boundary."""


class NotRunningError(ShoalError, RuntimeError):
    """Shoal is not running in this process: call ``serve.run`` (or ``serve.start``) first."""


# --- shoal.patterns ----------------------------------------------------------------------------


class PatternError(ShoalError):
    """Base class of the errors raised by ``shoal.patterns``."""


class QuorumError(PatternError):
    """Fewer ensemble members answered than ``min_responses`` requires.

    ``failed`` maps each member that was left out to why ("TimeoutError: ...",
    or the member's exception as "Type: message"); ``responded`` lists the
    members that answered. The message names both.
    """

    def __init__(
        self,
        message: str,
        failed: dict[str, str] | None = None,
        responded: list[str] | None = None,
    ) -> None:
        super().__init__(message)  # args == (message,): the error pickles and rebuilds as is
        self.failed = dict(failed or {})
        self.responded = list(responded or [])


class SelectionError(PatternError, LookupError):
    """A router could not pick a member: the choice names no member, or nothing chose one."""


class FeedbackError(PatternError, ValueError):
    """A bandit reward is invalid (rewards are finite numbers in [0, 1])."""


# --- shoal.online ------------------------------------------------------------------------------


class PublishError(ShoalError):
    """Not every replica confirmed the generation in time. ``generation`` is persisted anyway:
    replicas that missed it catch up from the store (sync thread, or restart)."""

    def __init__(self, message: str, generation: int) -> None:
        super().__init__(message)
        self.generation = generation

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.generation), self.__dict__)


class GenerationNotFoundError(ShoalError, LookupError):
    """The store holds no such generation (never written, or pruned), or is empty."""


# --- shoal.integrations ------------------------------------------------------------------------


class InvalidInputError(ShoalError, ValueError):
    """The input does not fit the model: ``errors`` lists each problem (HTTP 422).

    Each error is ``{"loc": [...], "msg": ..., "type": ..., "expected": ...}``, in
    the shape FastAPI uses for its own 422 answers.
    """

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
        self.errors = errors

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))  # rebuilt with its errors in the caller's process


# --- shoal.oip (the Open Inference Protocol) ---------------------------------------------------


class InferenceError(ShoalError):
    """An Open Inference Protocol request failed. ``status`` is its HTTP status; the message
    is the v2 error body's ``"error"``. Raise a subclass in a model's code to answer with it."""

    status = 500


class InferenceRequestError(InferenceError, ValueError):
    """The request does not fit the protocol or the model (shape, datatype, data, JSON): 400."""

    status = 400


class ModelNotFoundError(InferenceError, LookupError):
    """No model (or version of it) is served under that name: 404."""

    status = 404


class MethodNotAllowedError(InferenceError):
    """An OIP path asked with the wrong HTTP method (``GET .../infer``): 405, ``allow`` names
    the right one."""

    status = 405

    def __init__(self, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.allow = allow

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.allow))


class UnsupportedExtensionError(InferenceError):
    """A protocol extension shoal does not implement (the model repository): 501 / UNIMPLEMENTED."""

    status = 501


__all__ = [
    "BackPressureError",
    "BatchResultTypeError",
    "BatchSizeMismatchError",
    "ConfigError",
    "ConfigTypeError",
    "DeploymentError",
    "DeploymentUnavailableError",
    "DirectCallError",
    "FeedbackError",
    "ForkServerUnavailable",
    "GenerationNotFoundError",
    "InferenceError",
    "InferenceRequestError",
    "InvalidInputError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "NotFoundError",
    "NotRunningError",
    "PatternError",
    "PublishError",
    "QuorumError",
    "RayServeException",
    "ReplicaDiedError",
    "ReplicaError",
    "ReplicaStoppedError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "RouteConflictError",
    "SelectionError",
    "SerializationError",
    "ShoalError",
    "SyncCallInEventLoopError",
    "TransportError",
    "UnavailableError",
    "UnsupportedExtensionError",
]
