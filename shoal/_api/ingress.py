"""``@serve.ingress(app)``: a FastAPI (or any ASGI) app as a deployment's HTTP interface.

Routes declared on methods of the decorated class (``@app.get("/x") def x(self)``)
become class-based views: ``self`` is resolved per request to the replica's
instance, so routes share the state (models, connections) the constructor set up.
The app runs inside the ingress replica; the proxy only forwards bytes.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import sys
import threading
import types
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
        served = app if _is_builder(app) else _class_view(app, cls)
        setattr(cls, ASGI_APP_ATTRIBUTE, _IngressApp(served, cls, _caller_module()))
        return cls

    return decorate


class _IngressApp:
    """What ``@serve.ingress`` keeps on the class: the app (or builder) it serves.

    Replicas get the class pickled, usually by value (its global name is the
    ``Deployment``), and the app with it, by value, as Ray Serve does. An app that
    cannot be pickled (it holds a lock, a client, or FastAPI's included routers)
    goes by reference instead when the class is a global of an importable module:
    the replica imports that module, which builds the app again there.
    """

    __slots__ = ("app", "modules", "owner")

    def __init__(self, app: Any, owner: type | None, modules: tuple[str, ...] = ()) -> None:
        self.app, self.owner, self.modules = app, owner, modules

    def __reduce__(self) -> tuple[Any, ...]:
        by_value = (_IngressApp, (self.app, None))
        if self.owner is None or getattr(_probing, "active", False):
            return by_value
        location = _global_location(self.owner, self.modules)
        if location is None:
            return by_value
        import cloudpickle

        _probing.active = True  # the app's routes pickle the class, and so this again
        try:
            cloudpickle.dumps(self.app)
        except Exception:  # cannot travel by value: the replica builds it
            return (_served_at, location)
        finally:
            _probing.active = False
        return by_value


_probing = threading.local()


def _global_location(cls: type, modules: tuple[str, ...]) -> tuple[str, str] | None:
    """``(module, name)`` of a global that is ``cls`` or a deployment of it, in an
    importable module; None if there is none."""
    for module_name in dict.fromkeys((cls.__module__, *modules)):
        module = sys.modules.get(module_name)
        if module is None or module_name == "__main__" or not getattr(module, "__file__", None):
            continue
        for name, value in list(vars(module).items()):
            if value is cls or getattr(value, "func_or_class", None) is cls:
                return module_name, name
    return None


def _served_at(module_name: str, name: str) -> _IngressApp:
    """In a replica: the ingress app of the class at ``module.name``, built by importing it."""
    value = getattr(importlib.import_module(module_name), name)
    served = getattr(getattr(value, "func_or_class", value), ASGI_APP_ATTRIBUTE, None)
    if not isinstance(served, _IngressApp):
        raise ConfigError(f"{module_name}.{name} is no longer a @serve.ingress class")
    return served


def _caller_module() -> tuple[str, ...]:
    """The module that called ``ingress(app)(...)``: where ``serve.ingress(app)()``'s class
    (made here, in shoal) is bound to a global."""
    frame = sys._getframe(2)
    return (str(frame.f_globals.get("__name__", "")),)


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
    served = getattr(type(instance), ASGI_APP_ATTRIBUTE, None)
    if served is None:
        return None
    _adopt(instance, served.owner)
    app = served.app
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


def _adopt(instance: Any, owner: type | None) -> None:
    """Make ``instance`` an instance of ``owner`` when its class is a copy of it.

    When the app came by reference (see ``_IngressApp``), its routes are the
    functions of the class this replica imported, while the instance is of the
    copy of that class the replica received by value: the same code, but
    ``super()`` in a route would refuse the instance. Same qualified name and
    module means the same class statement.
    """
    cls = type(instance)
    if owner is None or cls is owner:
        return
    if (cls.__qualname__, cls.__module__) == (owner.__qualname__, owner.__module__):
        with contextlib.suppress(TypeError):  # different layouts: keep the copy
            instance.__class__ = owner


async def _current_instance() -> Any:
    # async on purpose: FastAPI runs sync dependencies in a thread pool, per request.
    from shoal._api.context import get_replica_context

    return get_replica_context().servable_object


def _class_view(app: Any, cls: type) -> Any:
    """The app ``cls`` serves: a copy of ``app`` as it is now, with the routes defined
    in ``cls`` (or its bases) as class-based views, as Ray Serve's ``serve.ingress`` does.

    A copy, so one app can serve several deployments and routes added afterwards
    are not served (Ray Serve freezes the app at decoration). In the copy:
    - routes defined in ``cls``'s body or a base's take ``self`` from the replica
      (never a query parameter), and move after the other routes, as in Ray Serve;
    - where ``cls`` and a base both define a method and path, the subclass's wins;
    - routes bound to another deployment class are dropped.
    """
    view = _copy_app(app)
    routes = getattr(view, "routes", None)
    if view is app or not isinstance(routes, list):
        return app  # not a FastAPI app or router: nothing to bind
    from fastapi.routing import APIRoute, APIWebSocketRoute

    others, mine = [], []
    for route in routes:
        if not isinstance(route, APIRoute | APIWebSocketRoute):
            others.append(route)
        elif (depth := _defined_in(route.endpoint, cls)) is not None:
            mine.append((depth, route))
        elif getattr(route.endpoint, _BOUND_CLASS_ATTRIBUTE, None) is None:
            others.append(route)  # a plain function route
    routes[:] = others + [_bound(route, cls) for route in _most_derived(mine)]
    return view


_BOUND_CLASS_ATTRIBUTE = "_shoal_ingress_class"


def _defined_in(endpoint: Any, cls: type) -> int | None:
    """How far up ``cls``'s MRO the class whose body defines ``endpoint`` is, or None.

    By qualified name, so a method redefined under the same name still counts.
    """
    owner, _, _ = getattr(endpoint, "__qualname__", "").rpartition(".")
    module = getattr(endpoint, "__module__", None)
    for depth, klass in enumerate(cls.__mro__[:-1]):  # not object
        if owner == klass.__qualname__ and module == klass.__module__:
            return depth
    return None


def _most_derived(routes: list[tuple[int, Any]]) -> list[Any]:
    """The routes in order, less those a subclass redefines (same path and methods)."""
    best: dict[tuple[Any, ...], int] = {}
    for depth, route in routes:
        key = (type(route), route.path, frozenset(getattr(route, "methods", None) or ()))
        best[key] = min(depth, best.get(key, depth))
    kept = []
    for depth, route in routes:
        key = (type(route), route.path, frozenset(getattr(route, "methods", None) or ()))
        if depth == best[key]:
            kept.append(route)
    return kept


def _bound(route: Any, cls: type) -> Any:
    endpoint = route.endpoint
    with contextlib.suppress(AttributeError, TypeError):
        setattr(endpoint, _BOUND_CLASS_ATTRIBUTE, cls)
    if not inspect.signature(endpoint).parameters:
        return route  # no ``self``: called with no arguments
    return _rebuild(route, _with_self_dependency(endpoint))


def _copy_app(app: Any) -> Any:
    """A FastAPI app or router whose route list (and middleware, handlers) is its own."""
    import copy

    from fastapi import APIRouter, FastAPI

    view: Any
    if isinstance(app, APIRouter):
        view = copy.copy(app)
        view.routes = list(app.routes)
        _own_router_stack(view, app)
        return view
    if not isinstance(app, FastAPI):
        return app
    view = copy.copy(app)
    view.router = _copy_app(app.router)
    view.user_middleware = list(app.user_middleware)
    view.exception_handlers = dict(app.exception_handlers)
    view.middleware_stack = None  # built again, around the copied router
    view.openapi_schema = None
    _repoint_closures(view, app)
    return view


def _own_router_stack(view: Any, router: Any) -> None:
    """Starlette routers dispatch through ``middleware_stack``, the original's bound ``app``."""
    stack = getattr(router, "middleware_stack", None)
    if getattr(stack, "__self__", None) is router:
        view.middleware_stack = view.app


def _repoint_closures(view: Any, app: Any) -> None:
    """Routes whose function closes over ``app`` (FastAPI's /docs, /openapi.json) use ``view``,
    so the schema describes the routes ``view`` serves."""
    from starlette.routing import Route

    routes = view.router.routes
    for index, route in enumerate(routes):
        endpoint = getattr(route, "endpoint", None)
        cells = getattr(endpoint, "__closure__", None) or ()
        if type(route) is not Route or not any(_holds(cell, app) for cell in cells):
            continue
        assert isinstance(endpoint, types.FunctionType)
        closure = tuple(types.CellType(view) if _holds(cell, app) else cell for cell in cells)
        function = types.FunctionType(
            endpoint.__code__, endpoint.__globals__, endpoint.__name__,
            endpoint.__defaults__, closure,
        )  # fmt: skip
        function.__qualname__ = endpoint.__qualname__
        routes[index] = _rebuild(route, function)


def _holds(cell: Any, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def _with_self_dependency(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``def method(self, i)`` becomes ``def method(self=Depends(replica instance), *, i)``.

    Idempotent: a base class's method may be bound for several subclasses.
    """
    from fastapi import Depends

    signature = inspect.signature(endpoint)
    parameters = list(signature.parameters.values())
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
