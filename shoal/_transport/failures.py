"""Exceptions across process boundaries.

A replica turns an exception into a :class:`Failure` message; the caller turns
it back into the original exception type, with the replica's traceback attached
as the first note, or, when the type cannot be rebuilt, into
:class:`ReplicaError`.

The traceback sent is the user's: the frames of shoal around the user's code
are left out (see :func:`_trim`), and so is the final ``Type: message`` line,
which the rebuilt exception prints itself. An exception re-raised from a
deeper replica keeps that replica's traceback as its own note, so a chain of
calls shows each replica's frames once, outermost first.

Exceptions travel pickled, as Ray Serve sends them, so the caller gets the
type and its attributes. Pickle would rebuild an exception with ``cls(*args)``,
which fails for an ``__init__`` that takes other arguments than the message
(``FieldError(field, reason)``); the exceptions of a failure are therefore
pickled to :func:`_rebuild_exception`, which falls back to creating the object
without ``__init__`` and restores ``args`` and the attributes. Payloads are only
unpickled from the authenticated peers of the transport, as every message is.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import io
import os
import pickle
import sysconfig
import traceback
from typing import Any

from shoal import _errors
from shoal._errors import ReplicaError, ShoalError
from shoal._transport.messages import Failure

_SHOAL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIRS = tuple(
    {os.path.join(sysconfig.get_path(name), "") for name in ("stdlib", "platstdlib")}
)
_SITE_DIRS = tuple({os.path.join(sysconfig.get_path(name), "") for name in ("purelib", "platlib")})


def failure_from(exc: BaseException, where: str = "") -> Failure:
    """Describe ``exc`` (raised in this process) for the caller; ``where`` names the replica."""
    kind = type(exc).__name__ if isinstance(exc, ShoalError) else "user"
    try:
        payload: bytes | None = _dumps(_ExceptionPickler, exc)
    except Exception:
        try:
            payload = _dumps(_cloud_exception_pickler(), exc)
        except Exception:
            payload = None
    # The notes travel with the pickled exception; without it, they go in the text.
    text = remote_traceback(exc, where, with_notes=payload is None)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return Failure(name, str(exc), text, payload, kind)


class _ExceptionPickler(pickle.Pickler):
    """A pickler whose exceptions unpickle even when their ``__init__`` cannot take their args."""

    def reducer_override(self, obj: Any) -> Any:
        return _reduce_exception(obj)


@functools.cache
def _cloud_exception_pickler() -> type[pickle.Pickler]:
    """The same for cloudpickle: exception classes it sends by value (local, ``__main__``)."""
    import cloudpickle

    class CloudExceptionPickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            reduced = _reduce_exception(obj)
            return super().reducer_override(obj) if reduced is NotImplemented else reduced

    return CloudExceptionPickler


def _dumps(pickler: type[pickle.Pickler], obj: Any) -> bytes:
    buffer = io.BytesIO()
    pickler(buffer, protocol=5).dump(obj)
    return buffer.getvalue()


def _reduce_exception(obj: Any) -> Any:
    """Route an exception that pickles as ``cls(*args)`` through :func:`_rebuild_exception`.

    Other objects, and exceptions with their own way of pickling (a ``__reduce__``
    returning another callable, a ``copyreg`` entry), pickle as usual.
    """
    if not isinstance(obj, BaseException) or type(obj) in copyreg.dispatch_table:
        return NotImplemented
    reduced = obj.__reduce_ex__(5)
    if (
        not isinstance(reduced, tuple)
        or not 2 <= len(reduced) <= 3
        or reduced[0] is not type(obj)
        or not isinstance(reduced[1], tuple)
    ):
        return NotImplemented
    return (_rebuild_exception, (reduced[0], reduced[1], obj.args), *reduced[2:])


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], original_args: tuple[Any, ...]
) -> BaseException:
    """``cls(*args)``, or when ``__init__`` refuses ``args``, ``cls`` made without ``__init__``.

    ``args`` are the arguments pickle would call ``cls`` with; ``original_args``
    (the exception's ``args``) are restored either way, so an ``__init__`` that
    formats its message does not format it twice. Pickle then restores the
    attributes (``__dict__``).
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise pickle.UnpicklingError(f"not an exception type: {cls!r}")
    try:
        exc = cls(*args)
    except Exception:
        exc = cls.__new__(cls, *args)  # BaseException.__new__ takes any arguments
        # The built-in base's __init__ sets what lives outside __dict__ (OSError's errno).
        builtin = next(base for base in cls.__mro__ if base.__module__ == "builtins")
        with contextlib.suppress(Exception):
            builtin.__init__(exc, *args)  # type: ignore[misc]
    with contextlib.suppress(AttributeError, TypeError):  # unless ``args`` is read-only
        exc.args = original_args
    return exc


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
                note = f"\n{failure.traceback.rstrip()}"
                notes = getattr(exc, "__notes__", None)
                if isinstance(notes, list):
                    notes.insert(0, note)  # ours before the notes of replicas it called
                else:
                    exc.add_note(note)
            return exc
    shoal_type = getattr(_errors, failure.kind, None)
    if isinstance(shoal_type, type) and issubclass(shoal_type, ShoalError):
        try:
            return shoal_type(failure.message)
        except TypeError:
            pass
    return ReplicaError(failure.type_name, failure.message, failure.traceback)


def remote_traceback(exc: BaseException, where: str = "", *, with_notes: bool = False) -> str:
    """``exc``'s traceback as the caller shows it: user frames first, no final ``Type: message``.

    Starts with a ``Remote traceback (WHERE):`` line, ``where`` being e.g. "in replica X".
    Empty for a shoal error raised outside user code: its message says it all.
    """
    summary = traceback.TracebackException.from_exception(exc)
    if not _trim(summary) and isinstance(exc, ShoalError):
        return ""
    lines = list(summary.format())
    tail = list(summary.format_exception_only())
    if tail and lines[-len(tail) :] == tail:
        del lines[-len(tail) :]
    where = where.strip().rstrip(":")
    lines.insert(0, f"Remote traceback ({where}):\n" if where else "Remote traceback:\n")
    if with_notes:
        lines.extend(f"{note}\n" for note in getattr(exc, "__notes__", ()) if isinstance(note, str))
    return "".join(lines)


def is_internal(filename: str) -> bool:
    """Whether ``filename`` is shoal's own code or the standard library's (not site-packages)."""
    if filename.startswith(_SHOAL_DIR) or filename.startswith("<frozen "):
        return True
    return filename.startswith(_STDLIB_DIRS) and not filename.startswith(_SITE_DIRS)


def _trim(summary: traceback.TracebackException) -> bool:
    """Keep the user's part of each stack of the chain; False if it has no user frame.

    Drops the leading frames of shoal and the standard library (the replica
    calling the user's method) and the trailing frames of shoal (a handle
    re-raising a deeper replica's error, which has its own note). A stack with no
    user frame at all (an error inside shoal) is kept whole.
    """
    seen: set[int] = set()
    pending = [summary]
    found = False
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        stack = current.stack
        user = [i for i, frame in enumerate(stack) if not is_internal(frame.filename)]
        if user:
            found = True
            end = len(stack)
            while end - 1 > user[-1] and stack[end - 1].filename.startswith(_SHOAL_DIR):
                end -= 1
            current.stack = traceback.StackSummary.from_list(stack[user[0] : end])
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(getattr(current, "exceptions", None) or ())
    return found
