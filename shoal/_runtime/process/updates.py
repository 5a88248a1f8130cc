"""Updates (replica sets, routes) sent to many processes at once, each acknowledged.

A process that does not acknowledge one in time is *lagging* (its event loop is
blocked, or it hangs): it still gets every later update, in order, but nobody waits
for it until it answers again (see :meth:`Updates.deliver`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import Any

from shoal._config import TIMEOUTS
from shoal._transport.codec import Encoded
from shoal._transport.messages import Failure, Message

logger = logging.getLogger("shoal.runtime")


class Updates:
    """The runtime's sending of updates; ``lagging``: ids of the processes that missed an
    acknowledgement and have not answered since. Targets have ``conn``, ``worker_id``
    and ``stopping`` (workers and attached processes)."""

    def __init__(self) -> None:
        self.lagging: set[str] = set()

    def forget(self, worker_id: str) -> None:
        """``worker_id``'s process is gone."""
        self.lagging.discard(worker_id)

    async def deliver(self, targets: Sequence[Any], msg: Message) -> None:
        """Send ``msg`` to every target; wait at most ``TIMEOUTS.update_ack_s`` for each reply.

        A process that misses the acknowledgement is *lagging*: its event loop is
        blocked (or it is hung). Later updates are still sent to it, in order, but
        are not waited for until it answers anything again; meanwhile its own
        routers cannot send a request (they run on that loop), and it applies the
        updates already in its socket before the requests waiting behind them. So
        a blocked replica never holds up other processes' updates or an unrelated
        ``serve.run``; the one guarantee it weakens is that of a lagging process
        about a replica being stopped (such a request is still served while the
        replica drains, or fails over to another replica once it has exited).
        """
        waiting: dict[asyncio.Future[Message], Any] = {}
        encoded = Encoded(msg)  # pickled once for every process, not once per process
        for target in targets:
            if target.conn is None or target.conn.closed:
                continue
            future = target.conn.call(encoded)
            future.add_done_callback(functools.partial(self._acknowledged, target.worker_id))
            if target.worker_id not in self.lagging:
                waiting[future] = target
        if not waiting:
            return
        _, late = await asyncio.wait(waiting, timeout=TIMEOUTS.update_ack_s)
        if late:
            for _ in range(2):  # replies already received count (see _ask)
                await asyncio.sleep(0)
        for future in late:
            target = waiting[future]
            if future.done() or target.stopping or target.worker_id in self.lagging:
                continue
            self.lagging.add(target.worker_id)
            logger.warning(
                "%s did not acknowledge %s within %g s (its event loop is blocked?); "
                "not waiting for it until it answers again",
                target.worker_id, type(msg).__name__, TIMEOUTS.update_ack_s,
            )  # fmt: skip

    def _acknowledged(self, worker_id: str, future: asyncio.Future[Message]) -> None:
        if future.cancelled():
            return
        self.lagging.discard(worker_id)  # it answered (or is gone): its loop runs
        reply = None if future.exception() is not None else future.result()
        if isinstance(reply, Failure):
            logger.warning("%s failed to apply an update: %s", worker_id, reply.message)
