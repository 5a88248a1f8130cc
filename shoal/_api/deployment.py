"""``@serve.deployment``, ``Deployment.options`` and ``Deployment.bind``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

from shoal._config import DeploymentConfig, validate
from shoal._errors import ConfigError, ShoalError


class Deployment:
    """A class or function marked as a deployment, with its options. Immutable."""

    def __init__(self, target: Callable[..., Any], config: DeploymentConfig) -> None:
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

    def options(self, **options: Any) -> Deployment:
        """A copy with ``options`` changed; invalid ones raise ConfigError naming them."""
        merged = self._config.model_dump(exclude_unset=True) | options
        return Deployment(self._target, validate(DeploymentConfig, merged, _what(self._target)))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Build an application: this deployment constructed with these arguments.

        Bound deployments anywhere in the arguments arrive in the constructor as handles.
        """
        if not inspect.isclass(self._target) and (args or kwargs):
            raise ConfigError(
                f"function deployment '{self.name}' takes no constructor arguments; "
                "call .bind() without arguments"
            )
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ShoalError(
            f"deployment '{self.name}' cannot be called directly: build an application with "
            f"{self.name}.bind(...) and pass it to serve.run()"
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


def _what(target: Any) -> str:
    return f"deployment '{getattr(target, '__name__', target)}'"


@overload
def deployment(_func_or_class: Callable[..., Any], /) -> Deployment: ...


@overload
def deployment(
    _func_or_class: None = None, /, **options: Any
) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(_func_or_class: Any = None, /, **options: Any) -> Any:
    """Mark a class or function as a deployment.

    Accepts Ray Serve's options (``name``, ``num_replicas``, ``max_ongoing_requests``,
    ``user_config``, ``ray_actor_options``, ``autoscaling_config``, health-check and
    graceful-shutdown timings); see :class:`shoal._config.DeploymentConfig`.
    Invalid options raise ConfigError at decoration time.
    """

    def decorate(target: Any) -> Deployment:
        if not callable(target):
            raise ConfigError(f"@serve.deployment needs a class or function, got {target!r}")
        return Deployment(target, validate(DeploymentConfig, options, _what(target)))

    if _func_or_class is not None:
        if options:
            raise ConfigError("use @serve.deployment(...) with keyword options only")
        return decorate(_func_or_class)
    return decorate
