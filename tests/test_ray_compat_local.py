"""Ray Serve's local testing mode: ``serve.run(app, _local_testing_mode=True)``.

Written from Ray's documentation (serve/advanced-guides/dev-workflow.md, "Local
Testing Mode") and the behaviour of Ray's ``local_testing_mode.py``: the
application runs in the test's process, handles work from the main thread and
from the test's own event loop, user exceptions arrive as themselves, arguments
are copied as a remote call copies them, and the ``"ray.serve"`` logger prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_driver

from shoal import serve
from shoal.serve.exceptions import RayServeException
from shoal.serve.handle import DeploymentHandle


@pytest.fixture(autouse=True)
def _delete_new_apps() -> Iterator[None]:
    """Delete the applications a test deployed (serve.shutdown would also stop the session's
    multi-process instance)."""
    before = set(serve.status().applications)
    yield
    for name in set(serve.status().applications) - before:
        with contextlib.suppress(serve.NotFoundError):
            serve.delete(name)


def run(app: Any, **kwargs: Any) -> DeploymentHandle:
    return serve.run(app, _local_testing_mode=True, **kwargs)


# --- composition, from the main thread and from the test's event loop ----------------------


@serve.deployment
class Inner:
    def __init__(self, my_name: str) -> None:
        self._my_name = my_name

    def __call__(self) -> str:
        return self._my_name


@serve.deployment
class Outer:
    def __init__(self, my_name: str, inner_handle: DeploymentHandle) -> None:
        assert isinstance(inner_handle, DeploymentHandle)
        self._my_name = my_name
        self._inner_handle = inner_handle

    async def __call__(self, name: str) -> str:
        inner_name = await self._inner_handle.remote()
        return f"Hello {name} from {self._my_name} and {inner_name}!"


def test_composition_and_result_from_the_main_thread() -> None:
    # Ray's tests/test_local_testing_mode.py, test_basic_composition.
    handle = run(Outer.bind("Theodore", Inner.bind("Kevin")))
    assert isinstance(handle, DeploymentHandle)
    assert handle.remote("Edith").result() == "Hello Edith from Theodore and Kevin!"


async def test_await_from_the_tests_own_event_loop() -> None:
    handle = run(Outer.bind("Theodore", Inner.bind("Kevin")))
    assert await handle.remote("Edith") == "Hello Edith from Theodore and Kevin!"
    names = await asyncio.gather(*(handle.remote(str(i)) for i in range(20)))
    assert names[7] == "Hello 7 from Theodore and Kevin!"
    with pytest.raises(RuntimeError):  # blocking in a running loop: Ray's RuntimeError
        handle.remote("Edith").result()


@serve.deployment
def plus_one(x: int) -> int:
    return x + 1


def test_responses_chain_into_calls() -> None:
    handle = run(plus_one.bind())
    assert handle.remote(handle.remote(handle.remote(1))).result() == 4


# --- exceptions ----------------------------------------------------------------------------


class ModelError(Exception):
    pass


@serve.deployment
class Failing:
    def __init__(self, fail_in_init: bool = False) -> None:
        if fail_in_init:
            raise ModelError("cannot load weights")

    def predict(self) -> None:
        raise ModelError("sync method failed")

    async def apredict(self) -> None:
        raise ValueError("async method failed")


def test_constructor_exception_is_raised_by_serve_run_as_itself() -> None:
    with pytest.raises(ModelError, match="cannot load weights"):
        run(Failing.bind(True))


async def test_user_exceptions_arrive_as_their_own_type() -> None:
    handle = run(Failing.bind())
    with pytest.raises(ModelError, match="sync method failed"):
        await handle.predict.remote()
    with pytest.raises(ValueError, match="async method failed"):
        await handle.apredict.remote()
    with pytest.raises(ModelError, match="sync method failed"):
        await asyncio.to_thread(lambda: handle.predict.remote().result())


def test_a_missing_method_raises_ray_serve_exception_naming_it() -> None:
    handle = run(Failing.bind())
    with pytest.raises(RayServeException, match="'nope'") as info:
        handle.nope.remote().result()
    assert "predict" in str(info.value)  # the available methods are listed


class FieldError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@serve.deployment
def validate(payload: dict[str, Any]) -> None:
    raise FieldError("age", "must be positive")


def test_an_exception_whose_init_takes_other_arguments_arrives_as_itself() -> None:
    with pytest.raises(FieldError) as info:
        run(validate.bind()).remote({"age": -1}).result()
    assert info.value.field == "age"


# --- streaming -----------------------------------------------------------------------------


@serve.deployment
class Streamer:
    def count(self, limit: int) -> Iterator[int]:
        yield from range(limit)

    async def acount(self, limit: int) -> AsyncIterator[int]:
        for i in range(limit):
            await asyncio.sleep(0)
            yield i


async def test_streaming_generators_iterate_sync_and_async() -> None:
    handle = run(Streamer.bind()).options(stream=True)
    assert [i async for i in handle.count.remote(3)] == [0, 1, 2]
    assert [i async for i in handle.acount.remote(3)] == [0, 1, 2]
    assert await asyncio.to_thread(lambda: list(handle.acount.remote(4))) == [0, 1, 2, 3]
    unread = handle.count.remote(3)
    with pytest.raises(RuntimeError):  # sync iteration in a running loop: Ray's RuntimeError
        next(iter(unread))
    # Sent at call time (as in Ray): a stream nobody reads holds its replica's slot until it
    # is cancelled or collected, and the app's deletion would wait for it to drain.
    unread.cancel()


# --- user_config ---------------------------------------------------------------------------


@serve.deployment(user_config={"threshold": 0.5})
class Thresholder:
    def __init__(self) -> None:
        self.threshold = 0.0

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.threshold = config["threshold"]

    def __call__(self, score: float) -> bool:
        return score > self.threshold


def test_user_config_is_applied_at_start_and_on_update() -> None:
    handle = run(Thresholder.bind())
    assert handle.remote(0.6).result() is True
    handle = run(Thresholder.options(user_config={"threshold": 0.9}).bind())
    assert handle.remote(0.6).result() is False


# --- arguments are copied as a remote call copies them ----------------------------------------


@serve.deployment
class Mutator:
    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        record["seen"] = True
        return record

    def call_back(self, other: DeploymentHandle) -> str:
        return other.remote().result()


def test_arguments_are_copies_as_in_a_remote_call() -> None:
    handle = run(Mutator.bind())
    record: dict[str, Any] = {"id": 1}
    assert handle.remote(record).result() == {"id": 1, "seen": True}
    assert record == {"id": 1}, "the replica changed the caller's object"


def test_local_classes_and_lambdas_are_copied_too() -> None:
    class Point:  # defined in a function: plain pickle refuses it, cloudpickle copies it
        def __init__(self, x: int) -> None:
            self.x = x

    @serve.deployment
    def apply(point: Point, function: Any) -> tuple[bool, int]:
        return isinstance(point, Point), function(point.x)

    assert run(apply.bind()).remote(Point(2), lambda x: x * 10).result() == (True, 20)


def test_handles_passed_as_arguments_stay_usable() -> None:
    inner = run(Inner.bind("Kevin"), name="inner", route_prefix=None)
    handle = run(Mutator.bind(), name="mutator", route_prefix=None)
    assert handle.call_back.remote(inner).result() == "Kevin"


def test_an_argument_that_cannot_be_pickled_is_a_type_error() -> None:
    handle = run(Mutator.bind())
    with pytest.raises(TypeError, match="serialize"):
        handle.remote({"lock": threading.Lock()}).result()


# --- delete, shutdown, logging -------------------------------------------------------------


def test_delete_and_shutdown_then_run_again(tmp_path: Path) -> None:
    run_driver(tmp_path, """
from shoal import serve
from shoal.serve.exceptions import RayServeException
from test_ray_compat_local import Inner

handle = serve.run(Inner.bind("Kevin"), name="app", _local_testing_mode=True)
serve.delete("app")
assert "app" not in serve.status().applications
try:
    handle.remote().result(timeout_s=10)
    raise AssertionError("a deleted application answered")
except RayServeException:
    pass
serve.shutdown()
handle = serve.run(Inner.bind("Kevin"), name="app", _local_testing_mode=True)
assert handle.remote().result() == "Kevin"
serve.shutdown()
""")  # fmt: skip


@serve.deployment
class SayHello:
    def __call__(self) -> str:
        logging.getLogger("ray.serve").info("Hello world!")
        return "hi"


def test_the_ray_serve_logger_prints_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    # Ray's local testing mode configures the "ray.serve" logger (INFO, to stderr), and
    # its log lines name the deployment and the replica (serve/monitoring.md).
    assert run(SayHello.bind()).remote().result() == "hi"
    lines = [line for line in capsys.readouterr().err.splitlines() if "Hello world!" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("INFO ") and " SayHello " in lines[0], lines
    assert "#SayHello#" in lines[0] and "test_ray_compat_local.py:" in lines[0], lines
