"""What ``@serve.batch`` gives callers: one call in, one result (or one stream) out.

- A call of a batched coroutine joins its batch when it is awaited; its result
  is its element of the handler's list.
- A call of a batched async generator joins its batch at once, as in Ray
  Serve (callers may start several calls, then read them one after another);
  made where no event loop runs, it joins at its first read instead. It
  returns the caller's stream of its elements of each step. A stream closed
  or dropped, even before its first read, leaves its batch, and the handler
  is closed once no caller of its batch is left.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from shoal._api.batch_handler import take_names

if TYPE_CHECKING:
    from shoal._api.batching import _Batcher, _Item, _State

#: What a streaming caller's queue carries: an element, the end, or an exception.
ITEM, END, ERROR = "item", "end", "error"


async def _stream(
    state: _State, arguments: dict[str, Any], queued: tuple[_Batcher, _Item] | None
) -> AsyncIterator[Any]:
    """One caller's stream: its element of each step the handler yields."""
    if queued is None:  # made where no loop ran: it joins the batch now, on this loop
        batcher = state.batcher()
        item = batcher.submit(arguments, streaming=True)
    else:
        batcher, item = queued
    assert item.queue is not None
    try:
        while True:
            kind, value = await item.queue.get()
            if kind is ITEM:
                yield value
            elif kind is END:
                return
            else:
                raise value
    finally:
        item.closed = True  # later outputs for this caller are dropped
        batcher.discard(item)


class StreamCaller:
    """A batched async generator's caller.

    Called, it joins the batch and returns the caller's stream. It shows
    ``inspect`` the handler's code and this call's signature, so
    ``inspect.isasyncgenfunction`` is true of it, as of the async generator
    function it stands for (the replica streams it as it streams one).
    """

    def __init__(self, state: _State) -> None:
        self._state = state
        fn = state.handler.fn
        take_names(self, fn)
        self.__code__ = fn.__code__
        self.__defaults__ = fn.__defaults__
        self.__kwdefaults__ = fn.__kwdefaults__
        self.__annotations__ = dict(getattr(fn, "__annotations__", {}))
        self.__signature__ = state.handler.signature

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        state = self._state
        arguments = state.handler.bind(args, kwargs)
        try:
            batcher = state.batcher()
        except RuntimeError:  # no running loop (a sync caller): join at the first read
            return _stream(state, arguments, None)
        item = batcher.submit(arguments, streaming=True)
        stream = _stream(state, arguments, (batcher, item))
        item.stream = weakref.ref(stream)  # an unread stream leaves when it is dropped
        return stream


def make_caller(state: _State) -> Callable[..., Any]:
    """The callable callers call, with the batcher's setters, getters and stats."""
    handler = state.handler

    async def call(*args: Any, **kwargs: Any) -> Any:
        batcher = state.batcher()
        item = batcher.submit(handler.bind(args, kwargs), streaming=False)
        assert item.future is not None
        try:
            return await item.future
        except asyncio.CancelledError:
            batcher.discard(item)  # still queued: leave the batch; running: result dropped
            raise

    caller: Any = StreamCaller(state) if handler.streaming else call
    if not handler.streaming:
        take_names(caller, handler.fn)
    caller.set_max_batch_size = state.set_max_batch_size
    caller.set_batch_wait_timeout_s = state.set_batch_wait_timeout_s
    caller._get_max_batch_size = state.get_max_batch_size  # Ray Serve's getters
    caller._get_batch_wait_timeout_s = state.get_batch_wait_timeout_s
    caller.batch_stats = state.batch_stats
    caller._shoal_batch_state = state
    return caller
