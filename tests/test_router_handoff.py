"""The router's direct hand-off (issue 15): a reply that frees a replica's slot sends
the next waiting request to it from that same callback.

What a caller sees must not change: every request is answered exactly once, a
replica never holds more than ``max_ongoing_requests``, a waiting request whose caller
gives up never reaches the replica, and one whose deadline passes while it waits
leaves unsent. Handle and HTTP tests run real deployments; the in-loop tests drive a
router against a fake replica, so they can tell what was sent and when.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import pytest
from conftest import Deploy, InProcessReplicas, async_wait_until
from starlette.requests import Request as HttpRequest

from shoal import serve
from shoal._config import HTTPOptions
from shoal._errors import RequestTimeoutError
from shoal._proxy.proxy import Proxy
from shoal._router.router import Router, RouterRegistry
from shoal._transport.http import HttpRequestData, HttpResponseData
from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate, Request, Result

#: Generous bound for a request the test expects to finish (slow shared machines).
DONE_S = 10.0
#: Concurrent requests: many more than the replica may hold at once.
MANY = 40


@serve.deployment(max_ongoing_requests=2)
class Counted:
    """Echoes its argument and records how many requests it held at once."""

    def __init__(self) -> None:
        self.active = 0
        self.most = 0
        self.calls = 0

    async def __call__(self, value: Any) -> Any:
        if isinstance(value, HttpRequest):
            value = int(value.query_params["i"])
        self.calls += 1
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            for _ in range(3):  # a few loop turns of "work": requests overlap here
                await asyncio.sleep(0)
            return value
        finally:
            self.active -= 1

    def stats(self) -> tuple[int, int]:
        return self.calls, self.most


def test_many_handle_calls_are_each_answered_once_within_the_replicas_limit(
    deploy: Deploy,
) -> None:
    handle = deploy(Counted.bind())
    responses = [handle.remote(i) for i in range(MANY)]
    assert [response.result(timeout_s=DONE_S) for response in responses] == list(range(MANY))
    calls, most = handle.stats.remote().result(timeout_s=DONE_S)
    assert calls == MANY and most <= 2


def test_many_http_requests_are_each_answered_once_within_the_replicas_limit(
    base_url: str,
) -> None:
    name = f"handoff{os.getpid()}"
    handle = serve.run(Counted.bind(), name=name, route_prefix=f"/{name}")
    try:

        async def scenario() -> list[str]:
            async with httpx.AsyncClient(base_url=base_url, timeout=DONE_S) as client:
                replies = await asyncio.gather(
                    *(client.get(f"/{name}", params={"i": i}) for i in range(MANY))
                )
            assert {reply.status_code for reply in replies} == {200}
            return [reply.text for reply in replies]

        assert asyncio.run(scenario()) == [str(i) for i in range(MANY)]
        calls, most = handle.stats.remote().result(timeout_s=DONE_S)
        assert calls == MANY and most <= 2
    finally:
        serve.delete(name)


# --- in the loop, against a fake replica ------------------------------------------------------


class _Stream:
    """A stream whose reply the test delivers (``answer``), calling back as a socket
    stream does when its last message arrives."""

    def __init__(self, replica: _Replica, request: Request) -> None:
        self.replica = replica
        self.request = request
        self.reply: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._on_end: Any = None
        self.closed = False

    def on_end(self, callback: Any) -> None:
        self._on_end = callback

    def answer(self) -> None:
        self.replica.active.remove(self)
        value = self.request.args[0]
        if isinstance(value, HttpRequestData):  # (through the proxy: an HTTP response)
            value = HttpResponseData(200, [], value.path.encode())
        self.reply.set_result(Result(value))
        callback, self._on_end = self._on_end, None
        if callback is not None:
            callback()  # the slot frees before anyone reads the reply

    async def next(self) -> Result:
        return await self.reply

    def close(self) -> None:
        if not self.reply.done():  # cancelled in the replica before it answered
            self.replica.active.remove(self)
            self.reply.cancel()
            callback, self._on_end = self._on_end, None
            if callback is not None:
                callback()


class _Replica(InProcessReplicas):
    """A fake replica client: records what reaches it, answers when the test says."""

    closed = False

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.active: list[_Stream] = []
        self.most = 0

    def stream(self, request: Request) -> _Stream:
        self.received.append(request.args[0])
        stream = _Stream(self, request)
        self.active.append(stream)
        self.most = max(self.most, len(self.active))
        return stream


async def _router(limit: int) -> tuple[Router, _Replica]:
    replica = _Replica()
    registry = RouterRegistry(replica, asyncio.get_running_loop())  # type: ignore[arg-type]
    registry.apply(ReplicaSetUpdate("app", "D", [ReplicaInfo("r1", "-", limit)], ingress=True))
    router = registry.get("app", "D")
    router.activate()

    async def connected() -> bool:
        return bool(router.load_sample()[1])

    await async_wait_until(connected, what="the router connected to the fake replica")
    return router, replica


async def _opened(router: Router, value: Any, deadline: float | None = None) -> Any:
    stream = await router.open_stream(Request("__call__", (value,), {}), deadline)
    try:
        reply = await stream.next()
        assert isinstance(reply, Result)
        return reply.value
    finally:
        stream.close()


async def test_a_freed_slot_sends_the_next_waiting_request_in_the_same_callback() -> None:
    router, replica = await _router(limit=2)
    calls = [asyncio.ensure_future(_opened(router, i)) for i in range(MANY)]

    async def queued() -> bool:
        return router.waiting == MANY - 2

    await async_wait_until(queued, what="all but two requests waiting")
    while replica.active:
        before = len(replica.received)
        replica.active[0].answer()  # no loop turn between the reply and the next send
        assert len(replica.received) == min(before + 1, MANY)
        assert len(replica.active) <= 2
        await asyncio.sleep(0)
    assert await asyncio.gather(*calls) == list(range(MANY))
    assert replica.received == list(range(MANY)) and replica.most == 2
    assert router.waiting == 0


async def test_a_waiting_request_whose_caller_gives_up_is_never_sent() -> None:
    router, replica = await _router(limit=1)
    first = asyncio.ensure_future(_opened(router, "first"))
    gone = asyncio.ensure_future(_opened(router, "gone"))
    last = asyncio.ensure_future(_opened(router, "last"))

    async def queued() -> bool:
        return router.waiting == 2

    await async_wait_until(queued, what="two requests waiting")
    gone.cancel()  # (an HTTP client that disconnected, a handle call cancelled)
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert router.waiting == 1
    replica.active[0].answer()
    replica.active[0].answer()
    assert await asyncio.gather(first, last) == ["first", "last"]
    assert replica.received == ["first", "last"]


async def test_a_call_cancelled_after_it_was_handed_a_slot_frees_it() -> None:
    router, replica = await _router(limit=1)
    first = asyncio.ensure_future(_opened(router, "first"))
    late = asyncio.ensure_future(_opened(router, "late"))
    last = asyncio.ensure_future(_opened(router, "last"))

    async def queued() -> bool:
        return router.waiting == 2

    await async_wait_until(queued, what="two requests waiting")
    replica.active[0].answer()  # "late" is sent to the replica now...
    late.cancel()  # ...and its caller gives up before it ever ran again
    with pytest.raises(asyncio.CancelledError):
        await late
    # Its stream was closed (the replica cancels it) and the slot went to "last".
    assert replica.received == ["first", "late", "last"]
    replica.active[0].answer()
    assert await asyncio.gather(first, last) == ["first", "last"]
    assert replica.most == 1


async def test_a_waiting_requests_deadline_expires_unsent() -> None:
    router, replica = await _router(limit=1)
    first = asyncio.ensure_future(_opened(router, "first"))
    short = asyncio.ensure_future(_opened(router, "short", time.monotonic() + 0.05))
    with pytest.raises(RequestTimeoutError, match="it was not sent"):
        await asyncio.wait_for(short, DONE_S)
    assert router.waiting == 0
    replica.active[0].answer()
    assert await first == "first"
    assert replica.received == ["first"]


async def test_an_http_client_that_leaves_while_its_request_waits_is_never_sent() -> None:
    router, replica = await _router(limit=1)
    proxy = Proxy(router._registry, HTTPOptions())
    proxy.set_routes({"/": ("app", "D")})
    statuses: dict[str, int] = {}
    leaving: dict[str, asyncio.Event] = {}

    async def call(path: str) -> None:
        scope = {"type": "http", "path": path, "method": "GET", "headers": [],
                 "query_string": b""}  # fmt: skip
        messages = [{"type": "http.request", "body": b"", "more_body": False}]
        left = leaving[path] = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await left.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses[path] = message["status"]

        await proxy(scope, receive, send)

    calls = [asyncio.ensure_future(call(path)) for path in ("/first", "/gone", "/last")]

    async def waiting(count: int) -> bool:
        return router.waiting == count

    await async_wait_until(lambda: waiting(2), what="two requests waiting in the proxy")
    leaving["/gone"].set()  # its client disconnects: it leaves the queue at once
    await async_wait_until(lambda: waiting(1), what="the abandoned request leaving the queue")
    replica.active[0].answer()
    replica.active[0].answer()
    await asyncio.wait_for(asyncio.gather(*calls), DONE_S)
    assert [data.path for data in replica.received] == ["/first", "/last"]
    assert statuses == {"/first": 200, "/last": 200}
