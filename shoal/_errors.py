"""The shoal exception hierarchy.

Every error shoal raises on its own account is a :class:`ShoalError`. Errors
raised by user code inside a replica are re-raised in the caller as their
original type when they can be transported; otherwise as
:class:`ReplicaError`, which carries the remote type name and traceback text.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class of every error raised by shoal itself."""


class ConfigError(ShoalError, ValueError):
    """An option or configuration value is invalid. The message names the option and value."""


class DeploymentError(ShoalError):
    """A deployment could not be deployed (for example its constructor raised)."""


class RouteConflictError(ShoalError, ValueError):
    """Two applications claim the same route prefix."""


class NotFoundError(ShoalError, KeyError):
    """An application, deployment or method does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it verbatim.
        return str(self.args[0]) if self.args else ""


class UnavailableError(ShoalError):
    """A deployment has no replica able to take the request (deleted or shutting down)."""


class ReplicaDiedError(UnavailableError):
    """The replica handling a request died before it answered."""


class ReplicaError(ShoalError):
    """An exception raised by user code in a replica that could not be re-raised as its own type.

    ``remote_type`` is the qualified name of the original exception type and
    ``remote_traceback`` the formatted traceback from the replica.
    """

    def __init__(self, remote_type: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {message}\n\nRemote traceback:\n{remote_traceback}")
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


class BatchSizeMismatchError(ShoalError, ValueError):
    """A ``@serve.batch`` handler did not return one result per request of its batch.

    Every caller in that batch receives it; the message names both lengths.
    """


class RequestTimeoutError(ShoalError, TimeoutError):
    """A request or a control operation did not complete within its time limit."""


class RequestCancelledError(ShoalError):
    """The request was cancelled before it completed."""


class TransportError(ShoalError, ConnectionError):
    """A connection between shoal processes failed (peer died or stopped reading)."""


class NotRunningError(ShoalError, RuntimeError):
    """Shoal is not running in this process: call ``serve.run`` (or ``serve.start``) first."""


__all__ = [
    "BatchSizeMismatchError",
    "ConfigError",
    "DeploymentError",
    "NotFoundError",
    "NotRunningError",
    "ReplicaDiedError",
    "ReplicaError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "RouteConflictError",
    "ShoalError",
    "TransportError",
    "UnavailableError",
]
