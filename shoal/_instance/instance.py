"""An instance: a controller, its runtime and routers, on their own loop thread.

The driver of ``serve.run`` embeds one (``kind="process"``, or ``"local"`` for
local testing mode); a ``shoal start`` server hosts one too. With admin options
it also serves the admin REST API and the socket other processes attach to.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from shoal._config import (
    TIMEOUTS,
    AdminOptions,
    HTTPOptions,
    ServeStartOptions,
    gRPCOptions,
    proxy_options,
)
from shoal._controller.controller import Controller
from shoal._controller.resources import Capacity, Ledger, UnaccountedLedger
from shoal._controller.status import ServeStatus
from shoal._instance.background import deploying, logged_failure
from shoal._instance.checkpoint import Checkpoint, DesiredState
from shoal._observe.options import Telemetry
from shoal._observe.process import configure_process
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import LoopThread
from shoal._runtime.registry import create_runtime
from shoal._seam.specs import AppSpec
from shoal._transport.tcp import is_loopback

logger = logging.getLogger("shoal")


@dataclass(frozen=True)
class ServerRole:
    """What makes an instance a ``shoal start`` server rather than embedded in a driver."""

    directory: str  # the runtime's sockets, fixed so that workers can rejoin a restart
    token: str  # of the admin API, for callers not on this machine
    attach_socket: str  # other processes' serve.* calls
    checkpoint: Checkpoint
    orphan_grace_s: float = 30.0  # workers outlive a crashed server that long, serving
    adopt_window_s: float = 2.0  # a restarted server waits at most that long for them


class Instance:
    """A controller, its runtime and routers, on their own loop thread."""

    def __init__(
        self,
        kind: str,
        http: HTTPOptions | None,
        wait_for_proxy: bool = True,
        options: ServeStartOptions | None = None,
        admin: AdminOptions | None = None,
        server: ServerRole | None = None,
        telemetry: Telemetry | None = None,
        grpc: gRPCOptions | None = None,
        admin_later: bool = False,
    ) -> None:
        """``admin_later``: the admin API waits for :meth:`serve_admin` (after the first
        deployment, so that the first replica starts without waiting for it)."""
        self.kind = kind
        self.telemetry = telemetry or Telemetry()
        if kind == "process":  # local testing mode writes no log files
            self.telemetry = _with_log_directory(self.telemetry, server)
        self.http = http
        warn_if_exposed(http)
        # gRPC is served by the HTTP proxy's process: none without it. A port of 0 is
        # chosen here, once, so that a replacement proxy serves the same one. A server
        # may adopt a proxy that still holds its port: then the proxy reports a busy one.
        self.grpc = None
        if http is not None and grpc is not None and grpc.enabled:
            from shoal._proxy.grpc_proxy import check_port

            probe = server is None or grpc.port == 0
            self.grpc = check_port(grpc, http.host) if probe else grpc
        self.options = options or ServeStartOptions()
        self.admin_options = admin
        self.server = server
        self._wait_for_proxy = wait_for_proxy
        self.thread = LoopThread(f"shoal-{kind}")
        self.services: Any = None  # the admin REST API and attach socket, if served
        # Set by a `shoal start` server: how a remote shutdown request reaches its main thread.
        self.on_shutdown_requested: Any = None
        try:
            self.controller: Controller = self.thread.run(self._start(), 60.0)
            if not admin_later:
                self.serve_admin()
            if server is not None:
                self.thread.run(self._recover(server), TIMEOUTS.deploy_s)
        except BaseException:
            self.stop()
            raise
        self.registry = self.controller.registry

    def serve_admin(self) -> None:
        """Serve the admin REST API (and a server's attach socket) if the options ask
        for it and it is not served yet; a busy port raises ConfigError."""
        admin, server = self.admin_options, self.server
        if self.services is not None or admin is None or not admin.enabled:
            return
        from shoal._instance.services import AdminServices

        token, attach = (server.token, server.attach_socket) if server else (None, None)
        self.services = self.thread.run(AdminServices.start(self, admin, token, attach), 60.0)

    async def _start(self) -> Controller:
        # Only options a caller set are passed: each runtime keeps its own defaults.
        server, options = self.server, {}
        if server is not None:
            options = {"directory": server.directory, "orphan_grace_s": server.orphan_grace_s}
        if self.kind == "process":
            # Local testing mode keeps what this process was configured with: a second,
            # local instance in a driver must not undo the process instance's options.
            configure_process(self.telemetry, "controller")
            options["telemetry"] = self.telemetry
        name = self.kind
        if self.kind == "process" and self.options.runtime == "ray":
            name = "ray"
            if self.options.address is not None:
                options["address"] = self.options.address
            if self.options.proxy_location is not None:  # EveryNode (the default), HeadOnly
                options["proxy_location"] = self.options.proxy_location
        if name == "process" and server is not None:
            options["fork_server_on_first_use"] = True  # long-lived: its first deploy forks
        runtime = create_runtime(name, **options)
        registry = RouterRegistry(runtime.connector, self.thread.loop)
        if runtime.places_replicas:
            ledger: Ledger = UnaccountedLedger()  # the runtime's cluster places replicas
        else:
            ledger = Ledger(Capacity.detect(self.options.resources, TIMEOUTS.gpu_probe_s))
        controller = Controller(runtime, registry, ledger)
        adopt_window_s = server.adopt_window_s if server is not None else 0.0
        proxy = None if self.http is None else proxy_options(self.http, self.grpc)
        await controller.start(proxy, self._wait_for_proxy, adopt_window_s)
        return controller

    async def _recover(self, server: ServerRole) -> None:
        """Take back the checkpointed applications (adopting what still runs), then
        checkpoint after every change."""
        from shoal._controller.recovery import restore

        desired = server.checkpoint.load()
        if desired is not None:
            if self.services is not None:
                self.services.plane.restore_configs(desired.configs, desired.unbuilt)
            self.controller.target_capacity = desired.target_capacity
            self.controller.failed.update(desired.failed)
            if desired.apps or desired.configs:
                await restore(self.controller, desired.apps)
        self.controller.on_change = lambda: server.checkpoint.save(self._desired())
        self.controller.on_change()

    def _desired(self) -> DesiredState:
        plane = self.services.plane if self.services is not None else None
        return DesiredState(
            apps=[app.spec for app in self.controller.apps.values()],
            configs=plane.configs() if plane is not None else {},
            target_capacity=self.controller.target_capacity,
            failed=dict(self.controller.failed),
            unbuilt=plane.unbuilt() if plane is not None else {},
        )

    def run(self, coro: Any, timeout_s: float = TIMEOUTS.deploy_s) -> Any:
        return self.thread.run(coro, timeout_s)

    # --- what serve.* asks of an instance (an attached one answers the same) -----------

    def app_names(self) -> list[str]:
        return list(self.controller.apps)

    def ingress_of(self, name: str) -> str:
        return self.controller.ingress_of(name)

    def deploy(self, spec: AppSpec) -> None:
        self.deploy_many([spec])

    def deploy_many(self, specs: list[AppSpec], wait: bool = True) -> Future[None] | None:
        """Deploy ``specs`` side by side; raises the first failure once all have finished.
        ``wait=False``: returns at once the future of that deploy (its failure is also
        logged, and the applications' status says it)."""
        if not wait:
            future = self.thread.submit(self.deploy_many_async(specs))
            return logged_failure(future, deploying(specs))
        self.run(self.deploy_many_async(specs))
        return None

    async def deploy_many_async(self, specs: list[AppSpec]) -> None:
        results = await asyncio.gather(
            *(self.controller.deploy(spec) for spec in specs), return_exceptions=True
        )
        for spec, result in zip(specs, results, strict=True):
            if not isinstance(result, BaseException) and self.services is not None:
                self.services.plane.deployed_imperatively(spec.name)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def delete(self, name: str, wait: bool = True) -> None:
        """Delete application ``name``; ``wait=False``: return once asked (a failure is
        logged)."""
        if not wait:
            logged_failure(self.thread.submit(self.controller.delete(name)), f"deleting {name!r}")
            return
        self.run(self.controller.delete(name))

    def status(self) -> ServeStatus:
        status: ServeStatus = self.run(_snapshot(self), 30.0)
        return status

    def status_now(self) -> ServeStatus:
        """The status, on the instance's loop: with what its config files add (an
        application building, or whose build failed) when it serves the admin API."""
        if self.services is not None:
            status: ServeStatus = self.services.plane.status()
            return status
        return self.controller.status()

    def stop(self) -> None:
        """Shut down in order: admin services (no new operations), then the controller."""
        try:
            if self.services is not None:
                self.run(self.services.close(), 10.0)
            if getattr(self, "controller", None) is not None:
                self.run(self.controller.shutdown(TIMEOUTS.shutdown_s), TIMEOUTS.shutdown_s + 10)
        finally:
            self.thread.stop()


def warn_if_exposed(http: HTTPOptions | None) -> None:
    """Warn when the HTTP proxy (and with it any direct ingress port) is to listen beyond
    loopback: other machines can then call every application, with no TLS and no
    authentication. (The admin API and the gRPC proxy warn for themselves.)"""
    if http is not None and not is_loopback(http.host):
        logger.warning(
            "the HTTP proxy listens on %s:%d, beyond this machine: any host that can reach "
            "it can call the applications (no TLS, no authentication); http_options "
            "host='127.0.0.1' keeps it local", http.host, http.port,
        )  # fmt: skip


async def _snapshot(instance: Instance) -> ServeStatus:
    return instance.status_now()


def _with_log_directory(telemetry: Telemetry, server: ServerRole | None) -> Telemetry:
    """``telemetry`` naming the directory of this instance's log files (docs/logging.md)."""
    from shoal._instance.home import log_directory, server_dir

    # A server's files outlive its runtime's directory (removed at shutdown): its own dir.
    directory = log_directory(server_dir() if server is not None else None)
    logging = telemetry.logging.model_copy(update={"directory": directory})
    return telemetry.model_copy(update={"logging": logging})
