"""A Ray Serve program runs after changing one import line: submodules and call forms.

The import lines and call forms are the ones Ray Serve's documentation uses;
each call form is deployed in local testing mode and answers through its handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI

import shoal
from shoal import _errors, serve

Run = Callable[..., Any]


@pytest.fixture
def run_local() -> Iterator[Run]:
    """``run_local(app)``: serve.run in local testing mode; the apps are deleted afterwards."""
    names: list[str] = []

    def run(app: Any) -> Any:
        names.append(f"ray-imports-{len(names)}")
        return serve.run(app, name=names[-1], route_prefix=None, _local_testing_mode=True)

    yield run
    for name in names:
        with contextlib.suppress(serve.NotFoundError):  # a deployment that failed is gone
            serve.delete(name)


# --- imports ------------------------------------------------------------------------------


def test_ray_serve_import_lines_work_in_a_fresh_interpreter() -> None:
    program = """
from shoal import serve
from shoal.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from shoal.serve.exceptions import RequestCancelledError
from shoal.serve.config import AutoscalingConfig, HTTPOptions
from shoal.serve.schema import ApplicationStatus, DeploymentStatus, ServeStatus
from shoal.serve.context import ReplicaContext
from shoal.serve.metrics import Counter, Gauge, Histogram
from shoal.serve import metrics
assert metrics.Counter is Counter
assert serve.handle.DeploymentHandle is DeploymentHandle  # attribute access, as with Ray
assert serve.config.HTTPOptions is serve.HTTPOptions
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


SUBMODULES = {
    "handle": ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"],
    "config": [
        "AutoscalingConfig", "AutoscalingContext", "AutoscalingPolicy", "DeploymentConfig",
        "DeploymentID", "HTTPOptions", "gRPCOptions",
    ],
    "schema": [
        "ApplicationStatus", "ApplicationStatusOverview", "DeploymentSchema", "DeploymentStatus",
        "DeploymentStatusOverview", "LoggingConfig", "ReplicaState", "ServeApplicationSchema",
        "ServeDeploySchema", "ServeStatus",
    ],
    "context": ["ReplicaContext"],
    "metrics": ["Counter", "Gauge", "Histogram"],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(SUBMODULES))
def test_submodule_names_are_pinned_and_are_shoals_own_objects(module: str) -> None:
    submodule = getattr(serve, module)
    assert submodule.__all__ == SUBMODULES[module]
    for name in submodule.__all__:
        value = getattr(submodule, name)
        if hasattr(serve, name):
            assert value is getattr(serve, name)
        assert value.__module__.startswith("shoal._")  # re-exported, not redefined


def test_exceptions_module_lists_every_shoal_error() -> None:
    from shoal.serve import exceptions

    assert exceptions.__all__ == _errors.__all__
    for name in exceptions.__all__:
        assert getattr(exceptions, name) is getattr(_errors, name)
    for name in set(exceptions.__all__) & set(shoal.__all__):
        assert getattr(exceptions, name) is getattr(shoal, name)


def test_ray_serve_exception_names_import() -> None:
    from shoal.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        RayServeException,
        RequestCancelledError,
    )

    for error in (BackPressureError, DeploymentUnavailableError, RequestCancelledError):
        assert issubclass(error, RayServeException)


# --- serve.deployment -----------------------------------------------------------------------


class Echo:
    def __call__(self, x: int) -> str:
        return f"{type(self).__name__}:{x}"


def add_one(x: int) -> int:
    return x + 1


DEPLOYMENT_FORMS: dict[str, Callable[[], serve.Deployment]] = {
    "@serve.deployment": lambda: serve.deployment(Echo),
    "@serve.deployment()": lambda: serve.deployment()(Echo),
    "@serve.deployment(num_replicas=2)": lambda: serve.deployment(num_replicas=2)(Echo),
    "serve.deployment(Cls)": lambda: serve.deployment(Echo),
    "serve.deployment(Cls, num_replicas=2)": lambda: serve.deployment(Echo, num_replicas=2),
    "serve.deployment(name=...)(Cls)": lambda: serve.deployment(name="Named")(Echo),
    "serve.deployment(Cls, name=..., num_replicas=2)": lambda: serve.deployment(
        Echo, name="Named", num_replicas=2
    ),
}


@pytest.mark.parametrize("form", list(DEPLOYMENT_FORMS))
def test_every_deployment_call_form_deploys_and_answers(form: str, run_local: Run) -> None:
    declared = DEPLOYMENT_FORMS[form]()
    replicas = 2 if "num_replicas=2" in form else 1
    name = "Named" if "name=" in form else "Echo"
    handle = run_local(declared.bind())
    assert handle.remote(7).result(timeout_s=30) == "Echo:7"
    app = serve.status().applications["ray-imports-0"]
    assert list(app.deployments) == [name]
    assert app.deployments[name].target_replicas == replicas


@pytest.mark.parametrize(
    "declare",
    [
        lambda: serve.deployment(add_one),
        lambda: serve.deployment()(add_one),
        lambda: serve.deployment(add_one, max_ongoing_requests=3),
    ],
    ids=["serve.deployment(func)", "serve.deployment()(func)", "serve.deployment(func, ...)"],
)
def test_function_deployments_in_every_form(
    declare: Callable[[], serve.Deployment], run_local: Run
) -> None:
    assert run_local(declare().bind()).remote(41).result(timeout_s=30) == 42


class Other:
    def __call__(self, x: int) -> str:
        return f"other:{x}"


def test_options_can_swap_the_class_and_keep_the_name(run_local: Run) -> None:
    swapped = serve.deployment(Echo, name="Kept").options(func_or_class=Other, num_replicas=2)
    assert (swapped.name, swapped.num_replicas) == ("Kept", 2)
    assert run_local(swapped.bind()).remote(1).result(timeout_s=30) == "other:1"


def test_bad_deployment_call_forms_say_what_to_do() -> None:
    with pytest.raises(serve.ConfigError, match=r"only positional argument.*name='Model'"):
        serve.deployment("Model")  # Ray 1.x's positional name
    with pytest.raises(serve.ConfigError, match=r"'num_replica'.*did you mean 'num_replicas'"):
        serve.deployment(Echo, num_replica=2)
    with pytest.raises(serve.ConfigError, match=r"'num_replica'.*did you mean 'num_replicas'"):
        serve.deployment(num_replica=2)(Echo)
    with pytest.raises(serve.ConfigError, match=r"'max_ongoing_request'.*'max_ongoing_requests'"):
        serve.deployment(Echo).options(max_ongoing_request=3)
    with pytest.raises(serve.ConfigError, match="needs a class or function"):
        serve.deployment(Echo).options(func_or_class=3)  # type: ignore[arg-type]


# --- serve.batch ----------------------------------------------------------------------------


class Batched:
    """The same batched doubling under each decorator form; records each batch's size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch
    async def bare(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [2 * x for x in xs]

    @serve.batch()
    async def empty_call(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [2 * x for x in xs]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=30)
    async def with_options(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [2 * x for x in xs]

    async def positional(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [2 * x for x in xs]

    positional_with_options = serve.batch(positional, max_batch_size=4, batch_wait_timeout_s=30)
    positional = serve.batch(positional)

    async def __call__(self, method: str, x: int) -> int:
        result: int = await getattr(self, method)(x)
        return result

    def batch_sizes(self) -> list[int]:
        return self.sizes


@pytest.mark.parametrize(
    "method", ["bare", "empty_call", "with_options", "positional", "positional_with_options"]
)
def test_every_batch_form_works_on_methods(method: str, run_local: Run) -> None:
    handle = run_local(serve.deployment(Batched).bind())
    responses = [handle.remote(method, x) for x in range(4)]
    assert [r.result(timeout_s=30) for r in responses] == [0, 2, 4, 6]
    sizes = handle.batch_sizes.remote().result(timeout_s=30)
    assert sum(sizes) == 4
    if "options" in method:  # full at 4, long before the 30 s wait: one batch
        assert sizes == [4]


async def triple(xs: list[int]) -> list[int]:
    return [3 * x for x in xs]


FUNCTION_FORMS = {
    "@serve.batch": serve.batch(triple),
    "@serve.batch()": serve.batch()(triple),
    "@serve.batch(max_batch_size=..)": serve.batch(max_batch_size=4.0)(triple),  # as Ray: 4.0 is 4
    "serve.batch(fn, max_batch_size=..)": serve.batch(triple, max_batch_size=4),
}


@pytest.mark.parametrize("form", list(FUNCTION_FORMS))
def test_every_batch_form_works_on_functions(form: str, run_local: Run) -> None:
    batched = FUNCTION_FORMS[form]

    async def tripler(x: int) -> int:
        result: int = await batched(x)
        return result

    handle = run_local(serve.deployment(tripler).bind())
    responses = [handle.remote(x) for x in range(5)]
    assert [r.result(timeout_s=30) for r in responses] == [0, 3, 6, 9, 12]


async def test_batched_function_called_directly_batches_concurrent_calls() -> None:
    seen: list[list[int]] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=30)
    async def record(xs: list[int]) -> list[int]:
        seen.append(xs)
        return xs

    assert await asyncio.gather(*(record(x) for x in range(3))) == [0, 1, 2]
    assert seen == [[0, 1, 2]]


def sync_handler(xs: list[int]) -> list[int]:
    return xs


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda: serve.batch(max_batch_size="4"), TypeError, "max_batch_size must be an integer"),
        (lambda: serve.batch(max_batch_size=0), ValueError, "max_batch_size must be an integer"),
        (lambda: serve.batch(max_batch_size=2.5), TypeError, "max_batch_size=2.5"),
        (lambda: serve.batch(batch_wait_timeout_s="1"), TypeError, "must be a float >= 0"),
        (lambda: serve.batch(batch_wait_timeout_s=-1), ValueError, "must be a float >= 0"),
        (lambda: serve.batch(max_concurrent_batches=0), TypeError, "max_concurrent_batches"),
        (lambda: serve.batch(batch_size_fn=3), TypeError, "batch_size_fn must be a callable"),
        (lambda: serve.batch(sync_handler), TypeError, "async def"),
        (lambda: serve.batch()(sync_handler), TypeError, "async def"),
        (lambda: serve.batch(3), TypeError, "functions or methods"),
        (lambda: serve.batch()(3), TypeError, "functions or methods"),
        (lambda: serve.batch(max_batch_sise=4), TypeError, r"did you mean 'max_batch_size'"),
    ],
)
def test_bad_batch_calls_raise_rays_error_types(
    call: Callable[[], Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment) as info:
        call()
    assert isinstance(info.value, serve.ConfigError)  # and shoal's own type


# --- serve.ingress --------------------------------------------------------------------------


standalone = FastAPI()


@standalone.get("/hi")
def say_hi() -> str:
    return "hello from the app alone"


def build_app() -> FastAPI:
    """A builder: runs in each replica, after the constructor."""
    built = FastAPI()

    @built.get("/who")
    def who() -> dict[str, str]:
        return {"replica_of": serve.get_replica_context().deployment}

    return built


router = APIRouter()


@serve.deployment
@serve.ingress(router)
class RouterIngress:
    def __init__(self) -> None:
        self.greeting = "routed"

    @router.get("/greet")
    def greet(self) -> str:
        return self.greeting


@serve.deployment
@serve.ingress(build_app)
class BuiltIngress:
    pass


def test_every_ingress_form_serves_http(base_url: str) -> None:
    serve.run(serve.deployment(serve.ingress(standalone)()).bind(), name="alone",
              route_prefix="/alone")  # fmt: skip
    serve.run(serve.deployment(serve.ingress(build_app)()).bind(), name="built",
              route_prefix="/built")  # fmt: skip
    serve.run(BuiltIngress.bind(), name="built-cls", route_prefix="/built-cls")
    serve.run(RouterIngress.bind(), name="router", route_prefix="/router")
    try:
        assert httpx.get(f"{base_url}/alone/hi", timeout=30).json() == "hello from the app alone"
        assert httpx.get(f"{base_url}/built/who", timeout=30).json() == {
            "replica_of": "ASGIIngressDeployment"
        }
        assert httpx.get(f"{base_url}/built-cls/who", timeout=30).json() == {
            "replica_of": "BuiltIngress"
        }
        assert httpx.get(f"{base_url}/router/greet", timeout=30).json() == "routed"
    finally:
        for name in ("alone", "built", "built-cls", "router"):
            serve.delete(name)


def not_an_app() -> int:
    return 42


def test_bad_ingress_calls_say_what_to_do(run_local: Run) -> None:
    with pytest.raises(serve.ConfigError, match=r"unknown option 'ap'.*did you mean 'app'"):
        serve.ingress(ap=standalone)  # type: ignore[call-arg]
    with pytest.raises(serve.ConfigError, match="builder takes no arguments"):
        serve.ingress(lambda request: request)
    with pytest.raises(serve.ConfigError, match="decorates a class"):
        serve.ingress(standalone)(add_one)  # type: ignore[arg-type]
    with pytest.raises(serve.DeploymentError, match=r"builder not_an_app returned 42"):
        run_local(serve.deployment(serve.ingress(not_an_app)()).bind())
