"""From a validated Serve config to applications, and from an application to its config.

:func:`build_applications` imports each application (with its ``runtime_env``'s
local paths importable), calls builder functions with their ``args``, and
applies the file's deployment overrides, as Ray Serve does: a key the file sets
replaces the code's whole value. Nothing is started here. :func:`config_for` is
the reverse: what Ray's ``serve build`` writes for an application.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import traceback
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from shoal._api.deployment import Application, Deployment
from shoal._api.graph import _substitute
from shoal._config import HTTPOptions, LoggingConfig
from shoal._deploy_config import ServeApplicationSchema, ServeDeploySchema, validation_lines
from shoal._errors import ConfigError
from shoal._transport.failures import is_internal


@dataclass(frozen=True)
class BuiltApp:
    """One application of a config, ready for ``serve.run``; ``index`` is its position."""

    name: str
    route_prefix: str | None
    app: Application
    index: int
    direct_ingress_port: int | None = None  # docs/direct-ingress.md


def build_applications(config: ServeDeploySchema) -> list[BuiltApp]:
    """Import and build every application of ``config``, in order, with its overrides.

    Raises ConfigError naming ``applications[i]`` and the field at fault (the first
    application that fails; :func:`build_application` builds one at a time).
    """
    return [build_application(config, index) for index in range(len(config.applications))]


def build_application(config: ServeDeploySchema, index: int) -> BuiltApp:
    """Import and build ``config.applications[index]`` with its overrides.

    The current directory is importable (as with ``python -m``) and stays so; the
    runtime_env's working_dir (also the current directory while importing) and
    py_modules are importable only while importing: ``sys.path`` and the current
    directory are restored afterwards. Relative runtime_env paths are made absolute.
    """
    schema = config.applications[index]
    where = f"applications[{index}]"
    env = _absolute_env(schema.runtime_env, f"{where}.runtime_env")
    with _importable(env):
        app = load_target(schema.import_path, schema.args, where=where)
    # Ray's rule: a deployment's own logging_config, else its application's, else the
    # file's (which `shoal run` also makes the instance's); a top-level one with Ray's
    # defaults (as `serve build` writes) leaves the instance's in place.
    top = config.logging_config if config.logging_config != LoggingConfig() else None
    logging_config = schema.logging_config or top
    app = _apply_overrides(app, schema, env, where, logging_config)
    return BuiltApp(schema.name, schema.route_prefix, app, index, schema.direct_ingress_port)


def load_target(
    import_path: str, args: dict[str, Any] | None = None, *, where: str | None = None
) -> Application:
    """Import ``module:attribute`` (or ``module.attribute``) and return its application.

    A callable that is not an application is a builder: it is called with ``args``
    (validated into its pydantic model when its one parameter is annotated with
    one), or without arguments if it takes none. Every failure is one ConfigError
    naming what to fix (file and line for errors in the user's code); ``where``
    (``applications[i]``) prefixes the field at fault.
    """
    args = dict(args or {})

    def fail(reason: str, field: str = "import_path") -> ConfigError:
        if where is None:
            return ConfigError(reason)
        value = args if field == "args" else import_path
        return ConfigError(f"{where}.{field}: {value!r}: {reason}")

    module_name, attribute = _split(import_path, fail)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    target = getattr(_import(module_name, attribute, fail), attribute, _MISSING)
    if target is _MISSING:
        module = sys.modules[module_name]
        apps = sorted(n for n, v in vars(module).items() if isinstance(v, Application))
        found = f"its applications: {', '.join(apps)}" if apps else "it defines no application"
        raise fail(f"module {module_name!r} has no attribute {attribute!r}; {found}")
    if isinstance(target, Application):
        if args:
            raise fail(
                f"{import_path} is an application, not a builder function, so it takes no "
                "args; remove them, or point import_path at a function that takes them and "
                "returns an application",
                "args",
            )
        return target
    if isinstance(target, Deployment):
        raise fail(
            f"{import_path} is a deployment, not an application: bind it in the module "
            f"(app = {attribute}.bind(...)) and point import_path at the application"
        )
    if not callable(target):
        raise fail(f"{import_path} is not an application (build one with .bind())")
    app = _call_builder(target, import_path, args, where, fail)
    if not isinstance(app, Application):
        raise fail(
            f"the builder {import_path} returned {_short(app)}, not an application; "
            "return Deployment.bind(...)"
        )
    return app


_MISSING = object()


def _split(import_path: str, fail: Any) -> tuple[str, str]:
    if ":" in import_path:
        module_name, _, attribute = import_path.partition(":")
    else:
        module_name, _, attribute = import_path.rpartition(".")
    if not module_name or not attribute or ":" in attribute:
        raise fail(
            f"expected MODULE:ATTRIBUTE (e.g. examples.pipeline:app), got {import_path!r}; "
            "name the application after a colon"
        )
    return module_name, attribute


def _import(module_name: str, attribute: str, fail: Any) -> Any:
    try:
        return importlib.import_module(module_name)
    except SyntaxError as exc:  # IndentationError included
        source = f"\n    {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        raise fail(
            f"syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}{source}"
        ) from None
    except Exception as exc:
        if _not_found(exc, module_name):
            fix = "check the name, or run shoal from the directory that contains it"
            if module_name.endswith(".py"):
                fix = f"name the module, not its file: {module_name[:-3]}:{attribute}"
            raise fail(
                f"no module named {module_name!r} in the current directory ({os.getcwd()}) "
                f"or on sys.path; {fix}"
            ) from None
        raise fail(f"importing {module_name!r} failed{_where(exc)}") from None


def _call_builder(
    builder: Any, import_path: str, args: dict[str, Any], where: str | None, fail: Any
) -> Any:
    """Call ``builder`` as Ray does: with ``args`` (a dict, or its pydantic model)."""
    try:
        parameters = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    kinds = inspect.Parameter
    required = [p for p in parameters if p.default is p.empty and p.kind not in (
        kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]  # fmt: skip
    call_args: tuple[Any, ...] = ()
    if parameters and parameters[0].kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
        call_args = (_typed_args(builder, parameters[0], args, where),)
    elif required or args:
        raise fail(
            f"the builder {import_path} must take one parameter, the args dict (or a "
            "pydantic model of it)"
        )
    try:
        return builder(*call_args)
    except Exception as exc:
        raise fail(f"building the application {import_path}() failed{_where(exc)}") from None


def _typed_args(builder: Any, parameter: Any, args: dict[str, Any], where: str | None) -> Any:
    try:
        annotation = typing.get_type_hints(builder).get(parameter.name, parameter.annotation)
    except Exception:  # an unresolvable string annotation: treat the args as a plain dict
        annotation = parameter.annotation
    if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
        return args
    try:
        return annotation.model_validate(args)
    except ValidationError as exc:
        prefix = f"{where}.args" if where else "args"
        lines = validation_lines(exc, annotation, prefix)
        raise ConfigError(
            "\n".join(lines) + f"\n(the builder's arguments, validated by {annotation.__name__})"
        ) from None


def _not_found(exc: Exception, module_name: str) -> bool:
    """Whether ``exc`` says the target module itself (or its package) does not exist."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return False
    if module_name != name and not module_name.startswith(f"{name}."):
        return False  # the module exists but imports something missing
    return not any(not is_internal(f.filename) for f in traceback.extract_tb(exc.__traceback__))


def _where(exc: BaseException) -> str:
    """`` at FILE, line N: Type: message`` and the source line, from the innermost user frame."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not is_internal(f.filename)]
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        text += " (is it installed in this Python environment?)"
    if not frames:
        return f": {text}"
    frame = frames[-1]
    source = f"\n    {frame.line.strip()}" if frame.line and frame.line.strip() else ""
    return f" at {frame.filename}, line {frame.lineno}: {text}{source}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- runtime_env ------------------------------------------------------------------------------


def _absolute_env(env: dict[str, Any], path: str) -> dict[str, Any]:
    """``env`` with local paths made absolute (relative to the current directory)."""
    env = dict(env)  # URIs are Ray's to fetch (a local runtime refuses them)
    if env.get("working_dir") is not None and "://" not in env["working_dir"]:
        directory = os.path.abspath(env["working_dir"])
        if not os.path.isdir(directory):
            raise ConfigError(
                f"{path}.working_dir: {env['working_dir']!r} is not a directory (relative "
                f"paths are relative to the current directory, {os.getcwd()})"
            )
        env["working_dir"] = directory
    if env.get("py_modules"):
        modules = [m if "://" in m else os.path.abspath(m) for m in env["py_modules"]]
        for given, module in zip(env["py_modules"], modules, strict=True):
            if "://" not in module and not os.path.exists(module):
                raise ConfigError(
                    f"{path}.py_modules: {given!r} does not exist (relative paths are "
                    f"relative to the current directory, {os.getcwd()})"
                )
        env["py_modules"] = modules
    return env


@contextlib.contextmanager
def _importable(env: dict[str, Any]) -> Iterator[None]:
    """Import as a replica with ``env`` will: working_dir (also the current directory),
    then py_modules, then the current directory and ``sys.path``; restored afterwards."""
    saved_path, saved_cwd = list(sys.path), os.getcwd()
    if saved_cwd not in saved_path:
        saved_path.insert(0, saved_cwd)  # kept afterwards, as load_target does
    front = [env["working_dir"]] if env.get("working_dir") else []
    for module in env.get("py_modules") or []:
        zipped = os.path.isfile(module) and module.endswith((".zip", ".whl"))
        front.append(module if zipped else os.path.dirname(module.rstrip(os.sep)))
    sys.path[:] = front + saved_path
    try:
        if env.get("working_dir"):
            os.chdir(env["working_dir"])
        yield
    finally:
        os.chdir(saved_cwd)
        sys.path[:] = saved_path


def _merge_env(app_env: dict[str, Any], own: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's rule: the deployment's keys win, except env_vars, which are merged."""
    own = own or {}
    merged = {**app_env, **own}
    if "env_vars" in app_env and "env_vars" in own:
        merged["env_vars"] = {**app_env["env_vars"], **own["env_vars"]}
    return merged


# --- deployment overrides ---------------------------------------------------------------------


def _apply_overrides(
    app: Application,
    schema: ServeApplicationSchema,
    env: dict[str, Any],
    where: str,
    logging_config: LoggingConfig | None = None,
) -> Application:
    """A copy of the graph with each listed deployment's options overridden (and the app's
    runtime_env merged into every deployment's; ``logging_config`` given to every
    deployment that sets none); untouched nodes are shared."""
    nodes = deployment_names(app)
    by_name = {name: node for node, name in nodes}
    overrides: dict[int, tuple[int, dict[str, Any]]] = {}
    for position, entry in enumerate(schema.deployments):
        if entry.name not in by_name:
            raise ConfigError(
                f"{where}.deployments[{position}].name: {entry.name!r} is not a deployment of "
                f"{schema.import_path}; its deployments: {', '.join(by_name)}"
            )
        options = entry.model_dump(exclude_unset=True, exclude={"name"})
        overrides[id(by_name[entry.name])] = (position, options)
    if not overrides and not env and logging_config is None:
        return app
    memo: dict[int, Application] = {}

    def rebuild(node: Application) -> Application:
        if id(node) in memo:
            return memo[id(node)]
        args = _substitute(node.args, rebuild, set())
        kwargs = _substitute(node.kwargs, rebuild, set())
        position, options = overrides.get(id(node), (-1, {}))
        if env:
            actor = options.get("ray_actor_options", node.deployment.ray_actor_options)
            own_env = actor.get("runtime_env")
            options["ray_actor_options"] = {**actor, "runtime_env": _merge_env(env, own_env)}
        if (
            logging_config is not None
            and options.get("logging_config", node.deployment.config.logging_config) is None
        ):
            options["logging_config"] = logging_config
        deployment = node.deployment
        if options:
            try:
                deployment = deployment.options(**options)
            except ConfigError as exc:
                field = f"deployments[{position}]" if position >= 0 else "runtime_env"
                raise ConfigError(f"{where}.{field}: {exc}") from None
        same = deployment is node.deployment and args is node.args and kwargs is node.kwargs
        memo[id(node)] = node if same else Application(deployment, args, kwargs)
        return memo[id(node)]

    return rebuild(app)


def deployment_names(app: Application) -> list[tuple[Application, str]]:
    """Every distinct bound deployment of the graph with its name in the application,
    in the order (and with the ``name_1`` suffixes) ``serve.run`` gives them."""
    names: dict[int, str] = {}
    nodes: list[Application] = []

    def visit(node: Application) -> Application:
        if id(node) not in names:
            base, taken = node.deployment.name, set(names.values())
            unique, suffix = base, 0
            while unique in taken:
                suffix += 1
                unique = f"{base}_{suffix}"
            names[id(node)] = unique
            nodes.append(node)
        return node

    visit(app)
    for node in nodes:  # grows while walking: breadth first, as serve.run walks
        _substitute(node.args, visit, set())
        _substitute(node.kwargs, visit, set())
    return [(node, names[id(node)]) for node in nodes]


# --- serve build ------------------------------------------------------------------------------

# What Ray's `serve build` writes for the sections the code of an application does not set.
RAY_GRPC_DEFAULTS: dict[str, Any] = {"port": 9000, "grpc_servicer_functions": []}
RAY_LOGGING_DEFAULTS: dict[str, Any] = {
    "encoding": "TEXT", "log_level": "INFO", "logs_dir": None, "enable_access_log": True,
}  # fmt: skip


def config_for(
    import_path: str, app: Application, name: str = "default", route_prefix: str | None = "/"
) -> dict[str, Any]:
    """The config Ray's ``serve build`` writes for ``app``: each deployment with the options
    its code sets explicitly. It parses back and builds the same application."""
    http = HTTPOptions()
    deployments = []
    for node, deployment_name in deployment_names(app):
        options = node.deployment.config.model_dump(
            mode="json", exclude_unset=True, exclude={"name", "route_prefix"}
        )
        deployments.append({"name": deployment_name, **options})
    application: dict[str, Any] = {
        "name": name, "route_prefix": route_prefix, "import_path": import_path,
        "runtime_env": {}, "deployments": deployments,
    }  # fmt: skip
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http.host, "port": http.port},
        "grpc_options": dict(RAY_GRPC_DEFAULTS, grpc_servicer_functions=[]),
        "logging_config": dict(RAY_LOGGING_DEFAULTS),
        "applications": [application],
    }
