"""The proxy's ASGI plumbing: reading a request's body and headers, knowing whether a
response started, noticing a client that left, and short replies of its own."""

from __future__ import annotations

import asyncio
from typing import Any

Scope = dict[str, Any]
TEXT = (b"content-type", b"text/plain; charset=utf-8")


async def client_to_replica(receive: Any, stream: Any) -> None:
    while True:
        message = await receive()
        stream.send_input(message)
        if message["type"] == "websocket.disconnect":
            return


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes | None:
    """The whole request body, or None if it is larger than ``limit`` bytes."""
    declared = header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        return None
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    chunks, size = [body], len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class StartTracker:
    """Wraps ASGI ``send`` to know whether the response has started."""

    __slots__ = ("_send", "sent")

    def __init__(self, send: Any) -> None:
        self._send = send
        self.sent = False

    async def __call__(self, message: dict[str, Any]) -> None:
        self.sent = True
        await self._send(message)


class DisconnectWatch:
    """Closes the request's stream (cancelling the replica's work) if the client leaves.

    Watching starts only for requests still running after one to two periods of their
    :class:`DisconnectWatches` (25-50 ms by default), or at once (:meth:`start`) for
    queued requests and streamed responses. The request's body must have been read: the
    next message ``receive`` gives is then the client leaving (or the response's end).

    A ``receive`` that can say when the client leaves (an ``on_disconnect(callback)``
    method, as the proxy's own HTTP protocol gives: see
    :mod:`shoal._proxy.http_protocol`) is asked to: that costs a callback, not a task.
    Any other ``receive`` is awaited by a task. Either way, after :meth:`stop` the
    stream is not closed by this watch.
    """

    __slots__ = ("_hooked", "_receive", "_stream", "_task", "generation")

    def __init__(self, receive: Any, stream: Any) -> None:
        self._receive = receive
        self._stream = stream
        self._task: asyncio.Future[Any] | None = None
        self._hooked = False  # registered with ``receive.on_disconnect``
        #: The set of watches not started yet that holds this one (None: none does).
        self.generation: set[DisconnectWatch] | None = None

    def start(self) -> None:
        if self.generation is not None:
            self.generation.discard(self)
            self.generation = None
        if self._task is None and not self._hooked:
            on_disconnect = getattr(self._receive, "on_disconnect", None)
            if on_disconnect is not None and on_disconnect(self._left):
                self._hooked = True
                return
            self._task = asyncio.ensure_future(self._receive())
            self._task.add_done_callback(self._received)

    def _left(self) -> None:
        self._stream.close()

    def _received(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            self._stream.close()

    def stop(self) -> None:
        if self.generation is not None:
            self.generation.discard(self)
            self.generation = None
        if self._hooked:
            self._hooked = False
            self._receive.forget_disconnect(self._left)
        if self._task is not None:
            self._task.cancel()


class DisconnectWatches:
    """Starts the :class:`DisconnectWatch` of every request still running after one to
    two periods of ``period_s``, with one timer for all of them (while any is pending)
    rather than one per request: a request answered at once costs two set operations.

    Watches wait in two generations: those made since the last tick (young), and those
    made in the period before it (old). Each tick starts the old ones and ages the young.
    """

    __slots__ = ("_old", "_period_s", "_timer", "_young")

    def __init__(self, period_s: float = 0.025) -> None:
        self._period_s = period_s
        self._young: set[DisconnectWatch] = set()
        self._old: set[DisconnectWatch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Any, stream: Any) -> DisconnectWatch:
        """A watch for a request's ``stream``, started by a later tick unless stopped."""
        watch = DisconnectWatch(receive, stream)
        young = watch.generation = self._young
        young.add(watch)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period_s, self._tick)
        return watch

    def _tick(self) -> None:
        old, self._old, self._young = self._old, self._young, set()
        for watch in old:
            watch.generation = None  # (so start() leaves the set being iterated alone)
            watch.start()
        self._timer = None
        if self._old:
            self._timer = asyncio.get_running_loop().call_later(self._period_s, self._tick)


def header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


async def reply(
    send: Any,
    status: int,
    text: str,
    content_type: tuple[bytes, bytes] = TEXT,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = text.encode()
    headers = [content_type, (b"content-length", str(len(body)).encode()), *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
