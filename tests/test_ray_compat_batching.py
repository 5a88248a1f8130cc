"""``@serve.batch`` as Ray Serve documents and tests it: streams, arguments, results, forms.

Written from Ray Serve's ``batching.py`` and its unit tests: a batched async
generator joins its batch when it is called (callers may start several calls
and read them one after another), outside a replica too; handlers take one
list per argument (``*args`` and ``**kwargs`` included); a result that is not
a list is a ``TypeError`` and a list of the wrong length a
``RayServeException``, with Ray Serve's messages. Waits use long
``batch_wait_timeout_s`` values, so a batch runs only when it is full: a call
that does not join in time hangs, and ``asyncio.timeout`` turns that into a
failure.
"""

from __future__ import annotations

import asyncio
import gc
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import Deploy, async_wait_until
from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal import serve
from shoal.serve.exceptions import BatchSizeMismatchError, RayServeException

LONG = 1000.0  # a batch_wait_timeout_s no test waits for
TIMEOUT = 10.0


class Pairs:
    """Ray Serve's two-argument handlers, as a method and as a stream."""

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def stream(self, key1: list[str], key2: list[str]):  # type: ignore[no-untyped-def]
        for step in range(2):
            yield [(step, a, b) for a, b in zip(key1, key2, strict=True)]


@serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
async def pairs_stream(key1: list[str], key2: list[str]):  # type: ignore[no-untyped-def]
    for step in range(2):
        yield [(step, a, b) for a, b in zip(key1, key2, strict=True)]


CALL_FORMS = {  # Ray Serve's four ways to pass the two arguments
    "args": lambda fn, a, b: fn(a, b),
    "kwargs": lambda fn, a, b: fn(key1=a, key2=b),
    "mixed": lambda fn, a, b: fn(a, key2=b),
    "out-of-order": lambda fn, a, b: fn(key2=b, key1=a),
}


async def read(stream: Any) -> list[Any]:
    return [item async for item in stream]


def read_concurrently(streams: list[Any]) -> list[list[Any]]:
    """Each stream's items, read by one task per stream (from sync code)."""

    async def read_all() -> list[list[Any]]:
        return list(await asyncio.gather(*(read(stream) for stream in streams)))

    return asyncio.run(asyncio.wait_for(read_all(), TIMEOUT))


# --- 1. a batched generator joins its batch when called --------------------------------


@pytest.mark.parametrize("form", list(CALL_FORMS))
@pytest.mark.parametrize("kind", ["method", "function"])
async def test_streams_started_together_can_be_read_one_after_another(kind: str, form: str) -> None:
    fn = Pairs().stream if kind == "method" else pairs_stream
    call = CALL_FORMS[form]
    streams = [call(fn, "hi1", "hi2"), call(fn, "hi3", "hi4")]
    async with asyncio.timeout(TIMEOUT):  # the first read waits for a full batch of two
        results = [await read(streams[0]), await read(streams[1])]
    assert results == [
        [(0, "hi1", "hi2"), (1, "hi1", "hi2")],
        [(0, "hi3", "hi4"), (1, "hi3", "hi4")],
    ]
    assert fn.batch_stats().recent_sizes[-1] == 2


async def test_a_stream_call_that_does_not_fit_the_signature_raises_at_the_call() -> None:
    with pytest.raises(TypeError, match="missing a required argument: 'key2'"):
        pairs_stream("hi1")  # no read: the call itself checks its arguments, as in Ray Serve


@pytest.mark.parametrize("stop", [StopIteration, StopAsyncIteration, StopIteration()])
async def test_streams_end_one_by_one_when_read_in_turn(stop: Any) -> None:
    callers = 4
    step_done = asyncio.Event()

    @serve.batch(max_batch_size=callers, batch_wait_timeout_s=LONG)
    async def terminator(ids: list[int]):  # type: ignore[no-untyped-def]
        for finished in range(1, callers + 1):  # ends one more caller's stream per step
            step_done.clear()
            yield [stop] * finished + ids[finished:]
            await step_done.wait()

    streams = [terminator(i) for i in range(callers)]
    async with asyncio.timeout(TIMEOUT):
        for i, stream in enumerate(streams):
            assert await read(stream) == [i] * i  # caller i gets i steps before its stop
            step_done.set()


@pytest.mark.parametrize("error", ["raised", "wrong length"])
async def test_a_stream_error_reaches_each_caller_then_its_stream_ends(error: str) -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def failing(xs: list[str]):  # type: ignore[no-untyped-def]
        for step in range(5):
            if step == 2 and error == "raised":
                raise RuntimeError("Testing error")
            yield xs * 2 if step == 2 else xs

    expected = (
        (RuntimeError, "Testing error")
        if error == "raised"
        else (RayServeException, "The input list has length 2 but the returned list has length 4")
    )
    async with asyncio.timeout(TIMEOUT):
        for stream in [failing("a"), failing("b")]:
            for _ in range(2):
                await stream.__anext__()
            with pytest.raises(expected[0], match=expected[1]):
                await stream.__anext__()
            with pytest.raises(StopAsyncIteration):
                await stream.__anext__()


async def test_setters_and_getters_while_a_batch_streams() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def three_times(xs: list[int]):  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield xs

    assert (three_times._get_max_batch_size(), three_times._get_batch_wait_timeout_s()) == (2, LONG)
    first = [three_times(1), three_times(2)]
    async with asyncio.timeout(TIMEOUT):
        for stream, x in zip(first, (1, 2), strict=True):
            assert [await stream.__anext__() for _ in range(2)] == [x, x]
        three_times.set_max_batch_size(3)
        assert three_times._get_max_batch_size() == 3
        second = [three_times(x) for x in (3, 4, 5)]
        for stream, x in zip(first, (1, 2), strict=True):
            assert await read(stream) == [x]
        assert [await read(stream) for stream in second] == [[3] * 3, [4] * 3, [5] * 3]
    assert three_times.batch_stats().recent_sizes == (2, 3)


async def test_a_stream_dropped_or_closed_before_it_is_read_leaves_its_batch() -> None:
    class Ticker:
        @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
        async def ticks(self, xs: list[int]):  # type: ignore[no-untyped-def]
            tick = 0
            while True:  # ends only when no caller is left to read
                yield [tick] * len(xs)
                tick += 1
                await asyncio.sleep(0)  # one step of work

    ticker = Ticker()
    reader, dropped, closed = ticker.ticks(0), ticker.ticks(1), ticker.ticks(2)
    async with asyncio.timeout(TIMEOUT):
        assert await reader.__anext__() == 0  # the batch of three runs
        del dropped  # never started: it runs no ``finally``
        gc.collect()
        await closed.aclose()  # closed before its first read: no ``finally`` either
        assert [await reader.__anext__() for _ in range(2)] == [1, 2]
        await reader.aclose()

        async def idle() -> bool:
            return ticker.ticks.batch_stats().running == 0

        await async_wait_until(idle, what="the batch to end once its only reader left")
    assert ticker.ticks.batch_stats().recent_sizes == (3,)


# --- 2. streaming batches in plain asyncio programs ----------------------------------


class Streamer:
    """A plain class (no deployment) with a batched generator method."""

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def numbers(self, limits: list[int]):  # type: ignore[no-untyped-def]
        for step in range(max(limits)):
            yield [step if step < limit else StopIteration for limit in limits]


def test_streaming_batches_in_asyncio_run() -> None:
    streamer = Streamer()

    async def gathered() -> list[list[int]]:
        return list(await asyncio.gather(*(read(streamer.numbers(n)) for n in (3, 1, 2))))

    async def in_turn() -> list[list[int]]:
        streams = [streamer.numbers(n) for n in (2, 3, 1)]
        return [await read(stream) for stream in streams]

    assert asyncio.run(asyncio.wait_for(gathered(), TIMEOUT)) == [[0, 1, 2], [0], [0, 1]]
    assert asyncio.run(asyncio.wait_for(in_turn(), TIMEOUT)) == [[0, 1], [0, 1, 2], [0]]
    # Made where no loop runs: each stream joins its batch when it is first read.
    made_outside = [streamer.numbers(n) for n in (1, 2, 1)]

    async def read_all() -> list[list[int]]:
        return list(await asyncio.gather(*(read(stream) for stream in made_outside)))

    assert asyncio.run(asyncio.wait_for(read_all(), TIMEOUT)) == [[0], [0, 1], [0]]
    assert streamer.numbers.batch_stats().recent_sizes == (3, 3, 3)


# --- 3. arguments, results and decorator forms -----------------------------------------


async def test_handlers_without_parameters_and_bare_forms_are_accepted() -> None:
    @serve.batch
    async def function() -> None:
        pass

    @serve.batch(max_batch_size=1)
    async def ping() -> list[str]:
        return ["pong"]

    class Class:
        @serve.batch
        async def method(self) -> None:
            pass

        @serve.batch(max_batch_size=10, batch_wait_timeout_s=1.5)
        async def method2(self) -> None:
            pass

    assert callable(function) and callable(Class().method) and callable(Class().method2)
    assert await ping() == "pong"


async def test_an_infinite_wait_runs_only_full_batches() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=float("inf"))  # accepted by Ray Serve
    async def echo(xs: list[int]) -> list[int]:
        return xs

    first = asyncio.ensure_future(echo(1))
    for _ in range(10):  # let the batcher run: it must keep waiting for a second request
        await asyncio.sleep(0)
    assert not first.done() and echo.batch_stats().queued == 1
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(first, echo(2)) == [1, 2]
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        serve.batch(batch_wait_timeout_s=float("nan"))


class Variadic:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def positional(self, *args: list[int]) -> list[tuple[int, ...]]:
        assert all(isinstance(column, list) for column in args)  # one list per argument
        return list(zip(*args, strict=True))

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def keywords(self, first: list[int], **kwargs: list[int]) -> list[dict[str, int]]:
        return [{"first": f, **{k: v[i] for k, v in kwargs.items()}} for i, f in enumerate(first)]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def defaults(self, xs: list[int], flag: Any = None) -> list[Any]:
        return [(x, flag) for x in xs]


async def test_args_and_kwargs_handlers_get_one_list_per_argument() -> None:
    model = Variadic()
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(model.positional(1, 2), model.positional(3, 4)) == [
            (1, 2),
            (3, 4),
        ]
        assert await asyncio.gather(model.keywords(1, a=2), model.keywords(3, a=4)) == [
            {"first": 1, "a": 2},
            {"first": 3, "a": 4},
        ]
        mixed = await asyncio.gather(
            model.positional(1), model.positional(2, 3), return_exceptions=True
        )
    assert all(isinstance(outcome, TypeError) for outcome in mixed)
    assert "same number of extra positional arguments" in str(mixed[0])


async def test_a_default_no_caller_passed_is_the_handlers_own() -> None:
    model = Variadic()
    async with asyncio.timeout(TIMEOUT):
        assert await asyncio.gather(model.defaults(1), model.defaults(2)) == [(1, None), (2, None)]
        # Passed by some callers only: a list, the default in the other callers' slots.
        assert await asyncio.gather(model.defaults(1), model.defaults(2, flag=True)) == [
            (1, [None, True]),
            (2, [None, True]),
        ]


class BadResults:
    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def count(self, xs: list[int]) -> Any:
        return len(xs)  # Ray Serve's test: not a list

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def short(self, xs: list[int]) -> list[int]:
        return xs[:1]

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def as_tuple(self, xs: list[int]) -> tuple[int, ...]:
        return tuple(xs)  # sized: Ray Serve takes it

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=LONG)
    async def steps(self, xs: list[int]):  # type: ignore[no-untyped-def]
        yield len(xs)


async def test_a_result_that_is_not_a_list_is_a_type_error() -> None:
    model = BadResults()
    async with asyncio.timeout(TIMEOUT):
        outcomes = await asyncio.gather(*(model.count(i) for i in range(3)), return_exceptions=True)
        streamed = await asyncio.gather(
            *(read(model.steps(i)) for i in range(3)), return_exceptions=True
        )
        assert await asyncio.gather(*(model.as_tuple(i) for i in range(3))) == [0, 1, 2]
    for outcome in [*outcomes, *streamed]:
        assert isinstance(outcome, TypeError) and isinstance(outcome, RayServeException)
        assert isinstance(outcome, BatchSizeMismatchError)  # shoal's own type, as before
        assert "object of type 'int' has no len()" in str(outcome)
        assert "BadResults." in str(outcome)


async def test_a_list_of_the_wrong_length_is_rays_exception_and_message() -> None:
    model = BadResults()
    async with asyncio.timeout(TIMEOUT):
        outcomes = await asyncio.gather(*(model.short(i) for i in range(3)), return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, RayServeException) and not isinstance(outcome, TypeError)
        assert str(outcome).startswith(
            "Batched function doesn't preserve batch size. "
            "The input list has length 3 but the returned list has length 1"
        )


# --- through deployments, on both runtimes ---------------------------------------------


@serve.deployment(max_ongoing_requests=8)
class BatchedApp:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def pairs(self, key1: list[str], key2: list[str]):  # type: ignore[no-untyped-def]
        for step in range(2):
            yield [f"{step}{a}{b}" for a, b in zip(key1, key2, strict=True)]

    async def in_turn(self) -> list[list[str]]:
        streams = [self.pairs("a", key2="b"), self.pairs("c", key2="d")]
        return [await read(stream) for stream in streams]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def add(self, *args: list[int], **kwargs: list[int]) -> list[int]:
        columns = [*args, *kwargs.values()]
        return [sum(values) for values in zip(*columns, strict=True)]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def not_a_list(self, xs: list[int]) -> Any:
        return None

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
    async def too_long(self, xs: list[int]) -> list[int]:
        return xs * 2


@serve.deployment(max_ongoing_requests=8)
@serve.batch(max_batch_size=2, batch_wait_timeout_s=LONG)
async def doubled_stream(xs: list[int]):  # type: ignore[no-untyped-def]
    for step in range(2):
        yield [2 * x + step for x in xs]


def test_batch_semantics_through_a_deployment(deploy: Deploy) -> None:
    handle = deploy(BatchedApp.bind())
    assert handle.in_turn.remote().result(timeout_s=TIMEOUT) == [["0ab", "1ab"], ["0cd", "1cd"]]
    # (Read concurrently: a handle opens its stream when first read, not at .remote().)
    streams = [handle.options(stream=True).pairs.remote(k, "x") for k in ("p", "q")]
    assert read_concurrently(streams) == [["0px", "1px"], ["0qx", "1qx"]]
    doubled = deploy(doubled_stream.bind()).options(stream=True)
    assert read_concurrently([doubled.remote(x) for x in (1, 5)]) == [[2, 3], [10, 11]]
    sums = [handle.add.remote(1, 2, z=3), handle.add.remote(4, 5, z=6)]
    assert [r.result(timeout_s=TIMEOUT) for r in sums] == [6, 15]
    for method, error, text in [
        ("not_a_list", TypeError, "object of type 'NoneType' has no len()"),
        ("too_long", RayServeException, "Batched function doesn't preserve batch size"),
    ]:
        responses = [getattr(handle, method).remote(i) for i in range(2)]
        for response in responses:
            with pytest.raises(error, match=text):
                response.result(timeout_s=TIMEOUT)


@serve.deployment(max_ongoing_requests=8)
class Textgen:
    """Ray Serve's streaming-response test: a batched generator behind HTTP."""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def batch_handler(self, prompts: list[str]):  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield prompts

    async def __call__(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self.batch_handler(request.query_params["prompt"]))


@serve.deployment(max_ongoing_requests=8)
class DirectTextgen:
    """The batched generator is the HTTP entry point itself: its items stream."""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def __call__(self, requests: list[Request]):  # type: ignore[no-untyped-def]
        prompts = [request.query_params["prompt"] for request in requests]
        for step in range(2):
            yield [f"{prompt}{step};" for prompt in prompts]


def test_batched_streams_over_http(base_url: str) -> None:
    names = [f"textgen-{os.getpid()}", f"direct-{os.getpid()}"]
    serve.run(Textgen.bind(), name=names[0], route_prefix=f"/{names[0]}")
    serve.run(DirectTextgen.bind(), name=names[1], route_prefix=f"/{names[1]}")
    try:
        with ThreadPoolExecutor(4) as pool:
            texts = list(
                pool.map(
                    lambda i: httpx.get(f"{base_url}/{names[i % 2]}?prompt=p{i}", timeout=30).text,
                    range(8),
                )
            )
    finally:
        for name in names:
            serve.delete(name)
    assert texts == [f"p{i}" * 3 if i % 2 == 0 else f"p{i}0;p{i}1;" for i in range(8)]


@serve.deployment(max_ongoing_requests=10)
class PairedStream:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=60)
    async def __call__(self, words: list[str]) -> Any:
        for step in range(2):
            yield [f"{word}-{step}" for word in words]


def test_handle_streams_join_their_batch_when_called(deploy: Deploy) -> None:
    # As in Ray: the request is sent at .remote(), so two streams started together
    # form one batch even when the caller reads them one after the other (otherwise
    # the first read waits out the 60 s batch timeout, then the test's timeout).
    handle = deploy(PairedStream.bind()).options(stream=True)
    first, second = handle.remote("a"), handle.remote("b")
    assert list(first) == ["a-0", "a-1"]
    assert list(second) == ["b-0", "b-1"]
