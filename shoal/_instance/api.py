"""The application-level API: start, run, delete, status, shutdown, handles.

Two independent instances can exist in one driver process: the multi-process
one (``serve.start``/``serve.run``) and the in-process one
(``serve.run(..., _local_testing_mode=True)``). Each owns a background event
loop thread on which its controller and routers run.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
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
    TIMEOUTS,
    AdminOptions,
    HTTPOptions,
    LoggingConfig,
    ServeStartOptions,
    gRPCOptions,
    validate,
)
from shoal._config.support import NAME_WITHOUT_HASH
from shoal._controller.status import ServeStatus
from shoal._errors import (
    ConfigError,
    ConfigTypeError,
    DeploymentError,
    NotFoundError,
    NotRunningError,
)
from shoal._instance import arguments
from shoal._instance.instance import Instance
from shoal._observe.options import Telemetry
from shoal._router.router import RouterRegistry
from shoal._runtime.loop import wait_responsive
from shoal._seam.specs import AppSpec
from shoal._seam.startup import user_frames

logger = logging.getLogger("shoal")

_instances: dict[str, Instance] = {}
_lock = threading.RLock()
#: How often serve.run_many(wait_for_applications_running=False) looks for the ingress.
_CREATED_POLL_S = 0.05


def start(
    proxy_location: str | None = None,
    http_options: dict[str, Any] | HTTPOptions | None = None,
    grpc_options: dict[str, Any] | gRPCOptions | None = None,
    logging_config: dict[str, Any] | LoggingConfig | None = None,
    *,
    resources: dict[str, float] | None = None,
    admin_options: dict[str, Any] | AdminOptions | None = None,
    metrics_options: dict[str, Any] | None = None,
    tracing_options: dict[str, Any] | None = None,
    runtime: str = "process",
    address: str | None = None,
    _blocking: bool = True,
    _attach: bool = True,
    _admin_later: bool = False,
    **kwargs: Any,
) -> None:
    """Start shoal's multi-process runtime and its HTTP proxy (127.0.0.1:8000 by default).

    If a ``shoal start`` server runs for this user, attach to it instead (as Ray
    Serve connects to a running cluster): the other options are then the server's.
    ``proxy_location="Disabled"`` starts no proxy ("EveryNode" and "HeadOnly" both
    mean the one proxy of this machine; on Ray, "EveryNode", the default, runs one on
    every node). ``resources`` declares the custom
    resources this machine offers replicas (CPUs and GPUs are detected).
    ``runtime="ray"`` runs every replica as a Ray actor on the Ray cluster at
    ``address`` (docs/ray.md). ``admin_options`` place the admin REST API
    (127.0.0.1:8265 by default; ``{"enabled": False}`` turns it off; a busy port is a
    ConfigError).
    Calling it again while running is a no-op (a warning if the HTTP options
    differ; a ConfigError if the resources differ).
    ``_blocking=False`` returns before the proxy is up; ``serve.run`` waits for it.
    ``_attach=False`` (``shoal run``/``shoal demo``) never attaches: it serves here.
    ``_admin_later=True`` (``shoal run``/``shoal demo``) serves the admin API only when
    :func:`serve_admin` is called, once the applications are deployed (cold start).
    """
    arguments.refuse_extra("serve.start", kwargs, arguments.START_KEYWORDS)
    asked, options, grpc = _start_arguments(
        proxy_location, http_options, grpc_options, logging_config, resources, admin_options,
        metrics_options, tracing_options, runtime, address,
    )  # fmt: skip
    with _lock:
        instance = _instances.get("process")
        if instance is None and _attach and _attach_to_server():
            _warn_ignored(_ATTACHED, asked.given)
            return
        if instance is not None:
            _start_again(instance, asked)
            return
        _start_instance(asked, options, grpc, _blocking, _admin_later)


def _start_arguments(
    proxy_location: str | None,
    http_options: dict[str, Any] | HTTPOptions | None,
    grpc_options: dict[str, Any] | gRPCOptions | None,
    logging_config: dict[str, Any] | LoggingConfig | None,
    resources: dict[str, float] | None,
    admin_options: dict[str, Any] | AdminOptions | None,
    metrics_options: dict[str, Any] | None,
    tracing_options: dict[str, Any] | None,
    runtime: str,
    address: str | None,
) -> tuple[Asked, HTTPOptions, gRPCOptions | None]:
    """serve.start()'s arguments validated: what it asked for, the HTTP and gRPC options."""
    settings: ServeStartOptions = validate(
        ServeStartOptions,
        {
            "resources": dict(resources or {}),
            "proxy_location": proxy_location,
            "runtime": runtime,
            "address": address,
        },
        "serve.start()",
    )
    options = arguments.http_options(http_options)
    grpc = arguments.grpc_options(grpc_options)
    admin = arguments.admin_options(admin_options)
    telemetry = arguments.telemetry_options(metrics_options, tracing_options, logging_config)
    given = {
        "proxy_location": proxy_location, "http_options": http_options,
        "grpc_options": grpc_options, "logging_config": logging_config,
        "resources": resources, "admin_options": admin_options,
        "metrics_options": metrics_options, "tracing_options": tracing_options,
        "address": address, "runtime": None if runtime == "process" else runtime,
    }  # fmt: skip
    asked_http = None if http_options is None else options
    asked_grpc = None if grpc_options is None else grpc
    return Asked(settings, asked_http, asked_grpc, telemetry, admin, given), options, grpc


def _start_instance(
    asked: Asked, options: HTTPOptions, grpc: gRPCOptions | None, blocking: bool, admin_later: bool
) -> None:
    """Start this process's instance, whose registry becomes the default (hold ``_lock``)."""
    http = None if asked.settings.proxy_location == "Disabled" else options
    _instances["process"] = Instance(
        "process", http, blocking, asked.settings, asked.admin, telemetry=asked.telemetry,
        grpc=grpc, admin_later=admin_later,
    )  # fmt: skip
    set_default_registry(_instances["process"].registry)


def serve_admin() -> None:
    """Serve the admin API that ``serve.start(_admin_later=True)`` left for later
    (no-op if it is served, off, or shoal is not started here); a busy port raises
    ConfigError."""
    with _lock:
        instance = _instances.get("process")
        if isinstance(instance, Instance):
            instance.serve_admin()


def _check_same_start(
    instance: Instance,
    settings: ServeStartOptions,
    http: HTTPOptions | None,
    grpc: gRPCOptions | None,
) -> None:
    """serve.start() again while ``instance`` runs: a ConfigError for options that need
    a restart (runtime, resources); a warning for HTTP or gRPC options given that
    differ (None: not given)."""
    if settings.runtime != instance.options.runtime:
        raise ConfigError(
            f"shoal is already running with runtime={instance.options.runtime!r}; "
            f"call serve.shutdown() first to start it with runtime={settings.runtime!r}"
        )
    if settings.resources != instance.options.resources:
        raise ConfigError(
            f"shoal is already running with resources={instance.options.resources}; "
            "call serve.shutdown() first to declare other resources"
        )
    if http is not None and http != instance.http:
        logger.warning("shoal is already running with HTTP %s; ignoring new options", instance.http)
    if grpc is not None and grpc != instance.grpc:
        logger.warning("shoal is already running with gRPC %s; ignoring new options", instance.grpc)


_ATTACHED = "attached to the running shoal server, whose options apply"


@dataclass(frozen=True)
class Asked:
    """What a serve.start() call asked for, validated (``http``, ``grpc``: None when not
    given); ``given``: each option as passed (None: not given)."""

    settings: ServeStartOptions
    http: HTTPOptions | None
    grpc: gRPCOptions | None
    telemetry: Telemetry
    admin: AdminOptions
    given: dict[str, Any]


def _start_again(instance: Instance, asked: Asked) -> None:
    """serve.start() while ``instance`` runs: nothing starts. A ConfigError for options
    that need a restart; every other option given that differs from the instance's
    named in one warning."""
    if instance.kind != "process":  # attached earlier: the server's options apply
        _warn_ignored(_ATTACHED, asked.given)
        return
    _check_same_start(instance, asked.settings, asked.http, asked.grpc)
    running, telemetry = instance.telemetry, asked.telemetry
    differ = {
        "proxy_location": asked.settings.proxy_location != instance.options.proxy_location,
        "logging_config": telemetry.logging.model_dump(exclude={"directory"})
        != running.logging.model_dump(exclude={"directory"}),
        "metrics_options": telemetry.metrics != running.metrics,
        "tracing_options": telemetry.tracing != running.tracing,
        "admin_options": asked.admin != instance.admin_options,
    }
    ignored = {name: asked.given[name] for name, changed in differ.items() if changed}
    _warn_ignored("shoal is already running", ignored)


def _warn_ignored(why: str, given: dict[str, Any]) -> None:
    """One warning naming the options of serve.start() that do not apply (none given:
    nothing to say)."""
    names = [name for name, value in given.items() if value is not None]
    if names:
        logger.warning(
            "serve.start(): %s; ignoring %s (they apply when shoal starts: serve.shutdown() "
            "first, or `shoal shutdown` for a server, to start it with them)",
            why, ", ".join(names),
        )  # fmt: skip


def _attach_to_server() -> bool:
    """Attach to this user's running ``shoal start`` server, if there is one."""
    from shoal._instance.home import read_server_info

    info = read_server_info()
    if info is None:
        return False
    from shoal._instance.attach import AttachedInstance

    attached = AttachedInstance(info)
    _instances["process"] = attached  # type: ignore[assignment]
    set_default_registry(attached.registry)
    logger.info("attached to the shoal server (pid %d, admin API %s)", info.pid, info.admin_url)
    return True


def _instance(local: bool) -> Instance:
    with _lock:
        if local:
            if "local" not in _instances:
                _instances["local"] = Instance("local", None)
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
    logging_config: dict[str, Any] | LoggingConfig | None = None,
    _local_testing_mode: bool = False,
    external_scaler_enabled: bool = False,
    *,
    direct_ingress_port: int | None = None,
    **kwargs: Any,
) -> DeploymentHandle:
    """Deploy (or update in place) application ``name``; return its ingress handle.

    Returns only once every replica is ready and, if ``route_prefix`` is set, the
    HTTP route answers; replicas PENDING for resources are waited for, as in Ray
    Serve (at most the deploy timeout). Raises ConfigError at once if they can
    never fit this machine, and DeploymentError if a constructor fails (the app
    is then DEPLOY_FAILED and nothing of it is left running).

    ``external_scaler_enabled``: only False, Ray's default, is supported yet (True is a
    ConfigError).

    ``direct_ingress_port`` (shoal's own; keyword only, so Ray's positional order holds):
    the ingress replicas also accept HTTP themselves on that port, without the proxy's
    hop (docs/direct-ingress.md).
    """
    arguments.refuse_extra("serve.run", kwargs, arguments.RUN_KEYWORDS)
    arguments.external_scaler("serve.run", external_scaler_enabled)
    one = RunTarget(target, name, route_prefix, logging_config, direct_ingress_port)
    _check_target(one)
    handle = _deploy(one, _local_testing_mode)
    if blocking:
        _block_until_interrupted()
    return handle


@dataclass(frozen=True)
class RunTarget:
    """One application for :func:`run_many` (Ray Serve's ``serve.RunTarget``)."""

    target: Application
    name: str = "default"
    route_prefix: str | None = "/"
    logging_config: dict[str, Any] | LoggingConfig | None = None
    direct_ingress_port: int | None = None  # shoal's own (docs/direct-ingress.md)


def run_many(
    targets: Sequence[RunTarget],
    blocking: bool = False,
    wait_for_ingress_deployment_creation: bool = True,
    wait_for_applications_running: bool = True,
    _local_testing_mode: bool = False,
) -> list[DeploymentHandle]:
    """Deploy several applications; return their ingress handles, in order (Ray Serve's API).

    Every target is checked before any deploys; then they deploy side by side.
    ``wait_for_applications_running=False`` returns once the deploy has started (with
    ``wait_for_ingress_deployment_creation``, once each application's ingress deployment
    exists), not once every replica is ready: a call on a handle then waits for a
    replica, and a failure is logged and shown by ``serve.status()`` instead of raised.
    """
    if not targets:
        raise ConfigError("No applications provided.")
    for target in targets:
        _check_target(target)
    waits = _Waits(wait_for_applications_running, wait_for_ingress_deployment_creation)
    handles = _deploy_all(targets, _local_testing_mode, waits)
    if blocking:
        _block_until_interrupted()
    return handles


def _check_target(target: RunTarget) -> None:
    if target.logging_config is not None:
        arguments.logging_config_of(target.logging_config, "serve.run()")
    if not isinstance(target.target, Application):
        raise ConfigTypeError(
            "`serve.run` expects an `Application` returned by `Deployment.bind()`, "
            f"got {target.target!r}"
        )
    if not target.name:
        raise ConfigError("application name must be a non-empty string")
    if "#" in target.name:
        raise ConfigError(
            f"serve.run(name={target.name!r}): an application name {NAME_WITHOUT_HASH}"
        )
    arguments.check_route_prefix(target.route_prefix)
    arguments.check_direct_ingress_port(target.direct_ingress_port)


def _deploy(target: RunTarget, local: bool) -> DeploymentHandle:
    """Deploy one application (or update it in place); its ingress handle."""
    return _deploy_all([target], local)[0]


def _prepare(target: RunTarget, local: bool) -> tuple[Instance, AppSpec, str | None]:
    """Build ``target``'s spec and check it: (instance, spec, the previous ingress or None)."""
    instance, name, route_prefix = _instance(local), target.name, target.route_prefix
    if target.target.deployment.config.route_prefix is not None and route_prefix == "/":
        route_prefix = target.target.deployment.config.route_prefix
    elif route_prefix == "/":  # an OIP model's own prefix, /v2/models/{name} (docs/oip.md)
        func_or_class = target.target.deployment.func_or_class
        route_prefix = getattr(func_or_class, "__shoal_route_prefix__", route_prefix)
    logging_config = None
    if target.logging_config is not None:
        logging_config = arguments.logging_config_of(target.logging_config, "serve.run()")
    spec = build_app(
        target.target, name, route_prefix, instance.registry, logging_config,
        target.direct_ingress_port,
    )  # fmt: skip
    for deployment in spec.deployments.values():
        arguments.check_supported(deployment.name, deployment.config, local)
    previous = instance.ingress_of(name) if name in instance.app_names() else None
    return instance, spec, previous


@dataclass(frozen=True)
class _Waits:
    """What a deploy waits for: every application running, or else (``created``) each
    application's ingress deployment existing, or nothing."""

    running: bool = True
    created: bool = True


def _deploy_all(
    targets: Sequence[RunTarget], local: bool, waits: _Waits = _Waits()
) -> list[DeploymentHandle]:
    """Deploy ``targets`` side by side (each is checked before any deploys); their ingress
    handles, in order. If some fail, the others still deploy; the first failure is raised
    (only if ``waits.running``: see :func:`run_many`)."""
    prepared = [_prepare(target, local) for target in targets]
    instance = prepared[0][0]
    specs = [spec for _instance, spec, _previous in prepared]
    try:
        if waits.running:
            instance.deploy_many(specs)
        else:
            deploying = instance.deploy_many(specs, wait=False)
            if waits.created and deploying is not None:
                _wait_created(instance, specs, deploying)
    except DeploymentError as exc:
        # The frames of shoal's loop thread say nothing to the user; the cause has theirs.
        raise exc.with_traceback(None) from exc.__cause__
    except Exception as exc:  # local testing mode: the constructor's own exception, as Ray
        raise exc.with_traceback(user_frames(exc.__traceback__)) from exc.__cause__
    handles = []
    for _instance, spec, previous in prepared:
        if previous is not None and previous != spec.ingress:
            _forget_handles(spec.name)
        handles.append(_cached_handle(instance.registry, spec.name, spec.ingress))
    return handles


def _wait_created(instance: Instance, specs: list[AppSpec], deploying: Future[None]) -> None:
    """Return once every application of ``specs`` lists its ingress deployment (raise the
    deploy's failure if it ends first; DeploymentError after the deploy timeout)."""
    deadline = time.monotonic() + TIMEOUTS.deploy_s
    while True:
        applications = instance.status().applications
        if all(
            spec.name in applications and spec.ingress in applications[spec.name].deployments
            for spec in specs
        ):
            return
        if deploying.done():
            deploying.result()  # its failure, if any
            return
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"the ingress deployments of {', '.join(s.name for s in specs)} were not "
                f"created within {TIMEOUTS.deploy_s:g} s; see serve.status()"
            )
        with contextlib.suppress(TimeoutError):
            deploying.result(_CREATED_POLL_S)


def _block_until_interrupted() -> None:
    try:
        wait_responsive()
    except KeyboardInterrupt:
        shutdown()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete application ``name``: its route goes first, then its replicas drain and stop.

    As in Ray Serve, deleting an application that does not exist does nothing, and
    ``_blocking=False`` returns once the delete is asked for, not once it is done (the
    application is DELETING meanwhile; a failure is logged).
    """
    _forget_handles(name)
    for instance in _running():
        # (or only listed: a new application whose first deploy failed)
        if name in instance.app_names() or name in instance.status().applications:
            instance.delete(name, wait=_blocking)
            return
    logger.info("serve.delete(%r): there is no application of that name", name)


def status() -> ServeStatus:
    """Applications -> deployments -> replicas, with Ray Serve's status strings."""
    merged = ServeStatus()
    for instance in _running():
        current = instance.status()
        merged.applications.update(current.applications)
        merged.proxies.update(current.proxies)
    return merged


def shutdown() -> None:
    """Stop everything shoal started, in order, within a time limit. Safe to call twice.

    In a process attached to a ``shoal start`` server (or a driver with no instance
    while one runs), it shuts that server down, as Ray Serve's does the cluster's Serve.
    """
    _running()  # attaches to a running server, if this process has no instance
    _stop_all()


def stopping() -> None:
    """Shoal is about to shut down (a SIGTERM or SIGINT handler calls this before it wakes
    the thread that shuts down): the processes of its instances that end from now on are
    not replaced. A service manager signals every process of the group at once, and the
    event loop may hear of their ends first. One attribute write each: signal-safe."""
    for instance in list(_instances.values()):
        controller = getattr(instance, "controller", None)
        if controller is not None:
            controller.stopping = True


def _stop_all() -> None:
    with _lock:
        instances = list(_instances.values())
        _instances.clear()
        _handles.clear()
        set_default_registry(None)
    for instance in instances:
        try:
            instance.stop()
        except Exception:
            logger.exception("error while shutting down shoal (%s runtime)", instance.kind)


def _at_exit() -> None:
    """At interpreter exit: leave an attached server running; stop embedded instances."""
    with _lock:
        attached = [i for i in _instances.values() if i.kind == "attached"]
        if attached:
            _instances.pop("process", None)
    for instance in attached:
        instance.detach()  # type: ignore[attr-defined]
    _stop_all()


atexit.register(_at_exit)


def _running() -> list[Instance]:
    """This process's instances; in a driver that has none, the ``shoal start`` server it
    attaches to (never from inside a replica or proxy: they route with what they have)."""
    with _lock:
        if not _instances and _registry_or_none() is None:
            _attach_to_server()
        return list(_instances.values())


# Handles given out by run/get_app_handle/get_deployment_handle, one per deployment, as Ray
# Serve caches them: repeated calls return the same object.
_handles: dict[tuple[RouterRegistry, str, str], DeploymentHandle] = {}


def _cached_handle(registry: RouterRegistry, app: str, deployment: str) -> DeploymentHandle:
    with _lock:
        key = (registry, app, deployment)
        handle = _handles.get(key)
        if handle is None:
            handle = _handles[key] = DeploymentHandle(deployment, app, registry=registry)
        return handle


def _forget_handles(app: str) -> None:
    with _lock:
        for key in [key for key in _handles if key[1] == app]:
            del _handles[key]


def get_app_handle(name: str) -> DeploymentHandle:
    """The ingress handle of a running application, from the driver or inside a replica.

    Raises NotFoundError (a RayServeException) if there is no such application.
    """
    for instance in _running():
        if name in instance.app_names():
            return _cached_handle(instance.registry, name, instance.ingress_of(name))
        if name in instance.status().applications:  # listed, not running (a failed deploy)
            instance.ingress_of(name)  # raises NotFoundError, saying why
    # In a replica (or the proxy) there is no controller: the replica sets it receives
    # say which deployment is each application's ingress.
    registry = _registry_or_none()
    ingress = registry.ingress_of(name) if registry is not None else None
    if registry is None or ingress is None:
        raise NotFoundError(f"Application '{name}' does not exist.")
    return _cached_handle(registry, name, ingress)


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    """A handle to any deployment; ``app_name`` defaults to the caller's application."""
    if app_name is None:
        context = replica_context.get()
        app_name = context.app_name if context is not None else _only_app()
    registry = (
        next((i.registry for i in _running() if app_name in i.app_names()), None)
        or _registry_or_none()
    )
    if registry is None:
        raise NotRunningError("shoal is not running: call serve.run() first")
    registry.get(app_name, deployment_name)  # raises NotFoundError with what exists
    return _cached_handle(registry, app_name, deployment_name)


def _only_app() -> str:
    names = [name for instance in _running() for name in instance.app_names()]
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
