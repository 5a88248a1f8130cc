"""The arguments of ``serve.start`` and ``serve.run``, checked and converted before anything
starts: a ConfigError (or ConfigTypeError) names the argument, its value, and what to do."""

from __future__ import annotations

import difflib
import os
from typing import Any

from shoal._config import (
    AdminOptions,
    DeploymentConfig,
    HTTPOptions,
    LoggingConfig,
    gRPCOptions,
    validate,
)
from shoal._config.support import EXTERNAL_SCALER_NOT_YET, ray_only
from shoal._errors import ConfigError, ConfigTypeError
from shoal._instance.home import default_admin_options
from shoal._observe.options import Telemetry


def telemetry_options(
    metrics: dict[str, Any] | None,
    tracing: dict[str, Any] | None,
    logging_config: dict[str, Any] | LoggingConfig | None = None,
) -> Telemetry:
    """The observability options of ``serve.start`` (shoal's own keywords and Ray's
    ``logging_config``), validated."""
    options: dict[str, Any] = {}
    if logging_config is not None:
        options["logging"] = logging_config_of(logging_config, "serve.start()").model_dump()
    if metrics is not None:
        options["metrics"] = dict(metrics)
    if tracing is not None:
        options["tracing"] = dict(tracing)
    telemetry: Telemetry = validate(Telemetry, options, "serve.start()")
    return telemetry


def admin_options(value: dict[str, Any] | AdminOptions | None) -> AdminOptions:
    if isinstance(value, AdminOptions):
        return value
    if value is None:
        return default_admin_options()
    options: AdminOptions = validate(AdminOptions, dict(value), "admin_options")
    return options


START_KEYWORDS = (
    "proxy_location", "http_options", "grpc_options", "logging_config", "resources",
    "admin_options", "metrics_options", "tracing_options", "runtime", "address", "_blocking",
    "_attach", "_admin_later",
)  # fmt: skip
RUN_KEYWORDS = (
    "target", "blocking", "name", "route_prefix", "logging_config", "_local_testing_mode",
    "external_scaler_enabled", "direct_ingress_port",
)  # fmt: skip


def external_scaler(function: str, enabled: Any) -> None:
    """Refuse ``external_scaler_enabled`` but for False, Ray's default (and shoal's way)."""
    if type(enabled) is not bool:
        raise ConfigTypeError(
            f"{function}: external_scaler_enabled must be a bool, got {type(enabled).__name__} "
            f"{enabled!r}"
        )
    if enabled:
        raise ConfigError(f"{function}: external_scaler_enabled=True {EXTERNAL_SCALER_NOT_YET}")


def refuse_extra(function: str, kwargs: dict[str, Any], known: tuple[str, ...]) -> None:
    """Raise ConfigError naming each unknown keyword argument and its close matches."""
    if not kwargs:
        return
    problems = []
    for name in kwargs:
        matches = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
        problems.append(f"{function} got an unknown keyword argument {name!r}{hint}")
    raise ConfigError(f"{'; '.join(problems)} (it accepts: {', '.join(known)})")


def http_options(value: dict[str, Any] | HTTPOptions | None) -> HTTPOptions:
    if isinstance(value, HTTPOptions):
        return value
    options: HTTPOptions = validate(HTTPOptions, dict(value or {}), "http_options")
    return options


def grpc_options(value: dict[str, Any] | gRPCOptions | None) -> gRPCOptions | None:
    if value is None or isinstance(value, gRPCOptions):
        return value
    if not isinstance(value, dict):
        raise ConfigTypeError(
            f"grpc_options must be a dict or a gRPCOptions, got {type(value).__name__}"
        )
    options: gRPCOptions = validate(gRPCOptions, dict(value), "grpc_options")
    return options


def logging_config_of(value: dict[str, Any] | LoggingConfig, what: str) -> LoggingConfig:
    if isinstance(value, LoggingConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigTypeError(
            f"{what}: logging_config must be a dict or a LoggingConfig, got {value!r}"
        )
    config: LoggingConfig = validate(LoggingConfig, dict(value), f"{what} logging_config")
    return config


def check_direct_ingress_port(port: Any) -> None:
    if port is None:
        return
    if type(port) is not int:
        raise ConfigTypeError(f"direct_ingress_port must be a port number or None, got {port!r}")
    if not 1 <= port <= 65535:
        raise ConfigError(f"Invalid direct_ingress_port {port}: use a port from 1 to 65535.")


def check_supported(deployment: str, config: DeploymentConfig, local: bool) -> None:
    """Refuse what this runtime cannot honour before anything starts."""
    actor = config.ray_actor_options
    env = actor.runtime_env or {}
    if local:
        # Options only Ray implements: named first (the other runtimes' controllers refuse
        # them too, and a Ray instance takes them).
        problems = ray_only(config)
        if problems:
            raise ConfigError(f"deployment '{deployment}': " + "; ".join(problems))
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
        if "://" not in path and not os.path.exists(path):  # a URI is Ray's to fetch
            raise ConfigError(
                f"deployment '{deployment}': runtime_env path {path!r} does not exist "
                f"(relative paths are relative to the driver's directory {os.getcwd()!r})"
            )
    if paths and "://" not in paths[0] and not os.path.isdir(paths[0]):
        raise ConfigError(
            f"deployment '{deployment}': runtime_env working_dir {paths[0]!r} is not a directory"
        )


def check_route_prefix(route_prefix: str | None) -> None:
    """Ray Serve validates ``serve.run(route_prefix=...)`` before deploying anything."""
    from shoal._api.deployment import validate_route_prefix

    validate_route_prefix(route_prefix)
