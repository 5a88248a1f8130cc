"""Handles and responses behave as Ray Serve documents them (issue 16), on both runtimes.

Error types and texts are Ray Serve's where programs match on them.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import Deploy, Driver, start_early, started_drivers

from shoal import serve
from shoal.serve.exceptions import DeploymentUnavailableError, RayServeException
from shoal.serve.handle import DeploymentHandle

# --- streaming is decided by what the method returns -----------------------------------------


@serve.deployment
class Streamer:
    def numbers(self, n: int) -> Iterator[int]:  # not a generator function: returns one
        return (i for i in range(n))

    async def other(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def inner(self, n: int) -> AsyncIterator[int]:  # returns an async generator
        return self.other(n)

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    def unary(self, n: int) -> int:
        return n


@serve.deployment
class Relay:
    def __init__(self, streamer: DeploymentHandle) -> None:
        self.streamer = streamer.options(stream=True)

    async def __call__(self, n: int) -> Any:  # another deployment's response generator
        return self.streamer.count.remote(n)


def test_what_a_method_returns_decides_streaming(deploy: Deploy) -> None:
    handle = deploy(Relay.bind(Streamer.bind())).options(stream=True)
    assert list(handle.remote(3)) == [0, 1, 2]
    streamer = serve.get_deployment_handle("Streamer", handle.app_name).options(stream=True)
    assert list(streamer.numbers.remote(3)) == [0, 1, 2]
    assert list(streamer.inner.remote(2)) == [0, 1]


def test_stream_mismatch_raises_rays_type_error(deploy: Deploy) -> None:
    streamer = deploy(Streamer.bind())
    needs_stream = (
        "Method '{}' returned a generator. You must use `handle.options(stream=True)` "
        "to call generators on a deployment."
    )
    for method in ("count", "numbers", "other"):
        with pytest.raises(TypeError, match=re.escape(needs_stream.format(method))):
            getattr(streamer, method).remote(2).result(timeout_s=30)
    with pytest.raises(TypeError, match=re.escape(
        "Called method 'unary' with `handle.options(stream=True)` but it did not return "
        "a generator."
    )):  # fmt: skip
        list(streamer.options(stream=True).unary.remote(2))
    assert streamer.unary.remote(2).result(timeout_s=30) == 2  # the replica keeps serving


# --- error types and texts --------------------------------------------------------------------


@serve.deployment
class Store:
    def __call__(self) -> str:
        return "store"

    def exists(self, key: str) -> bool:
        return False


def test_missing_method_names_the_available_ones(deploy: Deploy) -> None:
    handle = deploy(Store.bind())
    with pytest.raises(RayServeException) as info:
        handle.nope.remote().result(timeout_s=30)
    assert str(info.value) == (
        "Tried to call a method 'nope' that does not exist. Available methods: ['exists']."
    )


def test_missing_application(deploy: Deploy) -> None:
    deploy(Store.bind())
    with pytest.raises(RayServeException, match=re.escape("Application 'nope' does not exist.")):
        serve.get_app_handle("nope")
    serve.delete("nope")  # as on Ray Serve: nothing to delete is not an error


@serve.deployment
def echo(value: Any) -> Any:
    return value


def test_nested_response_is_not_serializable(deploy: Deploy) -> None:
    handle = deploy(echo.bind())
    response = handle.remote(1)
    assert handle.remote(response).result(timeout_s=30) == 1  # top level: resolved first
    with pytest.raises(RayServeException, match="`DeploymentResponse` is not serializable"):
        handle.remote([handle.remote(2)]).result(timeout_s=30)


def test_blocking_calls_in_a_running_loop_raise_runtime_error(deploy: Deploy) -> None:
    handle = deploy(Streamer.bind())

    async def blocking_calls() -> None:
        with pytest.raises(RuntimeError, match=re.escape(
            "Sync methods should not be called from within an `asyncio` event loop. "
            "Use `await response` instead."
        )):  # fmt: skip
            handle.unary.remote(1).result()
        stream = handle.options(stream=True).count.remote(2)
        with pytest.raises(RuntimeError, match="Use `async for`"):
            next(stream)
        with pytest.raises(TypeError, match="cannot be awaited directly"):
            await stream
        assert [i async for i in stream] == [0, 1]

    asyncio.run(blocking_calls())


def test_deleted_application_raises_deployment_unavailable(deploy: Deploy) -> None:
    handle = deploy(Store.bind(), name="gone")
    assert handle.remote().result(timeout_s=30) == "store"
    serve.delete("gone")
    with pytest.raises(DeploymentUnavailableError):
        handle.remote().result(timeout_s=30)


# --- handle identity and caching --------------------------------------------------------------


@serve.deployment
class Front:
    def __init__(self, back: DeploymentHandle) -> None:
        self.back = back

    async def __call__(self) -> str:
        return "front+" + await self.back.remote()


@serve.deployment
class Back:
    def __call__(self) -> str:
        return "back"


def test_handles_are_cached_per_deployment(deploy: Deploy) -> None:
    ran = deploy(Front.bind(Back.bind()), name="cached")
    assert serve.get_app_handle("cached") is ran
    assert serve.get_app_handle("cached") is serve.get_app_handle("cached")
    back = serve.get_deployment_handle("Back", "cached")
    assert back is serve.get_deployment_handle("Back", "cached")
    assert back.remote().result(timeout_s=30) == "back"
    deploy(Back.bind(), name="cached")  # another ingress: the app handle follows it
    assert serve.get_app_handle("cached").deployment_name == "Back"
    assert serve.get_app_handle("cached").remote().result(timeout_s=30) == "back"


@serve.deployment
class AppCaller:
    async def __call__(self, app: str) -> Any:
        return await serve.get_app_handle(app).remote()

    def missing(self, app: str) -> str:
        try:
            serve.get_app_handle(app)
        except RayServeException as exc:
            return str(exc)
        return "found"


def test_get_app_handle_inside_a_replica(deploy: Deploy) -> None:
    caller = deploy(AppCaller.bind(), name="caller")
    deploy(Front.bind(Back.bind()), name="target")
    assert caller.remote("target").result(timeout_s=30) == "front+back"
    assert caller.missing.remote("nope").result(timeout_s=30) == (
        "Application 'nope' does not exist."
    )
    deploy(Back.bind(), name="target")  # Back, unchanged, becomes the ingress
    assert caller.remote("target").result(timeout_s=30) == "back"
    serve.delete("target")
    assert caller.missing.remote("target").result(timeout_s=30) == (
        "Application 'target' does not exist."
    )


def test_handle_shutdown(deploy: Deploy) -> None:
    handle = deploy(Store.bind())
    assert handle.remote().result(timeout_s=30) == "store"
    handle.shutdown()
    asyncio.run(handle.shutdown_async())
    # As on Ray Serve (it only stops the router's metrics), the handle keeps working.
    assert handle.remote().result(timeout_s=30) == "store"


_AFTER_SHUTDOWN = """
import sys
from conftest import free_port
from shoal import serve
from shoal.serve.exceptions import DeploymentUnavailableError

@serve.deployment
def one() -> int:
    return 1

local = sys.argv[1] == "local"
if not local:
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
handle = serve.run(one.bind(), route_prefix=None, _local_testing_mode=local)
assert handle.remote().result(timeout_s=30) == 1
serve.shutdown()
try:
    handle.remote()
except DeploymentUnavailableError as exc:
    assert "shut down" in str(exc), exc
else:
    raise AssertionError("no error")
"""


@pytest.fixture(scope="module")
def after_shutdown(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Driver]]:
    """_AFTER_SHUTDOWN on each runtime, started before the module's first test."""
    yield from started_drivers(
        tmp_path_factory, local=(_AFTER_SHUTDOWN, "local"), process=(_AFTER_SHUTDOWN, "process")
    )


@pytest.fixture(scope="module", autouse=True)
def _start_early(request: pytest.FixtureRequest) -> None:
    start_early(request, "after_shutdown")  # they run while the tests before theirs do


@pytest.mark.parametrize("runtime", ["local", "process"])
def test_handle_of_a_shut_down_instance_is_unavailable(
    after_shutdown: dict[str, Driver], runtime: str
) -> None:
    after_shutdown[runtime].result()  # its asserts passed: it exited 0


# --- deployments ------------------------------------------------------------------------------

_lock = threading.Lock()


def test_unpicklable_deployment_raises_type_error_at_bind() -> None:
    class HoldsLock:
        lock = _lock

    def uses_lock() -> bool:
        return _lock.locked()

    class Plain:
        def __init__(self, arg: Any) -> None:
            self.arg = arg

    pattern = (
        r"Could not serialize the deployment[\s\S]*'lock'[\s\S]*was found to be non-serializable"
    )
    with pytest.raises(TypeError, match=pattern):
        serve.deployment(HoldsLock).bind()
    with pytest.raises(TypeError, match=r"'_lock' used by uses_lock[\s\S]*non-serializable"):
        serve.deployment(uses_lock).bind()
    with pytest.raises(
        TypeError, match=r"Could not serialize the deployment init args:[\s\S]*pickle"
    ):
        serve.deployment(Plain).bind(_lock)
    with pytest.raises(TypeError, match=r"Could not serialize the deployment init kwargs:"):
        serve.deployment(Plain).bind(arg=_lock)
    serve.deployment(Plain).bind(arg={"plain": [1, 2.0]})  # data is fine


class Model:
    pass


def test_deployment_properties() -> None:
    declared = serve.deployment(
        Model, name="kv", version="7", num_replicas=2, user_config={"a": 1},
        max_ongoing_requests=3, ray_actor_options={"num_cpus": 0.5},
    )  # fmt: skip
    assert (declared.name, declared.version, declared.func_or_class) == ("kv", "7", Model)
    assert (declared.num_replicas, declared.user_config) == (2, {"a": 1})
    assert (declared.max_ongoing_requests, declared.max_queued_requests) == (3, -1)
    assert declared.ray_actor_options == {"num_cpus": 0.5}
    assert declared.logging_config is None and declared.route_prefix is None
    assert (declared.init_args, declared.init_kwargs) == ((), {})
    assert serve.deployment(Model).version is None


def test_calling_a_deployment_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="Deployments cannot be constructed directly"):
        Store()


@pytest.fixture(params=["inprocess", "process"])
def local(request: pytest.FixtureRequest) -> Iterator[bool]:
    if request.param == "process":
        request.getfixturevalue("http_port")
    yield request.param == "inprocess"
    for name in ("many-a", "many-b"):
        serve.delete(name)


def test_run_many(local: bool) -> None:
    handles = serve.run_many(
        [
            serve.RunTarget(Store.bind(), name="many-a", route_prefix=None),
            serve.RunTarget(echo.bind(), name="many-b", route_prefix=None),
        ],
        _local_testing_mode=local,
    )
    assert handles[0].remote().result(timeout_s=30) == "store"
    assert handles[1].remote(5).result(timeout_s=30) == 5
    assert handles[1] is serve.get_app_handle("many-b")
    with pytest.raises(ValueError, match="No applications provided"):
        serve.run_many([])
