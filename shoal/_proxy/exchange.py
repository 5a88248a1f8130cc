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

    Watching costs a task, so it starts only for requests still running after
    ``delay_s``, or at once for streamed responses.
    """

    __slots__ = ("_receive", "_stream", "_task", "_timer")

    def __init__(self, receive: Any, stream: Any, delay_s: float = 0.05) -> None:
        self._receive = receive
        self._stream = stream
        self._task: asyncio.Future[Any] | None = None
        self._timer = asyncio.get_running_loop().call_later(delay_s, self.start)

    def start(self) -> None:
        self._timer.cancel()
        if self._task is None:
            self._task = asyncio.ensure_future(self._receive())
            self._task.add_done_callback(self._received)

    def _received(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled():
            self._stream.close()

    def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


def close_opened(opening: asyncio.Future[Any]) -> None:
    """Release a stream opened for a request nobody waits for any more."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


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
