"""Exceptions across process boundaries.

A replica turns an exception into a :class:`Failure` message; the caller turns
it back into the original exception type (with the remote traceback attached
as a note) or, when the type cannot be rebuilt, into :class:`ReplicaError`.
"""

from __future__ import annotations

import pickle
import traceback

from shoal import _errors
from shoal._errors import ReplicaError, ShoalError
from shoal._transport.messages import Failure


def failure_from(exc: BaseException, where: str = "") -> Failure:
    """Describe ``exc`` (raised in this process) for the caller."""
    kind = type(exc).__name__ if isinstance(exc, ShoalError) else "user"
    text = "".join(traceback.format_exception(exc))
    if where:
        text = f"{where}\n{text}"
    try:
        payload: bytes | None = pickle.dumps(exc, protocol=5)
    except Exception:
        try:
            import cloudpickle

            payload = cloudpickle.dumps(exc, protocol=5)
        except Exception:
            payload = None
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return Failure(name, str(exc), text, payload, kind)


def exception_from(failure: Failure) -> BaseException:
    """The exception to raise in the caller for ``failure``."""
    if failure.exception is not None:
        try:
            exc = pickle.loads(failure.exception)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__traceback__ = None
            if failure.traceback:
                exc.add_note(f"\nRemote traceback:\n{failure.traceback.rstrip()}")
            return exc
    shoal_type = getattr(_errors, failure.kind, None)
    if isinstance(shoal_type, type) and issubclass(shoal_type, ShoalError):
        try:
            return shoal_type(failure.message)
        except TypeError:
            pass
    return ReplicaError(failure.type_name, failure.message, failure.traceback)
