"""The seam between shoal's core and a runtime.

The core (API, controller, router, replica logic) never starts a process or
opens a socket itself; it asks a :class:`Runtime` (control plane, used by the
controller) and a :class:`Connector` (data plane, used by the routers of every
process). ``docs/architecture.md`` maps each runtime onto these protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from shoal._config import HTTPOptions
from shoal._seam.specs import ReplicaSpec
from shoal._transport.messages import Message, ReplicaInfo, ReplicaSetUpdate, Request


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
