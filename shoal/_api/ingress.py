"""``@serve.ingress(app)``: a FastAPI (or any ASGI) app as a deployment's HTTP interface.

Routes declared on methods of the decorated class (``@app.get("/x") def x(self)``)
become class-based views: ``self`` is resolved per request to the replica's
instance, so routes share the state (models, connections) the constructor set up.
The app runs inside the ingress replica; the proxy only forwards bytes.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable
from typing import Any

from shoal._errors import ConfigError

ASGI_APP_ATTRIBUTE = "__shoal_asgi_app__"
_BUILT_APP_ATTRIBUTE = "_shoal_built_asgi_app"


def ingress(app: Any = None, **options: Any) -> Callable[..., type]:
    """Serve ``app`` from the decorated class, in each of Ray Serve's forms.

    ``app`` is a FastAPI app or ``APIRouter``, a Starlette or any ASGI app, or a
    function without arguments that builds one (called once per replica, after
    the constructor)::

        @serve.deployment
        @serve.ingress(app)
        class Api: ...

        Api = serve.deployment(serve.ingress(app)())  # no class: the app alone
    """
    for name in options:
        hint = " (did you mean 'app'?)" if difflib.get_close_matches(name, ["app"]) else ""
        raise ConfigError(
            f"unknown option {name!r} for serve.ingress{hint}; valid options: app (the ASGI "
            "app, FastAPI, Starlette..., or a function that builds it)"
        )
    if not callable(app):
        raise ConfigError(
            f"@serve.ingress needs an ASGI app (FastAPI, Starlette...) or a function that "
            f"builds one, got {app!r}"
        )
    if _is_builder(app) and not _takes_no_arguments(app):
        raise ConfigError(
            f"@serve.ingress got the function {app.__qualname__}, which is neither an ASGI app "
            "(`async def app(scope, receive, send)`) nor a builder: a builder takes no "
            "arguments and returns the app"
        )
    _make_app_state_picklable()

    def decorate(cls: type | None = None) -> type:
        if cls is None:
            cls = type(
                "ASGIIngressDeployment",
                (),
                {"__init__": _keep_arguments, "__module__": __name__,
                 "__doc__": "A deployment that only serves its ASGI app."},
            )  # fmt: skip
        if not inspect.isclass(cls):
            raise ConfigError(
                f"@serve.ingress decorates a class (put it under @serve.deployment), got {cls!r}"
            )
        if not _is_builder(app):
            _bind_class_routes(app, cls)
        setattr(cls, ASGI_APP_ATTRIBUTE, app)
        return cls

    return decorate


def _as_app(app: Any) -> Any:
    """A FastAPI ``APIRouter`` (its routes as they are now) in a FastAPI app; else ``app``.

    FastAPI routes only run inside a FastAPI app, which sets up their request scope.
    """
    from fastapi import APIRouter, FastAPI

    if not isinstance(app, APIRouter):
        return app
    wrapper = FastAPI()
    wrapper.include_router(app)
    return wrapper


def _keep_arguments(self: Any, *args: Any, **kwargs: Any) -> None:
    self.args, self.kwargs = args, kwargs


def _is_builder(app: Any) -> bool:
    """A plain function that is not itself an ASGI app (those are ``async def``)."""
    return inspect.isfunction(app) and not inspect.iscoroutinefunction(app)


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        inspect.signature(fn).bind()
    except TypeError:
        return False
    return True


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
    """The ASGI app an ingress instance serves, or None.

    A builder runs once per instance; an ``APIRouter`` is served in a FastAPI app.
    """
    app = getattr(type(instance), ASGI_APP_ATTRIBUTE, None)
    if app is None:
        return None
    built = getattr(instance, _BUILT_APP_ATTRIBUTE, None)
    if built is None:
        built = _as_app(app() if _is_builder(app) else app)
        if not callable(built):
            raise ConfigError(
                f"the @serve.ingress builder {app.__qualname__} returned {built!r}, "
                "not an ASGI app (FastAPI, Starlette...)"
            )
        if built is not app:
            with contextlib.suppress(AttributeError):  # no __dict__: the replica asks once
                setattr(instance, _BUILT_APP_ATTRIBUTE, built)
    return built


async def _current_instance() -> Any:
    # async on purpose: FastAPI runs sync dependencies in a thread pool, per request.
    from shoal._api.context import get_replica_context

    return get_replica_context().servable_object


def _bind_class_routes(app: Any, cls: type) -> None:
    """Rebuild the app's routes whose endpoints are methods of ``cls`` as class-based views."""
    router = getattr(app, "router", app)  # a FastAPI/Starlette app, or an APIRouter itself
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
