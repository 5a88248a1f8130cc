"""``@serve.deployment``, ``Deployment.options`` and ``Deployment.bind``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

from shoal._api.serializability import check_picklable
from shoal._config import DeploymentConfig, validate
from shoal._errors import ConfigError, ConfigTypeError, DirectCallError


class Deployment:
    """A class or function marked as a deployment, with its options. Immutable."""

    def __init__(self, target: Callable[..., Any], config: DeploymentConfig) -> None:
        validate_route_prefix(config.route_prefix)
        self._target = target
        self._config = config

    @property
    def name(self) -> str:
        return self._config.name or self._target.__name__

    @property
    def func_or_class(self) -> Callable[..., Any]:
        return self._target

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int | str | None:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def version(self) -> str | None:
        return self._config.version

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def route_prefix(self) -> str | None:
        """The deployment-level route prefix (Ray Serve raises here: it dropped the option)."""
        return self._config.route_prefix

    @property
    def ray_actor_options(self) -> dict[str, Any]:
        return self._config.ray_actor_options.model_dump(exclude_unset=True)

    @property
    def logging_config(self) -> dict[str, Any] | None:
        """As Ray's: a dict (its fields are ``shoal.serve.schema.LoggingConfig``'s), or None."""
        config = self._config.logging_config
        return None if config is None else config.model_dump()

    @property
    def init_args(self) -> tuple[Any, ...]:
        """Always empty: ``.bind()`` returns an Application holding the arguments."""
        return ()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return {}

    def options(
        self, func_or_class: Callable[..., Any] | None = None, **options: Any
    ) -> Deployment:
        """A copy with ``options`` changed and, if given, another class or function
        (which keeps this deployment's name unless ``name`` is given).

        Invalid or unknown options raise ConfigError naming them.
        """
        target = self._target
        if func_or_class is not None:
            if not callable(func_or_class):
                raise ConfigError(
                    f"Deployment.options(func_or_class=...) needs a class or function, "
                    f"got {func_or_class!r}"
                )
            target, options = func_or_class, {"name": self.name, **options}
        merged = self._config.model_dump(exclude_unset=True) | options
        return Deployment(target, validate(DeploymentConfig, merged, _what(target)))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Build an application: this deployment constructed with these arguments.

        Bound deployments anywhere in the arguments arrive in the constructor as handles.
        """
        if not inspect.isclass(self._target) and (args or kwargs):
            raise ConfigError(
                f"function deployment '{self.name}' takes no constructor arguments; "
                "call .bind() without arguments"
            )
        # As Ray Serve: what replicas receive pickled is refused here, with a TypeError.
        check_picklable(self._target, f"the deployment {self._target!r}", {})
        check_picklable(args, "the deployment init args", _named(args))
        check_picklable(kwargs, "the deployment init kwargs", _named(kwargs))
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DirectCallError(
            "Deployments cannot be constructed directly. Use `.bind()` instead: "
            f"build an application with {self.name}.bind(...) and pass it to serve.run()"
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


class Application:
    """A deployment bound to its constructor arguments: the unit ``serve.run`` deploys."""

    def __init__(self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Application(ingress={self.deployment.name!r})"


def validate_route_prefix(route_prefix: Any) -> None:
    """Ray Serve's rules (and messages) for a route prefix; None means no HTTP route."""
    if route_prefix is None:
        return
    if not isinstance(route_prefix, str):
        raise ConfigTypeError(f"route_prefix must be a string or None, got {route_prefix!r}")
    if not route_prefix.startswith("/"):
        raise ConfigError(
            f"Invalid route_prefix '{route_prefix}', must start with a forward slash ('/')."
        )
    if route_prefix != "/" and route_prefix.endswith("/"):
        raise ConfigError(
            f"Invalid route_prefix '{route_prefix}', may not end with a trailing '/'."
        )
    if "{" in route_prefix or "}" in route_prefix:
        # The proxy matches prefixes literally; a path parameter would never match.
        raise ConfigError(f"Invalid route_prefix '{route_prefix}', may not contain wildcards.")


def _named(arguments: tuple[Any, ...] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return {f"argument '{key}'": value for key, value in arguments.items()}
    return {f"argument {position}": value for position, value in enumerate(arguments)}


def _what(target: Any) -> str:
    return f"deployment '{getattr(target, '__name__', target)}'"


@overload
def deployment(func_or_class: Callable[..., Any], /, **options: Any) -> Deployment: ...


@overload
def deployment(
    func_or_class: None = None, /, **options: Any
) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(func_or_class: Any = None, /, **options: Any) -> Any:
    """Mark a class or function as a deployment, in each of Ray Serve's call forms.

    ``@serve.deployment``, ``@serve.deployment(num_replicas=2)``,
    ``serve.deployment(Model)`` and ``serve.deployment(Model, num_replicas=2)``.
    Options have Ray Serve's names (``name``, ``num_replicas``, ``max_ongoing_requests``,
    ``user_config``, ``ray_actor_options``...; see :class:`shoal._config.DeploymentConfig`).
    Invalid, unknown or not yet supported options raise ConfigError when the
    deployment is declared.
    """
    if func_or_class is not None and not callable(func_or_class):
        raise ConfigError(
            f"serve.deployment takes the class or function to deploy as its only positional "
            f"argument, got {func_or_class!r}; pass options as keywords "
            f"(for example name={func_or_class!r})"
        )

    def decorate(target: Any) -> Deployment:
        if not callable(target):
            raise ConfigError(f"@serve.deployment needs a class or function, got {target!r}")
        return Deployment(target, validate(DeploymentConfig, options, _what(target)))

    return decorate if func_or_class is None else decorate(func_or_class)
