"""Ray Serve's config file (``serve deploy`` / ``serve build`` format), strictly validated.

A file Ray Serve accepts is accepted here unchanged, as long as it only uses what
shoal implements: an option shoal does not implement yet is refused, naming the issue
that brings it. Every problem is reported as one line ``<field path>: <value> <what is
wrong>`` in a single :class:`ConfigError`.
Deployment overrides reuse :class:`shoal._config.DeploymentConfig`'s fields, so
an option has the same type, bounds and checks in code and in a file.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shoal._config import (
    AutoscalingPolicy,
    DeploymentConfig,
    HTTPOptions,
    LoggingConfig,
    TracingOptions,
    _Strict,
    gRPCOptions,
    runtime_env_problems,
)
from shoal._config.support import EXTERNAL_SCALER_NOT_YET, check_name, not_yet
from shoal._errors import ConfigError

# A problem found by a model validator: (path relative to the model, value, message).
Problem = tuple[str, Any, str]


def _problems(problems: list[Problem]) -> PydanticCustomError:
    # The structured problems travel in the error's context, so the formatter can
    # prefix each one with the full path of the model that found it.
    return PydanticCustomError("shoal_problems", "{count} problem(s)", {
        "count": len(problems), "problems": problems,
    })  # fmt: skip


class gRPCOptionsSchema(gRPCOptions):  # Ray's name; the same fields as serve.start's
    """Ray's ``grpc_options``: the gRPC proxy (docs/grpc.md)."""


class DeploymentSchema(DeploymentConfig):
    """Overrides of one deployment's options; only the keys the file sets override the code.

    As in Ray, a value replaces the code's whole value: ``ray_actor_options`` and
    ``user_config`` are not merged with the code's.
    """

    name: str = Field(
        min_length=1,
        description="The deployment to override, as named in the application (the class or "
        "function name unless the code sets name=); required.",
    )

    @model_validator(mode="after")
    def _runtime_env(self) -> DeploymentSchema:
        found = _env_problems(self.ray_actor_options.runtime_env, "ray_actor_options.runtime_env")
        if found:
            raise _problems(found)
        return self


def _env_problems(env: dict[str, Any] | None, path: str) -> list[Problem]:
    """``runtime_env_problems``, one (path, value, message) per key."""
    found: list[Problem] = []
    for key, value in (env or {}).items():
        for line in runtime_env_problems({key: value}):
            found.append((f"{path}.{key}", value, "is invalid: " + line.rsplit(": ", 1)[1]))
    return found


def _check_route_prefix(value: str | None) -> str | None:
    # Ray Serve's rules (shoal._api.deployment applies the same ones to serve.run).
    if value is None:
        return value
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    if value != "/" and value.endswith("/"):
        raise ValueError("must not end with '/' (unless it is just '/')")
    if "{" in value or "}" in value:
        raise ValueError("must not contain wildcards ('{' or '}')")
    return value


class ServeApplicationSchema(_Strict):
    """One application: what to import, its arguments, environment and overrides."""

    name: str = Field(
        "default",
        min_length=1,
        description="Application name, unique within the file, without '#'.",
    )
    route_prefix: str | None = Field(
        "/",
        description="HTTP path prefix of the application's ingress (longest prefix wins); "
        "null serves it to handles only. Unique within the file.",
    )
    direct_ingress_port: int | None = Field(
        None, ge=1, le=65535,
        description="A port on which the ingress replicas accept HTTP themselves, besides the "
        "proxy (docs/direct-ingress.md); null: through the proxy only. Shoal's own.",
    )  # fmt: skip
    import_path: str = Field(
        description="Where the application is: 'module.submodule:attribute' or "
        "'module.submodule.attribute'; a bound application or a builder function taking `args`."
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Arguments of a builder function (validated into its pydantic model when "
        "its parameter is annotated with one); must be empty for a bound application.",
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Environment of the application: local working_dir and py_modules are "
        "importable while building it and in every replica; env_vars are set in every replica. "
        "Each deployment's own runtime_env keys win (env_vars are merged).",
    )
    deployments: list[DeploymentSchema] = Field(
        default_factory=list, description="Overrides of the options the code sets."
    )
    logging_config: LoggingConfig | None = Field(
        None,
        description="How the application's deployments log, unless one sets its own "
        "(docs/logging.md); null: the file's top-level logging_config.",
    )
    autoscaling_policy: AutoscalingPolicy | None = Field(
        None,
        description="One policy deciding every autoscaled deployment of the application "
        "(see docs/autoscaling.md); null: each deployment's own.",
    )
    external_scaler_enabled: bool = Field(
        False,
        description="Ray Serve's external scaling; only false (its default) is supported yet.",
    )

    @field_validator("external_scaler_enabled")
    @classmethod
    def _external_scaler(cls, value: bool) -> bool:
        if value:
            raise ValueError(EXTERNAL_SCALER_NOT_YET)
        return value

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str | None) -> str | None:
        return _check_route_prefix(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value) or value

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        # Ray's rules: one colon at most, else at least one dot; none at either end.
        module, _, attribute = value.rpartition(":") if ":" in value else value.rpartition(".")
        if value.count(":") > 1 or not module or not attribute or module.endswith("."):
            raise ValueError(
                "is not an import path: expected 'module.submodule:attribute' "
                "or 'module.submodule.attribute'"
            )
        return value

    @model_validator(mode="after")
    def _checks(self) -> ServeApplicationSchema:
        found = _env_problems(self.runtime_env, "runtime_env")
        found += _duplicates(self.deployments, "deployments", "name")
        if found:
            raise _problems(found)
        return self


def _duplicates(items: list[Any], path: str, field: str) -> list[Problem]:
    first: dict[Any, int] = {}
    found: list[Problem] = []
    for index, item in enumerate(items):
        value = getattr(item, field)
        if value is None:
            continue
        if value in first:
            found.append((
                f"{path}[{index}].{field}", value,
                f"is also the {field} of {path}[{first[value]}]: each {field} must be unique",
            ))  # fmt: skip
        first.setdefault(value, index)
    return found


class ServeDeploySchema(_Strict):
    """A whole Serve config file: instance options and the applications to run.

    Deploying it is declarative: the applications listed are what should run.
    """

    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where proxies run: EveryNode on every node of a Ray cluster, HeadOnly "
        "on the controller's node only (on one machine both run its one proxy); Disabled "
        "runs none.",
    )
    http_options: HTTPOptions = Field(
        default_factory=HTTPOptions, description="Options of the HTTP proxy."
    )
    grpc_options: gRPCOptionsSchema | None = Field(
        None,
        description="Options of the gRPC proxy (docs/grpc.md), applied where the file starts "
        "the instance (shoal run); null: no gRPC server.",
    )
    logging_config: LoggingConfig | None = Field(
        None,
        description="How the deployments of every application log, unless the application or "
        "the deployment sets its own (docs/logging.md).",
    )
    tracing_options: TracingOptions | None = Field(
        None,
        description="OpenTelemetry tracing of the instance (a shoal extension; "
        "docs/tracing.md), applied where the file starts it (shoal run); null: off.",
    )
    runtime: Literal["process", "ray"] | None = Field(
        None,
        description="Where the replicas run (a shoal extension; docs/ray.md): process (this "
        "machine's processes) or ray (Ray actors on a Ray cluster), applied where the file "
        "starts the instance (shoal run); a running instance with another runtime refuses "
        "the file. null: process.",
    )
    ray_address: str | None = Field(
        None,
        description="With runtime: ray, the Ray cluster's address (auto, host:port; Ray "
        "Client's ray:// is refused; a shoal extension), applied where the file starts the "
        "instance (shoal run). null: RAY_ADDRESS, or a new local cluster.",
    )
    target_capacity: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Percent of every deployment's replicas to run (and of its autoscaling "
        "bounds), as in Ray; null: 100.",
    )
    applications: list[ServeApplicationSchema] = Field(
        description="The applications to run (required, as in Ray; [] runs none): "
        "deploying the file deletes the others."
    )

    @model_validator(mode="after")
    def _checks(self) -> ServeDeploySchema:
        found: list[Problem] = []
        apps = self.applications
        found += _duplicates(apps, "applications", "name")
        found += _duplicates(apps, "applications", "route_prefix")
        if self.ray_address is not None and self.runtime != "ray":
            found.append(("ray_address", self.ray_address, "needs runtime: ray"))
        if found:
            raise _problems(found)
        return self


# --- parsing ----------------------------------------------------------------------------------


def parse_config(data: Any, source: str, *, text: str | None = None) -> ServeDeploySchema:
    """Validate ``data`` (a parsed YAML/JSON document) as a Serve config.

    Raises ConfigError with one line per problem, each starting with ``source``
    (and the line of the field, when the document's ``text`` is given).
    """
    if data is None:
        raise ConfigError(f"{source}: the config is empty; it needs an 'applications' list")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a Serve config is a mapping with an 'applications' list, "
            f"got {type(data).__name__} {_short(data)}"
        )
    if "import_path" in data and "applications" not in data:
        from shoal._config_text import legacy_message

        raise ConfigError(legacy_message(data, source))
    try:
        return ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        from shoal._config_text import compose, line_of

        root = compose(text) if text is not None else None
        numbered = [(line_of(root, line.partition(": ")[0]), line) for line in _lines(exc)]
        numbered.sort(key=lambda item: item[0] or 0)  # in the file's order, when known
        raise ConfigError("\n".join(
            f"{source}: {line}{f' (line {number})' if number else ''}" for number, line in numbered
        )) from None  # fmt: skip


def load_config_file(path: str) -> ServeDeploySchema:
    """Read and validate a YAML or JSON Serve config file (JSON if it starts with ``{``).

    Every problem names the file, the line and the field path.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(f"{path}: cannot read the config file ({reason})") from None
    from shoal._config_text import parse_document

    return parse_config(parse_document(text, path), path, text=text)


def _short(value: Any) -> str:
    if isinstance(value, BaseModel):  # as the file wrote it
        value = value.model_dump(mode="json", exclude_unset=True)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- error messages ---------------------------------------------------------------------------

_TYPES = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
    "string_type": "a string", "bool_type": "true or false", "dict_type": "a mapping",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
    "none_required": "null", "int_parsing": "an integer", "float_parsing": "a number",
    "bool_parsing": "true or false",
}  # fmt: skip
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}  # fmt: skip


def _lines(exc: ValidationError) -> list[str]:
    """One line per problem: ``path: value message``; union alternatives are merged."""
    lines: list[str] = []
    merged: dict[str, tuple[Any, list[str]]] = {}
    for error in exc.errors():
        path, annotation = _walk(ServeDeploySchema, error["loc"])
        if error["type"] == "shoal_problems":
            for relative, value, message in error["ctx"]["problems"]:
                full = f"{path}.{relative}" if path and not relative.startswith("[") else (
                    f"{path}{relative}"
                )  # fmt: skip
                lines.append(f"{full}: {_short(value)} {message}")
        elif error["type"] == "extra_forbidden":
            lines.append(_unknown_key(error["loc"], path))
        elif error["type"] == "missing":
            lines.append(f"{path}: required, but missing")
        elif error["type"] == "value_error" and _is_model(annotation):
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {message}" if path else message)
        else:
            value, messages = merged.setdefault(path, (error["input"], []))
            messages.append(_message(error))
    for path, (value, messages) in merged.items():
        first, *rest = messages
        alternatives = "".join(f" or {m.removeprefix('is not ')}" for m in rest)
        lines.append(f"{path}: {_short(value)} {first}{alternatives}")
    return lines


def _message(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in _TYPES:
        return f"is not {_TYPES[kind]}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"is not {_BOUNDS[kind]} {bound}"
    if kind == "literal_error":
        return f"is not {ctx['expected']}"
    if kind == "string_too_short":
        return "must not be empty"
    message = str(error["msg"]).removeprefix("Value error, ")
    for op in (">=", "<=", ">", "<"):  # "must be >= 0" from shoal._config reads "is not >= 0"
        if message.startswith(f"must be {op} "):
            message = "is not " + message.removeprefix("must be ")
    return message if message.startswith(("is ", "must ")) else f"is invalid: {message}"


def _walk(model: Any, loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The readable path of ``loc`` (``a[0].b``, union member tags dropped) and its type."""
    path, annotation = "", model
    for part in loc:
        annotation = _strip_none(annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin in (typing.Union, _UnionType) and isinstance(part, str):
            # a union member tag such as 'int' or "literal['auto']": not a key of the file
            annotation = next((a for a in args if getattr(a, "__name__", "") == part), None)
            continue
        if isinstance(part, int):
            path += f"[{part}]"
            annotation = args[0] if origin is list and args else None
            continue
        path += f".{part}" if path else str(part)
        if _is_model(annotation) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        elif origin is dict and len(args) == 2:
            annotation = args[1]
        else:
            annotation = None
    return path, _strip_none(annotation)


_UnionType = type(int | str)


def _strip_none(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, _UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
        return typing.Union[tuple(rest)]  # noqa: UP007 (built from a tuple)
    return annotation


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _unknown_key(loc: tuple[Any, ...], path: str) -> str:
    _, parent = _walk(ServeDeploySchema, loc[:-1])
    parent = _strip_none(parent)
    valid = sorted(parent.model_fields) if _is_model(parent) else []
    if parent is DeploymentSchema and (why := not_yet(str(loc[-1]))):
        return f"{path}: {why}"
    matches = difflib.get_close_matches(str(loc[-1]), valid, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
    return f"{path}: unknown key{hint}; valid keys: {', '.join(valid)}"


def validation_lines(exc: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    """``path: value message`` lines for a ValidationError of any model (builder arguments)."""
    lines = []
    for error in exc.errors():
        path, _ = _walk(model, error["loc"])
        full = ".".join(p for p in (prefix, path) if p).replace(".[", "[")
        if error["type"] == "missing":
            lines.append(f"{full}: required, but missing")
        elif error["type"] == "extra_forbidden":
            lines.append(f"{full}: unknown key; valid keys: {', '.join(model.model_fields)}")
        else:
            lines.append(f"{full}: {_short(error['input'])} {_message(error)}")
    return lines
