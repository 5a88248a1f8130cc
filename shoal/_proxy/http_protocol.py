"""uvicorn's httptools protocol, writing a response's head and whole body in one write.

uvicorn writes the status line and headers as soon as the application sends
``http.response.start``, then the body with a second ``write`` when it comes: two
system calls (and, on loopback, two wake-ups of the client) for every one-shot
response, the proxy's usual kind. Here the head waits for the body, and a final body
of the declared length goes out with it in one write. Guarantees:

- the bytes on the wire are uvicorn's, in the same order (the head is built by
  uvicorn's own code, with its checks and errors);
- a head never waits past the end of the event-loop turn in which it was sent (a
  streamed response's head reaches the client before the application's next wait
  ends), nor behind a write of the same response (any other body is written after it);
- everything else (keep-alive, pipelining, flow control, disconnects, websockets) is
  uvicorn's unchanged.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _HeadCapture:
    """Stands in for the transport while uvicorn builds a response's head."""

    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head = data


class _Cork:
    """A request's application, given a ``send`` that holds the response's head until
    its body (or the loop turn's end). A wrapper, not a subclass of uvicorn's cycle: a
    cycle whose class changed after it was made loses CPython's fast attribute access
    (its attributes were laid out for the old class), in uvicorn's code too."""

    __slots__ = ("app", "cycle", "head")

    def __init__(self, app: Any, cycle: RequestResponseCycle) -> None:
        self.app = app
        self.cycle = cycle
        self.head: bytes | None = None  # the response's head, built but not written yet

    async def __call__(self, scope: Any, receive: Any, _send: Any) -> None:
        try:
            await self.app(scope, receive, self.send)
        except BaseException:
            self.flush_head()  # uvicorn closes the connection: after the head, as before
            raise

    async def send(self, message: Any) -> None:
        cycle = self.cycle
        head = self.head
        if head is not None:
            self.head = None
            if self._send_with_body(head, message):
                return
            if not cycle.disconnected:
                cycle.transport.write(head)
        elif (
            not cycle.response_started
            and message["type"] == "http.response.start"
            and not cycle.disconnected
            and not cycle.flow.write_paused
        ):
            transport, capture = cycle.transport, _HeadCapture()
            cycle.transport = capture  # type: ignore[assignment]
            try:
                await cycle.send(message)  # builds the head; never suspends here
            finally:
                cycle.transport = transport
            self.head = capture.head
            asyncio.get_running_loop().call_soon(self.flush_head)
            return
        await cycle.send(message)

    def _send_with_body(self, head: bytes, message: Any) -> bool:
        """Write ``head`` with ``message`` if it is the response's whole body (of the
        declared length); False (nothing written) otherwise: uvicorn handles it."""
        cycle = self.cycle
        if (
            message["type"] != "http.response.body"
            or message.get("more_body", False)
            or cycle.chunked_encoding
            or cycle.disconnected
            or cycle.flow.write_paused
            or cycle.scope["method"] == "HEAD"
        ):
            return False
        body = message.get("body", b"")
        if len(body) != cycle.expected_content_length:
            return False  # uvicorn raises its error (after the head, as it would)
        cycle.expected_content_length = 0
        if len(body) < 65536:
            cycle.transport.write(head + body)
        else:  # large: not worth a copy
            cycle.transport.writelines((head, body))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
        return True

    def flush_head(self) -> None:
        head = self.head
        if head is not None:
            self.head = None
            cycle = self.cycle
            if not cycle.disconnected and not cycle.transport.is_closing():
                cycle.transport.write(head)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests' heads wait for their bodies."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        super()._start_asgi_task(cycle, _Cork(app, cycle))  # every cycle starts here


#: The uvicorn releases whose request cycle :class:`_Cork` was checked against (it reads
#: and sets the cycle's private fields): the lock's (constraints.txt). Any other gets
#: uvicorn's own protocol, unchanged: a head and a body in two writes.
_CHECKED_UVICORN = ("0.54.",)


def http_protocol() -> type[asyncio.Protocol] | str:
    """The proxy's HTTP protocol for ``uvicorn.Config(http=...)``: the corked one with a
    uvicorn it was checked against, else uvicorn's own."""
    if uvicorn.__version__.startswith(_CHECKED_UVICORN) and hasattr(
        HttpToolsProtocol, "_start_asgi_task"
    ):
        return CorkedHttpToolsProtocol
    return "httptools"
