"""Running ASGI apps inside a replica: requests and lifespan events.

Guarantees:
- a response sent with a single body message comes back as one complete
  :class:`HttpResponseData`; a streamed one as its start, then chunks as the
  app produces them (bounded queue: a slow client slows the app down);
- the app never sees a disconnect while it runs; when the client goes away
  the proxy cancels the request, which cancels the app's task;
- a lifespan startup failure raises, so the deployment fails with its message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncGenerator, AsyncIterator, MutableMapping
from typing import Any

from shoal._config import TIMEOUTS
from shoal._errors import DeploymentError
from shoal._transport.http import HttpRequestData, HttpResponseData, HttpResponseStart

logger = logging.getLogger("shoal.replica")


async def asgi_parts(
    app: Any, scope: dict[str, Any], body: bytes
) -> AsyncGenerator[HttpResponseData | HttpResponseStart | bytes, None]:
    """Run ``app`` for one HTTP request; yield a complete response or a start and chunks."""
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # only cancellation ends a request
        return {"type": "http.disconnect"}

    channel = _Channel()
    task = channel.run(app(scope, receive, channel.put))
    start: HttpResponseStart | None = None
    complete = False
    try:
        while True:
            message = await channel.get()
            if message is None:
                if start is None:
                    raise RuntimeError("the ASGI app returned without sending a response")
                return
            if message["type"] == "http.response.start":
                start = HttpResponseStart(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and start is not None:
                chunk = bytes(message.get("body", b""))
                more = message.get("more_body", False)
                if not more and not isinstance(start, _Sent):
                    complete = True
                    yield HttpResponseData(start.status, start.headers, chunk)
                    return
                if not isinstance(start, _Sent):
                    yield start
                    start = _Sent(start.status, start.headers)
                if chunk:
                    yield chunk
                if not more:
                    complete = True
                    return
    finally:
        if complete:  # the app may go on with background tasks after its response
            _finish_in_background(task)
        else:
            task.cancel()


class _Channel:
    """Messages an ASGI app task sends, for one consumer; the app waits when 16 are unread.

    Cheaper than an ``asyncio.Queue`` raced against the task with ``asyncio.wait``:
    one future per wait, no extra tasks (this is on every ingress request).
    """

    __slots__ = ("_items", "_space", "_task", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[MutableMapping[str, Any]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None
        self._task: asyncio.Future[Any] | None = None

    def run(self, coroutine: Any) -> asyncio.Future[Any]:
        """Run the app's coroutine as the producer; its end wakes the consumer."""
        self._task = asyncio.ensure_future(coroutine)
        self._task.add_done_callback(self._wake)
        return self._task

    async def put(self, message: MutableMapping[str, Any]) -> None:
        self._items.append(message)
        self._wake()
        if len(self._items) >= 16:
            self._space = asyncio.get_running_loop().create_future()
            await self._space

    def _wake(self, *_: Any) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> MutableMapping[str, Any] | None:
        """The next message; None once the app finished; raises what the app raised."""
        assert self._task is not None
        while not self._items:
            if self._task.done():
                self._task.result()
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        message = self._items.popleft()
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)
        return message


_background: set[asyncio.Future[Any]] = set()


def _finish_in_background(task: asyncio.Future[Any]) -> None:
    if task.done():
        _report_background(task)
        return
    _background.add(task)
    task.add_done_callback(_report_background)


def _report_background(task: asyncio.Future[Any]) -> None:
    """Log what the app raised after its response (Starlette re-raises after its 500)."""
    from shoal._api.context import request_context

    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "request %s failed in the ASGI app",
            request_context.get().request_id,
            exc_info=task.exception(),
        )


class _Sent(HttpResponseStart):
    """Marks that the response start has been passed on."""


async def websocket_messages(
    app: Any, scope: dict[str, Any], inbox: asyncio.Queue[Any]
) -> AsyncIterator[MutableMapping[str, Any]]:
    """Run ``app`` for one websocket; its receive reads ``inbox`` (the client's messages)."""
    channel = _Channel()
    task = channel.run(app(scope, inbox.get, channel.put))
    try:
        while (message := await channel.get()) is not None:
            yield message
    finally:
        task.cancel()


def request_scope(data: HttpRequestData, state: dict[str, Any]) -> dict[str, Any]:
    scope = data.scope()
    scope["state"] = dict(state)
    return scope


class Lifespan:
    """Drives an ASGI app's lifespan protocol (startup at replica start, shutdown at stop)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox = _Channel()
        self._task: asyncio.Future[Any] | None = None

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}  # fmt: skip
        self._task = self._outbox.run(self.app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        message = await self._reply("startup")
        if message is None:
            self._task = None  # the app does not speak lifespan: nothing to run
            return
        if message["type"] == "lifespan.startup.failed":
            raise DeploymentError(f"lifespan startup failed: {message.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            message = await self._reply("shutdown")
        except Exception:
            logger.exception("lifespan shutdown failed")
            return
        if message is not None and message["type"] == "lifespan.shutdown.failed":
            logger.error("lifespan shutdown failed: %s", message.get("message", ""))

    async def _reply(self, phase: str) -> MutableMapping[str, Any] | None:
        assert self._task is not None
        try:
            return await asyncio.wait_for(self._outbox.get(), TIMEOUTS.asgi_lifespan_s)
        except TimeoutError:
            raise DeploymentError(
                f"lifespan {phase} did not finish within {TIMEOUTS.asgi_lifespan_s:g} s"
            ) from None
        except Exception as exc:
            if phase == "startup" and not self.state and _unsupported(exc):
                return None
            raise DeploymentError(f"lifespan {phase} raised {type(exc).__name__}: {exc}") from exc


def _unsupported(exc: Exception) -> bool:
    """Apps that do not handle lifespan typically fail on the unknown scope type."""
    text = str(exc).lower()
    return isinstance(exc, AssertionError | KeyError | ValueError | TypeError) or "lifespan" in text
