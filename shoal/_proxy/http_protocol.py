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

The application's ``receive`` is the request's :class:`Cork`: uvicorn's ``receive``,
plus :meth:`Cork.on_disconnect`, which tells of the client leaving without a task
awaiting ``receive()`` (what :class:`shoal._proxy.exchange.DisconnectWatch` uses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
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


class Cork:
    """A request's application, given a ``send`` that holds the response's head until
    its body (or the loop turn's end), and this object as its ``receive``. A wrapper,
    not a subclass of uvicorn's cycle: a cycle whose class changed after it was made
    loses CPython's fast attribute access (its attributes were laid out for the old
    class), in uvicorn's code too."""

    __slots__ = ("_on_disconnect", "app", "cycle", "head", "start")

    def __init__(self, app: Any, cycle: RequestResponseCycle) -> None:
        self.app = app
        self.cycle = cycle
        self.head: bytes | None = None  # the response's head, built but not written yet
        self._on_disconnect: Callable[[], object] | None = None
        #: The first message the application sent (None: none yet): its status and
        #: request id, for what the proxy records (``shoal._proxy.observe``).
        self.start: Any = None

    async def run(self, scope: Any, _receive: Any, _send: Any) -> None:
        """The application uvicorn runs for this request."""
        try:
            await self.app(scope, self, self.send)
        except BaseException:
            self.flush_head()  # uvicorn closes the connection: after the head, as before
            raise
        finally:
            self._on_disconnect = None  # no callback outlives its request's application

    def __call__(self) -> Coroutine[Any, Any, Any]:
        """The application's ``receive``: uvicorn's."""
        return self.cycle.receive()

    def on_disconnect(self, callback: Callable[[], object]) -> bool:
        """Call ``callback`` once if the client disconnects before this request's
        response is complete (when uvicorn marks its cycle ``disconnected``; soon if it
        already has), unless :meth:`forget_disconnect` comes first. It runs from the
        event loop, never inside this call or uvicorn's ``connection_lost``.

        False (nothing registered: the caller watches ``receive()`` itself) if another
        callback is registered. A pipelined request that runs while a later one was
        read is not told, as uvicorn does not mark it (its ``receive()`` never returns).
        """
        if self._on_disconnect is not None:
            return False
        self._on_disconnect = callback
        if self.cycle.disconnected:
            asyncio.get_running_loop().call_soon(self.disconnected)
        return True

    def forget_disconnect(self, callback: Callable[[], object]) -> None:
        """Unregister ``callback`` (if it is the one registered): it is not called."""
        if self._on_disconnect == callback:  # (bound methods are equal, not identical)
            self._on_disconnect = None

    def disconnected(self) -> None:
        """The client left: call the registered callback, if any (once)."""
        callback = self._on_disconnect
        if callback is not None:
            self._on_disconnect = None
            callback()

    async def send(self, message: Any) -> None:
        if self.start is None:
            self.start = message
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
    """uvicorn's httptools protocol whose requests' heads wait for their bodies, and
    whose requests can be told of their client leaving (:meth:`Cork.on_disconnect`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cork: Cork | None = None  # the request started last on this connection

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cork = self._cork = Cork(app, cycle)
        super()._start_asgi_task(cycle, cork.run)  # every cycle starts here

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        cork, self._cork = self._cork, None
        # Only a request uvicorn marked (the current one, its response incomplete): not
        # an earlier one of this keep-alive connection, nor one answered already.
        if cork is not None and cork.cycle.disconnected and cork._on_disconnect is not None:
            self.loop.call_soon(cork.disconnected)


#: The uvicorn releases whose request cycle :class:`Cork` was checked against (it reads
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
