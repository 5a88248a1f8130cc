"""Streaming responses: over HTTP (generators, StreamingResponse, SSE) and through handles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Deploy, async_wait_until, wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve


@serve.deployment
class Tokens:
    async def __call__(self, request: Request):  # type: ignore[no-untyped-def]
        n = int(request.query_params.get("n", "3"))
        marker = request.query_params.get("marker")
        try:
            for i in range(n):
                yield f"data: {i}\n\n"
                await asyncio.sleep(float(request.query_params.get("pause", "0")))
            if request.query_params.get("fail"):
                raise RuntimeError("model crashed mid-stream")
        finally:
            if marker:
                Path(marker).write_text("closed")


@serve.deployment
def records(request: Request):  # type: ignore[no-untyped-def]
    yield {"id": 1}
    yield {"id": 2}


@serve.deployment
class EventStream:
    def __call__(self, request: Request) -> StreamingResponse:
        def events() -> Iterator[str]:
            for token in ("Hello", " world"):
                yield f"data: {token}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def base(http_port: int) -> Iterator[str]:
    serve.run(Tokens.bind(), name="tokens", route_prefix="/tokens")
    serve.run(records.bind(), name="records", route_prefix="/records")
    serve.run(EventStream.bind(), name="sse", route_prefix="/sse")
    yield f"http://127.0.0.1:{http_port}"
    for name in ("tokens", "records", "sse"):
        serve.delete(name)


def test_generator_streams_chunks(base: str) -> None:
    with httpx.stream("GET", f"{base}/tokens?n=4", timeout=30) as reply:
        assert reply.headers["content-type"] == "text/plain; charset=utf-8"
        assert reply.headers.get("transfer-encoding") == "chunked"
        assert "".join(reply.iter_text()) == "".join(f"data: {i}\n\n" for i in range(4))


def test_non_text_items_stream_as_json_lines(base: str) -> None:
    reply = httpx.get(f"{base}/records", timeout=30)
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert reply.text == '{"id":1}\n{"id":2}\n'


def test_server_sent_events(base: str) -> None:
    with httpx.stream("GET", f"{base}/sse", timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert list(reply.iter_lines()) == ["data: Hello", "", "data:  world", ""]


def test_first_chunk_arrives_before_the_stream_ends(base: str) -> None:
    with httpx.stream("GET", f"{base}/tokens?n=3&pause=0.5", timeout=30) as reply:
        started = time.monotonic()
        first = next(reply.iter_text())
        assert first.startswith("data: 0")
        assert time.monotonic() - started < 0.4  # not held back until the end (1.5 s)


def test_client_disconnect_cancels_the_generator_within_a_second(base: str, tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    url = f"{base}/tokens?n=1000&pause=0.05&marker={marker}"
    with httpx.stream("GET", url, timeout=30) as reply:
        next(reply.iter_text())
    wait_until(marker.exists, 1.0, "the generator to stop within 1 s of the disconnect")


def test_failure_mid_stream_truncates_the_response(base: str) -> None:
    url = f"{base}/tokens?n=2&fail=1"
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url, timeout=30) as reply:
        list(reply.iter_text())
    assert httpx.get(f"{base}/tokens?n=1", timeout=30).text == "data: 0\n\n"  # still serving


@serve.deployment
class Producer:
    def __init__(self) -> None:
        self.produced = 0

    async def items(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            self.produced += 1
            yield i

    def count(self) -> int:
        return self.produced


async def test_slow_consumer_bounds_what_the_replica_produces(deploy: Deploy) -> None:
    handle = deploy(Producer.bind())
    stream = handle.options(stream=True).items.remote(10_000)
    assert await stream.__anext__() == 0
    # Wait for the producer to stop: its count the same over five calls in a row to its
    # replica (each call is a turn of the replica's event loop, in which a producer free
    # to run ahead would have advanced). Unbounded, it would stop only at 10,000.
    counts: list[int] = []

    async def producer_stopped() -> bool:
        counts.append(await handle.count.remote())
        return len(counts) >= 5 and len(set(counts[-5:])) == 1

    await async_wait_until(producer_stopped, 30, "the producer to stop")
    assert counts[-1] <= 200, f"replica produced {counts[-1]} items for a consumer that read 1"
    stream.cancel()


@serve.deployment(max_ongoing_requests=1)
class OneAtATime:
    def numbers(self, count: int) -> Iterator[int]:
        yield from range(count)

    def ping(self) -> str:
        return "pong"


def test_a_stream_cancelled_as_soon_as_it_is_made_releases_its_replica(deploy: Deploy) -> None:
    handle = deploy(OneAtATime.bind())
    assert handle.ping.remote().result(timeout_s=10) == "pong"  # the router is connected
    for _ in range(20):  # the cancel races the stream's opening: try it many times
        handle.options(stream=True).numbers.remote(3).cancel()
        # The replica takes one request at a time: a leaked stream would hold it for ever.
        assert handle.ping.remote().result(timeout_s=5) == "pong"
