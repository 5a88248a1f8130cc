"""The hand-written batcher of the W3 reference server: what one would write without shoal.

A queue and one loop: take the first request, then collect more until the batch holds
``max_size`` requests or ``wait_s`` has passed since the first was taken; run the handler
on the list (one batch at a time), hand each caller its result, repeat. It counts batches
and requests so that the bench can report the mean batch size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[list[Any]], Awaitable[list[Any]]]


class Batcher:
    def __init__(self, handler: Handler, max_size: int, wait_s: float) -> None:
        self.handler = handler
        self.max_size = max_size
        self.wait_s = wait_s
        self.batches = 0
        self.requests = 0
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        """Queue one item and wait for its result (the loop starts on first use)."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run(self._queue))
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _collect(
        self, queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]]
    ) -> list[tuple[Any, asyncio.Future[Any]]]:
        loop = asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self, queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]]) -> None:
        while True:
            batch = await self._collect(queue)
            self.batches += 1
            self.requests += len(batch)
            try:
                results = await self.handler([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # the caller may have gone
                    future.set_result(result)

    def stats(self) -> dict[str, Any]:
        """The counters, with the same names as shoal's ``BatchStats`` fields."""
        return {
            "batches": self.batches,
            "requests": self.requests,
            "max_batch_size": self.max_size,
            "batch_wait_timeout_s": self.wait_s,
            "queued": 0 if self._queue is None else self._queue.qsize(),
            "latency": None,
        }
