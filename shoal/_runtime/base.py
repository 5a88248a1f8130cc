"""The seam between shoal's core and a runtime.

The core (API, controller, router, replica logic) never starts a process or
opens a socket itself; it asks a :class:`Runtime` (control plane, used by the
controller in the driver) and a :class:`Connector` (data plane, used by the
routers of every process). ``docs/architecture.md`` maps each runtime onto
these four protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from shoal._config import DeploymentConfig, HTTPOptions
from shoal._transport.messages import Message, ReplicaInfo, ReplicaSetUpdate, Request


@dataclass
class ReplicaSpec:
    """Everything needed to construct one replica, in any process."""

    app: str
    deployment: str
    replica_id: str
    target: Any  # the user's class or function
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: DeploymentConfig
    is_ingress: bool = False


class Stream(Protocol):
    """The receiving end of a streamed response."""

    async def next(self) -> Message:
        """The next StreamItem, then StreamEnd or Failure."""
        ...

    def close(self) -> None: ...


class ReplicaClient(Protocol):
    """How a router talks to one replica (data plane)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    @property
    def close_callbacks(self) -> list[Callable[[Any], None]]: ...

    def call(self, request: Request) -> asyncio.Future[Message]:
        """Send ``request``; resolves to Result or Failure. Cancelling it cancels the request."""
        ...

    def stream(self, request: Request) -> Stream: ...

    def close(self) -> None:
        """Close the connection (pending requests fail)."""
        ...


class Connector(Protocol):
    """Turns a replica's address into a client, in whichever process holds handles."""

    async def connect(self, info: ReplicaInfo) -> ReplicaClient: ...


class ReplicaHandle(Protocol):
    """The controller's grip on one running replica (control plane)."""

    info: ReplicaInfo
    pid: int | None

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None: ...

    async def check_health(self, timeout_s: float) -> None: ...

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        """Drain ongoing requests (at most ``timeout_s``), then end the replica."""
        ...

    def kill(self) -> None: ...


class Runtime(Protocol):
    """Starts and stops replicas and the proxy, and tells every process about replica sets."""

    connector: Connector
    supports_http: bool

    async def start(self, on_replica_died: Callable[[ReplicaHandle], None]) -> None: ...

    async def start_replica(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Start a replica (``Replica.initialize``) and return once it can take requests.

        Raises :func:`startup_failed`'s DeploymentError (naming the step that failed,
        with the user's traceback) if a startup step fails; in local testing mode, a
        constructor's own exception (see :func:`constructor_failed`).
        """
        ...

    async def publish(self, update: ReplicaSetUpdate) -> None:
        """Deliver ``update`` to every process holding routers; returns once all applied it."""
        ...

    async def start_proxy(self, options: HTTPOptions) -> tuple[str, int]:
        """Start the HTTP proxy; returns the bound (host, port)."""
        ...

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """Install the route table in the proxy; returns once it serves it."""
        ...

    async def drain_proxy(self) -> None:
        """Tell the proxy (if any) that shoal is shutting down; returns once it drains."""
        ...

    async def shutdown(self, timeout_s: float) -> None: ...


#: The steps of a replica's startup, in order, as error messages name them.
CONSTRUCTOR = "the constructor"
LIFESPAN_STARTUP = "the lifespan startup"
RECONFIGURE = "reconfigure()"
INITIAL_HEALTH_CHECK = "the initial health check"
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
