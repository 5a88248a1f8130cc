"""Request priorities (issue 11 §2): higher classes leave queues first, FIFO within a class.

A ``Gate`` replica (``max_ongoing_requests=1``) records the order in which requests
reach it and holds each one until the test opens it (``release``, sent with
``broadcast``, which bypasses the queue): requests sent while it holds the first one
wait in the caller's router, and the recorded order is the order they left it.
Handle tests run on both runtimes; HTTP tests use the session's proxy; the proxy's
own queue and the batcher's are tested in asyncio, without processes.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import pickle
import time
from collections.abc import Coroutine
from typing import Any

import httpx
import pytest
from conftest import Deploy, InProcessReplicas, async_wait_until, wait_until
from starlette.requests import Request

from shoal import serve
from shoal._api.context import RequestContext, get_request_context, request_context
from shoal._api.handle import DeploymentHandle
from shoal._config import HTTPOptions
from shoal._errors import (
    BackPressureError,
    ConfigError,
    DeploymentUnavailableError,
    RequestTimeoutError,
)
from shoal._proxy.proxy import Proxy
from shoal._router.router import RouterRegistry
from shoal._transport.http import HttpResponseData
from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate, Result

#: Generous bound for a request the test expects to finish (slow shared machines).
DONE_S = 10.0
#: A deadline or timeout short enough to keep the tests fast.
SHORT_S = 0.3
#: How late past its deadline a call may fail on a slow shared machine.
LATE_S = 2.0
_TIMER_SLACK_S = 0.002  # how early an event loop's timer may fire by our clock
#: Queued in this order while the Gate is held: (priority, tag).
ARRIVALS = [("low", "l1"), ("normal", "n1"), ("high", "h1"),
            ("low", "l2"), ("high", "h2"), ("normal", "n2")]  # fmt: skip
#: The order they must leave the queue: by class, then in arrival order.
SERVED = ["h1", "h2", "n1", "n2", "l1", "l2"]
#: Runs a ``deploy`` test on the in-process runtime only.
LOCAL = pytest.mark.parametrize("deploy", ["inprocess"], indirect=True)


@serve.deployment(max_ongoing_requests=1)
class Gate:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.order: list[Any] = []

    async def __call__(self, tag: Any = None) -> Any:
        self.order.append(tag)
        await self.gate.wait()
        return tag

    async def release(self) -> None:
        self.gate.set()

    async def served(self) -> list[Any]:
        return self.order


def _served(gate: Any) -> list[Any]:
    return [tag for order in gate.served.broadcast().result(timeout_s=DONE_S).values()
            for tag in order]  # fmt: skip


def _release(gate: Any) -> None:
    gate.release.broadcast().result(timeout_s=DONE_S)


def _held(gate: Any) -> Any:
    """Send a request that takes the Gate's only slot; returns its response."""
    holder = gate.remote("hold")
    wait_until(lambda: _served(gate) == ["hold"], what="the Gate holding its first request")
    return holder


# --- through handles --------------------------------------------------------------------------


def test_waiting_requests_leave_by_class_then_in_arrival_order(deploy: Deploy) -> None:
    gate = deploy(Gate.bind())
    holder = _held(gate)
    # Sent from this thread in this order, they reach the router's loop (and its queue) in
    # this order, all before the release below.
    responses = [gate.options(priority=priority).remote(tag) for priority, tag in ARRIVALS]
    _release(gate)
    assert holder.result(timeout_s=DONE_S) == "hold"
    assert [r.result(timeout_s=DONE_S) for r in responses] == [tag for _, tag in ARRIVALS]
    assert _served(gate) == ["hold", *SERVED]


@LOCAL  # the router's own logic: the multi-process runtime adds nothing but time
def test_a_full_queue_pushes_out_its_newest_lower_priority_request(deploy: Deploy) -> None:
    gate = deploy(Gate.options(max_queued_requests=2).bind())
    holder = _held(gate)
    low = gate.options(priority="low")
    first, newest = low.remote("l1"), low.remote("l2")  # the queue is full now
    high = gate.options(priority="high").remote("h1")  # takes the place of l2
    refused = low.remote("l3")  # full, and nothing of lower priority to push out
    with pytest.raises(BackPressureError) as pushed_out:
        newest.result(timeout_s=DONE_S)
    assert "pushed out of the queue by a high-priority request" in str(pushed_out.value.__notes__)
    with pytest.raises(BackPressureError) as full:
        refused.result(timeout_s=DONE_S)
    assert "max_queued_requests=2" in str(full.value)
    _release(gate)
    assert [r.result(timeout_s=DONE_S) for r in (holder, high, first)] == ["hold", "h1", "l1"]
    assert _served(gate) == ["hold", "h1", "l1"]  # the refused requests were never sent


@serve.deployment
class Down:
    async def __call__(self) -> str:
        return get_request_context().priority


@serve.deployment
class Up:
    def __init__(self, down: Any) -> None:
        self.down = down

    async def __call__(self, own: str | None = None) -> tuple[str, str]:
        """Up's priority, and Down's when Up calls it with priority ``own`` (None: inherited)."""
        return get_request_context().priority, await self.down.options(priority=own).remote()


def test_a_downstream_call_inherits_the_priority_unless_its_handle_sets_one(
    deploy: Deploy,
) -> None:
    up = deploy(Up.bind(Down.bind()))
    assert up.remote().result(timeout_s=DONE_S) == ("normal", "normal")
    assert up.options(priority="high").remote().result(timeout_s=DONE_S) == ("high", "high")
    assert up.options(priority="low").remote().result(timeout_s=DONE_S) == ("low", "low")
    assert up.options(priority="low").remote("high").result(timeout_s=DONE_S) == ("low", "high")
    assert get_request_context().priority == "normal"  # outside a request


def test_without_replicas_requests_of_every_class_fail_after_no_replica_timeout_s(
    deploy: Deploy,
) -> None:
    gate = deploy(Gate.options(num_replicas=0, no_replica_timeout_s=SHORT_S).bind())
    started = time.perf_counter()
    responses = [gate.options(priority=p).remote() for p in ("low", "high", "normal", "low")]
    for response in responses:
        with pytest.raises(DeploymentUnavailableError, match="no_replica_timeout_s"):
            response.result(timeout_s=DONE_S)
    waited = time.perf_counter() - started
    # The loop's timers count from the time its iteration began (uvloop: whole
    # milliseconds), which can precede the call: a CI run measured 0.29999 s.
    assert SHORT_S - _TIMER_SLACK_S <= waited < SHORT_S + LATE_S, waited


@LOCAL
def test_a_queued_request_of_any_class_leaves_at_its_deadline(deploy: Deploy) -> None:
    gate = deploy(Gate.bind())
    holder = _held(gate)
    started = time.perf_counter()
    high = gate.options(priority="high", timeout_s=SHORT_S).remote("h1")
    low = gate.options(priority="low").remote("l1")
    with pytest.raises(RequestTimeoutError, match="while it waited for a replica"):
        high.result(timeout_s=DONE_S)
    took = time.perf_counter() - started
    assert SHORT_S - 0.01 <= took < SHORT_S + LATE_S, took
    _release(gate)
    assert [r.result(timeout_s=DONE_S) for r in (holder, low)] == ["hold", "l1"]
    assert _served(gate) == ["hold", "l1"]  # the expired request never reached the replica


def test_an_invalid_priority_is_refused_and_a_valid_one_is_kept_by_copies_and_pickles() -> None:
    handle = DeploymentHandle("Gate", "app")
    for bad in ("urgent", "", 1, True):
        with pytest.raises(ConfigError) as refused:
            handle.options(priority=bad)
        assert repr(bad) in str(refused.value)
        assert "'high', 'normal', 'low'" in str(refused.value)
    low = handle.options(priority="low")
    assert low != handle and low.options(priority=None) == handle
    assert low.served == low.options(method_name="served")  # a method keeps the priority
    assert pickle.loads(pickle.dumps(low.served)) == low.served != handle.served


# --- over HTTP: the x-request-priority header ---------------------------------------------------


@serve.deployment(max_ongoing_requests=16)
class Front:
    """An ingress that passes each HTTP request on to the Gate (its priority inherited)."""

    def __init__(self, gate: Any) -> None:
        self.gate = gate
        self.entered = 0

    async def __call__(self, request: Request) -> Any:
        tag = request.query_params.get("tag")
        if tag is None:
            return get_request_context().priority
        response = self.gate.remote(tag)  # queued in this replica's router, in call order
        self.entered += 1
        return await response

    async def count(self) -> int:
        return self.entered


def test_the_priority_header_orders_the_queue_and_travels_with_the_request(
    base_url: str,
) -> None:
    name = f"prio{os.getpid()}"
    front = serve.run(Front.bind(Gate.bind()), name=name, route_prefix=f"/{name}")
    gate = serve.get_deployment_handle("Gate", name)
    entered = front.count.broadcast

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=DONE_S) as client:
            replies = [asyncio.ensure_future(client.get(f"/{name}", params={"tag": "hold"}))]
            for count, (priority, tag) in enumerate(ARRIVALS, start=1):
                await asyncio.to_thread(wait_until, lambda n=count: _served(gate) == ["hold"]
                                        and sum(entered().result().values()) == n)  # fmt: skip
                headers = {"x-request-priority": priority}
                replies.append(asyncio.ensure_future(
                    client.get(f"/{name}", params={"tag": tag}, headers=headers)))  # fmt: skip
            await asyncio.to_thread(wait_until, lambda: sum(entered().result().values()) == 7)
            await asyncio.to_thread(_release, gate)
            return [reply.text for reply in await asyncio.gather(*replies)]

    try:
        assert asyncio.run(scenario()) == ["hold"] + [tag for _, tag in ARRIVALS]
        assert _served(gate) == ["hold", *SERVED]
        priority = httpx.get(f"{base_url}/{name}", headers={"x-request-priority": "High"})
        assert (priority.status_code, priority.text) == (200, "high")  # in any case
        assert httpx.get(f"{base_url}/{name}").text == "normal"
        refused = httpx.get(f"{base_url}/{name}", headers={"x-request-priority": "urgent"})
        assert refused.status_code == 400
        assert refused.text == (
            "Invalid x-request-priority header 'urgent': use one of 'high', 'normal', 'low'."
        )
    finally:
        serve.delete(name)


class _Replica(InProcessReplicas):
    """A fake replica for the proxy's router: records the order requests reach it and
    holds every response until ``gate`` is set."""

    closed = False

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.order: list[tuple[str, int]] = []

    def stream(self, request: Any) -> Any:
        self.order.append((request.args[0].path, request.priority))
        return self

    async def next(self) -> Result:
        await self.gate.wait()
        return Result(HttpResponseData(200, [], b"ok"))


async def test_the_proxy_queues_a_request_in_the_class_its_header_names() -> None:
    replica = _Replica()
    registry = RouterRegistry(replica, asyncio.get_running_loop())  # type: ignore[arg-type]
    registry.apply(ReplicaSetUpdate("app", "Front", [ReplicaInfo("r1", "-", 1)], ingress=True))
    router = registry.get("app", "Front")
    proxy = Proxy(registry, HTTPOptions())
    proxy.set_routes({"/": ("app", "Front")})

    async def connected() -> bool:
        return bool(router.load_sample()[1])

    await async_wait_until(connected, what="the router connected to the fake replica")

    def call(path: str, priority: str | None) -> asyncio.Future[None]:
        headers = [] if priority is None else [(b"x-request-priority", priority.encode())]
        scope = {"type": "http", "path": path, "method": "GET", "headers": headers,
                 "query_string": b""}  # fmt: skip
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError("unreachable")

        async def send(_message: dict[str, Any]) -> None:
            pass

        return asyncio.ensure_future(proxy(scope, receive, send))

    calls = [call("/hold", None)]
    for waiting, (priority, tag) in enumerate([(None, "n0"), *ARRIVALS]):
        calls.append(call(f"/{tag}", priority))

        async def queued(n: int = waiting + 1) -> bool:
            return router.waiting == n

        await async_wait_until(queued, what=f"{tag} queued in the proxy")
    replica.gate.set()
    await asyncio.wait_for(asyncio.gather(*calls), DONE_S)
    ranks = {"/n0": 1, "/hold": 1, "/h1": 0, "/h2": 0, "/n1": 1, "/n2": 1, "/l1": 2, "/l2": 2}
    expected = ["/hold", "/h1", "/h2", "/n0", "/n1", "/n2", "/l1", "/l2"]
    assert replica.order == [(path, ranks[path]) for path in expected]


# --- the batcher's queue ------------------------------------------------------------------------


class Batched:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.priorities: list[str] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=DONE_S)
    async def echo(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        self.priorities.append(get_request_context().priority)
        return xs


def _in_request(call: Coroutine[Any, Any, Any], priority: str) -> asyncio.Task[Any]:
    """Run ``call`` as a replica runs a request of ``priority``."""
    context = contextvars.copy_context()
    context.run(request_context.set, RequestContext(priority=priority))
    return asyncio.get_running_loop().create_task(call, context=context)


async def test_a_batch_takes_higher_priority_callers_first() -> None:
    model = Batched()
    priorities = ["low", "low", "high", "normal", "high", "normal"]
    calls = [_in_request(model.echo(i), p) for i, p in enumerate(priorities)]
    assert await asyncio.wait_for(asyncio.gather(*calls), DONE_S) == list(range(6))
    assert model.batches == [[2, 4], [3, 5], [0, 1]]
    # A batch runs in its first caller's context: its handle calls get the highest priority.
    assert model.priorities == ["high", "normal", "low"]
