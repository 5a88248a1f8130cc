"""The responses of handle calls: one result (``DeploymentResponse``) or a stream of them
(``DeploymentResponseGenerator``), as in Ray Serve."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from shoal._errors import (
    ReplicaDiedError,
    RequestCancelledError,
    RequestTimeoutError,
    ShoalError,
    SyncCallInEventLoopError,
    TransportError,
)
from shoal._observe import tracing
from shoal._router.router import REPLY_GRACE_S, Router
from shoal._seam.loops import on_loop
from shoal._seam.protocols import Stream
from shoal._transport.failures import exception_from
from shoal._transport.messages import Failure, Message, Request, Result, StreamEnd, StreamItem


def _unwrap(msg: Message) -> Any:
    if type(msg) is Result:
        return msg.value
    if isinstance(msg, Failure):
        raise exception_from(msg)
    raise ShoalError(f"unexpected reply {type(msg).__name__}")


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class DeploymentResponse:
    """The pending result of ``handle.remote()``: ``await`` it, or call ``.result()`` in sync code.

    Passing it as an argument to another handle call hands the value over
    without a round trip through the caller's code.
    """

    __slots__ = ("_inner", "_loop")

    def __init__(self, inner: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner  # asyncio future/task on ``loop``, or a concurrent future
        self._loop = loop

    def __await__(self) -> Any:
        inner = self._inner
        try:
            if not isinstance(inner, concurrent.futures.Future) and on_loop(self._loop):
                msg = yield from inner.__await__()
            else:
                msg = yield from asyncio.wrap_future(self._concurrent()).__await__()
        except TransportError as exc:
            raise ReplicaDiedError(f"the replica died while handling the request ({exc})") from None
        except asyncio.CancelledError:
            if _caller_cancelling():
                raise  # the awaiting task itself was cancelled (or timed out): not the request
            raise RequestCancelledError(_CANCELLED) from None
        return _unwrap(msg)

    def result(self, timeout_s: float | None = None) -> Any:
        """Block until the result is ready (at most ``timeout_s``); not for async code."""
        if _in_event_loop():
            raise SyncCallInEventLoopError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `await response` instead."
            )
        try:
            msg = self._concurrent().result(timeout_s)
        except RequestTimeoutError:
            raise  # the request's own deadline (concurrent's TimeoutError is the builtin one)
        except concurrent.futures.TimeoutError:
            raise RequestTimeoutError(f"no result within timeout_s={timeout_s}") from None
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(_CANCELLED) from None
        except TransportError as exc:
            raise ReplicaDiedError(f"the replica died while handling the request ({exc})") from None
        return _unwrap(msg)

    def __reduce__(self) -> Any:
        # Ray Serve's error and text: only top-level arguments are resolved before a call.
        raise ShoalError(
            "`DeploymentResponse` is not serializable. If you are passing the "
            "`DeploymentResponse` in a nested object (e.g. a list or dictionary) to a "
            "downstream deployment handle call, that is no longer supported. Please "
            "only pass `DeploymentResponse` objects as top level arguments."
        )

    def _concurrent(self) -> concurrent.futures.Future[Message]:
        inner = self._inner
        if not isinstance(inner, concurrent.futures.Future):
            inner = self._inner = asyncio.run_coroutine_threadsafe(_wait(inner), self._loop)
        return inner

    def cancel(self) -> None:
        """Cancel the request (the replica's task is cancelled if it started).

        Then ``.result()`` and ``await`` raise ``RequestCancelledError``, as in Ray
        Serve, unless the request had already finished.
        """
        inner = self._inner
        if isinstance(inner, concurrent.futures.Future) or (on_loop(self._loop)):
            inner.cancel()
        else:
            self._loop.call_soon_threadsafe(inner.cancel)


async def _wait(awaitable: Any) -> Any:
    return await awaitable


_CANCELLED = "Request was cancelled."  # Ray Serve's text (without a request id)


def _caller_cancelling() -> bool:
    """Whether the task running this code is being cancelled (``task.cancel()``, a timeout)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class DeploymentResponseGenerator:
    """The stream of items from a generator method (``handle.options(stream=True)``).

    Iterate with ``async for`` in async code or ``for`` in sync code. With a
    deadline, the whole stream must end by then: a read past it (and a grace for the
    replica's own timeout) closes the stream, which cancels the replica's generator,
    and raises RequestTimeoutError.
    """

    def __init__(
        self, router: Router, request: Request, on_router_loop: bool, deadline: float | None = None
    ) -> None:
        self._router = router
        self._stream: Stream | None = None
        self._done = False
        self._deadline = deadline
        self._span: Any = None  # the call's span when tracing (ends with the stream)
        # The request is sent at call time, as in Ray (a batched generator joins its batch
        # when called, not when first read); the stream is picked up on the first read.
        opening = self._open(request, deadline)
        if on_router_loop:
            self._opening: Any = router.loop.create_task(opening)
        else:
            self._opening = asyncio.run_coroutine_threadsafe(opening, router.loop)

    async def _open(self, request: Request, deadline: float | None) -> Stream:
        stream = await self._router.open_stream(request, deadline)
        if self._done:  # cancelled (or dropped) while it opened: release the replica's slot
            stream.close()
            raise asyncio.CancelledError
        return stream

    async def _next_message(self) -> Message:
        deadline = self._deadline
        if deadline is None:
            return await self._receive()
        timeout = asyncio.timeout(deadline - time.monotonic() + REPLY_GRACE_S)
        try:
            async with timeout:
                return await self._receive()
        except TimeoutError:
            if not timeout.expired():
                raise  # the router's RequestTimeoutError (it left the queue)
        self._done = True
        if self._stream is not None:
            self._stream.close()  # cancels the replica's generator
        if self._span is not None:
            self._end_span(TimeoutError("the stream's deadline passed"))
        raise self._router.timed_out("before the stream ended; it was cancelled", "reply")

    async def _receive(self) -> Message:
        if self._stream is None:
            opening = self._opening
            if isinstance(opening, concurrent.futures.Future):
                opening = asyncio.wrap_future(opening)
            self._stream = await opening
        return await self._stream.next()

    def _item(self, msg: Message) -> Any:
        if type(msg) is StreamItem:
            return msg.value
        self._done = True
        if self._span is not None:
            self._end_span(msg)
        if type(msg) is StreamEnd:
            return _END
        return _unwrap(msg)

    def _end_span(self, outcome: Any = None) -> None:
        """End the call's span, if tracing: with the last message, an error, or nothing."""
        span, self._span = self._span, None
        if span is None:
            return
        if isinstance(outcome, BaseException):
            tracing.fail(span, outcome)
            span.end()
        else:
            tracing.end_reply(span, outcome)

    def __await__(self) -> Any:
        raise TypeError(
            "`DeploymentResponseGenerator` cannot be awaited directly. Use `async for` "
            "or `await response.__anext__() instead`."
        )  # Ray Serve's text

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        loop = self._router.loop
        try:
            if on_loop(loop):
                msg = await self._next_message()
            else:
                msg = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(self._next_message(), loop)
                )
        except TransportError as exc:
            raise ReplicaDiedError(f"the replica died while streaming ({exc})") from None
        item = self._item(msg)
        if item is _END:
            raise StopAsyncIteration
        return item

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if _in_event_loop():
            raise SyncCallInEventLoopError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `async for` or `await response.__anext__()` instead."
            )
        future = asyncio.run_coroutine_threadsafe(self._next_message(), self._router.loop)
        try:
            msg = future.result()
        except TransportError as exc:
            raise ReplicaDiedError(f"the replica died while streaming ({exc})") from None
        item = self._item(msg)
        if item is _END:
            raise StopIteration
        return item

    def cancel(self) -> None:
        """Stop the stream; the replica's generator is cancelled (and its slot released),
        whether the stream is still opening, opened, or being read."""
        self._done = True
        self._end_span()
        self._router.loop.call_soon_threadsafe(self._abandon)

    def _abandon(self) -> None:
        # On the router's loop, where the opening's outcome is settled: stop it, or close
        # what it opened. One that opens after this sees ``_done`` (``_open``).
        opening = self._opening
        if not opening.cancel() and not opening.cancelled() and opening.exception() is None:
            opening.result().close()

    def __del__(self) -> None:
        # A stream nobody reads any more must not hold its replica slot for ever.
        if hasattr(self, "_opening") and not self._done and not self._router.loop.is_closed():
            self.cancel()
        if getattr(self, "_span", None) is not None:
            self._end_span()


_END = object()
