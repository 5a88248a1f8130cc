"""Ray Serve's HTTP calling conventions, over real HTTP on the multi-process runtime.

Each test is written from Ray Serve's documented behaviour (its docs and its own
tests of ``serve.ingress`` and ``route_prefix``).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import httpx
import numpy as np
import pytest
from fastapi import APIRouter, FastAPI
from starlette.requests import Request

from shoal import serve

_apps = itertools.count()


@pytest.fixture
def run(http_port: int) -> Iterator[Callable[..., str]]:
    """``run(app, prefix, name)``: serve.run (under a fresh name unless ``name`` is given);
    returns the route's base URL. Every application is deleted afterwards."""
    names: list[str] = []

    def deploy(app: Any, prefix: str = "/", name: str | None = None) -> str:
        name = name or f"compat-{next(_apps)}"
        if name not in names:
            names.append(name)
        serve.run(app, name=name, route_prefix=prefix)
        return f"http://127.0.0.1:{http_port}{prefix.rstrip('/')}"

    yield deploy
    for name in names:
        serve.delete(name)


# --- handlers without parameters ----------------------------------------------------------


@serve.deployment
def hello() -> str:
    return "hello"


@serve.deployment
class NoArgumentCall:
    def __call__(self) -> dict[str, str]:
        return {"called": "without arguments"}


@serve.deployment
class NoArgumentAsyncGenerator:
    async def __call__(self) -> Any:
        for word in ("a", "b"):
            yield word


@serve.deployment
class RequestCall:
    def __call__(self, request: Request) -> str:
        return request.url.path


def test_handlers_without_parameters_are_called_with_none(run: Callable[..., str]) -> None:
    assert httpx.get(run(hello.bind(), "/hello"), timeout=30).text == "hello"
    reply = httpx.post(run(NoArgumentCall.bind(), "/no-args"), timeout=30)
    assert reply.status_code == 200 and reply.json() == {"called": "without arguments"}
    assert httpx.get(run(NoArgumentAsyncGenerator.bind(), "/gen"), timeout=30).text == "ab"
    # A handler with a parameter still gets the Starlette Request.
    assert httpx.get(run(RequestCall.bind(), "/with-request") + "/x", timeout=30).text == (
        "/with-request/x"
    )


# --- numpy values from a composed model ---------------------------------------------------


@serve.deployment
class Model:
    def predict(self, x: float) -> Any:
        return {"scalar": np.float32(x) * 2, "array": np.arange(3, dtype=np.int64) + int(x),
                "flag": np.bool_(x > 1)}  # fmt: skip


@serve.deployment
class Pipeline:
    def __init__(self, model: Any) -> None:
        self.model = model

    async def __call__(self, request: Request) -> Any:
        prediction = await self.model.predict.remote((await request.json())["x"])
        part = request.query_params.get("part")
        return prediction[part] if part else prediction  # a bare numpy scalar or array


def test_numpy_values_from_a_composed_model_answer_json(run: Callable[..., str]) -> None:
    url = run(Pipeline.bind(Model.bind()), "/numpy")
    reply = httpx.post(url, json={"x": 2}, timeout=30)
    assert reply.status_code == 200
    assert reply.json() == {"scalar": 4.0, "array": [2, 3, 4], "flag": True}
    for part, expected in [("scalar", 4.0), ("array", [2, 3, 4]), ("flag", True)]:
        reply = httpx.post(url, params={"part": part}, json={"x": 2}, timeout=30)
        assert reply.status_code == 200 and reply.json() == expected, part


# --- route_prefix validation --------------------------------------------------------------

_BAD_PREFIXES = [
    ("api", "must start with a forward slash ('/')."),
    ("/api/", "may not end with a trailing '/'."),
    ("/api/{version}", "may not contain wildcards."),
    ("/a}", "may not contain wildcards."),
]


@pytest.mark.parametrize(("prefix", "reason"), _BAD_PREFIXES)
def test_serve_run_refuses_invalid_route_prefixes(prefix: str, reason: str) -> None:
    # Raised before anything is deployed (and so before any runtime starts).
    with pytest.raises(ValueError) as raised:
        serve.run(hello.bind(), name="never-deployed", route_prefix=prefix)
    assert str(raised.value) == f"Invalid route_prefix '{prefix}', {reason}"


@pytest.mark.parametrize(("prefix", "reason"), _BAD_PREFIXES)
def test_deployment_refuses_invalid_route_prefixes(prefix: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"Invalid route_prefix '.*', ") as raised:
        serve.deployment(route_prefix=prefix)(RequestCall.func_or_class)
    assert str(raised.value).endswith(reason)
    with pytest.raises(ValueError, match=r"Invalid route_prefix"):
        RequestCall.options(route_prefix=prefix)


def test_valid_route_prefixes_serve(run: Callable[..., str]) -> None:
    assert httpx.get(run(RequestCall.bind(), "/v1/models") + "/x", timeout=30).text == (
        "/v1/models/x"
    )
    assert serve.deployment(route_prefix="/")(hello.func_or_class).config.route_prefix == "/"


# --- FastAPI ingress ----------------------------------------------------------------------

shared = FastAPI()


@serve.deployment
@serve.ingress(shared)
class Counter1:
    @shared.get("/incr")
    def incr(self) -> str:
        return "incr"

    @shared.get("/decr")
    def decr(self) -> str:
        return "decr"


@serve.deployment
@serve.ingress(shared)
class Counter2:
    @shared.get("/incr2")
    def incr2(self) -> str:
        return "incr2"

    @shared.get("/decr2")
    def decr2(self) -> str:
        return "decr2"


def test_one_fastapi_app_serves_two_deployments(run: Callable[..., str]) -> None:
    one, two = run(Counter1.bind(), "/counter1"), run(Counter2.bind(), "/counter2")
    for url, path in [(one, "/incr"), (one, "/decr"), (two, "/incr2"), (two, "/decr2")]:
        assert httpx.get(url + path, timeout=30).json() == path[1:]
    for url, path in [(one, "/incr2"), (one, "/decr2"), (two, "/incr"), (two, "/decr")]:
        assert httpx.get(url + path, timeout=30).status_code == 404, (url, path)


duplicated = FastAPI()


@duplicated.get("/who")
def plain_who() -> str:
    return "plain function"


@serve.deployment
@serve.ingress(duplicated)
class First:
    @duplicated.get("/")
    def root(self) -> str:
        return "first"

    @duplicated.get("/who")
    def who(self) -> str:
        return "class method"

    @duplicated.get("/method")
    def method(self) -> str:
        return "get"

    @duplicated.post("/method")
    def method(self) -> str:  # noqa: F811 - a redefinition, as in Ray Serve's own test
        return "post"


@serve.deployment
@serve.ingress(duplicated)
class Second:
    @duplicated.get("/")
    def root(self) -> str:
        return "second"


@duplicated.get("/added-later")
def added_later() -> str:
    return "not served: the app was frozen when the classes were decorated"


def test_duplicate_routes_resolve_as_in_ray(run: Callable[..., str]) -> None:
    first, second = run(First.bind(), "/first"), run(Second.bind(), "/second")
    assert httpx.get(first + "/", timeout=30).json() == "first"
    assert httpx.get(second + "/", timeout=30).json() == "second"
    # Class routes come after the app's function routes, as in Ray Serve.
    assert httpx.get(first + "/who", timeout=30).json() == "plain function"
    # Both functions of a redefined method are routes, each with `self` bound.
    assert httpx.get(first + "/method", timeout=30).json() == "get"
    assert httpx.post(first + "/method", timeout=30).json() == "post"
    for url in (first, second):
        assert httpx.get(url + "/added-later", timeout=30).status_code == 404


inherited = FastAPI()


class BaseApi:
    def __init__(self) -> None:
        self.name = type(self).__name__

    @inherited.get("/hello")
    def hello(self) -> str:
        return "base"

    @inherited.get("/name")
    def my_name(self, greeting: str = "hi") -> str:
        return f"{greeting} {self.name}"


@serve.deployment
@serve.ingress(inherited)
class ChildApi(BaseApi):
    @inherited.get("/hello")
    def hello(self) -> str:
        return "child"

    @inherited.get("/static")
    def no_parameters() -> str:  # type: ignore[misc]  # no self: called with none
        return "static"


def test_subclass_routes_win_and_inherited_routes_get_self(run: Callable[..., str]) -> None:
    url = run(ChildApi.bind(), "/child")
    assert httpx.get(url + "/hello", timeout=30).json() == "child"
    assert httpx.get(url + "/name?greeting=hey", timeout=30).json() == "hey ChildApi"
    assert httpx.get(url + "/static", timeout=30).json() == "static"


def test_self_is_never_a_parameter_in_openapi(run: Callable[..., str]) -> None:
    for deployment, prefix in [(ChildApi, "/child-docs"), (First, "/first-docs")]:
        schema = httpx.get(run(deployment.bind(), prefix) + "/openapi.json", timeout=30).json()
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                names = [p["name"] for p in operation.get("parameters", [])]
                assert "self" not in names, (prefix, path)
    # The schema describes the routes this deployment serves, not the shared app's.
    assert "/hello" not in schema["paths"] and "/added-later" not in schema["paths"]


@pytest.mark.parametrize("prefix", ["/", "/subpath"])
def test_docs_follow_an_in_place_redeploy(run: Callable[..., str], prefix: str) -> None:
    """Ray Serve's doc-generation test: redeploying a new class on the same app object."""
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class App:
        @app.get("/")
        def func1(self, arg: str) -> str:
            return "hello"

    url = run(App.bind(), prefix, name="docs")
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert {path: list(ops) for path, ops in schema["paths"].items()} == {"/": ["get"]}
    assert httpx.get(f"{url}/docs", timeout=10).status_code == 200

    @serve.deployment
    @serve.ingress(app)
    class App:  # type: ignore[no-redef]
        @app.get("/")
        def func1(self, arg: str) -> str:
            return "hello"

        @app.post("/hello")
        def func2(self, arg: int) -> str:
            return "hello"

    assert run(App.bind(), prefix, name="docs") == url
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert {path: list(ops) for path, ops in schema["paths"].items()} == {
        "/": ["get"],
        "/hello": ["post"],
    }
    assert httpx.get(f"{url}/docs", timeout=10).status_code == 200
    assert httpx.get(f"{url}/?arg=x", timeout=10).json() == "hello"


# An app whose module holds what cannot be pickled: a lock, a client, and (in recent
# FastAPI) an included router, which holds a lock of its own.
lock = threading.Lock()
client = httpx.Client()
unpicklable = FastAPI()
items = APIRouter(prefix="/items")


@items.get("/{item_id}")
def get_item(item_id: int) -> dict[str, int]:
    with lock:
        return {"item_id": item_id}


@unpicklable.get("/client")
def client_type() -> str:
    return type(client).__name__


unpicklable.include_router(items)


@serve.deployment
@serve.ingress(unpicklable)
class HoldsUnpicklables(BaseApi):
    @unpicklable.get("/method")
    def method(self) -> str:
        return f"{type(self).__name__} and {super().hello()}"  # super() works in routes


def test_an_app_whose_module_holds_unpicklable_objects_deploys(run: Callable[..., str]) -> None:
    with pytest.raises(TypeError, match="cannot pickle"):
        cloudpickle.dumps(unpicklable)
    url = run(HoldsUnpicklables.bind(), "/unpicklable")
    assert httpx.get(url + "/items/7", timeout=30).json() == {"item_id": 7}
    assert httpx.get(url + "/client", timeout=30).json() == "Client"
    assert httpx.get(url + "/method", timeout=30).json() == "HoldsUnpicklables and base"
    # Apps of the driver's own script still travel by value (as in Ray Serve).
    url = run(serve.deployment(serve.ingress(duplicated)()).bind(), "/by-value")
    assert httpx.get(url + "/who", timeout=30).json() == "plain function"
