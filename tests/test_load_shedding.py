"""Load shedding (issue 11 §1): bounded queues, abandoned work, no replica to serve.

A ``Gate`` replica holds every call until the test opens it (``release``, sent
with ``broadcast``, which bypasses the queue), and counts the calls it received,
so a test can tell a request that was refused or abandoned from one that ran.
Handle tests run on both runtimes; HTTP tests use the session's proxy, or a child
driver for the proxy-wide option.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Deploy, run_driver, wait_until

from shoal import serve
from shoal._errors import BackPressureError, DeploymentUnavailableError, RequestCancelledError

#: "At once": a refusal must arrive well within this (measured: a few ms).
AT_ONCE_S = 0.1
#: Generous bound for a request the test expects to finish (slow shared machines).
DONE_S = 10.0


@serve.deployment(max_ongoing_requests=2, max_queued_requests=3)
class Gate:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self, value: Any = None) -> str:
        self.calls += 1
        await self.gate.wait()
        return "ok"

    async def release(self) -> None:
        self.gate.set()

    async def count(self) -> int:
        return self.calls


def _calls(handle: Any) -> int:
    return sum(handle.count.broadcast().result(timeout_s=DONE_S).values())


def _release(handle: Any) -> None:
    handle.release.broadcast().result(timeout_s=DONE_S)


def _ready(handle: Any) -> None:
    """Make the caller's router connect before the test measures anything."""
    assert _calls(handle) == 0


# --- max_queued_requests through handles -------------------------------------------------------


def test_requests_beyond_the_queue_get_backpressure_at_once(deploy: Deploy) -> None:
    handle = deploy(Gate.bind())
    _ready(handle)
    started = time.perf_counter()
    responses = [handle.remote(i) for i in range(8)]  # 2 run, 3 wait, 3 are refused
    refusals = []
    for response in responses[5:]:
        with pytest.raises(BackPressureError) as refused:
            response.result(timeout_s=DONE_S)
        refusals.append(time.perf_counter() - started)
    assert max(refusals) < AT_ONCE_S, f"refused after {max(refusals) * 1000:.1f} ms"
    error = refused.value
    assert (error.num_queued_requests, error.max_queued_requests) == (3, 3)
    assert "deployment 'Gate'" in str(error) and "max_queued_requests=3" in str(error)
    assert "retry later" in str(error)
    assert _calls(handle) == 2  # the queued ones wait here, not on the replica
    _release(handle)
    assert [r.result(timeout_s=DONE_S) for r in responses[:5]] == ["ok"] * 5
    assert _calls(handle) == 5


def test_a_cancelled_or_timed_out_response_leaves_the_queue(deploy: Deploy) -> None:
    handle = deploy(Gate.options(max_queued_requests=1).bind())
    _ready(handle)
    running = [handle.remote(i) for i in range(2)]
    cancelled = handle.remote("cancelled")  # waits: the queue is full now
    cancelled.cancel()
    # A cancel from another thread reaches the router's loop after the request itself;
    # this round trip through that loop makes sure both arrived (and nothing ran).
    assert _calls(handle) == 2
    timed_out = handle.remote("timed out")  # accepted: the cancelled one left the queue

    async def wait_briefly() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(timed_out, 0.05)

    asyncio.run(wait_briefly())
    last = handle.remote("last")  # accepted: the timed-out one left the queue too
    with pytest.raises(BackPressureError):  # and the queue counts exactly: it is full again
        handle.remote("one too many").result(timeout_s=DONE_S)
    _release(handle)
    assert [r.result(timeout_s=DONE_S) for r in [*running, last]] == ["ok"] * 3
    with pytest.raises(RequestCancelledError):
        cancelled.result(timeout_s=DONE_S)
    assert _calls(handle) == 3  # neither abandoned request reached the replica


# --- no replica able to serve --------------------------------------------------------------


def test_without_replicas_a_request_fails_after_no_replica_timeout_s(deploy: Deploy) -> None:
    handle = deploy(Gate.options(num_replicas=0, no_replica_timeout_s=0.3).bind())
    started = time.perf_counter()
    with pytest.raises(DeploymentUnavailableError) as unavailable:
        handle.remote().result(timeout_s=DONE_S)
    waited = time.perf_counter() - started
    # The router counts a waiter within 1 ms of its limit as expired (timers may fire that
    # early), and it and this test read different clocks: 0.3 s less that slack. Above:
    # failed by the limit, well before the caller's own DONE_S (a shared 2-core CI run,
    # the other worker starting Ray, took 1.49 s from the call to the error).
    assert 0.3 - 0.002 <= waited < DONE_S / 2, waited
    message = str(unavailable.value)
    assert "deployment 'Gate'" in message and "no_replica_timeout_s=0.3" in message
    # The time it waited: at least the limit, at most what this test saw (a loaded machine
    # fires the timer late: a CI run waited 0.437 s).
    said = re.search(r"for ([0-9.]+) s", message)
    assert said is not None and 0.3 - 0.002 <= float(said.group(1)) <= waited + 0.001, message


# --- over HTTP, through the session's proxy ----------------------------------------------------


def _serve_http(app: Any, name: str) -> tuple[Any, str]:
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    return handle, f"/{name}"


async def _get(client: httpx.AsyncClient, path: str) -> tuple[int, float, httpx.Response]:
    started = time.perf_counter()
    reply = await client.get(path)
    return reply.status_code, time.perf_counter() - started, reply


def test_http_requests_beyond_the_queue_get_503_at_once(base_url: str) -> None:
    name = f"shed{os.getpid()}"
    handle, path = _serve_http(Gate.bind(), name)
    try:

        async def burst() -> list[tuple[int, float, httpx.Response]]:
            async with httpx.AsyncClient(base_url=base_url, timeout=DONE_S) as client:
                await client.get("/-/healthz")
                tasks = [asyncio.ensure_future(_get(client, path)) for _ in range(8)]
                done = await _wait_for(tasks, 3)  # the refused ones, before any release
                await asyncio.to_thread(_release, handle)
                await asyncio.gather(*tasks)
                assert len(done) == 3
                return [t.result() for t in tasks]

        replies = asyncio.run(burst())
        refused = [(t, r) for status, t, r in replies if status == 503]
        assert sorted(status for status, _, _ in replies) == [200] * 5 + [503] * 3
        # At once: the three refusals arrived while the five others were still held (burst()
        # saw them done before it released the Gate). No bound in seconds here: these
        # include eight new connections to a proxy that, with the suite on two workers,
        # shares two cores with another module's servers (a CI run saw 1.8 s).
        reply = refused[0][1]
        assert reply.headers["retry-after"] == "1"
        assert len(reply.headers["x-request-id"]) == 32  # an answer of the proxy has one too
        assert f"too many requests are queued for application '{name}'" in reply.text
        assert _calls(handle) == 5
    finally:
        serve.delete(name)


async def _wait_for(tasks: list[asyncio.Future[Any]], count: int) -> list[Any]:
    """The tasks done once ``count`` of them are (the others are held by the Gate)."""
    deadline = time.monotonic() + DONE_S
    while sum(task.done() for task in tasks) < count:
        assert time.monotonic() < deadline, f"fewer than {count} requests were answered"
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # any further answer would be a bug: let it show
    return [task for task in tasks if task.done()]


def test_a_disconnected_clients_queued_request_never_reaches_the_replica(
    base_url: str, http_port: int
) -> None:
    name = f"gone{os.getpid()}"
    handle, path = _serve_http(Gate.options(max_queued_requests=1).bind(), name)
    request = f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
    try:

        async def scenario() -> list[int]:
            async with httpx.AsyncClient(base_url=base_url, timeout=DONE_S) as client:
                running = [asyncio.ensure_future(client.get(path)) for _ in range(2)]
                await asyncio.to_thread(wait_until, lambda: _calls(handle) == 2)
                _, writer = await asyncio.open_connection("127.0.0.1", http_port)
                writer.write(request)  # queued in the proxy: both replica slots are busy
                await writer.drain()
                await asyncio.sleep(0.1)
                writer.close()  # the client leaves while its request waits
                await asyncio.sleep(0.1)
                # The queue (max 1) has room again: this one waits instead of a 503.
                last = asyncio.ensure_future(client.get(path))
                await asyncio.sleep(0.1)
                await asyncio.to_thread(_release, handle)
                replies = await asyncio.gather(*running, last)
                return [reply.status_code for reply in replies]

        assert asyncio.run(scenario()) == [200, 200, 200]
        assert _calls(handle) == 3  # the abandoned request never ran
    finally:
        serve.delete(name)


def test_http_without_replicas_gets_503_after_no_replica_timeout_s(base_url: str) -> None:
    name = f"none{os.getpid()}"
    _serve_http(Gate.options(num_replicas=0, no_replica_timeout_s=0.3).bind(), name)
    try:
        started = time.perf_counter()
        reply = httpx.get(f"{base_url}/{name}", timeout=DONE_S)
        waited = time.perf_counter() - started
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert f"application '{name}' has no replica able to serve" in reply.text
        # The router's 1 ms timer slack, and two clocks (see the handle's test above).
        assert 0.3 - 0.002 <= waited < 0.3 + 1.0, waited
    finally:
        serve.delete(name)


# --- the proxy's own cap, in a child driver (its own proxy and options) -----------------------


def test_the_proxy_refuses_beyond_its_max_ongoing_requests(tmp_path: Path) -> None:
    result = run_driver(tmp_path, PROXY_CAP_DRIVER)
    assert result.stdout.split() == ["200", "200", "503", "503", "1", "2"], result.stdout


PROXY_CAP_DRIVER = """
import asyncio, sys, httpx
from conftest import wait_until
from shoal import serve
from test_load_shedding import Gate, _release, _calls

port = int(sys.argv[1])
serve.start(http_options={"port": port, "max_ongoing_requests": 2})
handle = serve.run(Gate.options(max_queued_requests=-1).bind(), route_prefix="/")

async def main():
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        held = [asyncio.ensure_future(client.get("/")) for _ in range(2)]
        await asyncio.to_thread(wait_until, lambda: _calls(handle) == 2)
        refused = [await client.get("/") for _ in range(2)]  # the proxy holds 2 already
        await asyncio.to_thread(_release, handle)
        return [await r for r in held] + refused

replies = asyncio.run(main())
print(*[reply.status_code for reply in replies], replies[-1].headers["retry-after"])
print(_calls(handle))
serve.shutdown()
"""


def test_changing_the_queue_limit_keeps_the_replicas_and_applies_at_once(deploy: Deploy) -> None:
    handle = deploy(Gate.bind(), name="requeue")
    before = serve.status().applications["requeue"].deployments["Gate"].replicas
    handle = deploy(Gate.options(max_queued_requests=1, no_replica_timeout_s=5).bind(),
                    name="requeue")  # fmt: skip
    after = serve.status().applications["requeue"].deployments["Gate"].replicas
    assert [r.replica_id for r in after] == [r.replica_id for r in before]  # not replaced
    _ready(handle)
    responses = [handle.remote(i) for i in range(3)]  # 2 run, 1 waits
    with pytest.raises(BackPressureError) as refused:
        handle.remote("one too many").result(timeout_s=DONE_S)
    assert refused.value.max_queued_requests == 1
    _release(handle)
    assert [r.result(timeout_s=DONE_S) for r in responses] == ["ok"] * 3
