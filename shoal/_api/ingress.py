"""``@serve.ingress(app)``: a FastAPI (or any ASGI) app as a deployment's HTTP interface.

Routes declared on methods of the decorated class (``@app.get("/x") def x(self)``)
become class-based views: ``self`` is resolved per request to the replica's
instance, so routes share the state (models, connections) the constructor set up.
The app runs inside the ingress replica; the proxy only forwards bytes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from shoal._errors import ConfigError

ASGI_APP_ATTRIBUTE = "__shoal_asgi_app__"


def ingress(app: Any) -> Callable[[type], type]:
    """Serve ``app`` (FastAPI, Starlette or any ASGI callable) from the decorated class.

    Put it under ``@serve.deployment``::

        @serve.deployment
        @serve.ingress(app)
        class Api: ...
    """
    if not callable(app):
        raise ConfigError(f"@serve.ingress needs an ASGI app (FastAPI, Starlette...), got {app!r}")
    _make_app_state_picklable()

    def decorate(cls: type) -> type:
        if not inspect.isclass(cls):
            raise ConfigError(
                f"@serve.ingress decorates a class (put it under @serve.deployment), got {cls!r}"
            )
        _bind_class_routes(app, cls)
        setattr(cls, ASGI_APP_ATTRIBUTE, app)
        return cls

    return decorate


def _make_app_state_picklable() -> None:
    """Apps defined in ``__main__`` travel to replicas by value; Starlette's ``State``
    cannot be unpickled as is (its ``__getattr__`` recurses before ``_state`` exists)."""
    import copyreg

    from starlette.datastructures import State

    copyreg.pickle(State, _reduce_state)


def _reduce_state(state: Any) -> tuple[Any, ...]:
    from starlette.datastructures import State

    return (State, (dict(state._state),))


def asgi_app_of(instance: Any) -> Any:
    """The ASGI app an ingress instance serves, or None."""
    return getattr(type(instance), ASGI_APP_ATTRIBUTE, None)


async def _current_instance() -> Any:
    # async on purpose: FastAPI runs sync dependencies in a thread pool, per request.
    from shoal._api.context import get_replica_context

    return get_replica_context().servable_object


def _bind_class_routes(app: Any, cls: type) -> None:
    """Rebuild the app's routes whose endpoints are methods of ``cls`` as class-based views."""
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if not isinstance(routes, list):
        return  # not a FastAPI/Starlette app: nothing to bind
    from fastapi.routing import APIRoute, APIWebSocketRoute

    for index, route in enumerate(routes):
        if not isinstance(route, APIRoute | APIWebSocketRoute):
            continue
        endpoint = route.endpoint
        if vars(cls).get(getattr(endpoint, "__name__", "")) is not endpoint:
            continue  # a plain function route, not a method of this class
        routes[index] = _rebuild(route, _with_self_dependency(endpoint, cls))
    if hasattr(app, "openapi_schema"):
        app.openapi_schema = None  # regenerate without the 'self' parameter


def _with_self_dependency(endpoint: Callable[..., Any], cls: type) -> Callable[..., Any]:
    from fastapi import Depends

    signature = inspect.signature(endpoint)
    parameters = list(signature.parameters.values())
    if not parameters:
        raise ConfigError(
            f"route method {cls.__name__}.{endpoint.__name__} must take `self` as first argument"
        )
    self_parameter = parameters[0].replace(default=Depends(_current_instance))
    others = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters[1:]]
    endpoint.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *others]
    )
    return endpoint


def _rebuild(route: Any, endpoint: Callable[..., Any]) -> Any:
    """A new route of the same class with the same constructor arguments but ``endpoint``."""
    accepted = inspect.signature(type(route).__init__).parameters
    arguments = {
        name: getattr(route, name)
        for name in accepted
        if name not in ("self", "path", "endpoint") and hasattr(route, name)
    }
    return type(route)(route.path, endpoint, **arguments)
