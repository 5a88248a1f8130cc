"""Request priorities, and the queue a router keeps its waiting requests in.

Three classes, by rank: ``high`` (0), ``normal`` (1, the default) and ``low`` (2). A
request carries its rank (``Request.priority``); a router serves the waiting requests
of a higher class first, and those of one class in arrival order (a new request never
overtakes one of its class already waiting). Priorities only order requests that
wait: a request that finds a replica with room is sent at once, whatever its class.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

#: The classes, highest first: a request's rank is its index here.
PRIORITIES = ("high", "normal", "low")
#: The rank of a request that names no priority.
NORMAL = 1
RANKS = {name: rank for rank, name in enumerate(PRIORITIES)}
CHOICES = ", ".join(repr(name) for name in PRIORITIES)


class Entry(Protocol):
    """What the queue needs of a waiting request: its class and when it started waiting."""

    rank: int
    started: float


E = TypeVar("E", bound=Entry)


def rank_of(priority: object) -> int | None:
    """The rank of a priority's name, or None if it names no class."""
    return RANKS.get(priority) if isinstance(priority, str) else None


class WaitQueue(Generic[E]):
    """The waiting requests of one router: one FIFO per class of entries (each names
    its class, ``rank``, and when it started waiting, ``started``), each an ordered
    dict, so that one that leaves from the middle goes in O(1).

    ``size`` is the number of entries held, read on the fast path instead of a call.
    """

    __slots__ = ("_fifos", "size")

    def __init__(self) -> None:
        self._fifos = tuple(collections.OrderedDict[E, None]() for _ in PRIORITIES)
        self.size = 0

    def push(self, entry: E) -> None:
        """Queue ``entry`` last in its class."""
        self._fifos[entry.rank][entry] = None
        self.size += 1

    def remove(self, entry: E) -> bool:
        """Take ``entry`` out of its class; False if it was no longer queued."""
        fifo = self._fifos[entry.rank]
        if entry not in fifo:
            return False
        del fifo[entry]
        self.size -= 1
        return True

    def peek_next(self) -> E | None:
        """The request to serve next: the longest-waiting of the highest class."""
        for fifo in self._fifos:
            if fifo:
                return next(iter(fifo))
        return None

    def pop_next(self) -> E | None:
        """Take the request to serve next (see :meth:`peek_next`)."""
        for fifo in self._fifos:
            if fifo:
                self.size -= 1
                return fifo.popitem(last=False)[0]
        return None

    def oldest(self) -> E | None:
        """The request that has waited longest, whatever its class, or None. Only the
        heads are compared (each class is in arrival order)."""
        found = None
        for fifo in self._fifos:
            if fifo:
                head = next(iter(fifo))
                if found is None or head.started < found.started:
                    found = head
        return found

    def pop_newest_below(self, rank: int) -> E | None:
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

    def drain(self) -> Iterator[E]:
        """Take every request, highest class first, each class in arrival order."""
        while (entry := self.pop_next()) is not None:
            yield entry
