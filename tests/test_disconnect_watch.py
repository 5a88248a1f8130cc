"""Disconnect watches without a task per request (issue 15): with the proxy's own HTTP
protocol, a request's ``receive`` tells of its client leaving through a callback
(``on_disconnect``), so a watch costs no task awaiting ``receive()``.

Real uvicorn servers on 127.0.0.1 and real sockets: a queued request whose client
closes its socket is never sent to the replica; a watch is called for the request its
connection was carrying when it closed, never for an earlier one of a keep-alive or
pipelined connection, nor after its response; and any other protocol (or ``receive``)
still gets the task-based watch, with the same outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import uvicorn
from conftest import InProcessReplicas, async_wait_until

from shoal._config import HTTPOptions
from shoal._errors import RequestCancelledError
from shoal._proxy.exchange import DisconnectWatch, read_body, reply
from shoal._proxy.http_protocol import CorkedHttpToolsProtocol
from shoal._proxy.proxy import Proxy
from shoal._router.router import RouterRegistry
from shoal._transport.http import HttpRequestData, HttpResponseData
from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate, Request, Result

#: Generous bound for what the test expects to happen (slow shared machines).
DONE_S = 10.0
_CORKED_ONLY = pytest.mark.parametrize("http", [CorkedHttpToolsProtocol], ids=["corked"])
_BOTH = pytest.mark.parametrize(
    "http", [CorkedHttpToolsProtocol, "httptools"], ids=["corked", "uvicorn"]
)


def _post(path: str, body: bytes = b"{}") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(), len(body), body,
    )  # fmt: skip


def _receive_tasks() -> list[asyncio.Task[Any]]:
    """The tasks awaiting a uvicorn request's ``receive()`` (a task-based watch's)."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "RequestResponseCycle.receive"
    ]


@contextlib.asynccontextmanager
async def _served(app: Any, http: Any) -> AsyncIterator[tuple[uvicorn.Server, int]]:
    """``app`` served by uvicorn with protocol ``http`` on a free 127.0.0.1 port, shut
    down on leaving."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=http, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    try:
        yield server, sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(server.shutdown(), DONE_S)


async def _no_connections(server: uvicorn.Server) -> None:
    """Wait until the server saw every connection close (its ``connection_lost`` ran)."""

    async def closed() -> bool:
        return not server.server_state.connections

    await async_wait_until(closed, DONE_S, "the server to see the connection close")


async def _response(reader: asyncio.StreamReader) -> bytes:
    """The next response's status code and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DONE_S)
    lines = head.split(b"\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), DONE_S)
    return lines[0].split(b" ")[1] + b" " + body


# --- the proxy, a real server, a fake replica -------------------------------------------------


class _Stream:
    def __init__(self, replica: _Replica, request: Request) -> None:
        self.replica = replica
        self.data: HttpRequestData = request.args[0]
        self.reply: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._on_end: Any = None

    def on_end(self, callback: Any) -> None:
        self._on_end = callback

    def answer(self) -> None:
        body = self.data.path.encode()
        headers = [(b"content-length", str(len(body)).encode())]
        self.reply.set_result(Result(HttpResponseData(200, headers, body)))
        self._ended()

    def _ended(self) -> None:
        self.replica.active.remove(self)
        callback, self._on_end = self._on_end, None
        if callback is not None:
            callback()

    async def next(self) -> Result:
        return await self.reply

    def close(self) -> None:
        if not self.reply.done():  # cancelled in the replica before it answered
            self.reply.set_exception(RequestCancelledError("the stream was closed"))
            self._ended()


class _Replica(InProcessReplicas):
    """A fake replica client: records what reaches it, answers when the test says."""

    closed = False

    def __init__(self) -> None:
        self.received: list[str] = []
        self.active: list[_Stream] = []

    def stream(self, request: Request) -> _Stream:
        stream = _Stream(self, request)
        self.received.append(stream.data.path)
        self.active.append(stream)
        return stream


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[Proxy, _Replica, int]]:
    """The proxy, served by the corked protocol, routing to a replica that holds one
    request at a time (the others wait in the router's queue)."""
    replica = _Replica()
    registry = RouterRegistry(replica, asyncio.get_running_loop())  # type: ignore[arg-type]
    registry.apply(ReplicaSetUpdate("app", "D", [ReplicaInfo("r1", "-", 1)], ingress=True))
    proxy = Proxy(registry, HTTPOptions())
    proxy.set_routes({"/": ("app", "D")})
    router = registry.get("app", "D")

    async def connected() -> bool:
        return bool(router.load_sample()[1])

    await async_wait_until(connected, DONE_S, "the router connected to the fake replica")
    async with _served(proxy, CorkedHttpToolsProtocol) as (_server, port):
        yield proxy, replica, port


async def test_a_queued_request_whose_client_leaves_is_never_sent(
    proxied: tuple[Proxy, _Replica, int],
) -> None:
    proxy, replica, port = proxied
    router = proxy.registry.get("app", "D")
    clients = {}

    async def waiting(count: int) -> bool:
        return router.waiting == count and len(replica.received) == 1

    for queued, path in enumerate(("/first", "/gone", "/last")):  # in this order
        clients[path] = await asyncio.open_connection("127.0.0.1", port)
        clients[path][1].write(_post(path))
        await async_wait_until(partial(waiting, queued), DONE_S, f"{path} sent or queued")
    assert _receive_tasks() == []  # watched through the protocol: no task per request
    clients["/gone"][1].close()  # its client leaves: it leaves the queue at once
    await async_wait_until(lambda: waiting(1), DONE_S, "the abandoned request leaving")
    replica.active[0].answer()
    assert await _response(clients["/first"][0]) == b"200 /first"
    replica.active[0].answer()
    assert await _response(clients["/last"][0]) == b"200 /last"
    assert replica.received == ["/first", "/last"]
    for _reader, writer in clients.values():
        writer.close()


async def test_a_sent_request_whose_client_leaves_is_cancelled_in_the_replica(
    proxied: tuple[Proxy, _Replica, int],
) -> None:
    proxy, replica, port = proxied
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/slow"))

    async def sent() -> bool:
        return bool(replica.active)

    await async_wait_until(sent, DONE_S, "the request reaching the replica")
    stream = replica.active[0]
    # A request answered later than its watch's periods: the watch starts, without a task.
    await async_wait_until(lambda: _watched(proxy), DONE_S, "the request's watch to start")
    assert _receive_tasks() == []
    writer.close()

    async def cancelled() -> bool:
        return stream.reply.done() and stream.reply.exception() is not None

    await async_wait_until(cancelled, DONE_S, "the replica's request to be cancelled")


async def _watched(proxy: Proxy) -> bool:
    watches = proxy._watches
    return not watches._young and not watches._old


# --- an application of its own: which request's watch is called -------------------------------


class _Closed:
    """A stream that records whether its watch closed it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def close(self) -> None:
        self.event.set()


class _App:
    """``/answered...``: answered at once, its watch kept until ``release`` (a request
    whose application runs on after its response); ``/held...``: answered on
    ``release``, unless its client left first; ``/late...``: its watch starts once the
    test sets ``release`` (the client may have left by then)."""

    def __init__(self) -> None:
        self.streams: dict[str, _Closed] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.done: dict[str, asyncio.Event] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        name = scope["path"]
        stream = self.streams[name] = _Closed()
        release = self.release.setdefault(name, asyncio.Event())
        done = self.done.setdefault(name, asyncio.Event())
        await read_body(scope, receive, 1000)  # then the next message is a disconnect
        watch = DisconnectWatch(receive, stream)
        try:
            if name.startswith("/late"):
                await release.wait()
                watch.start()
                await stream.event.wait()
                return
            watch.start()
            if name.startswith("/answered"):
                await reply(send, 200, name)
                await release.wait()
                return
            ended = asyncio.ensure_future(stream.event.wait())
            released = asyncio.ensure_future(release.wait())
            await asyncio.wait((ended, released), return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            released.cancel()
            if not stream.event.is_set():
                await reply(send, 200, name)
        finally:
            watch.stop()
            done.set()


@_BOTH
async def test_a_keep_alive_connection_watches_its_current_request(http: Any) -> None:
    app = _App()
    async with _served(app, http) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/answered"))
        assert await _response(reader) == b"200 /answered"
        writer.write(_post("/held"))  # the same connection's next request
        await async_wait_until(lambda: _started(app, "/held"), DONE_S, "the second request")
        if http is CorkedHttpToolsProtocol:
            assert _receive_tasks() == []
        writer.close()
        await asyncio.wait_for(app.streams["/held"].event.wait(), DONE_S)
        await asyncio.wait_for(app.done["/held"].wait(), DONE_S)
        await _no_connections(server)
        await _release_answered(app, http)


def _answered_untold(app: _App, http: Any) -> bool:
    """Whether ``/answered``'s watch left its stream alone. Not checked with uvicorn's
    own protocol: its ``receive()`` returns once the response is complete, so the
    task-based watch of an answered request closes its stream then (which does no harm)."""
    return http is not CorkedHttpToolsProtocol or not app.streams["/answered"].event.is_set()


async def _release_answered(app: _App, http: Any) -> None:
    """Let ``/answered``'s application return; its watch must have left its stream alone."""
    app.release["/answered"].set()
    await asyncio.wait_for(app.done["/answered"].wait(), DONE_S)
    assert _answered_untold(app, http)


async def _started(app: _App, name: str) -> bool:
    return name in app.streams


@_BOTH
async def test_a_connection_closed_after_the_response_calls_nothing(http: Any) -> None:
    app = _App()
    async with _served(app, http) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/answered"))
        assert await _response(reader) == b"200 /answered"
        writer.close()  # after the response, while its application still runs (watched)
        await _no_connections(server)
        for _ in range(5):
            await asyncio.sleep(0)  # (a callback scheduled by connection_lost runs)
        assert _answered_untold(app, http)
        await _release_answered(app, http)


@_BOTH
async def test_pipelined_requests_each_get_their_own_watch(http: Any) -> None:
    app = _App()
    async with _served(app, http) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/answered") + _post("/held"))  # the second waits for the first
        assert await _response(reader) == b"200 /answered"
        await async_wait_until(lambda: _started(app, "/held"), DONE_S, "the second request")
        writer.close()
        await asyncio.wait_for(app.streams["/held"].event.wait(), DONE_S)
        await _no_connections(server)
        await _release_answered(app, http)


@_BOTH
async def test_a_watch_started_after_the_client_left_closes_the_stream(http: Any) -> None:
    app = _App()
    async with _served(app, http) as (server, port):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/late"))
        await async_wait_until(lambda: _started(app, "/late"), DONE_S, "the request")
        writer.close()
        await _no_connections(server)
        app.release["/late"].set()  # the watch starts now: the client is already gone
        await asyncio.wait_for(app.streams["/late"].event.wait(), DONE_S)
        await asyncio.wait_for(app.done["/late"].wait(), DONE_S)


@_CORKED_ONLY
async def test_a_second_watch_of_one_request_falls_back_to_a_task(http: Any) -> None:
    """One callback per request: a second watch at the same time awaits ``receive()``;
    a stopped watch's callback is never called, and no callback outlives its request."""
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await read_body(scope, receive, 1000)
        first, second, stopped = _Closed(), _Closed(), _Closed()
        watches = [DisconnectWatch(receive, s) for s in (first, second, stopped)]
        watches[2].start()
        watches[2].stop()  # (its callback freed the one slot)
        watches[0].start()
        watches[1].start()
        seen["tasks"] = len(_receive_tasks())
        await asyncio.wait_for(asyncio.gather(first.event.wait(), second.event.wait()), DONE_S)
        seen["stopped"] = stopped.event.is_set()
        for watch in watches:
            watch.stop()
        seen["receive"] = receive

    async with _served(app, http) as (server, port):
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_post("/two"))
        await async_wait_until(lambda: _has(seen, "tasks"), DONE_S, "the watches to start")
        assert seen["tasks"] == 1  # the second watch's
        writer.close()
        await async_wait_until(lambda: _has(seen, "receive"), DONE_S, "both watches called")
        assert seen["stopped"] is False
        await _no_connections(server)
        assert seen["receive"]._on_disconnect is None


async def _has(seen: dict[str, Any], key: str) -> bool:
    return key in seen
