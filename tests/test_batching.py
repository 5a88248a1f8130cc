"""``@serve.batch``: batching semantics in asyncio (no processes), then through handles.

The unit tests call decorated methods directly on the test's event loop and
check batch *sizes* (deterministic: calls made in one loop iteration are all
queued before the batcher runs), not wall-clock times, except the
latency-target tests, whose timing bounds have wide margins.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Deploy, async_wait_until

from shoal import serve
from shoal._api.batch_metrics import Planner
from shoal._api.context import RequestContext, get_request_context, request_context

ROOT = Path(__file__).resolve().parents[1]

from examples import batching as example  # noqa: E402


class Doubler:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def double(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        return [2 * x for x in xs]


async def test_batches_flush_when_full_then_on_timeout() -> None:
    model = Doubler()
    results = await asyncio.gather(*(model.double(i) for i in range(10)))
    assert results == [2 * i for i in range(10)]
    assert [len(b) for b in model.batches] == [4, 4, 2]
    assert model.batches[0] == [0, 1, 2, 3]  # arrival order is kept
    stats = Doubler.double.batch_stats(model)
    assert stats.recent_sizes == (4, 4, 2)
    assert (stats.batches, stats.requests, stats.failed_batches) == (3, 10, 0)
    assert stats.size.max == 4 and stats.queued == 0 and stats.running == 0
    # The last batch was not full: it waited for the timeout (a lower bound: never early).
    assert stats.wait_s.max >= 0.008


async def test_a_partial_batch_runs_after_the_wait() -> None:
    class Slow:
        @serve.batch(max_batch_size=100, batch_wait_timeout_s=0.02)
        async def echo(self, xs: list[int]) -> list[int]:
            return xs

    model = Slow()
    assert await asyncio.gather(model.echo(1), model.echo(2), model.echo(3)) == [1, 2, 3]
    stats = model.echo.batch_stats()
    assert stats.recent_sizes == (3,)
    assert stats.wait_s.max >= 0.015


async def test_bare_decorator_free_function_and_several_arguments() -> None:
    seen: list[tuple[list[int], list[int], list[int]]] = []

    @serve.batch
    async def add(a: list[int], b: list[int], *, scale: list[int] | int = 1) -> list[int]:
        assert isinstance(scale, list)  # a default fills the slot of a caller that left it out
        seen.append((a, b, scale))
        return [(x + y) * s for x, y, s in zip(a, b, scale, strict=True)]

    results = await asyncio.gather(add(1, 2), add(3, b=4, scale=10), add(a=5, b=6))
    assert results == [3, 70, 11]
    assert seen == [([1, 3, 5], [2, 4, 6], [1, 10, 1])]
    assert add.batch_stats().recent_sizes == (3,)
    with pytest.raises(TypeError, match="missing a required argument: 'b'"):
        await add(1)

    class Bare:
        @serve.batch
        async def negate(self, xs: list[int]) -> list[int]:
            return [-x for x in xs]

    bare = Bare()
    assert await asyncio.gather(*(bare.negate(i) for i in range(12))) == [-i for i in range(12)]
    assert bare.negate.batch_stats().recent_sizes == (10, 2)  # Ray Serve's default size: 10


async def test_wrong_number_of_results_fails_every_caller_in_the_batch() -> None:
    class Short:
        def __init__(self) -> None:
            self.broken = True

        @serve.batch(max_batch_size=3, batch_wait_timeout_s=0.001)
        async def predict(self, xs: list[int]) -> list[int]:
            return xs[:1] if self.broken else xs

    model = Short()
    outcomes = await asyncio.gather(*(model.predict(i) for i in range(3)), return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, serve.BatchSizeMismatchError)
        assert isinstance(outcome, ValueError)
        assert "returned 1 results for a batch of 3 requests" in str(outcome)
    model.broken = False
    assert await asyncio.gather(model.predict(7), model.predict(8)) == [7, 8]
    assert model.predict.batch_stats().failed_batches == 1


async def test_an_exception_fails_only_its_own_batch() -> None:
    class Picky:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.001)
        async def check(self, xs: list[int]) -> list[int]:
            if any(x < 0 for x in xs):
                raise ValueError(f"negative input in {xs}")
            return xs

    model = Picky()
    outcomes = await asyncio.gather(
        *(model.check(x) for x in (1, -1, 2, 3, 4)), return_exceptions=True
    )
    assert [type(o) for o in outcomes[:2]] == [ValueError, ValueError]
    assert "negative input in [1, -1]" in str(outcomes[0])
    assert outcomes[2:] == [2, 3, 4]
    assert model.check.batch_stats().recent_sizes == (2, 2, 1)


async def test_a_cancelled_caller_leaves_its_batch_before_it_runs() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        @serve.batch(max_batch_size=3, batch_wait_timeout_s=10.0)  # flushes by size only
        async def run(self, xs: list[str]) -> list[str]:
            self.batches.append(xs)
            return [x.upper() for x in xs]

    model = Recorder()
    first = asyncio.create_task(model.run("a"))
    gone = asyncio.create_task(model.run("b"))

    async def both_queued() -> bool:
        return model.run.batch_stats().queued == 2

    await async_wait_until(both_queued, 10, "a and b in the batcher's queue")
    gone.cancel()
    others = [asyncio.create_task(model.run(x)) for x in ("c", "d")]
    assert await asyncio.gather(first, *others) == ["A", "C", "D"]
    assert gone.cancelled()
    assert model.batches == [["a", "c", "d"]]
    assert model.run.batch_stats().cancelled == 1


async def test_a_caller_cancelled_mid_batch_does_not_disturb_the_others() -> None:
    release = asyncio.Event()

    class Gate:
        @serve.batch(max_batch_size=3, batch_wait_timeout_s=0.001)
        async def run(self, xs: list[int]) -> list[int]:
            await release.wait()
            return xs

    model = Gate()
    tasks = [asyncio.create_task(model.run(i)) for i in range(3)]

    async def batch_running() -> bool:
        return model.run.batch_stats().running > 0

    await async_wait_until(batch_running, 10, "the batch to start")
    tasks[1].cancel()
    release.set()
    assert await tasks[0] == 0 and await tasks[2] == 2
    assert tasks[1].cancelled()
    assert await model.run(5) == 5  # the batcher keeps working


class Tunable:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.work.set_max_batch_size(config["max_batch_size"])
        self.work.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.005)
    async def work(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return xs


async def test_setters_change_a_live_batcher_from_the_next_batch() -> None:
    model = Tunable()
    await asyncio.gather(*(model.work(i) for i in range(6)))
    assert model.sizes == [2, 2, 2]
    model.reconfigure({"max_batch_size": 3, "batch_wait_timeout_s": 0.0})
    await asyncio.gather(*(model.work(i) for i in range(6)))
    assert model.sizes[3:] == [3, 3]
    stats = Tunable.work.batch_stats(model)
    assert (stats.max_batch_size, stats.batch_wait_timeout_s) == (3, 0.0)
    other = Tunable()  # each instance has its own batcher and options
    assert Tunable.work.batch_stats(other).max_batch_size == 2
    with pytest.raises(serve.ConfigError, match="max_batch_size=0"):
        model.work.set_max_batch_size(0)
    with pytest.raises(serve.ShoalError, match=r"self\.work\.set_max_batch_size"):
        Tunable.work.set_max_batch_size(4)


def total_length(texts: list[str]) -> int:
    return sum(len(text) for text in texts)


async def test_batch_size_fn_bounds_the_total_measure() -> None:
    class Tokens:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        @serve.batch(max_batch_size=10, batch_wait_timeout_s=10.0, batch_size_fn=total_length)
        async def embed(self, texts: list[str]) -> list[int]:
            self.batches.append(texts)
            return [len(t) for t in texts]

    model = Tokens()
    texts = ["aaaa", "bbbb", "cccc", "dd", "eeeeeeeee", "f" * 12]
    assert await asyncio.gather(*(model.embed(t) for t in texts)) == [len(t) for t in texts]
    # Full when the next item would exceed 10; an item over the limit runs alone.
    assert [[len(t) for t in b] for b in model.batches] == [[4, 4], [4, 2], [9], [12]]
    assert model.embed.batch_stats().size.max == 12


async def test_batches_never_mix_multiplexed_models() -> None:
    class Multi:
        def __init__(self) -> None:
            self.batches: list[tuple[str, list[str]]] = []

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
        async def predict(self, xs: list[str]) -> list[str]:
            # The batch runs in its first caller's context: the model id is the batch's.
            self.batches.append((get_request_context().multiplexed_model_id, xs))
            return xs

    model = Multi()

    async def call(model_id: str, x: str) -> str:
        request_context.set(RequestContext(multiplexed_model_id=model_id))
        return await model.predict(x)

    calls = [("m1", "a"), ("m2", "b"), ("m1", "c"), ("m2", "d"), ("m1", "e")]
    assert await asyncio.gather(*(call(m, x) for m, x in calls)) == ["a", "b", "c", "d", "e"]
    assert sorted(model.batches) == [("m1", ["a", "c", "e"]), ("m2", ["b", "d"])]


class Streamer:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def count(self, limits: list[int]):  # type: ignore[no-untyped-def]
        for step in range(max(limits)):
            if any(limit < 0 for limit in limits):
                raise ValueError("negative limit")
            yield [step if step < limit else StopIteration for limit in limits]


async def collect(stream: Any) -> list[int]:
    return [item async for item in stream]


async def test_streaming_batches_give_each_caller_its_own_stream() -> None:
    model = Streamer()
    streams = await asyncio.gather(*(collect(model.count(n)) for n in (3, 1, 0, 2)))
    assert streams == [[0, 1, 2], [0], [], [0, 1]]
    assert Streamer.count.batch_stats(model).recent_sizes == (4,)


async def test_streaming_errors_reach_every_caller_and_leaving_early_is_safe() -> None:
    model = Streamer()
    outcomes = await asyncio.gather(
        collect(model.count(2)), collect(model.count(-1)), return_exceptions=True
    )
    assert all(isinstance(o, ValueError) for o in outcomes)

    async def first_only() -> int:
        async for item in model.count(5):
            return int(item)  # leaves the stream: its generator is closed
        raise AssertionError("empty stream")

    assert await asyncio.gather(first_only(), collect(model.count(3))) == [0, [0, 1, 2]]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size=0"),
        ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s=-1"),
        ({"max_concurrent_batches": 1.5}, "max_concurrent_batches=1.5"),
        ({"batch_size_fn": 3}, "batch_size_fn=3"),
        ({"target_latency_s": 0}, "target_latency_s=0"),
    ],
)
def test_invalid_options_fail_at_decoration(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(serve.ConfigError, match=fragment):
        serve.batch(**options)


def test_handlers_must_be_async() -> None:
    def sync(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(serve.ConfigError, match="async def"):
        serve.batch(sync)


async def test_stats_keep_bounded_history() -> None:
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def one(xs: list[int]) -> list[int]:
        return xs

    for i in range(1100):
        await one(i)
    stats = one.batch_stats()
    assert stats.batches == 1100 and len(stats.recent_sizes) == 1024
    assert stats.size.count == 1024 and stats.size.p99 == 1


# --- latency-target mode ---------------------------------------------------------------


class Sleeper:
    """Cost 10 ms + 0.1 ms per item: batching pays, and the model is linear."""

    @serve.batch(max_batch_size=64, target_latency_s=0.05)
    async def infer(self, xs: list[int]) -> list[int]:
        await asyncio.sleep(0.010 + 0.0001 * len(xs))
        return xs


async def test_latency_mode_does_not_wait_at_low_load() -> None:
    model = Sleeper()
    for i in range(12):  # one caller, one request at a time: nobody to wait for
        assert await model.infer(i) == i
    stats = model.infer.batch_stats()
    assert set(stats.recent_sizes) == {1}
    assert stats.wait_s.p50 < 0.001
    assert stats.latency is not None and stats.latency.max_wait_s == 0.0


async def test_latency_mode_forms_large_batches_within_the_target_at_high_load() -> None:
    model = Sleeper()

    async def client(k: int) -> None:
        for i in range(6):
            assert await model.infer(k * 100 + i) == k * 100 + i

    await asyncio.gather(*(client(k) for k in range(64)))
    stats = model.infer.batch_stats()
    assert stats.requests == 64 * 6
    assert stats.size.mean >= 16
    plan = stats.latency
    assert plan is not None and plan.batch_size >= 16
    # The chosen size and wait respect the target.
    cost = plan.cost_intercept_s + plan.cost_per_item_s * plan.batch_size
    assert cost + plan.max_wait_s <= plan.target_latency_s
    assert plan.arrival_rate_per_s > 0


def test_planner_fits_the_cost_model_and_decides_from_the_arrival_rate() -> None:
    planner = Planner(0.05)
    for size in [1, 8, 32, 64, 16, 4, 48, 2] * 3:
        planner.observe(size, 0.010 + 0.0001 * size)
    assert planner.fitted
    assert planner.a == pytest.approx(0.010, rel=1e-6)
    assert planner.b == pytest.approx(0.0001, rel=1e-6)
    # S: a + b*S <= 0.9 * 0.05 / 2  ->  S = 125, capped by max_batch_size.
    assert planner.batch_limit(1000) == 125 and planner.batch_limit(64) == 64
    assert planner.batch_limit(1000, oldest_age=0.04) == 1000  # overloaded: drain fast
    now = 100.0
    assert planner.start_by(now, 1, 1, now) == now  # no arrivals seen: run at once
    for i in range(200):  # 2,000 arrivals/s, each finding the batcher busy
        planner.on_arrival(now + i * 0.0005, busy=True)
    now += 0.1
    assert planner.rate(now) == pytest.approx(2000, rel=0.05)
    start = planner.start_by(now, 1, 1, now)
    assert now < start <= now + 0.045 - planner.cost(2) + 1e-9
    assert planner.start_by(now, 1, 1, now + 0.05) < now + 0.05  # arrivals stopped: go


# --- through handles, on both runtimes ------------------------------------------------


@serve.deployment(max_ongoing_requests=32, user_config={"max_batch_size": 16})
class BatchedDoubler:
    def reconfigure(self, config: dict[str, Any]) -> None:
        self.__call__.set_max_batch_size(config["max_batch_size"])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def __call__(self, xs: list[int]) -> list[tuple[int, int]]:
        return [(2 * x, len(xs)) for x in xs]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def countdown(self, starts: list[int]):  # type: ignore[no-untyped-def]
        for step in range(max(starts)):
            yield [start - step if step < start else StopIteration for start in starts]

    def stats(self) -> Any:
        return self.__call__.batch_stats()


@serve.deployment(max_ongoing_requests=32)
@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
async def batched_square(xs: list[int]) -> list[int]:
    return [x * x for x in xs]


def test_batching_through_handles(deploy: Deploy) -> None:
    handle = deploy(BatchedDoubler.bind())
    responses = [handle.remote(i) for i in range(16)]
    results = [response.result(timeout_s=10) for response in responses]
    assert [value for value, _ in results] == [2 * i for i in range(16)]
    assert max(size for _, size in results) > 4  # batches formed, beyond the decorator's 4
    stats = handle.stats.remote().result(timeout_s=10)
    assert stats.requests == 16 and stats.max_batch_size == 16
    streams = [handle.options(stream=True).countdown.remote(n) for n in (3, 1, 2)]
    assert [list(stream) for stream in streams] == [[3, 2, 1], [1], [2, 1]]
    square = deploy(batched_square.bind())
    assert [r.result(timeout_s=10) for r in [square.remote(i) for i in range(8)]] == [
        i * i for i in range(8)
    ]


# --- the example -----------------------------------------------------------------------


async def test_example_models_agree() -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(example.WIDTH).astype(np.float32) for _ in range(8)]
    single = example.PerRequestMLP.func_or_class()
    batched = example.BatchedMLP.func_or_class()
    one = await asyncio.gather(*(single(x) for x in inputs))
    many = await asyncio.gather(*(batched(x) for x in inputs))
    for a, b in zip(one, many, strict=True):
        assert a.shape == (example.OUTPUTS,)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert max(type(batched).__call__.batch_stats(batched).recent_sizes) > 1
