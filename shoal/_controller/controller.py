"""The controller: applications, their deployments, routes, and shutdown order.

It runs on the driver's shoal event loop. Deploy and delete operations on one
application are serialized (other applications proceed meanwhile, so deleting
one can free the resources another waits for); a failed first deploy leaves
nothing running; an application whose replicas can never fit the machine is
refused before anything starts; an application's route is installed in the
proxy only after all of its replicas are ready, and removed before its
replicas are stopped. A failed update leaves the application at the version
still serving, as its desired state too (a later replacement starts that
version). The proxy is supervised: replaced when its process dies or its
event loop stops answering (``serve.status()`` says so meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal._config import TIMEOUTS, HTTPOptions
from shoal._config.support import ray_only
from shoal._controller.autoscaler import AppAutoscaler
from shoal._controller.deployment_state import DeploymentState, replica_set
from shoal._controller.metrics import controller_collector
from shoal._controller.policy import load_policy
from shoal._controller.resources import Demand, Ledger
from shoal._controller.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    ProxyStatus,
    ServeStatus,
)
from shoal._errors import (
    ConfigError,
    DeploymentError,
    NotFoundError,
    RouteConflictError,
    ShoalError,
    TransportError,
)
from shoal._observe import metrics
from shoal._observe.metrics.store import MetricsStore
from shoal._router.router import RouterRegistry
from shoal._seam.protocols import ReplicaHandle, Runtime
from shoal._seam.specs import AppSpec, DirectIngressSpec
from shoal._seam.startup import failure_message, is_user_startup_error
from shoal._transport.messages import LoadReport, ReplicaSetUpdate

logger = logging.getLogger("shoal.controller")

_PROXY_RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass
class _App:
    spec: AppSpec
    status: ApplicationStatus = ApplicationStatus.DEPLOYING
    message: str = ""
    deployed_at: float = 0.0
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    routed: bool = False
    autoscaler: AppAutoscaler | None = None  # its application-level policy, if any
    # The direct ingress port a redeploy moves away from: its old replicas listen there
    # until the deploy ends (stopped, or kept by a rollback), so no other app may take it.
    leaving_port: int | None = None
    deleted: bool = False  # a delete asked for it: a failing first deploy is not listed


def failed_to_deploy(name: str, message: str) -> NotFoundError:
    """What asking for the ingress of ``name``, listed DEPLOY_FAILED with ``message``
    after its first deploy failed, raises."""
    reason = message.splitlines()[0] if message else "no reason given"
    return NotFoundError(
        f"application '{name}' failed to deploy, so nothing of it runs: {reason}; "
        "deploy it again (see serve.status())"
    )


class Controller:
    """Reconciles applications onto a runtime."""

    def __init__(self, runtime: Runtime, registry: RouterRegistry, ledger: Ledger) -> None:
        self.runtime = runtime
        self.registry = registry
        self.ledger = ledger
        self.apps: dict[str, _App] = {}
        #: New applications whose first deploy failed: listed DEPLOY_FAILED, with why,
        #: until deployed again or deleted (as Ray Serve lists them); nothing of them runs.
        self.failed: dict[str, ApplicationStatusOverview] = {}
        #: Ray Serve's target_capacity (percent of every deployment's replicas; None: 100).
        self.target_capacity: float | None = None
        self.proxy: ProxyStatus | None = None
        self.http: HTTPOptions | None = None  # the proxy's options (direct ingress takes them too)
        self._proxy_starting: asyncio.Future[None] | None = None
        self._proxy_died = asyncio.Event()
        self._proxy_supervisor: asyncio.Task[None] | None = None
        #: Set when shoal starts shutting down (also from a signal handler, before the
        #: loop hears of it): processes that end from then on are not replaced.
        self.stopping = False
        self._locks: dict[str, asyncio.Lock] = {}
        # Called after every deploy and delete (success or not): a server checkpoints here.
        self.on_change: Callable[[], None] = lambda: None
        #: Every process's metrics (this one's read directly), served at /metrics.
        self.metrics = MetricsStore()
        self._collector = controller_collector(self._deployment_states)

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    async def start(
        self, http: HTTPOptions | None, wait_for_proxy: bool = True, adopt_window_s: float = 0.0
    ) -> None:
        """Start the runtime and, with ``http``, the proxy.

        With ``wait_for_proxy=False`` the proxy starts while applications deploy
        (faster cold starts); a proxy failure is then raised by the first deploy.
        With ``adopt_window_s`` (a restarted server), workers of the previous
        controller are given that long to rejoin first; a proxy among them is kept.
        """
        self.registry.load.sink = self.record_load  # the routers of this process
        self.http = http
        metrics.add_collector(self._collector)
        await self.runtime.start(self._replica_died, self.record_load, self.metrics)
        if adopt_window_s > 0:
            await self.runtime.settle_rejoins(adopt_window_s, http)  # type: ignore[attr-defined]
            if http is not None and self._adopt_proxy(http):
                return
        if http is not None and self.runtime.supports_http:
            self.proxy = ProxyStatus(http.host, http.port, ProxyStatus.STARTING)
            self._proxy_starting = asyncio.ensure_future(self._start_proxy(http))
            if wait_for_proxy:
                await self._proxy_starting

    async def _start_proxy(self, http: HTTPOptions) -> None:
        try:
            host, port = await self.runtime.start_proxy(http, self._proxy_died.set)
        except BaseException:
            self.proxy = None
            raise
        self.proxy = ProxyStatus(host, port, ProxyStatus.HEALTHY, self.runtime.proxy_pid)
        self._proxy_supervisor = asyncio.ensure_future(self._supervise_proxy())

    def _adopt_proxy(self, http: HTTPOptions) -> bool:
        where = self.runtime.adopt_proxy(http, self._proxy_died.set)  # type: ignore[attr-defined]
        if where is None:
            return False
        self.proxy = ProxyStatus(where[0], where[1], ProxyStatus.HEALTHY, self.runtime.proxy_pid)
        self._proxy_supervisor = asyncio.ensure_future(self._supervise_proxy())
        return True

    async def _supervise_proxy(self) -> None:
        """Replace the proxy when its process dies (at once) or its event loop has not
        answered for ``TIMEOUTS.proxy_check_timeout_s`` (hung), on the same port.

        No threshold of consecutive failures, unlike a replica's health check: the
        proxy runs no user code, so a check can only fail by the process being gone
        or by its loop not running at all. ``serve.status()`` shows STARTING while
        the replacement starts (UNHEALTHY between failed attempts), then HEALTHY.
        """
        while True:
            try:
                await asyncio.wait_for(self._proxy_died.wait(), TIMEOUTS.proxy_check_period_s)
                if self.stopping:  # it ended with the rest (a SIGTERM to the whole group)
                    return
                why = "its process died"
            except TimeoutError:
                try:
                    await self.runtime.check_proxy(TIMEOUTS.proxy_check_timeout_s)
                    continue
                except (ShoalError, TransportError) as exc:
                    why = f"it did not answer its health check ({exc})"
            await self._replace_proxy(why)

    async def _replace_proxy(self, why: str) -> None:
        """Restart the proxy until it serves again (with backoff if that keeps failing)."""
        assert self.proxy is not None
        host, port = self.proxy.host, self.proxy.port
        logger.warning("the HTTP proxy is unhealthy: %s; replacing it", why)
        for attempt in itertools.count():
            self._proxy_died.clear()
            self.proxy = ProxyStatus(host, port, ProxyStatus.STARTING)
            try:
                host, port = await self.runtime.restart_proxy()
            except (ShoalError, TransportError, OSError, TimeoutError) as exc:
                delay = _PROXY_RESTART_BACKOFF_S[min(attempt, len(_PROXY_RESTART_BACKOFF_S) - 1)]
                logger.warning(
                    "the HTTP proxy failed to restart (%s); retrying in %g s", exc, delay
                )
                self.proxy = ProxyStatus(host, port, ProxyStatus.UNHEALTHY)
                await asyncio.sleep(delay)
                continue
            self.proxy = ProxyStatus(host, port, ProxyStatus.HEALTHY, self.runtime.proxy_pid)
            logger.info("the HTTP proxy serves again on %s:%d", host, port)
            return

    async def publish(self, update: ReplicaSetUpdate) -> None:
        self.registry.apply(update)
        await self.runtime.publish(update)

    # --- applications --------------------------------------------------------------

    async def deploy(self, spec: AppSpec, wanted: Callable[[], bool] | None = None) -> None:
        """Deploy or update an application; returns when it serves (routes included).

        Waits while replicas are PENDING for resources; raises ConfigError at once
        if they can never fit this machine. ``wanted``: asked once the application's
        lock is held (after a delete that held it, say); False: nothing is deployed.
        """
        self._check_runtime_implements(spec)
        self._check_fits(spec)
        for deployment in spec.deployments.values():
            auto = deployment.config.autoscaling()
            if auto is not None:
                load_policy(auto.policy.policy_function)  # ConfigError before anything starts
        if spec.autoscaling_policy is not None:
            load_policy(spec.autoscaling_policy, "autoscaling_policy.policy_function")
        async with self._lock(spec.name):
            if wanted is not None and not wanted():
                return
            try:
                await self._deploy_locked(spec)
            finally:
                self.on_change()

    async def _deploy_locked(self, spec: AppSpec) -> None:
        self._check_route(spec)
        spec = self._with_direct_ingress(spec)
        self.failed.pop(spec.name, None)
        app = self.apps.get(spec.name)
        is_new = app is None
        if app is None:
            app = self.apps[spec.name] = _App(spec)
        previous, app.spec = app.spec, spec
        app.status, app.message = ApplicationStatus.DEPLOYING, ""
        if not is_new and previous.direct_ingress_port != spec.direct_ingress_port:
            app.leaving_port = previous.direct_ingress_port
        try:
            await self._deploy_deployments(app, previous if not is_new else None)
        except (Exception, asyncio.CancelledError) as exc:
            # Cancelled: serve.run gave up waiting (its timeout); leave no half-deployed app.
            app.status = ApplicationStatus.DEPLOY_FAILED
            app.message = failure_message(exc) or "the deploy was cancelled (serve.run timed out)"
            if is_new:
                await self._teardown(app)
                if not app.deleted:
                    self.failed[spec.name] = ApplicationStatusOverview(
                        app.status, app.message, spec.route_prefix, time.time()
                    )
            else:
                app.spec = previous
                await self._roll_back(app)
                await self._mark_ingress(app)  # back to the version still serving
            raise
        finally:
            app.leaving_port = None
        app.status, app.deployed_at = ApplicationStatus.RUNNING, time.time()
        app.routed = spec.route_prefix is not None
        self._autoscale_app(app)
        await self._publish_routes()

    def _check_runtime_implements(self, spec: AppSpec) -> None:
        """Refuse the options only a runtime whose cluster places replicas (Ray) implements."""
        if self.runtime.places_replicas:
            return
        for name, deployment in spec.deployments.items():
            problems = ray_only(deployment.config)
            if problems:
                raise ConfigError(
                    f"deployment '{name}' of application '{spec.name}': " + "; ".join(problems)
                )

    def _check_fits(self, spec: AppSpec) -> None:
        """Refuse an application whose replicas can never all run on this machine at once."""
        total, count = Demand(), 0
        for name, deployment in spec.deployments.items():
            one = Demand.of(deployment.config.ray_actor_options)
            why = self.ledger.never_fits(one)
            if why is not None:
                raise ConfigError(
                    f"deployment '{name}' of application '{spec.name}' can never start: "
                    f"each replica needs {why}"
                )
            replicas = deployment.config.target_replicas()
            total, count = total.plus(one.times(replicas)), count + replicas
        why = self.ledger.never_fits(total)
        if why is not None:
            raise ConfigError(
                f"application '{spec.name}' can never start: its {count} replicas together "
                f"need {why}; lower num_replicas or what each replica reserves"
            )

    def _check_route(self, spec: AppSpec) -> None:
        if spec.route_prefix is None or not self.runtime.supports_http:
            return  # without a proxy (in-process runtime) routes are never served
        for other in self.apps.values():
            if other.spec.name != spec.name and other.spec.route_prefix == spec.route_prefix:
                raise RouteConflictError(
                    f"route prefix '{spec.route_prefix}' is already used by application "
                    f"'{other.spec.name}'; choose another route_prefix or delete that app first"
                )

    def _with_direct_ingress(self, spec: AppSpec) -> AppSpec:
        """``spec`` whose ingress serves HTTP itself on ``spec.direct_ingress_port``
        (docs/direct-ingress.md), checked; ``spec`` itself without one. The port and
        route are part of the ingress's code version: changing them replaces its replicas."""
        port = spec.direct_ingress_port
        if port is None:
            return spec
        where = f"application '{spec.name}': direct_ingress_port={port}"
        if not self.runtime.supports_http or self.runtime.places_replicas:
            raise ConfigError(f"{where}: this runtime does not support direct ingress yet; "
                              "use the local runtime (serve.run without _local_testing_mode, "
                              "not on Ray) or remove direct_ingress_port")  # fmt: skip
        if self.http is None:
            raise ConfigError(f"{where}: shoal was started without HTTP (http_options)")
        if spec.route_prefix is None:
            raise ConfigError(f"{where}: the application has no route_prefix to serve")
        if port == self.http.port or (self.proxy is not None and port == self.proxy.port):
            raise ConfigError(f"{where}: that is the proxy's port; choose another")
        for other in self.apps.values():
            if other.spec.name == spec.name:
                continue
            if other.spec.direct_ingress_port == port:
                raise ConfigError(f"{where}: application '{other.spec.name}' uses that port")
            if other.leaving_port == port:
                # SO_REUSEPORT would let both apps' replicas listen: each would get some
                # of the port's connections.
                raise ConfigError(
                    f"{where}: application '{other.spec.name}' is moving off that port and "
                    "still serves it; retry once its deploy ends"
                )
        ingress = spec.deployments[spec.ingress]
        # The HTTP options only (a ProxyOptions' grpc_options would start a gRPC server too).
        options = HTTPOptions(**{n: getattr(self.http, n) for n in HTTPOptions.model_fields})
        options = options.model_copy(update={"port": port})
        direct = DirectIngressSpec(options, spec.route_prefix)
        if ingress.direct_ingress == direct:
            return spec  # already applied (a spec restored from a checkpoint)
        version = f"{ingress.code_version}+direct:{port}:{spec.route_prefix}"
        ingress = dataclasses.replace(ingress, direct_ingress=direct, code_version=version)
        return dataclasses.replace(spec, deployments={**spec.deployments, spec.ingress: ingress})

    async def _deploy_deployments(self, app: _App, previous: AppSpec | None) -> None:
        spec = app.spec
        removed = [d for name, d in app.deployments.items() if name not in spec.deployments]
        for name in spec.deployments:
            state = app.deployments.get(name)
            if state is None:
                state = app.deployments[name] = self.new_state(spec.name, name == spec.ingress)
                state.spec = None
                # Announce the deployment before any replica starts, so handles to it resolve.
                announce = replica_set(spec.name, spec.deployments[name], [], state.is_ingress)
                await self.publish(announce)
        await self._mark_ingress(app)
        results = await asyncio.gather(
            *(app.deployments[n].deploy(s) for n, s in spec.deployments.items()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            error = errors[0]
            if isinstance(error, DeploymentError) or is_user_startup_error(error):
                raise error  # a constructor's own exception only in local testing mode
            raise DeploymentError(
                f"deploying application '{spec.name}' failed: {error!r}"
            ) from error
        for state in removed:
            await state.delete()
            app.deployments.pop(state.name, None)

    def new_state(self, app: str, is_ingress: bool) -> DeploymentState:
        state = DeploymentState(app, self.runtime, self.publish, is_ingress, self.ledger)
        state.capacity = self.target_capacity
        return state

    def set_target_capacity(self, target_capacity: float | None) -> None:
        """Scale every deployment to ``target_capacity`` percent of its replicas (Ray
        Serve's option of a config file; None: 100)."""
        self.target_capacity = target_capacity
        for app in self.apps.values():
            for state in app.deployments.values():
                state.set_capacity(target_capacity)
        self.on_change()

    async def _roll_back(self, app: _App) -> None:
        """After a failed update, make ``app.spec`` (the version still serving) every
        deployment's desired state again, so replacements start that version.

        The deployment that failed has restored its own spec (its old replicas kept
        serving); one the update added is deleted; one whose update succeeded before
        another failed is redeployed at its previous version (best effort: logged).
        """
        for name, state in list(app.deployments.items()):
            before = app.spec.deployments.get(name)
            if before is None:
                await state.delete()
                app.deployments.pop(name, None)
            elif state.spec is not None and state.spec is not before:
                same = (state.spec.code_version, state.spec.config) == (
                    before.code_version, before.config,
                )  # fmt: skip
                if same:
                    state.spec = before
                    continue
                try:
                    await state.deploy(before)
                except Exception as exc:
                    logger.error(
                        "deployment '%s' of application '%s' could not go back to the version "
                        "still serving: %s", name, app.spec.name, failure_message(exc),
                    )  # fmt: skip

    async def _mark_ingress(self, app: _App) -> None:
        """Make each deployment's replica sets say whether it is ``app.spec``'s ingress.

        A deployment whose role changed republishes its set at once (nothing else
        might publish it), so every process's ``get_app_handle`` follows.
        """
        for name, state in app.deployments.items():
            is_ingress = name == app.spec.ingress
            if state.is_ingress != is_ingress:
                state.is_ingress = is_ingress
                if state.spec is not None:
                    await state.publish()

    def abort_pending(self, name: str) -> None:
        """Make the replicas of application ``name`` that wait for resources (or for the
        runtime's cluster to place them) give up: a deploy waiting on them fails."""
        existed = self.apps.get(name)
        if existed is not None:
            existed.deleted = True
            for state in existed.deployments.values():
                state.abort_pending(f"application '{name}' was deleted while its replicas waited")

    async def delete(self, name: str) -> None:
        if self.failed.pop(name, None) is not None and name not in self.apps:
            self.on_change()
            return
        existed = self.apps.get(name)
        self.abort_pending(name)  # a deploy waiting for resources gives up, releasing the lock
        async with self._lock(name):
            app = self.apps.get(name)
            if app is None:
                if existed is not None:
                    return  # its first deploy was waiting, gave up and removed it
                raise NotFoundError(f"application '{name}' does not exist")
            app.status = ApplicationStatus.DELETING
            try:
                await self._teardown(app)
            finally:
                self.on_change()

    def _autoscale_app(self, app: _App) -> None:
        """Start, replace or stop the application's own autoscaling policy."""
        if app.autoscaler is not None:
            app.autoscaler.stop()
            app.autoscaler = None
        path = app.spec.autoscaling_policy
        if path is not None:
            app.autoscaler = AppAutoscaler(app.spec.name, path, lambda: app.deployments)
            app.autoscaler.start()

    async def _teardown(self, app: _App) -> None:
        if app.autoscaler is not None:
            app.autoscaler.stop()
        app.routed = False
        await self._publish_routes()
        await asyncio.gather(*(d.delete() for d in app.deployments.values()))
        self.apps.pop(app.spec.name, None)

    async def _publish_routes(self) -> None:
        routes = {
            app.spec.route_prefix: (app.spec.name, app.spec.ingress)
            for app in self.apps.values()
            if app.routed and app.spec.route_prefix is not None
        }
        if self._proxy_starting is not None:
            await self._proxy_starting  # raises here if the proxy could not start
        if self.proxy is not None:
            await self.runtime.publish_routes(routes)

    def ingress_of(self, name: str) -> str:
        app = self.apps.get(name)
        if app is None:
            failed = self.failed.get(name)
            if failed is not None:
                raise failed_to_deploy(name, failed.message)
            raise NotFoundError(
                f"application '{name}' does not exist; running: {', '.join(self.apps) or 'none'}"
            )
        return app.spec.ingress

    def record_load(self, report: LoadReport) -> None:
        """A process's routers' load on an autoscaled deployment (ignored once it is gone)."""
        app = self.apps.get(report.app)
        state = app.deployments.get(report.deployment) if app is not None else None
        if state is not None and state.autoscaler is not None:
            state.autoscaler.record_load(report)

    def _deployment_states(self) -> list[DeploymentState]:
        return [state for app in list(self.apps.values()) for state in app.deployments.values()]

    def _replica_died(self, handle: ReplicaHandle) -> None:
        for app in self.apps.values():
            for state in app.deployments.values():
                if state.replica_died(handle, replace=not self.stopping):
                    return

    # --- status and shutdown -------------------------------------------------------

    def _graceful_timeout_s(self) -> float:
        """The longest ``graceful_shutdown_timeout_s`` of the running deployments."""
        return max(
            (
                state.spec.config.graceful_shutdown_timeout_s
                for app in self.apps.values()
                for state in app.deployments.values()
                if state.spec is not None
            ),
            default=0.0,
        )

    def status(self) -> ServeStatus:
        apps = dict(self.failed)
        for name, app in self.apps.items():
            deployments = {n: d.overview() for n, d in app.deployments.items()}
            status = app.status
            if status is ApplicationStatus.RUNNING and any(
                d.status.value == "UNHEALTHY" for d in deployments.values()
            ):
                status = ApplicationStatus.UNHEALTHY
            apps[name] = ApplicationStatusOverview(
                status, app.message, app.spec.route_prefix, app.deployed_at, deployments,
                app.spec.direct_ingress_port,
            )  # fmt: skip
        proxies = {self.runtime.proxy_node_id: self.proxy} if self.proxy else {}
        for node, proxy in self.runtime.node_proxies().items():  # other nodes' (EveryNode)
            proxies[node] = ProxyStatus(proxy.host, proxy.port, proxy.state, proxy.pid)
        return ServeStatus(proxies, apps, self.target_capacity)

    async def shutdown(self, timeout_s: float) -> None:
        """Fixed order, all within ``timeout_s``: the proxy drains (new requests get 503
        with ``Retry-After``; those it accepted are answered, for at most the largest
        ``graceful_shutdown_timeout_s`` and half of ``timeout_s``), then routes go and
        applications drain, then the runtime stops (proxy last)."""
        deadline = time.monotonic() + timeout_s
        self.stopping = True
        self.registry.load.stop()
        metrics.remove_collector(self._collector)
        self.ledger.close("shoal is shutting down")  # deploys waiting for resources give up
        if self._proxy_starting is not None:
            try:
                await self._proxy_starting
            except Exception:  # it never served: nothing to drain, and nothing to re-raise
                self._proxy_starting = None
        if self._proxy_supervisor is not None:
            self._proxy_supervisor.cancel()  # a proxy stopping now must not be replaced
            with contextlib.suppress(asyncio.CancelledError):
                await self._proxy_supervisor
        if self.proxy is not None:
            proxy = self.proxy
            self.proxy = ProxyStatus(proxy.host, proxy.port, ProxyStatus.DRAINING, proxy.pid)
            await self.runtime.drain_proxy(min(self._graceful_timeout_s(), timeout_s / 2))
        async with contextlib.AsyncExitStack() as locks:
            for name in list(self.apps):
                await locks.enter_async_context(self._lock(name))
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(self._teardown(app) for app in list(self.apps.values()))),
                    max(0.0, deadline - time.monotonic()),
                )
            except TimeoutError:
                logger.warning("applications did not drain within %.0f s; killing them", timeout_s)
            await self.runtime.shutdown(timeout_s=5.0)
