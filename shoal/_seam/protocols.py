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
from shoal._seam.specs import NodeProxy, ReplicaSpec
from shoal._transport.messages import (
    LoadReport,
    Message,
    MetricsReport,
    ReplicaInfo,
    ReplicaSetUpdate,
    Request,
)


class Stream(Protocol):
    """The receiving end of a streamed response."""

    async def next(self) -> Message:
        """The next StreamItem, then StreamEnd or Failure."""
        ...

    def send_input(self, value: Any) -> None:
        """Send ``value`` into the running stream (a websocket's client messages), in order.

        Ignored once the stream has ended or was closed, and by a request that reads
        no input.
        """
        ...

    def close(self) -> None:
        """Stop the stream; the replica's generator is cancelled if it still runs."""
        ...


class ReplicaClient(Protocol):
    """How a router talks to one replica (data plane)."""

    @property
    def replica_id(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, synchronously, when the replica becomes unreachable
        (it died, or the client was closed); at once if it already is.

        Synchronous so that a router drops the replica before any other code of
        its loop runs (a retry must not pick it again).
        """
        ...

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

    async def check_health(self, timeout_s: float) -> dict[str, Any] | None:
        """Run the user's ``check_health`` (raising what it raises); returns the replica's
        status details (``status_details()`` and batchers; None: none to report)."""
        ...

    async def ping(self, timeout_s: float) -> None:
        """Return once the replica's event loop answers (no user code runs); raises
        RequestTimeoutError after ``timeout_s``, TransportError if it is gone."""
        ...

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        """Drain ongoing requests (at most ``timeout_s``), then end the replica."""
        ...

    async def autoscaling_stats(self, timeout_s: float) -> dict[str, float] | None:
        """The replica's ``record_autoscaling_stats()`` (None: its class has none)."""
        ...

    def kill(self) -> None: ...


class MetricsSink(Protocol):
    """Where a runtime delivers the metrics reports of other processes."""

    def record(self, report: MetricsReport) -> None:
        """The latest report of ``report.source``."""
        ...

    def forget(self, source: str) -> None:
        """The process ``source`` stopped or died."""
        ...


class HelperProcess(Protocol):
    """A child a runtime started for the instance (:meth:`Runtime.fork_helper`)."""

    #: Its exit code, as ``Popen.returncode`` gives it (-N: killed by signal N).
    exited: asyncio.Future[int]

    def kill(self) -> None: ...


class Runtime(Protocol):
    """Starts and stops replicas and the proxy, and tells every process about replica sets."""

    supports_http: bool
    #: True: the runtime's cluster places replicas and accounts their resources (Ray);
    #: False: the controller's resource ledger does, for this machine.
    places_replicas: bool

    @property
    def connector(self) -> Connector:
        """How routers in this process reach this runtime's replicas."""
        ...

    async def start(
        self,
        on_replica_died: Callable[[ReplicaHandle], None],
        on_load: Callable[[LoadReport], None],
        metrics: MetricsSink | None = None,
    ) -> None:
        """Start; ``on_load`` receives the load reports of routers in other processes,
        ``metrics`` their metrics reports (and hears when a reporting process is gone).
        A runtime whose replicas share the controller's process sends it none."""
        ...

    async def start_replica(
        self, spec: ReplicaSpec, on_waiting: Callable[[str | None], None] | None = None
    ) -> ReplicaHandle:
        """Start a replica (``Replica.initialize``) and return once it can take requests.

        A runtime whose cluster places replicas calls ``on_waiting(reason)`` while it
        cannot place this one yet, and ``on_waiting(None)`` once it is placed.

        Raises :func:`startup_failed`'s DeploymentError (naming the step that failed,
        with the user's traceback) if a startup step fails; in local testing mode, a
        constructor's own exception (see :func:`constructor_failed`).
        """
        ...

    async def publish(self, update: ReplicaSetUpdate) -> None:
        """Deliver ``update`` to every process holding routers; returns once all applied
        it, except processes that do not answer within a short timeout (they get it
        when their event loop runs again; not waited for until they answer)."""
        ...

    async def start_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None] | None = None
    ) -> tuple[str, int]:
        """Start the HTTP proxy; returns the bound (host, port). ``on_died`` is called
        when it ends unexpectedly."""
        ...

    async def restart_proxy(self) -> tuple[str, int]:
        """Replace the proxy (ending the old one) on the same address, with the current
        routes and replica sets; returns the bound (host, port)."""
        ...

    async def check_proxy(self, timeout_s: float) -> None:
        """Return once the proxy's event loop answers; raises otherwise."""
        ...

    @property
    def proxy_pid(self) -> int | None:
        """The proxy's process id, if it has one."""
        ...

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """Install the route table in the proxy; returns once it serves it (or, if it
        does not answer within a short timeout, once a replacement will get them)."""
        ...

    async def drain_proxy(self, timeout_s: float = 0.0) -> None:
        """Make the proxy (if any) answer new requests 503 with ``Retry-After``; returns
        once the requests it had accepted are answered (at most ``timeout_s``). A runtime
        with proxies on other nodes drains them too, and stops supervising them."""
        ...

    @property
    def proxy_node_id(self) -> str:
        """The node the proxy of :meth:`start_proxy` runs on (``serve.status().proxies``
        lists it under this id)."""
        ...

    def node_proxies(self) -> dict[str, NodeProxy]:
        """The proxies the runtime runs and supervises on other nodes, by node id
        (``proxy_location`` EveryNode on a cluster); {} on one machine."""
        ...

    async def fork_helper(self, entry: str, argv: list[str]) -> HelperProcess | None:
        """A short-lived child running ``entry``'s main (a config build: ``"build"``)
        started the runtime's fastest way; None: the caller starts it with ``python -m``."""
        ...

    async def shutdown(self, timeout_s: float) -> None: ...
