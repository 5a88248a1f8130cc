"""Shoal applications driven by ``python -m bench``; plain public shoal API only.

Each is served on its own by the CLI at route prefix ``/``, e.g.::

    python -m shoal run bench.apps:w1 --host 127.0.0.1 --port 8000

and driven on the same paths as the reference servers (``POST /echo``, ``POST /w2``,
``GET /w4``, ``POST /w3``, ``GET /stream/...``); the ingress ignores the path, except
that the W3 apps answer ``GET .../stats`` with their ``batch_stats()`` and the stream app
picks its stream by the path's end. ``handle_rtt`` answers ``GET /?mode=seq&n=N`` and
``GET /?mode=par&n=N&inflight=64`` with timings measured inside the replica.

The FastAPI-based apps (W1 through ``@serve.ingress``, the business-logic example) are in
``bench.apps_fastapi``, so that importing this module (cold start, idle RSS) stays cheap.
"""

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from bench.apps_core import MAX_ONGOING, Echo, Featurizer, Pipeline, Predictor
from bench.common import (
    MEMBER_VALUES,
    W3_MAX_BATCH,
    W3_MAX_ONGOING,
    W3_WAIT_S,
    first_yield_stream,
    many_items_stream,
    mean,
    member,
    sleep_batch,
    summarize_us,
)
from shoal import serve

MAX_CALLS = 200_000


w1 = Echo.bind()


@serve.deployment  # every option at its default: max_ongoing_requests is Ray Serve's 5
class EchoDefaults:
    async def __call__(self, request: Request) -> Any:
        return await request.json()


w1_defaults = EchoDefaults.bind()


# --- W2: ingress -> featurizer -> predictor (bench.apps_core) ----------------------
w2 = Pipeline.bind(Featurizer.bind(), Predictor.bind())


# --- W4: fan-out to 3 members ----------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Member:
    def __init__(self, value: float) -> None:
        self.value = value

    async def __call__(self) -> float:
        return await member(self.value)


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class FanOut:
    def __init__(self, *members: Any) -> None:
        self.members = members

    async def __call__(self, request: Request) -> dict[str, float]:
        values = await asyncio.gather(*(m.remote() for m in self.members))
        return {"mean": mean(values)}


w4 = FanOut.bind(*(Member.options(name=f"Member{i}").bind(v) for i, v in enumerate(MEMBER_VALUES)))


# --- handle round trip -----------------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class NoopTarget:
    async def noop(self) -> None:
        return None


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class HandleBench:
    def __init__(self, target: Any) -> None:
        self.target = target

    async def __call__(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        n = max(1, min(int(query.get("n", "2000")), MAX_CALLS))
        if query.get("mode", "seq") == "par":
            inflight = max(1, min(int(query.get("inflight", "64")), 1024))
            return await self._parallel(n, inflight)
        return await self._sequential(n)

    async def _sequential(self, n: int) -> dict[str, Any]:
        durations: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            await self.target.noop.remote()
            durations.append(time.perf_counter() - start)
        return {"mode": "seq", **summarize_us(durations)}

    async def _parallel(self, n: int, inflight: int) -> dict[str, Any]:
        rounds = max(1, n // inflight)
        start = time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*(self.target.noop.remote() for _ in range(inflight)))
        elapsed = time.perf_counter() - start
        calls = rounds * inflight
        return {
            "mode": "par",
            "inflight": inflight,
            "calls": calls,
            "seconds": elapsed,
            "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
        }


handle_rtt = HandleBench.bind(NoopTarget.bind())


# --- W3: batching ----------------------------------------------------------------------
W3_TARGET_LATENCY_S = 0.05  # fits two batches of 64 (2 x 16.4 ms) in 45% of it: size 64


class _SleepBatchIngress:
    """``POST /w3`` -> one item of ``self.work``'s batches; ``GET .../stats`` -> its stats."""

    work: Any  # the @serve.batch method, defined by each subclass

    async def __call__(self, request: Request) -> Any:
        if request.url.path.endswith("/stats"):
            return dataclasses.asdict(self.work.batch_stats())
        body = await request.json()
        return await self.work(body.get("x"))


@serve.deployment(num_replicas=1, max_ongoing_requests=W3_MAX_ONGOING)
class FixedBatch(_SleepBatchIngress):
    @serve.batch(max_batch_size=W3_MAX_BATCH, batch_wait_timeout_s=W3_WAIT_S)
    async def work(self, xs: list[Any]) -> list[dict[str, Any]]:
        return await sleep_batch(xs)


@serve.deployment(num_replicas=1, max_ongoing_requests=W3_MAX_ONGOING)
class LatencyBatch(_SleepBatchIngress):
    @serve.batch(max_batch_size=64, target_latency_s=W3_TARGET_LATENCY_S)
    async def work(self, xs: list[Any]) -> list[dict[str, Any]]:
        return await sleep_batch(xs)


w3 = FixedBatch.bind()
w3_latency = LatencyBatch.bind()


# --- streaming -------------------------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Streams:
    """``GET .../first``: one line after 20 ms with the generator's own timestamps;
    ``GET .../many?n=N``: N items of 16 bytes."""

    async def __call__(self, request: Request) -> AsyncIterator[str]:
        if request.url.path.endswith("/many"):
            n = max(1, min(int(request.query_params.get("n", "1000")), 10_000_000))
            async for item in many_items_stream(n):
                yield item
        else:
            async for item in first_yield_stream():
                yield item


streams = Streams.bind()
