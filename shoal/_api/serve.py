"""The application-level API: start, run, delete, status, shutdown, handles.

Two independent instances can exist in one driver process: the multi-process
one (``serve.start``/``serve.run``) and the in-process one
(``serve.run(..., _local_testing_mode=True)``). Each owns a background event
loop thread on which its controller and routers run.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from shoal._api.context import (
    ReplicaContext,
    default_registry,
    replica_context,
    set_default_registry,
)
from shoal._api.deployment import Application
from shoal._api.graph import build_app
from shoal._api.handle import DeploymentHandle
from shoal._config import HTTPOptions, validate
from shoal._controller.controller import Controller
from shoal._controller.status import ServeStatus
from shoal._errors import ConfigError, NotFoundError, NotRunningError
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import LoopThread

logger = logging.getLogger("shoal")

_DEPLOY_TIMEOUT_S = 600.0
_SHUTDOWN_TIMEOUT_S = 30.0


class _Instance:
    """A controller, its runtime and routers, on their own loop thread."""

    def __init__(self, kind: str, http: HTTPOptions | None, wait_for_proxy: bool = True) -> None:
        self.kind = kind
        self.http = http
        self._wait_for_proxy = wait_for_proxy
        self.thread = LoopThread(f"shoal-{kind}")
        try:
            self.controller: Controller = self.thread.run(self._start(), 60.0)
        except BaseException:
            self.thread.stop()
            raise
        self.registry = self.controller.registry

    async def _start(self) -> Controller:
        runtime: Any
        if self.kind == "local":
            from shoal._runtime.inprocess import InProcessRuntime

            runtime = InProcessRuntime()
        else:
            from shoal._runtime.process.runtime import ProcessRuntime

            runtime = ProcessRuntime()
        registry = RouterRegistry(runtime.connector, self.thread.loop)
        controller = Controller(runtime, registry)
        await controller.start(self.http, self._wait_for_proxy)
        return controller

    def run(self, coro: Any, timeout_s: float = _DEPLOY_TIMEOUT_S) -> Any:
        return self.thread.run(coro, timeout_s)

    def stop(self) -> None:
        try:
            self.run(self.controller.shutdown(_SHUTDOWN_TIMEOUT_S), _SHUTDOWN_TIMEOUT_S + 10)
        finally:
            self.thread.stop()


_instances: dict[str, _Instance] = {}
_lock = threading.RLock()


def start(
    http_options: dict[str, Any] | HTTPOptions | None = None,
    *,
    _blocking: bool = True,
    **_ignored: Any,
) -> None:
    """Start shoal's multi-process runtime and its HTTP proxy (127.0.0.1:8000 by default).

    Calling it again while running is a no-op (a warning if the HTTP options differ).
    ``_blocking=False`` returns before the proxy is up; ``serve.run`` waits for it.
    """
    options = _http_options(http_options)
    with _lock:
        instance = _instances.get("process")
        if instance is not None:
            if options != instance.http:
                logger.warning(
                    "shoal is already running with HTTP %s; ignoring new options", instance.http
                )
            return
        _instances["process"] = _Instance("process", options, _blocking)
        set_default_registry(_instances["process"].registry)


def _http_options(value: dict[str, Any] | HTTPOptions | None) -> HTTPOptions:
    if isinstance(value, HTTPOptions):
        return value
    options: HTTPOptions = validate(HTTPOptions, dict(value or {}), "http_options")
    return options


def _instance(local: bool) -> _Instance:
    with _lock:
        if local:
            if "local" not in _instances:
                _instances["local"] = _Instance("local", None)
                if "process" not in _instances:
                    set_default_registry(_instances["local"].registry)
            return _instances["local"]
        if "process" not in _instances:
            start()
        return _instances["process"]


def run(
    target: Application,
    *,
    name: str = "default",
    route_prefix: str | None = "/",
    blocking: bool = False,
    _local_testing_mode: bool = False,
    **_ignored: Any,
) -> DeploymentHandle:
    """Deploy (or update in place) application ``name``; return its ingress handle.

    Returns only once every replica is ready and, if ``route_prefix`` is set, the
    HTTP route answers. Raises DeploymentError if a constructor fails (the app
    is then DEPLOY_FAILED and nothing of it is left running).
    """
    if not isinstance(target, Application):
        raise ConfigError(
            f"serve.run() takes an application from Deployment.bind(), got {target!r}"
        )
    if not name:
        raise ConfigError("application name must be a non-empty string")
    _check_route_prefix(route_prefix)
    instance = _instance(_local_testing_mode)
    if target.deployment.config.route_prefix is not None and route_prefix == "/":
        route_prefix = target.deployment.config.route_prefix
    spec = build_app(target, name, route_prefix, instance.registry)
    instance.run(instance.controller.deploy(spec))
    handle = DeploymentHandle(spec.ingress, name, registry=instance.registry)
    if blocking:
        _block_until_interrupted()
    return handle


def _check_route_prefix(route_prefix: str | None) -> None:
    if route_prefix is None or route_prefix == "/":
        return
    if not route_prefix.startswith("/") or route_prefix.endswith("/"):
        raise ConfigError(
            f"invalid route_prefix={route_prefix!r}: it must start with '/' and not end "
            "with '/' (except the root '/'), e.g. '/models/iris'"
        )


def _block_until_interrupted() -> None:
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete application ``name``: its route goes first, then its replicas drain and stop."""
    for instance in _running():
        if name in instance.controller.apps:
            instance.run(instance.controller.delete(name))
            return
    raise NotFoundError(f"application '{name}' does not exist")


def status() -> ServeStatus:
    """Applications -> deployments -> replicas, with Ray Serve's status strings."""
    merged = ServeStatus()
    for instance in _running():
        current = instance.run(_snapshot(instance.controller), 30.0)
        merged.applications.update(current.applications)
        merged.proxies.update(current.proxies)
    return merged


async def _snapshot(controller: Controller) -> ServeStatus:
    return controller.status()


def shutdown() -> None:
    """Stop everything shoal started, in order, within a time limit. Safe to call twice."""
    with _lock:
        instances = list(_instances.values())
        _instances.clear()
        set_default_registry(None)
    for instance in instances:
        try:
            instance.stop()
        except Exception:
            logger.exception("error while shutting down shoal (%s runtime)", instance.kind)


atexit.register(shutdown)


def _running() -> list[_Instance]:
    with _lock:
        return list(_instances.values())


def get_app_handle(name: str) -> DeploymentHandle:
    """The ingress handle of a running application."""
    for instance in _running():
        if name in instance.controller.apps:
            ingress = instance.controller.ingress_of(name)
            return DeploymentHandle(ingress, name, registry=instance.registry)
    raise NotFoundError(f"application '{name}' does not exist")


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    """A handle to any deployment; ``app_name`` defaults to the caller's application."""
    if app_name is None:
        context = replica_context.get()
        app_name = context.app_name if context is not None else _only_app()
    registry = (
        next((i.registry for i in _running() if app_name in i.controller.apps), None)
        or _registry_or_none()
    )
    if registry is None:
        raise NotRunningError("shoal is not running: call serve.run() first")
    registry.get(app_name, deployment_name)  # raises NotFoundError with what exists
    return DeploymentHandle(deployment_name, app_name, registry=registry)


def _only_app() -> str:
    names = [name for instance in _running() for name in instance.controller.apps]
    if len(names) == 1:
        return names[0]
    raise NotFoundError(f"pass app_name: running applications are {names or 'none'}")


def _registry_or_none() -> RouterRegistry | None:
    try:
        return default_registry()
    except NotRunningError:
        return None


def get_replica_context() -> ReplicaContext:
    from shoal._api.context import get_replica_context as current

    return current()
