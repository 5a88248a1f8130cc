"""Errors as Ray Serve raises them to the caller of a handle, on both runtimes.

Written from Ray Serve's behaviour: an exception raised by user code in a
replica crosses to the caller pickled, so it arrives as its own type with its
attributes, whatever its ``__init__`` takes (``shoal/_transport/failures.py``);
a response cancelled with ``response.cancel()`` raises ``RequestCancelledError``
from ``.result()`` and ``await`` (Ray's ``handle.py``), while a caller whose own
task is cancelled still gets ``asyncio.CancelledError``.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import Deploy, async_wait_until, wait_until

from shoal import serve
from shoal._transport.failures import exception_from, failure_from
from shoal.serve.exceptions import RequestCancelledError
from shoal.serve.handle import DeploymentHandle

# --- exceptions whose __init__ does not take their message -----------------------------------


class FieldError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class FixedMessageError(Exception):
    def __init__(self) -> None:
        super().__init__("always this message")


class CodedError(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"failed with code {code}")
        self.code = code


class PrefixedError(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(f"bad input: {detail}")


class LockedFieldError(FieldError):
    """Rebuilding needs no __init__, but a lock cannot be pickled at all."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.lock = threading.Lock()


@serve.deployment
class Validator:
    def field(self) -> None:
        raise FieldError("age", "must be positive")

    def fixed(self) -> None:
        raise FixedMessageError()

    async def coded(self) -> None:
        raise CodedError(code=7)

    def prefixed(self) -> None:
        raise PrefixedError("x")

    def locked(self) -> None:
        raise LockedFieldError("age", "must be positive")


@serve.deployment
class Front:
    def __init__(self, validator: DeploymentHandle) -> None:
        self.validator = validator

    async def __call__(self) -> None:
        await self.validator.field.remote()


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


def test_an_exception_whose_init_takes_other_arguments_arrives_as_itself(deploy: Deploy) -> None:
    handle = deploy(Validator.bind())
    with pytest.raises(FieldError) as info:
        handle.field.remote().result(timeout_s=30)
    error = info.value
    assert type(error) is FieldError
    assert (error.field, error.reason) == ("age", "must be positive")
    assert error.args == ("age: must be positive",) and str(error) == "age: must be positive"
    assert len(notes(error)) == 1
    assert notes(error)[0].lstrip().startswith("Remote traceback (in replica ")
    assert "in field" in notes(error)[0]  # down to the frame that raised


async def test_exceptions_taking_no_or_keyword_arguments_arrive_as_themselves(
    deploy: Deploy,
) -> None:
    handle = deploy(Validator.bind())
    with pytest.raises(FixedMessageError, match=r"^always this message") as fixed:
        await handle.fixed.remote()
    assert "in fixed" in notes(fixed.value)[0]
    with pytest.raises(CodedError, match="code 7") as coded:
        await handle.coded.remote()
    assert coded.value.code == 7
    assert "in coded" in notes(coded.value)[0]
    with pytest.raises(PrefixedError) as prefixed:  # its message is not formatted twice
        await handle.prefixed.remote()
    assert prefixed.value.args == ("bad input: x",)


def test_such_an_exception_keeps_every_replicas_traceback_through_composition(
    deploy: Deploy,
) -> None:
    handle = deploy(Front.bind(Validator.bind()))
    with pytest.raises(FieldError) as info:
        handle.remote().result(timeout_s=30)
    assert info.value.field == "age"
    outer, inner = notes(info.value)  # outermost replica first, each once
    assert "in __call__" in outer and "in field" not in outer
    assert "in field" in inner


def test_such_an_exception_that_cannot_be_pickled_still_becomes_replica_error(
    deploy: Deploy,
) -> None:
    handle = deploy(Validator.bind())
    with pytest.raises(serve.ReplicaError) as info:
        handle.locked.remote().result(timeout_s=30)
    assert info.value.remote_type == f"{__name__}.LockedFieldError"
    assert "age: must be positive" in str(info.value)
    assert "in locked" in info.value.remote_traceback


def test_a_class_only_cloudpickle_can_send_is_rebuilt_too() -> None:
    class LocalError(Exception):  # local: plain pickle cannot name it, cloudpickle sends it
        def __init__(self, what: str, count: int) -> None:
            super().__init__(f"{count} x {what}")
            self.what, self.count = what, count

    try:
        raise LocalError("apple", 3)
    except LocalError as exc:
        failure = failure_from(exc, "in replica R:")
    assert failure.exception is not None
    rebuilt = exception_from(failure)
    assert type(rebuilt).__name__ == "LocalError"
    assert (rebuilt.what, rebuilt.count, str(rebuilt)) == ("apple", 3, "3 x apple")  # type: ignore[attr-defined]
    assert "Remote traceback (in replica R)" in notes(rebuilt)[0]


# --- cancelling a response ---------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=10)
class Hanging:
    """Never answers ``__call__``; counts the calls that started and that were cancelled."""

    def __init__(self) -> None:
        self.started = self.cancelled = 0

    async def __call__(self) -> None:
        self.started += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def counts(self) -> dict[str, int]:
        return {"started": self.started, "cancelled": self.cancelled}


@serve.deployment
class Canceller:
    """Cancels calls to ``Hanging`` from inside a replica (awaiting on the router's loop)."""

    def __init__(self, hanging: DeploymentHandle) -> None:
        self.hanging = hanging

    async def cancel_then_await(self) -> str:
        response = self.hanging.remote()
        response.cancel()
        try:
            await response
        except RequestCancelledError:
            return "RequestCancelledError"
        return "answered"

    async def cancel_own_task(self) -> str:
        response = self.hanging.remote()
        entered = asyncio.Event()

        async def wait() -> Any:
            entered.set()
            return await response

        task = asyncio.create_task(wait())
        await entered.wait()  # the task is now suspended in ``await response``
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return f"CancelledError, task cancelled: {task.cancelled()}"
        return "answered"


def test_result_of_a_cancelled_response_raises_request_cancelled_error(deploy: Deploy) -> None:
    handle = deploy(Hanging.bind())
    response = handle.remote()
    response.cancel()  # at once: before or while it is assigned
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=30)

    response = handle.remote()
    wait_until(lambda: handle.counts.remote().result(timeout_s=30)["started"] == 1)
    response.cancel()  # while the replica runs it
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=30)
    wait_until(lambda: handle.counts.remote().result(timeout_s=30)["cancelled"] == 1)


async def test_awaiting_a_cancelled_response_raises_request_cancelled_error(
    deploy: Deploy,
) -> None:
    handle = deploy(Hanging.bind())
    response = handle.remote()
    response.cancel()
    with pytest.raises(RequestCancelledError):
        await response

    response = handle.remote()

    async def started() -> bool:
        return bool((await handle.counts.remote())["started"] == 1)

    await async_wait_until(started)
    response.cancel()
    with pytest.raises(RequestCancelledError):
        await response


def test_awaiting_a_cancelled_response_in_a_replica_raises_request_cancelled_error(
    deploy: Deploy,
) -> None:
    handle = deploy(Canceller.bind(Hanging.bind()))
    assert handle.cancel_then_await.remote().result(timeout_s=30) == "RequestCancelledError"


def test_a_replica_task_cancelled_while_awaiting_a_response_gets_cancelled_error(
    deploy: Deploy,
) -> None:
    handle = deploy(Canceller.bind(Hanging.bind()))
    answer = handle.cancel_own_task.remote().result(timeout_s=30)
    assert answer == "CancelledError, task cancelled: True"


async def test_a_caller_task_cancelled_while_awaiting_a_response_gets_cancelled_error(
    deploy: Deploy,
) -> None:
    handle = deploy(Hanging.bind())
    response = handle.remote()
    entered = asyncio.Event()

    async def wait() -> Any:
        entered.set()
        return await response

    task = asyncio.create_task(wait())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    # A timeout cancels the awaiting task itself: it still ends as TimeoutError.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await handle.remote()


@serve.deployment
class LetsCancelledErrorEscape:
    async def __call__(self) -> None:
        raise asyncio.CancelledError()  # user code's own bug: nobody cancelled this request


def test_a_stray_cancelled_error_in_user_code_still_answers_the_caller(deploy: Deploy) -> None:
    handle = deploy(LetsCancelledErrorEscape.bind())
    with pytest.raises(RequestCancelledError):
        handle.remote().result(timeout_s=20)
