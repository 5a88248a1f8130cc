"""One deployment's replica-set updates, coalesced.

Every replica that starts, stops or dies changes its deployment's set, and every
change used to send the whole set to every process holding routers: a deployment
of ``n`` replicas started together sent ``n`` updates to each of ``P`` processes,
``n * P`` messages of ``O(n)`` bytes each (2,000 replicas on 100 nodes: 4.2 million
messages; ``docs/scaling.md``). Now a change asked for while an update is being
delivered waits for it, then one more update carries every change made meanwhile.

Guarantee (unchanged for callers): :meth:`Publisher.publish` returns once an update
built at or after the call has been delivered (``Runtime.publish``: applied by every
process, except those not answering within its short timeout). So a replica is out
of every router before ``stop_replicas`` asks it to stop, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from shoal._transport.messages import ReplicaSetUpdate


class Publisher:
    """Sends ``make()`` through ``send``; calls made during a send share the next one."""

    def __init__(
        self,
        make: Callable[[], ReplicaSetUpdate],
        send: Callable[[ReplicaSetUpdate], Awaitable[None]],
    ) -> None:
        self._make = make
        self._send = send
        self._asked = 0  # calls so far
        self._covered = 0  # calls whose changes an update already delivered
        self._sending: asyncio.Future[None] | None = None
        #: Updates sent so far (the coalescing is visible in tests and benches).
        self.sent = 0

    async def publish(self) -> None:
        """Deliver the current set; returns once an update built after this call is."""
        self._asked += 1
        asked = self._asked
        while self._covered < asked:
            if self._sending is None or self._sending.done():
                self._sending = asyncio.ensure_future(self._send_current())
            # Shielded: a caller that gives up does not cancel an update others wait for.
            await asyncio.shield(self._sending)

    async def _send_current(self) -> None:
        covers = self._asked  # the set is built now: it includes every change asked so far
        update = self._make()
        self.sent += 1
        await self._send(update)
        self._covered = max(self._covered, covers)

    async def idle(self) -> None:
        """Return once no update is being sent (its outcome is the callers' business)."""
        while self._sending is not None and not self._sending.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._sending)
