"""Turning a bound application graph into deployment specs the controller can run."""

from __future__ import annotations

import copy
import hashlib
import json
import types
import uuid
from typing import Any

from shoal._api.deployment import Application
from shoal._api.handle import DeploymentHandle
from shoal._config import DeploymentConfig, LoggingConfig
from shoal._errors import ConfigError
from shoal._router.router import RouterRegistry
from shoal._seam.code import UserCode
from shoal._seam.specs import AppSpec, DeploymentSpec

# Options that change without replacing replicas (as in Ray Serve): user_config via
# reconfigure(), the replica count by starting or stopping replicas, the limits routers
# apply (republished with the replica set), and what only the controller reads
# (health checks, graceful shutdown).
_LIGHTWEIGHT = {
    "user_config", "num_replicas", "autoscaling_config", "max_queued_requests",
    "no_replica_timeout_s", "health_check_period_s", "health_check_timeout_s",
    "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s",
}  # fmt: skip


def build_app(
    app: Application,
    name: str,
    route_prefix: str | None,
    registry: RouterRegistry | None,
    logging_config: LoggingConfig | None = None,
    direct_ingress_port: int | None = None,
) -> AppSpec:
    """Walk the graph from the ingress; every distinct bound deployment becomes a spec.

    ``logging_config`` (``serve.run``'s) is given to every deployment that sets none;
    ``direct_ingress_port``: see docs/direct-ingress.md."""
    if not isinstance(app, Application):
        raise ConfigError(
            f"serve.run() takes an application built with Deployment.bind(), got {app!r}"
        )
    specs: dict[str, DeploymentSpec] = {}
    names: dict[int, str] = {}  # id(bound node) -> its unique deployment name
    nodes: list[Application] = []

    def name_of(node: Application) -> str:
        if id(node) not in names:
            # Like Ray Serve: a second, different binding of a name becomes name_1, name_2...
            base, taken = node.deployment.name, set(names.values())
            unique = (
                base
                if base not in taken
                else next(
                    f"{base}_{i}" for i in range(1, len(taken) + 2) if f"{base}_{i}" not in taken
                )
            )
            names[id(node)] = unique
            nodes.append(node)
        return names[id(node)]

    def to_handle(child: Application) -> DeploymentHandle:
        return DeploymentHandle(name_of(child), name, registry=registry)

    name_of(app)
    position = 0
    while position < len(nodes):
        node = nodes[position]
        position += 1
        args = _substitute(node.args, to_handle, set())
        kwargs = _substitute(node.kwargs, to_handle, set())
        config = node.deployment.config
        if logging_config is not None and config.logging_config is None:
            config = config.model_copy(update={"logging_config": logging_config})
        dep_name = names[id(node)]
        code = UserCode(node.deployment.func_or_class, args, kwargs)
        specs[dep_name] = DeploymentSpec(dep_name, code, config, _code_version(code, config))
    return AppSpec(name, route_prefix, names[id(app)], specs, None, direct_ingress_port)


#: Never searched for Applications: scalars, classes, and modules (a module passed as an
#: argument reaches sys.modules, and every application bound anywhere, through its globals).
_OPAQUE = (str, bytes, int, float, bool, type(None), type, types.ModuleType)


def _substitute(obj: Any, to_handle: Any, seen: set[int]) -> Any:
    """Return ``obj`` with every nested Application replaced; unchanged parts are shared."""
    if isinstance(obj, Application):
        return to_handle(obj)
    if id(obj) in seen or isinstance(obj, _OPAQUE):
        return obj
    seen.add(id(obj))
    if isinstance(obj, list | tuple | set | frozenset):
        items = [_substitute(item, to_handle, seen) for item in obj]
        if all(new is old for new, old in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    if isinstance(obj, dict):
        values = {key: _substitute(value, to_handle, seen) for key, value in obj.items()}
        if all(values[key] is obj[key] for key in obj):
            return obj
        return type(obj)(values) if type(obj) is dict else _copy_with(obj, values)
    attributes = getattr(obj, "__dict__", None)
    if isinstance(attributes, dict) and not callable(obj):
        changed = {}
        for key, value in attributes.items():
            new = _substitute(value, to_handle, seen)
            if new is not value:
                changed[key] = new
        if changed:
            clone = copy.copy(obj)
            for key, value in changed.items():
                object.__setattr__(clone, key, value)  # works for frozen dataclasses too
            return clone
    return obj


def _copy_with(mapping: Any, values: dict[Any, Any]) -> Any:
    clone = copy.copy(mapping)
    clone.update(values)
    return clone


def _code_version(code: UserCode, config: DeploymentConfig) -> str:
    """A fingerprint of code (its source included), arguments and heavyweight options;
    equal means the running replicas are reused."""
    if config.version is not None:
        return f"user:{config.version}"
    fingerprint = code.fingerprint()
    if fingerprint is None:
        return f"unhashable:{uuid.uuid4().hex}"  # cannot compare: always replace
    options = json.dumps(config.model_dump(mode="json", exclude=_LIGHTWEIGHT), sort_keys=True)
    return hashlib.blake2b(f"{fingerprint}:{options}".encode(), digest_size=12).hexdigest()
