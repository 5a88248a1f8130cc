"""The one configuration schema.

Python keyword options (``@serve.deployment(...)``, ``.options(...)``,
``serve.start(http_options=...)``), and later the YAML file and the CLI, are
all validated by these pydantic models. Nothing here reads the environment.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

# Re-exported: the one place every layer imports options from.
from shoal._config.strict import _Strict as _Strict
from shoal._config.support import _did_you_mean, check_name, not_yet, runtime_env_problems
from shoal._config.telemetry import LOG_LEVELS as LOG_LEVELS
from shoal._config.telemetry import LoggingConfig as LoggingConfig
from shoal._config.telemetry import TracingOptions as TracingOptions
from shoal._config.timeouts import TIMEOUTS as TIMEOUTS
from shoal._config.timeouts import Timeouts as Timeouts
from shoal._errors import ConfigError

#: Ray Serve's request-based policy (``shoal/_controller/policy.py``).
DEFAULT_POLICY = "shoal.serve.autoscaling_policy:replica_queue_length_autoscaling_policy"


class AutoscalingPolicy(_Strict):
    """Which function decides a deployment's replica count (Ray Serve's ``policy``).

    ``policy_function`` is an import path (``"module:function"`` or
    ``"module.function"``) of ``f(ctx: AutoscalingContext) -> (replicas, state)``;
    the default is Ray Serve's request-based policy.
    """

    policy_function: str = Field(
        DEFAULT_POLICY, min_length=1, description="Import path of the policy function."
    )

    @field_validator("policy_function", mode="before")
    @classmethod
    def _import_path(cls, value: Any) -> Any:
        # A function given in Python is kept as its import path: the controller imports
        # it (in the driver's process, so a function of the driver's __main__ works too).
        if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
            if "<locals>" in value.__qualname__:
                raise ValueError(
                    f"{value.__qualname__} is defined inside a function: define the policy "
                    "at module level so the controller can import it"
                )
            return f"{value.__module__}:{value.__qualname__}"
        return value


class AutoscalingConfig(_Strict):
    """Autoscaling options, with Ray Serve's names, meanings and defaults."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0: scale to zero).")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy (null: min_replicas)."
    )
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing plus queued requests per replica the policy aims at."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often each router reports its load to the controller."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which load reports are averaged."
    )
    smoothing_factor: float = Field(
        1.0, gt=0, description="Deprecated in Ray: both scaling factors at once."
    )
    upscale_smoothing_factor: float | None = Field(
        None, gt=0, description="Deprecated in Ray: use upscaling_factor."
    )
    downscale_smoothing_factor: float | None = Field(
        None, gt=0, description="Deprecated in Ray: use downscaling_factor."
    )
    upscaling_factor: float | None = Field(
        None, gt=0, description="Gain applied to each upscaling step (null: 1)."
    )
    downscaling_factor: float | None = Field(
        None, gt=0, description="Gain applied to each downscaling step (null: 1)."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="How long a higher count must be wanted before scaling up."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long a lower count must be wanted before scaling down."
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Delay of the 1 -> 0 step (null: downscale_delay_s)."
    )
    policy: AutoscalingPolicy = Field(
        default_factory=AutoscalingPolicy, description="The policy deciding the replica count."
    )

    def get_upscaling_factor(self) -> float:
        """The gain of upscaling steps (Ray's precedence among the three options)."""
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        """The gain of downscaling steps (Ray's precedence among the three options)."""
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must lie between min_replicas "
                f"({self.min_replicas}) and max_replicas ({self.max_replicas})"
            )
        return self


#: Ray Serve's defaults for ``num_replicas="auto"``; options the user sets win.
AUTO_DEFAULTS: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 100,
    "target_ongoing_requests": 2.0,
}


class RayActorOptions(_Strict):
    """Resources a replica reserves on the machine, and its runtime environment.

    ``num_cpus`` defaults to 0, so a replica never needs a whole free CPU.
    """

    num_cpus: float = Field(0.0, ge=0, description="CPUs each replica reserves (fractions too).")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs each replica reserves: whole ones, or a share below 1."
    )
    memory: float | None = Field(
        None, ge=0, description="Bytes of memory each replica reserves (Ray runtime only)."
    )
    object_store_memory: float | None = Field(
        None, ge=0, description="Bytes of object store each replica reserves (Ray runtime only)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources each replica reserves."
    )
    runtime_env: dict[str, Any] | None = Field(
        None,
        description="The replica's environment: env_vars, and local working_dir and "
        "py_modules on every runtime; any other key of Ray's on the Ray runtime.",
    )
    accelerator_type: str | None = Field(
        None, description="The accelerator each replica needs, e.g. A100 (Ray runtime only)."
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus(cls, value: float) -> float:
        # A replica gets whole GPUs, or a share of one: 1.5 GPUs cannot be assigned.
        if value > 1 and not float(value).is_integer():
            raise ValueError("must be a whole number when greater than 1 (or a fraction below 1)")
        return value

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(value)


def _check_custom_resources(value: dict[str, float]) -> dict[str, float]:
    for key, amount in value.items():
        if key in _BUILTIN_RESOURCES:
            raise ValueError(f"{key!r} is not a custom resource: use {_BUILTIN_RESOURCES[key]}")
        if amount < 0:
            raise ValueError(f"resource {key!r} must be >= 0, got {amount}")
    return value


_BUILTIN_RESOURCES = {
    "CPU": "num_cpus",
    "GPU": "num_gpus",
    "memory": "ray_actor_options memory",
    "object_store_memory": "ray_actor_options object_store_memory",
}


#: Default of ``no_replica_timeout_s``: long enough for a replica to start or be
#: replaced, short enough that callers learn of a broken deployment within a retry budget.
NO_REPLICA_TIMEOUT_S = 30.0
#: Default of ``http_options.max_ongoing_requests``: far above what one proxy serves at
#: once in practice, so only a flood is refused.
PROXY_MAX_ONGOING_REQUESTS = 10_000


class DeploymentConfig(_Strict):
    """Every option a deployment accepts, with Ray Serve's names and defaults.

    ``no_replica_timeout_s`` is shoal's own (Ray Serve waits without bound). It is a
    deployment option, not a proxy one, because the wait it bounds is the time that
    deployment's replicas take to start (a model loading for a minute needs more than a
    pure-Python function), and it applies to every caller: handles as well as HTTP.
    """

    name: str | None = Field(
        None,
        min_length=1,
        description="Unique within the application, without '#' (default: the class name).",
    )
    num_replicas: int | Literal["auto"] | None = Field(
        None,
        description="How many replicas run (null: 1); 'auto': autoscale with Ray's defaults "
        "(min 1, max 100, target_ongoing_requests 2), overridden by autoscaling_config.",
    )
    max_ongoing_requests: int = Field(
        5, ge=1, description="Most requests one router sends a replica at once; more wait."
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Most requests waiting for a replica in each caller (a process's handles, "
        "the proxy); more get BackPressureError / 503 at once (-1: no limit).",
    )
    no_replica_timeout_s: float = Field(
        NO_REPLICA_TIMEOUT_S,
        gt=0,
        description="Longest wait for a replica while the deployment has none able to serve; "
        "then DeploymentUnavailableError / 503. Shoal's own.",
    )
    user_config: Any = Field(
        None, description="JSON value given to reconfigure(); a change reconfigures in place."
    )
    ray_actor_options: RayActorOptions = Field(
        default_factory=RayActorOptions, description="What each replica reserves, its runtime_env."
    )
    autoscaling_config: AutoscalingConfig | None = Field(
        None, description="Autoscale between bounds (see docs/autoscaling.md)."
    )
    health_check_period_s: float = Field(
        10.0, gt=0, description="Seconds between two health checks of a replica."
    )
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="Seconds a health check may take before it counts as failed."
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, ge=0, description="Seconds between checks that a stopping replica is idle."
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="Longest wait for a stopping replica's requests, in seconds."
    )
    route_prefix: str | None = Field(
        None, description="Deprecated in Ray: the application's route_prefix wins unless '/'."
    )
    version: str | None = Field(
        None, description="Replicas are replaced when it changes (null: when code/options do)."
    )
    logging_config: LoggingConfig | None = Field(
        None,
        description="How the replicas log (docs/logging.md); null: the application's, "
        "else the instance's.",
    )
    placement_group_bundles: list[dict[str, float]] | None = Field(
        None,
        min_length=1,
        description="Resource bundles of a placement group made for each replica, which "
        "runs in the first (Ray runtime only).",
    )
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = (
        Field(None, description="How the bundles are placed (Ray runtime only); null: PACK.")
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="Replicas of the deployment per node at most (Ray runtime only)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return check_name(value)

    @field_validator("num_replicas")
    @classmethod
    def _replicas(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("user_config")
    @classmethod
    def _json_serializable(cls, value: Any) -> Any:
        if value is not None:
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"must be JSON-serializable ({exc})") from None
        return value

    @model_validator(mode="after")
    def _placement_group(self) -> DeploymentConfig:
        bundles = self.placement_group_bundles
        if self.placement_group_strategy is not None and bundles is None:
            raise ValueError(
                f"placement_group_strategy={self.placement_group_strategy!r} needs "
                "placement_group_bundles"
            )
        if bundles is not None:  # the replica's actor runs in the first bundle (as in Ray)
            options = self.ray_actor_options
            needs = {"CPU": options.num_cpus, "GPU": options.num_gpus, **options.resources,
                     "memory": options.memory or 0.0}  # fmt: skip
            short = {k: v for k, v in needs.items() if v and bundles[0].get(k, 0.0) < v}
            if short:
                raise ValueError(
                    f"the replica runs in the first placement group bundle {bundles[0]}, "
                    f"which does not hold what ray_actor_options reserve: {short}"
                )
        return self

    @model_validator(mode="after")
    def _replicas_vs_autoscaling(self) -> DeploymentConfig:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError(
                "num_replicas and autoscaling_config are mutually exclusive: "
                "set num_replicas='auto' or drop one of them"
            )
        return self

    def autoscaling(self) -> AutoscalingConfig | None:
        """The autoscaling options in effect (``num_replicas="auto"`` adds Ray's
        defaults under the user's), or None for a fixed replica count."""
        if self.num_replicas == "auto":
            given = (
                self.autoscaling_config.model_dump(exclude_unset=True)
                if (self.autoscaling_config is not None)
                else {}
            )
            return AutoscalingConfig(**{**AUTO_DEFAULTS, **given})
        return self.autoscaling_config

    def target_replicas(self) -> int:
        """How many replicas to start with: ``num_replicas``, or, when autoscaling, as Ray
        Serve does, ``initial_replicas`` (``min_replicas`` when unset; 0 is allowed)."""
        if isinstance(self.num_replicas, int):
            return self.num_replicas
        auto = self.autoscaling()
        if auto is None:
            return 1
        return auto.min_replicas if auto.initial_replicas is None else auto.initial_replicas


class ServeStartOptions(_Strict):
    """Instance-wide options of ``serve.start`` that are not HTTP options."""

    # Custom resources this machine offers to replicas (CPUs and GPUs are detected).
    resources: dict[str, float] = Field(default_factory=dict)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] | None = None
    # Where replicas run: "process" (one process each on this machine) or "ray" (one
    # Ray actor each, on a Ray cluster: docs/ray.md).
    runtime: Literal["process", "ray"] = "process"
    # The Ray cluster's address ("auto", "host:port"; "ray://" is refused); only with
    # runtime="ray". None: the cluster this process is connected to, RAY_ADDRESS's,
    # or a new local one, as ray.init() decides.
    address: str | None = None

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ServeStartOptions:
        if self.address is not None and self.runtime != "ray":
            raise ValueError(
                f"address={self.address!r} is a Ray cluster's address: it needs runtime='ray'"
            )
        if self.resources and self.runtime == "ray":
            raise ValueError(
                f"resources={self.resources!r} declares this machine's resources, but on "
                "runtime='ray' the Ray nodes declare theirs (ray start --resources=...)"
            )
        return self

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        return _check_custom_resources(value)


class HTTPOptions(_Strict):
    """Options of the HTTP proxy. It binds 127.0.0.1 unless told otherwise."""

    host: str = Field("127.0.0.1", description="Address the proxy binds (0.0.0.0: every one).")
    port: int = Field(8000, ge=0, le=65535, description="Port of the proxy (0: a free one).")
    root_path: str = Field("", description="Path prefix the proxy is mounted under.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a request may take before a 504 (null: no limit)."
    )
    keep_alive_timeout_s: int = Field(  # whole seconds: uvicorn takes an int
        5, gt=0, description="Seconds an idle keep-alive connection stays open."
    )
    max_request_body_bytes: int = Field(
        100 * 2**20, gt=0, description="Largest request body accepted (larger: 413); shoal's own."
    )
    max_ongoing_requests: int = Field(
        PROXY_MAX_ONGOING_REQUESTS,
        ge=1,
        description="Most HTTP requests the proxy holds at once (waiting or being answered); "
        "more get 503 at once. Shoal's own.",
    )


class gRPCOptions(_Strict):  # Ray's name (ray.serve.config.gRPCOptions)
    """Options of the gRPC proxy (docs/grpc.md), Ray Serve's ``grpc_options``.

    It serves only when ``grpc_servicer_functions`` lists at least one function (as in
    Ray), in the HTTP proxy's process, on ``http_options.host``.
    """

    port: int = Field(
        9000, ge=0, le=65535, description="Port of the gRPC proxy (0: a free one, shoal's own)."
    )
    grpc_servicer_functions: list[str] = Field(
        default_factory=list,
        description="Import paths of the generated add_XServicer_to_server functions to "
        "serve ([]: no gRPC server).",
    )
    request_timeout_s: float | None = Field(
        None, gt=0, description="Seconds a gRPC call may take (null: no limit but the client's)."
    )

    @field_validator("grpc_servicer_functions")
    @classmethod
    def _import_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            module, _, name = path.replace(":", ".").rpartition(".")
            if not module or not name or not all(p.isidentifier() for p in module.split(".")):
                raise ValueError(
                    f"{path!r} is not an import path; give 'module.function' or "
                    "'module:function', e.g. 'my_pb2_grpc.add_MyServiceServicer_to_server'"
                )
        return value

    @property
    def enabled(self) -> bool:
        """Whether a gRPC server runs (Ray's rule: some servicer function is listed)."""
        return bool(self.grpc_servicer_functions)


class ProxyOptions(HTTPOptions):
    """What a proxy process is started with: the HTTP options and, when gRPC is served,
    the gRPC options (shoal's own; ``Runtime.start_proxy`` takes it as HTTPOptions)."""

    grpc_options: gRPCOptions | None = None


def proxy_options(http: HTTPOptions, grpc: gRPCOptions | None) -> HTTPOptions:
    """``http``, with ``grpc`` when it serves (a ProxyOptions), for ``start_proxy``."""
    if grpc is None or not grpc.enabled:
        return http
    return ProxyOptions(**http.model_dump(), grpc_options=grpc)


class AdminOptions(_Strict):
    """The instance's admin (REST) API: Ray's dashboard address, so ``--address``
    defaults match. Loopback only unless told otherwise; ``port=0`` picks a free port."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8265, ge=0, le=65535)


def validate(model: type[_Strict], options: dict[str, Any], what: str) -> Any:
    """Build ``model`` from ``options`` or raise :class:`ConfigError` naming field and value.

    A :class:`DeploymentConfig`'s ``runtime_env`` is checked here too; options only the
    Ray runtime implements are refused when a local runtime deploys them (:mod:`.support`).
    """
    try:
        value = model(**options)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, options, what)) from None
    if isinstance(value, DeploymentConfig):
        problems = runtime_env_problems(value.ray_actor_options.runtime_env)
        if problems:
            raise ConfigError(f"{what}: " + "; ".join(problems))
    return value


def _describe(exc: ValidationError, options: dict[str, Any], what: str) -> str:
    model = _MODELS.get(exc.title, DeploymentConfig)
    grouped: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for error in exc.errors():
        path = _field_path(model, error["loc"])
        if error["type"] == "extra_forbidden":
            fields = _fields_at(model, error["loc"])
            hint = _did_you_mean(str(error["loc"][-1]), fields)
            option = ".".join(map(str, error["loc"]))
            valid = ", ".join(sorted(fields))
            why = not_yet(option) if model is DeploymentConfig else None
            unknown = f"unknown option {option!r} for {what}{hint}; valid options: {valid}"
            grouped.setdefault(f"option {option!r} for {what} {why}" if why else unknown, [])
            continue
        message = error["msg"].removeprefix("Value error, ")
        grouped.setdefault(path, []).append(message)
        values.setdefault(path, error["input"])
    lines = []
    for path, messages in grouped.items():
        if not messages:
            lines.append(path)
        elif path:
            lines.append(f"invalid {path}={values[path]!r} for {what}: {' or '.join(messages)}")
        else:
            lines.append(f"invalid options for {what}: {' or '.join(messages)}")
    return "; ".join(lines)


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The dotted option name in ``loc``, without pydantic's union-member tags."""
    parts = []
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or str(part) not in current.model_fields:
            break
        parts.append(str(part))
        annotation = current.model_fields[str(part)].annotation
        current = next((m for m in _MODELS.values() if m.__name__ in str(annotation)), None)
    return ".".join(parts)


_MODELS: dict[str, type[BaseModel]] = {
    "AutoscalingConfig": AutoscalingConfig,
    "AutoscalingPolicy": AutoscalingPolicy,
    "LoggingConfig": LoggingConfig,
    "RayActorOptions": RayActorOptions,
    "DeploymentConfig": DeploymentConfig,
    "HTTPOptions": HTTPOptions,
    "gRPCOptions": gRPCOptions,
    "AdminOptions": AdminOptions,
    "ServeStartOptions": ServeStartOptions,
    "TracingOptions": TracingOptions,
}


def describe_fields_of(*models: type[BaseModel]) -> None:
    """Let :func:`validate` name the fields of ``models`` (defined in higher layers, such
    as the observability options) in its errors, nested ones included."""
    for model in models:
        _MODELS[model.__name__] = model


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    path = _field_path(model, loc[:-1])
    for part in path.split(".") if path else []:
        annotation = model.model_fields[part].annotation
        model = next((m for m in _MODELS.values() if m.__name__ in str(annotation)), model)
    return list(model.model_fields)
