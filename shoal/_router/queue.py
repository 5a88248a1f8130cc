"""Request priorities, and the queue a router keeps its waiting requests in.

Three classes, by rank: ``high`` (0), ``normal`` (1, the default) and ``low`` (2). A
request carries its rank (``Request.priority``); a router serves the waiting requests
of a higher class first, and those of one class in arrival order (a new request never
overtakes one of its class already waiting). Priorities only order requests that
wait: a request that finds a replica with room is sent at once, whatever its class.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator

#: The classes, highest first: a request's rank is its index here.
PRIORITIES = ("high", "normal", "low")
#: The rank of a request that names no priority.
NORMAL = 1
RANKS = {name: rank for rank, name in enumerate(PRIORITIES)}
CHOICES = ", ".join(repr(name) for name in PRIORITIES)

Waiter = asyncio.Future[None]


def rank_of(priority: object) -> int | None:
    """The rank of a priority's name, or None if it names no class."""
    return RANKS.get(priority) if isinstance(priority, str) else None


class WaitQueue:
    """The waiting requests of one router: one FIFO per class, each mapping a request's
    wake-up future to the time it started waiting (an ordered dict, so that one that
    leaves from the middle goes in O(1)).

    ``size`` is the number of futures held, read on the fast path instead of a call.
    """

    __slots__ = ("_fifos", "size")

    def __init__(self) -> None:
        self._fifos = tuple(collections.OrderedDict[Waiter, float]() for _ in PRIORITIES)
        self.size = 0

    def push(self, waiter: Waiter, started: float, rank: int, first: bool = False) -> None:
        """Queue ``waiter`` last in its class, or ``first`` (one woken whose replica was
        lost before it could use it keeps its place)."""
        fifo = self._fifos[rank]
        fifo[waiter] = started
        if first:
            fifo.move_to_end(waiter, last=False)
        self.size += 1

    def remove(self, waiter: Waiter, rank: int) -> bool:
        """Take ``waiter`` out of its class; False if it was no longer queued."""
        if self._fifos[rank].pop(waiter, None) is None:
            return False
        self.size -= 1
        return True

    def pop_next(self) -> Waiter | None:
        """Take the request to serve next: the longest-waiting of the highest class."""
        for fifo in self._fifos:
            if fifo:
                self.size -= 1
                return fifo.popitem(last=False)[0]
        return None

    def oldest(self) -> tuple[Waiter, float, int] | None:
        """The request that has waited longest, whatever its class: ``(waiter, started,
        rank)``, or None. Only the heads are compared (each class is in arrival order)."""
        found = None
        for rank, fifo in enumerate(self._fifos):
            if fifo:
                waiter, started = next(iter(fifo.items()))
                if found is None or started < found[1]:
                    found = (waiter, started, rank)
        return found

    def pop_newest_below(self, rank: int) -> Waiter | None:
        """Take the most recent request of the lowest class below ``rank`` (lower
        priority), or None if none waits: the one a full queue pushes out first."""
        for fifo in reversed(self._fifos[rank + 1 :]):
            if fifo:
                self.size -= 1
                return fifo.popitem(last=True)[0]
        return None

    def has_below(self, rank: int) -> bool:
        """Whether a request of lower priority than ``rank`` waits."""
        return any(self._fifos[rank + 1 :])

    def drain(self) -> Iterator[Waiter]:
        """Take every request, highest class first, each class in arrival order."""
        while (waiter := self.pop_next()) is not None:
            yield waiter
