"""The proxy's cheaper hot path keeps its behaviour: the corked HTTP protocol puts the same
bytes on the wire as uvicorn's, and disconnect watches start late, together, or not at all."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from conftest import async_wait_until

from shoal._proxy.exchange import DisconnectWatches
from shoal._proxy.http_protocol import CorkedHttpToolsProtocol

_GET = b"GET /%s HTTP/1.1\r\nhost: t\r\n\r\n"
_CLOSE = b"GET /%s HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """One response per path: what the proxy and its error paths send."""
    if scope["type"] != "http":
        return
    name = scope["path"].strip("/")
    start = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
    if name == "whole":
        start["headers"].append((b"content-length", b"5"))
        await send(start)
        await send({"type": "http.response.body", "body": b"hello"})
    elif name == "chunked":  # no content-length: uvicorn chunks the body
        await send(start)
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"cd"})
    elif name == "short":  # fewer bytes than declared: uvicorn's error, after the head
        start["headers"].append((b"content-length", b"9"))
        await send(start)
        await send({"type": "http.response.body", "body": b"abc"})
    elif name == "raises":  # fails once started: the head, then the connection closes
        await send(start)
        raise RuntimeError("failed mid-response")
    elif name == "close":
        start["headers"] += [(b"content-length", b"2"), (b"connection", b"close")]
        await send(start)
        await send({"type": "http.response.body", "body": b"ok"})


async def _serve(http: Any, app: Any = _app) -> tuple[uvicorn.Server, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=http, lifespan="off", log_level="critical", server_header=False,
        date_header=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    return server, sock.getsockname()[1]


async def _exchange(port: int, request: bytes) -> bytes:
    """What the server sends until it closes the connection or stays quiet for 0.3 s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 0.3):
            received += chunk
    except TimeoutError:
        pass
    writer.close()
    return received


async def test_corked_protocol_sends_uvicorns_bytes() -> None:
    plain, plain_port = await _serve("httptools")
    corked, corked_port = await _serve(CorkedHttpToolsProtocol)
    try:
        for name in (b"whole", b"chunked", b"short", b"raises", b"close"):
            request = _GET % name
            expected = await _exchange(plain_port, request)
            assert expected.startswith(b"HTTP/1.1 ")
            assert await _exchange(corked_port, request) == expected, name
        pipelined = _GET % b"whole" + b"HEAD /whole HTTP/1.1\r\nhost: t\r\n\r\n" + _GET % b"whole"
        assert await _exchange(corked_port, pipelined) == await _exchange(plain_port, pipelined)
    finally:
        for server in (plain, corked):
            server.should_exit = True
            await server.shutdown()


async def test_a_streamed_head_is_not_held_back() -> None:
    """The head of a response whose body comes later reaches the client at once."""
    release = asyncio.Event()

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await release.wait()
            await send({"type": "http.response.body", "body": b"late"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(streaming, http=CorkedHttpToolsProtocol, lifespan="off",
                            log_level="critical")  # fmt: skip
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        writer.write(_GET % b"s")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
        release.set()
        assert (
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2.0) == b"4\r\nlate\r\n0\r\n\r\n"
        )
        writer.close()
    finally:
        server.should_exit = True
        await server.shutdown()


class _Stream:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _CountedWatches(DisconnectWatches):
    """Counts its ticks, so the test speaks in periods rather than in wall-clock time
    (which a loaded machine stretches)."""

    def __init__(self, period_s: float) -> None:
        super().__init__(period_s)
        self.ticks = 0

    def _tick(self) -> None:
        self.ticks += 1
        super()._tick()


async def test_disconnect_watches_start_after_one_to_two_periods() -> None:
    watches = _CountedWatches(period_s=0.02)
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    quick, slow = _Stream(), _Stream()
    answered = watches.watch(receive, quick)
    running = watches.watch(receive, slow)
    answered.stop()  # answered at once: never watched
    left.set()  # the client leaves before any watch started: nothing notices yet

    async def ticked_once() -> bool:
        return watches.ticks >= 1

    async def slow_closed() -> bool:
        return slow.closed

    await async_wait_until(ticked_once, timeout_s=5, what="the first tick")
    assert not slow.closed  # one period: the watch is only aged
    await async_wait_until(slow_closed, timeout_s=5, what="the running request's watch")
    assert watches.ticks == 2  # the second tick started it, and it saw the client gone
    assert not quick.closed
    assert watches._timer is None  # nothing left to watch: no timer runs
    running.stop()


async def test_a_watch_started_at_once_closes_the_stream_when_the_client_leaves() -> None:
    watches = DisconnectWatches()
    left = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await left.wait()
        return {"type": "http.disconnect"}

    stream = _Stream()
    watch = watches.watch(receive, stream)
    watch.start()  # a streamed response: watched from now on
    left.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert stream.closed
    watch.stop()
    assert watches._timer is not None  # (its tick finds the set empty and stops)


def test_the_locked_uvicorn_gets_the_corked_protocol() -> None:
    """The lock's uvicorn is the one ``Cork`` was checked against; a lock that moves to
    another release fails here until ``_CHECKED_UVICORN`` names it (after this module's
    byte-for-byte tests pass with it): any other release gets uvicorn's own protocol."""
    from shoal._proxy.http_protocol import http_protocol

    assert http_protocol() is CorkedHttpToolsProtocol


async def test_a_replica_slot_is_free_as_soon_as_the_last_reply_arrives() -> None:
    """The router's count of a replica's requests drops when the replica's last message
    arrives, before the consumer reads it (the next waiting request goes a loop turn
    sooner), and exactly once, however the stream then ends."""
    from shoal._router.router import _CountedStream
    from shoal._transport.client import SocketStream
    from shoal._transport.connection import Connection, StreamReceiver
    from shoal._transport.messages import Result, StreamEnd, StreamItem

    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_unix_connection(Connection, sock=a)
    b.close()  # (the peer is never written to: messages are pushed as they would arrive)
    released: list[int] = []
    receiver = StreamReceiver(conn, 1)
    counted = _CountedStream(
        SocketStream(conn, 1, receiver), lambda: released.append(1), None, None
    )
    receiver.push(StreamItem(b"part"))
    assert released == []  # a stream item: the replica is still working
    receiver.push(StreamEnd())
    assert released == [1]  # freed on arrival, nothing read yet
    assert type(await counted.next()) is StreamItem
    assert type(await counted.next()) is StreamEnd
    counted.close()
    assert released == [1]

    closed_early = StreamReceiver(conn, 2)
    counted = _CountedStream(
        SocketStream(conn, 2, closed_early), lambda: released.append(2), None, None
    )
    counted.close()  # the consumer gave up before any reply: freed once, at close
    closed_early.push(Result("late"))
    assert released == [1, 2]
    conn.close()


async def test_the_proxy_records_each_response_status_under_either_protocol() -> None:
    """What the proxy records (metrics, access lines) takes the response's status from
    the corked protocol's ``Cork.start`` or, under uvicorn's own protocol, from a
    ``send`` that keeps it: the same statuses either way, 0 (499) for no response."""
    from shoal._observe.metrics import snapshot
    from shoal._proxy.metrics import ProxyMetrics
    from shoal._proxy.observe import observed

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status = int(scope["path"].strip("/"))
        if status == 499:
            raise RuntimeError("no response")  # uvicorn answers 500; the proxy saw none
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    def route(protocol: str) -> tuple[str, str, str]:
        return ("/", f"fast-path-{protocol}", "ingress")

    def counts(protocol: str) -> dict[str, float]:
        families, _ = snapshot()
        (latency,) = [f for f in families if f[0] == "ray_serve_http_request_latency_ms"]
        return {
            dict(labels)["status_code"]: value
            for name, labels, value in latency[3]
            if name.endswith("_count") and dict(labels)["application"] == route(protocol)[1]
        }

    for name, protocol in (("corked", CorkedHttpToolsProtocol), ("plain", "httptools")):
        metrics = ProxyMetrics("node", "127.0.0.1", lambda: 0)
        served = observed(app, lambda _path, n=name: route(n), metrics, None)
        server, port = await _serve(protocol, served)
        try:
            for status in (200, 200, 404, 503, 499):
                request = _CLOSE % str(status).encode()  # (answered, the connection ends)
                reply = await _exchange(port, request)
                assert reply.startswith(b"HTTP/1.1 %d" % (500 if status == 499 else status))
        finally:
            server.should_exit = True
            await server.shutdown()
        assert counts(name) == {"200": 2.0, "404": 1.0, "503": 1.0, "499": 1.0}, name
