"""The steps of a replica's startup, and the errors that name the step that failed."""

from __future__ import annotations

import contextlib
from types import TracebackType

#: The steps of a replica's startup, in order, as error messages name them.
CONSTRUCTOR = "the constructor"
LIFESPAN_STARTUP = "the lifespan startup"
RECONFIGURE = "reconfigure()"
INITIAL_HEALTH_CHECK = "the initial health check"
DIRECT_INGRESS = "the direct ingress listener"
_STEP_ATTRIBUTE = "_shoal_startup_step"


def mark_startup_step(exc: BaseException, step: str) -> None:
    """Record on ``exc`` which startup step raised it (kept when it is pickled)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _STEP_ATTRIBUTE, step)


def startup_step(exc: BaseException) -> str | None:
    """The startup step that raised ``exc``, or None if it was not raised by one."""
    step = getattr(exc, _STEP_ATTRIBUTE, None)
    return step if isinstance(step, str) else None


def startup_failed(deployment: str, exc: BaseException, traceback_text: str) -> Exception:
    """The DeploymentError raised (``from exc``) when a replica's startup step fails.

    Its message names the step (constructor, lifespan startup, ``reconfigure()`` or
    initial health check), the deployment and the error, then gives the user's
    traceback. ``exc`` loses its own traceback and any note repeating that text, so
    the traceback is printed once when the error goes unhandled.
    """
    from shoal._errors import DeploymentError, ShoalError

    text = traceback_text.strip()
    what = f"{startup_step(exc) or CONSTRUCTOR} of deployment '{deployment}'"
    if isinstance(exc, ShoalError):  # shoal's own message says what went wrong
        message = f"{what} failed: {exc}"
    else:
        message = f"{what} raised {type(exc).__name__}: {exc}"
    exc.__traceback__ = None
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list) and text:
        notes[:] = [n for n in notes if not (isinstance(n, str) and n.strip() in text)]
        if not notes:
            del exc.__notes__
    return DeploymentError(f"{message}\n\n{text}" if text else message)


def constructor_failed(deployment: str, exc: BaseException, traceback_text: str) -> Exception:
    """What the in-process runtime (local testing mode) raises when a replica fails to start.

    As Ray Serve's local testing mode runs the constructor inline, an exception
    raised by the user's constructor propagates as itself: this function re-raises
    it. A failure in a later step returns :func:`startup_failed`'s DeploymentError.
    """
    if startup_step(exc) == CONSTRUCTOR:
        raise exc.with_traceback(user_frames(exc.__traceback__))
    return startup_failed(deployment, exc, traceback_text)


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its leading frames of shoal (starting the replica), if any user's remain."""
    from shoal._transport.failures import is_internal

    user = tb
    while user is not None and is_internal(user.tb_frame.f_code.co_filename):
        user = user.tb_next
    return user or tb


def is_user_startup_error(exc: BaseException) -> bool:
    """True for a user's own exception raised by a startup step and passed on as itself
    (the constructor's, in local testing mode, as in Ray Serve)."""
    from shoal._errors import ShoalError

    return startup_step(exc) is not None and not isinstance(exc, ShoalError)


def failure_message(exc: BaseException) -> str:
    """The deployment status message for a failed deploy."""
    if is_user_startup_error(exc):
        return f"{startup_step(exc)} raised {type(exc).__name__}: {exc}"
    return str(exc)


def traceback_text(exc: BaseException) -> str:
    """The user's traceback for ``exc``: its own frames if raised in this process,
    else the remote traceback the transport put in its notes."""
    from shoal._transport.failures import failure_from

    if exc.__traceback__ is not None:
        return failure_from(exc).traceback
    return "".join(n for n in getattr(exc, "__notes__", []) if isinstance(n, str))
