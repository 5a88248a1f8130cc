"""The application-level API: start, run, delete, status, shutdown, handles.

Two independent instances can exist in one driver process: the multi-process
one (``serve.start``/``serve.run``) and the in-process one
(``serve.run(..., _local_testing_mode=True)``). Each owns a background event
loop thread on which its controller and routers run.
"""

from __future__ import annotations

import atexit
import difflib
import logging
import os
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
from shoal._config import (
    NOT_SUPPORTED_YET,
    DeploymentConfig,
    HTTPOptions,
    ServeStartOptions,
    validate,
)
from shoal._controller.controller import Controller
from shoal._controller.resources import Capacity, Ledger
from shoal._controller.status import ServeStatus
from shoal._errors import ConfigError, DeploymentError, NotFoundError, NotRunningError
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import LoopThread

logger = logging.getLogger("shoal")

_DEPLOY_TIMEOUT_S = 600.0
_SHUTDOWN_TIMEOUT_S = 30.0
_GPU_PROBE_TIMEOUT_S = 10.0  # nvidia-smi -L, run once per instance when it exists


class _Instance:
    """A controller, its runtime and routers, on their own loop thread."""

    def __init__(
        self,
        kind: str,
        http: HTTPOptions | None,
        wait_for_proxy: bool = True,
        options: ServeStartOptions | None = None,
    ) -> None:
        self.kind = kind
        self.http = http
        self.options = options or ServeStartOptions()
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
        capacity = Capacity.detect(self.options.resources, _GPU_PROBE_TIMEOUT_S)
        controller = Controller(runtime, registry, Ledger(capacity))
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
    proxy_location: str | None = None,
    http_options: dict[str, Any] | HTTPOptions | None = None,
    grpc_options: dict[str, Any] | None = None,
    logging_config: dict[str, Any] | None = None,
    *,
    resources: dict[str, float] | None = None,
    _blocking: bool = True,
    **kwargs: Any,
) -> None:
    """Start shoal's multi-process runtime and its HTTP proxy (127.0.0.1:8000 by default).

    ``proxy_location="Disabled"`` starts no proxy ("EveryNode" and "HeadOnly" both
    mean the one proxy of this machine). ``resources`` declares the custom
    resources this machine offers replicas (CPUs and GPUs are detected).
    Calling it again while running is a no-op (a warning if the HTTP options
    differ; a ConfigError if the resources differ).
    ``_blocking=False`` returns before the proxy is up; ``serve.run`` waits for it.
    """
    _refuse_extra("serve.start", kwargs, _START_KEYWORDS)
    _refuse_set("serve.start", grpc_options=grpc_options, logging_config=logging_config)
    settings: ServeStartOptions = validate(
        ServeStartOptions,
        {"resources": dict(resources or {}), "proxy_location": proxy_location},
        "serve.start()",
    )
    options = _http_options(http_options)
    with _lock:
        instance = _instances.get("process")
        if instance is not None:
            if settings.resources != instance.options.resources:
                raise ConfigError(
                    f"shoal is already running with resources={instance.options.resources}; "
                    "call serve.shutdown() first to declare other resources"
                )
            if options != instance.http:
                logger.warning(
                    "shoal is already running with HTTP %s; ignoring new options", instance.http
                )
            return
        http = None if settings.proxy_location == "Disabled" else options
        _instances["process"] = _Instance("process", http, _blocking, settings)
        set_default_registry(_instances["process"].registry)


_START_KEYWORDS = (
    "proxy_location", "http_options", "grpc_options", "logging_config", "resources", "_blocking",
)  # fmt: skip
_RUN_KEYWORDS = ("target", "blocking", "name", "route_prefix", "logging_config",
                 "_local_testing_mode")  # fmt: skip


def _refuse_extra(function: str, kwargs: dict[str, Any], known: tuple[str, ...]) -> None:
    """Raise ConfigError naming each unknown keyword argument and its close matches."""
    if not kwargs:
        return
    problems = []
    for name in kwargs:
        matches = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        problems.append(f"{function} got an unknown keyword argument {name!r}{hint}")
    raise ConfigError(f"{'; '.join(problems)} (it accepts: {', '.join(known)})")


def _refuse_set(function: str, **values: Any) -> None:
    for name, value in values.items():
        if value is not None:
            raise ConfigError(f"{function}: {name} is not supported yet: {NOT_SUPPORTED_YET[name]}")


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
    blocking: bool = False,
    name: str = "default",
    route_prefix: str | None = "/",
    logging_config: dict[str, Any] | None = None,
    _local_testing_mode: bool = False,
    **kwargs: Any,
) -> DeploymentHandle:
    """Deploy (or update in place) application ``name``; return its ingress handle.

    Returns only once every replica is ready and, if ``route_prefix`` is set, the
    HTTP route answers; replicas PENDING for resources are waited for, as in Ray
    Serve (at most the deploy timeout). Raises ConfigError at once if they can
    never fit this machine, and DeploymentError if a constructor fails (the app
    is then DEPLOY_FAILED and nothing of it is left running).
    """
    _refuse_extra("serve.run", kwargs, _RUN_KEYWORDS)
    _refuse_set("serve.run", logging_config=logging_config)
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
    for deployment in spec.deployments.values():
        _check_supported(deployment.name, deployment.config, _local_testing_mode)
    try:
        instance.run(instance.controller.deploy(spec))
    except DeploymentError as exc:
        # The frames of shoal's loop thread say nothing to the user; the cause has theirs.
        raise exc.with_traceback(None) from exc.__cause__
    handle = DeploymentHandle(spec.ingress, name, registry=instance.registry)
    if blocking:
        _block_until_interrupted()
    return handle


def _check_supported(deployment: str, config: DeploymentConfig, local: bool) -> None:
    """Refuse what this runtime cannot honour before anything starts."""
    actor = config.ray_actor_options
    env = actor.runtime_env or {}
    if local:
        # Replicas share the driver's process: per-replica environment variables,
        # cwd, sys.path or GPU visibility would change the driver and every other replica.
        if env:
            key = next(iter(env))
            raise ConfigError(
                f"deployment '{deployment}': ray_actor_options.runtime_env.{key} is not "
                "supported in local testing mode (replicas run inside the driver process, "
                "whose environment it would change); use the multi-process runtime "
                "(serve.run without _local_testing_mode) or drop it with .options()"
            )
        if actor.num_gpus > 0:
            raise ConfigError(
                f"deployment '{deployment}': ray_actor_options.num_gpus is not supported in "
                "local testing mode (replicas share the driver process, so a replica cannot "
                "see only its own GPUs); use the multi-process runtime or num_gpus=0"
            )
        if any(actor.resources.values()):
            raise ConfigError(
                f"deployment '{deployment}': ray_actor_options.resources is not supported in "
                "local testing mode (it offers no custom resources; serve.start(resources=...) "
                "declares them for the multi-process runtime); drop them with .options()"
            )
        return
    paths = [env["working_dir"]] if "working_dir" in env else []
    for path in [*paths, *env.get("py_modules", [])]:
        if not os.path.exists(path):
            raise ConfigError(
                f"deployment '{deployment}': runtime_env path {path!r} does not exist "
                f"(relative paths are relative to the driver's directory {os.getcwd()!r})"
            )
    if paths and not os.path.isdir(paths[0]):
        raise ConfigError(
            f"deployment '{deployment}': runtime_env working_dir {paths[0]!r} is not a directory"
        )


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
