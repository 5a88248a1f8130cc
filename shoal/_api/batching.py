"""``@serve.batch``: concurrent single-item calls become one call of a batch handler.

Guarantees:
- each caller passes one item and gets its own result (or its own stream);
- a batch holds at most ``max_batch_size`` items (counted, or measured by
  ``batch_size_fn``) of one multiplexed model; it runs when full or when its
  oldest request has waited ``batch_wait_timeout_s`` (with ``target_latency_s``,
  when the latency planner in :mod:`shoal._api.batch_metrics` says so);
- a failing batch fails only its own callers, with the handler's exception;
- a caller cancelled before its batch runs leaves the batch; one cancelled
  while it runs has its result discarded; the other callers are unaffected;
- a caller whose request has a deadline (``get_request_context().deadline``)
  leaves the queue when it passes (RequestTimeoutError) and is never part of a
  batch; a batch runs with the latest deadline of its callers (none if one has
  none), so that the handle calls it makes serve every caller still waiting;
- callers of a higher priority (``get_request_context().priority``) are taken into
  a batch first, those of one class in arrival order; a batch runs in its first
  caller's context, so its handle calls have the highest priority of its callers;
- one batcher per instance (per free function), created on the running loop
  at the first call; the setters take effect from the next batch.

How arguments become lists and results are checked: :mod:`shoal._api.batch_handler`;
what callers get (a streaming call joins its batch when called):
:mod:`shoal._api.batch_callers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from shoal._api.batch_callers import END, ERROR, ITEM, make_caller
from shoal._api.batch_handler import Handler, as_list, take_names
from shoal._api.batch_metrics import (
    BatchRecorder,
    BatchStats,
    LatencyPlan,
    Planner,
    Stats,
    Summary,
    summarize,
)
from shoal._api.batch_options import (
    Options,
    check_known,
    check_max_batch_size,
    check_wait,
)
from shoal._api.context import request_context
from shoal._errors import ConfigTypeError, RequestCancelledError, RequestTimeoutError, ShoalError
from shoal._router.queue import RANKS
from shoal._seam.loops import on_loop

# --- the callers waiting for their batch ----------------------------------------------------


class _Item:
    """One caller's request waiting in (or running in) a batch."""

    __slots__ = ("arguments", "arrived", "closed", "context", "deadline", "first", "future", "key",
                 "priority", "queue", "queued", "stream", "timer")  # fmt: skip

    def __init__(self, arguments: dict[str, Any], first: Any, key: str, priority: int,
                 loop: asyncio.AbstractEventLoop, streaming: bool) -> None:  # fmt: skip
        self.arguments = arguments
        self.first = first  # what batch_size_fn measures
        self.key = key
        self.priority = priority  # its rank: lower is served first
        self.arrived = time.monotonic()
        self.context = contextvars.copy_context()  # the batch runs in its first caller's context
        self.future: asyncio.Future[Any] | None = None if streaming else loop.create_future()
        self.queue: asyncio.Queue[tuple[str, Any]] | None = asyncio.Queue() if streaming else None
        self.queued = True
        self.closed = False  # streaming: the caller left or its stream ended
        # streaming: the caller's stream; it dies unread if the caller drops it unstarted
        # (an async generator that never started runs no ``finally``)
        self.stream: weakref.ref[Any] | None = None
        self.deadline: float | None = None  # the request's, on the time.monotonic() clock
        self.timer: asyncio.TimerHandle | None = None  # takes it out of the queue at the deadline

    def unqueue(self) -> None:
        self.queued = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def dropped(self) -> bool:
        if self.future is not None:
            return self.future.done()  # cancelled, or failed at its deadline
        if self.closed:
            return True
        # A stream closed or dropped before it started (it runs no ``finally``).
        stream = self.stream() if self.stream is not None else None
        return self.stream is not None and getattr(stream, "ag_frame", None) is None

    def put(self, kind: str, value: Any) -> None:
        if self.queue is not None and not self.dropped:
            self.closed = kind is not ITEM
            self.queue.put_nowait((kind, value))


class _Group:
    """The queued items of one multiplexed model, in the order they join batches (by
    priority, then arrival), and how many of them fit in a batch."""

    __slots__ = ("fitted", "full", "items", "limit", "measure", "values")

    def __init__(self) -> None:
        self.items: deque[_Item] = deque()
        self.reset()

    def add(self, item: _Item) -> None:
        """Queue ``item`` after the items of its class and of higher ones."""
        items = self.items
        if not items or items[-1].priority <= item.priority:
            items.append(item)  # the common case (one class): nothing moves
            return
        index = len(items) - 1
        while index > 0 and items[index - 1].priority > item.priority:
            index -= 1
        items.insert(index, item)
        self.reset()  # the prefix known to fit has changed

    def oldest(self) -> float:
        """When its longest-waiting item arrived (not always the first one to run)."""
        items = self.items
        if items[0].priority == items[-1].priority:
            return items[0].arrived  # one class: in arrival order
        return min(item.arrived for item in items)

    def reset(self) -> None:
        self.fitted = self.measure = self.limit = 0
        self.values: list[Any] = []
        self.full = False

    def fit(self, limit: int, size_fn: Callable[[list[Any]], int] | None) -> None:
        """Extend the prefix known to fit in ``limit``; ``full`` once the next item would not."""
        items = self.items
        if size_fn is None:
            self.fitted = self.measure = min(len(items), limit)
            self.full = len(items) >= limit
            return
        if limit != self.limit:
            self.reset()
            self.limit = limit
        for item in islice(items, self.fitted, None):
            if self.full:
                return
            self.values.append(item.first)
            size = size_fn(self.values)
            if size > limit and self.fitted:  # an item larger than the limit still runs, alone
                self.values.pop()
                self.full = True
                return
            self.fitted += 1
            self.measure = size
            self.full = size >= limit


# --- the batcher -----------------------------------------------------------------------


class _Batcher:
    """Queues one state's requests on one event loop and runs its batches."""

    def __init__(self, state: _State, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.groups: dict[str, _Group] = {}
        self.queued = self.running = 0
        self.wakeup = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = BatchRecorder(state.handler.fn.__name__)  # on the loop, in the replica

    def submit(self, arguments: dict[str, Any], streaming: bool) -> _Item:
        context = request_context.get()
        state = self.state
        first = state.handler.first(arguments) if state.options.batch_size_fn else None
        item = _Item(arguments, first, context.multiplexed_model_id, RANKS[context.priority],
                     self.loop, streaming)  # fmt: skip
        if context.deadline is not None:
            item.deadline = context.deadline
            delay = context.deadline - time.monotonic()
            item.timer = self.loop.call_later(delay, self._expire, item)
        planner = state.planner
        if planner is not None:
            planner.on_arrival(item.arrived, busy=bool(self.queued or self.running))
        group = self.groups.get(item.key)
        if group is None:
            group = self.groups[item.key] = _Group()
        group.add(item)
        self.queued += 1
        self.wakeup.set()
        if self._scheduler is None:
            # An empty context: the scheduler outlives the request that started it.
            self._scheduler = self.loop.create_task(self._schedule(), context=contextvars.Context())
        return item

    def discard(self, item: _Item) -> None:
        """Take a cancelled caller's item out of its queue (no-op once its batch started)."""
        if not item.queued:
            return
        item.unqueue()
        group = self.groups[item.key]
        group.items.remove(item)
        group.reset()
        self.queued -= 1
        self.state.stats.cancelled += 1
        self.wakeup.set()

    def _expire(self, item: _Item) -> None:
        """A queued caller's deadline passed: it leaves the queue with RequestTimeoutError."""
        item.timer = None
        if item.queued:
            self.discard(item)
            self._time_out(item)

    def _time_out(self, item: _Item) -> None:
        error = RequestTimeoutError(
            f"the call of @serve.batch {self.state.handler.name} reached its request's "
            "deadline before its batch started; it left the queue"
        )
        if item.future is not None and not item.future.done():
            item.future.set_exception(error)
        item.put(ERROR, error)

    async def _schedule(self) -> None:
        try:
            while self.queued:
                deadline = None
                if self.running < self.state.options.max_concurrent_batches:
                    now = time.monotonic()
                    group, deadline = self._ready(now)
                    if group is not None:
                        self._start(group, now)
                        continue
                self.wakeup.clear()
                delay = None if deadline is None else max(0.0, deadline - time.monotonic())
                if delay == math.inf:  # batch_wait_timeout_s=inf: only a full batch runs
                    delay = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.wakeup.wait()
        finally:
            self._scheduler = None

    def _ready(self, now: float) -> tuple[_Group | None, float | None]:
        """The group whose batch should start now (its first caller's priority first, then
        the oldest), else the next deadline."""
        options, planner = self.state.options, self.state.planner
        best: _Group | None = None
        best_key = (0, 0.0)
        next_deadline: float | None = None
        for key, group in list(self.groups.items()):
            if not group.items:
                del self.groups[key]
                continue
            arrived = group.oldest()
            limit = options.max_batch_size
            if planner is not None:
                limit = planner.batch_limit(limit, now - arrived)
            try:
                group.fit(limit, options.batch_size_fn)
            except Exception as exc:  # batch_size_fn raised: fail these callers, keep serving
                self._fail_group(key, group, exc)
                continue
            if group.full:
                due = now
            elif planner is not None:
                due = planner.start_by(arrived, group.measure, group.fitted, now)
            else:
                due = arrived + options.batch_wait_timeout_s
            if due <= now:
                rank = (group.items[0].priority, arrived)
                if best is None or rank < best_key:
                    best, best_key = group, rank
            elif next_deadline is None or due < next_deadline:
                next_deadline = due
        return best, next_deadline

    def _fail_group(self, key: str, group: _Group, exc: Exception) -> None:
        del self.groups[key]
        self.queued -= len(group.items)
        for item in group.items:
            item.unqueue()
            if item.future is not None and not item.future.done():
                item.future.set_exception(exc)
            item.put(ERROR, exc)

    def _start(self, group: _Group, now: float) -> None:
        taken = [group.items.popleft() for _ in range(group.fitted)]
        measure = group.measure
        group.reset()
        self.queued -= len(taken)
        for item in taken:
            if item.timer is not None and item.deadline is not None and item.deadline <= now:
                self._time_out(item)  # its timer is due but has not run yet
            item.unqueue()
        batch = [item for item in taken if not item.dropped]
        if len(batch) < len(taken):  # callers cancelled a moment ago (their task has not run)
            self.state.stats.cancelled += len(taken) - len(batch)
            if self.state.options.batch_size_fn is None:
                measure = len(batch)  # (by batch_size_fn: kept, an over-estimate)
        if not batch:
            return
        self.running += 1
        wait = now - min(item.arrived for item in batch)
        task = self.loop.create_task(self._run(batch, measure, wait), context=_context_of(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Item], measure: int, wait: float) -> None:
        state = self.state
        started = time.monotonic()
        ok = False
        try:
            if state.handler.streaming:
                ok = await self._run_stream(batch, measure, started)
            else:
                ok = await self._run_call(batch)
        finally:
            duration = time.monotonic() - started
            self.running -= 1
            state.stats.record(len(batch), measure, wait, duration, ok)
            self.metrics.observe(measure, wait)
            if ok and state.planner is not None and not state.handler.streaming:
                state.planner.observe(measure, duration)
            self.wakeup.set()

    async def _run_call(self, batch: list[_Item]) -> bool:
        handler = self.state.handler
        futures = [item.future for item in batch if item.future is not None]
        try:
            calls = [item.arguments for item in batch]
            results = as_list(await handler.call(self.state.owner, calls), len(batch), handler.name)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return False
        for future, result in zip(futures, results, strict=True):
            if not future.done():  # a caller cancelled mid-batch: its result is dropped
                future.set_result(result)
        return True

    async def _run_stream(self, batch: list[_Item], measure: int, started: float) -> bool:
        handler, planner = self.state.handler, self.state.planner
        first = True
        try:
            calls = [item.arguments for item in batch]
            async with contextlib.aclosing(handler.call(self.state.owner, calls)) as steps:
                async for step in steps:
                    if first and planner is not None:  # cost = time to the first step
                        planner.observe(measure, time.monotonic() - started)
                    first = False
                    for item, out in zip(
                        batch, as_list(step, len(batch), handler.name), strict=True
                    ):
                        stop = out is StopIteration or out is StopAsyncIteration
                        if stop or isinstance(out, StopIteration | StopAsyncIteration):
                            item.put(END, None)
                        else:
                            item.put(ITEM, out)
                    if all(item.dropped for item in batch):  # every caller done or gone
                        break
        except asyncio.CancelledError:
            for item in batch:
                item.put(ERROR, RequestCancelledError("the batch was cancelled"))
            raise
        except Exception as exc:
            for item in batch:
                item.put(ERROR, exc)
            return False
        for item in batch:
            item.put(END, None)
        return True


def _context_of(batch: list[_Item]) -> contextvars.Context:
    """The context a batch runs in: its first caller's, with the latest deadline of its
    callers (None when one has none)."""
    context = batch[0].context
    if batch[0].deadline is None:
        return context
    deadlines = [item.deadline for item in batch]
    latest = None if None in deadlines else max(d for d in deadlines if d is not None)
    if latest == batch[0].deadline:
        return context
    context = context.copy()
    context.run(_set_deadline, latest)
    return context


def _set_deadline(deadline: float | None) -> None:
    request_context.set(dataclasses.replace(request_context.get(), deadline=deadline))


# --- per-instance state, the callers, the decorator ---------------------------------------


class _State:
    """One batcher's options, stats and planner: per instance, or per free function."""

    def __init__(self, handler: Handler, owner: Any) -> None:
        self.handler = handler
        self.owner = owner
        self.options = dataclasses.replace(handler.options)
        target = self.options.target_latency_s
        self.planner = Planner(target) if target is not None else None
        self.stats = Stats()
        self._batcher: _Batcher | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled with a free function sent to a worker: it starts with a fresh batcher.
        return (_State, (self.handler, None))

    def batcher(self) -> _Batcher:
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        if batcher is None or batcher.loop is not loop:
            batcher = self._batcher = _Batcher(self, loop)
        return batcher

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Change the batch size limit, from the next batch on (for example in ``reconfigure``)."""
        self.options.max_batch_size = check_max_batch_size(max_batch_size)
        self._poke()

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        """Change how long a batch waits to fill, from the next batch on."""
        self.options.batch_wait_timeout_s = check_wait(batch_wait_timeout_s)
        self._poke()

    def get_max_batch_size(self) -> int:
        return self.options.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.options.batch_wait_timeout_s

    def _poke(self) -> None:
        # Setters may run in a thread (a sync reconfigure): wake the scheduler on its loop.
        batcher = self._batcher
        if batcher is None or batcher.loop.is_closed():
            return
        if on_loop(batcher.loop):
            batcher.wakeup.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                batcher.loop.call_soon_threadsafe(batcher.wakeup.set)

    def batch_stats(self) -> BatchStats:
        """A snapshot of this batcher's counters, recent percentiles and latency plan."""
        stats, options, batcher = self.stats, self.options, self._batcher
        sizes = stats.measures if options.batch_size_fn is not None else stats.sizes
        plan = None
        if self.planner is not None:
            plan = self.planner.plan(options.max_batch_size, time.monotonic())
        return BatchStats(
            batches=stats.batches,
            requests=stats.requests,
            failed_batches=stats.failed,
            cancelled=stats.cancelled,
            queued=batcher.queued if batcher is not None else 0,
            running=batcher.running if batcher is not None else 0,
            max_batch_size=options.max_batch_size,
            batch_wait_timeout_s=options.batch_wait_timeout_s,
            recent_sizes=tuple(stats.sizes),
            size=summarize(sizes),
            wait_s=summarize(stats.waits),
            duration_s=summarize(stats.durations),
            latency=plan,
        )


class _BatchMethod:
    """A batched method: each instance gets its own batcher on first access."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        take_names(self, handler.fn)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        try:
            callers = instance.__dict__.setdefault("_shoal_batchers", {})
        except AttributeError:
            raise ShoalError(
                f"@serve.batch method {self._handler.name} needs instances with a __dict__ "
                "to keep their batcher: remove __slots__ from the class or add '__dict__' to it"
            ) from None
        caller = callers.get(self)
        if caller is None:
            caller = callers[self] = make_caller(_State(self._handler, instance))
        return caller

    def __call__(self, instance: Any, *args: Any, **kwargs: Any) -> Any:
        return self.__get__(instance)(*args, **kwargs)

    def batch_stats(self, instance: Any) -> BatchStats:
        """``Model.method.batch_stats(instance)``: that instance's batcher's stats."""
        stats: BatchStats = self.__get__(instance).batch_stats()
        return stats

    def set_max_batch_size(self, max_batch_size: int) -> None:
        raise ShoalError(self._per_instance("set_max_batch_size"))

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        raise ShoalError(self._per_instance("set_batch_wait_timeout_s"))

    def _per_instance(self, setter: str) -> str:
        name = self._handler.fn.__name__
        return (
            f"each instance has its own batcher: call self.{name}.{setter}(...) on an "
            "instance (for example in reconfigure), not on the class"
        )


def batchers_of(instance: Any) -> dict[str, BatchStats]:
    """The stats of each batcher an instance has used, by method name (status details)."""
    callers = getattr(instance, "__dict__", {}).get("_shoal_batchers", {})
    return {method.__name__: caller.batch_stats() for method, caller in list(callers.items())}


def batch(
    _func: Callable[..., Any] | None = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Callable[[list[Any]], int] | None = None,
    target_latency_s: float | None = None,
    **unknown: Any,
) -> Any:
    """Batch concurrent calls of an async method or function (Ray Serve's ``@serve.batch``).

    Every form of Ray Serve works: ``@serve.batch``, ``@serve.batch()``,
    ``@serve.batch(max_batch_size=4)``, ``serve.batch(fn)`` and
    ``serve.batch(fn, max_batch_size=4)``. The handler takes one list per
    argument (``*args`` and ``**kwargs`` too) and returns one result per
    request (or, as an async generator, yields one such list per step; put
    ``StopIteration`` in a caller's slot to end that caller's stream). Callers
    pass single items. A batch runs when it
    holds ``max_batch_size`` items (by ``batch_size_fn`` when given: full when
    the next item would exceed it) or when its oldest request has waited
    ``batch_wait_timeout_s``; at most ``max_concurrent_batches`` run at once.
    With ``target_latency_s``, the batch size (up to ``max_batch_size``) and the
    wait are chosen from the measured cost and arrival rate instead (see
    docs/batching.md). Invalid options raise ConfigError at decoration time
    (see :mod:`shoal._api.batch_options`).
    """
    check_known(unknown)
    options = Options(
        max_batch_size, batch_wait_timeout_s, max_concurrent_batches, batch_size_fn,
        target_latency_s,
    ).validate()  # fmt: skip

    def decorate(fn: Callable[..., Any]) -> Any:
        if not callable(fn):
            raise ConfigTypeError(
                f"@serve.batch can only be used to decorate functions or methods, got {fn!r}"
            )
        handler = Handler(fn, options)
        if handler.is_method:
            return _BatchMethod(handler)
        return make_caller(_State(handler, None))

    if _func is None:
        return decorate
    if not callable(_func):
        raise ConfigTypeError(
            f"@serve.batch can only be used to decorate functions or methods, got {_func!r}; "
            f"pass options as keywords (for example max_batch_size={_func!r})"
        )
    return decorate(_func)


__all__ = ["BatchStats", "LatencyPlan", "Summary", "batch"]
