"""Model-aware replica choice for multiplexed requests (docs/multiplexing.md).

A request with a ``multiplexed_model_id`` goes to, in order:

1. the least loaded replica that holds the model (loaded or loading) and has room
   (below ``max_ongoing_requests`` from this router);
2. otherwise the least loaded replica with room (ties: the one holding fewer models,
   then at random), which loads the model;
3. otherwise none: the request waits in the router's queue like any other.

Rule 1 gives way to rule 2, *spreading* the model to one more replica, when its holders
cannot take its traffic: they are all full (at ``max_ongoing_requests``), or the model is
*hot*: it is loaded (not still loading) on its holders, its share of this router's
recent multiplexed requests exceeds its holders' share of the replicas (80% of the
traffic on 1 of 2 replicas), and the least loaded holder is busier than the least loaded
other replica. A model then ends up on about ``share x replicas`` replicas, and stays
there while their caches keep it. A model still loading is never spread by the second
condition, so a burst of requests for a new model loads it once.

Where a router learns which replica holds which model:

- its own record, at once: the replica a request for model m is sent to holds m from
  then on (for :data:`SENT_GRACE_S`, unless the replica's report confirms it), so the
  requests that follow, concurrent ones included, go there and m is loaded once;
- the replicas' reports: the first multiplexed request a router routes opens one
  stream to every replica of the deployment (the reserved method :data:`WATCH_METHOD`,
  served by the replica without user code and not counted as a request), on which the
  replica sends the ids it holds (loaded, and loading) at once and again after every change (a load
  started or failed, a model evicted). The delay is one data-plane message (well under
  a millisecond on one machine); no controller is involved.

A request without a model id never comes here (the router's own choice applies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable
from typing import Any

from shoal._transport.messages import Request, StreamItem

logger = logging.getLogger("shoal.router")

#: The reserved method a router streams a replica's held model ids from.
WATCH_METHOD = "__shoal_multiplexed_model_ids__"
#: How long a router trusts its own record that a replica holds a model (the replica's
#: report normally confirms it within a millisecond: it lists models being loaded).
SENT_GRACE_S = 1.0
#: The traffic shares count this many requests at most: past it, every count is halved.
SHARE_WINDOW = 1000
#: Shares are not used before this many requests were counted.
SHARE_MIN_SAMPLE = 20
_EMPTY: frozenset[str] = frozenset()
_NONE: dict[str, float] = {}


class ModelRouting:
    """One router's knowledge of which of its replicas hold which models."""

    __slots__ = ("_counts", "_loading", "_loop", "_reported", "_sent", "_total", "_watches")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._reported: dict[str, frozenset[str]] = {}  # replica id -> ids held (reported)
        self._loading: dict[str, frozenset[str]] = {}  # replica id -> ids still loading
        self._sent: dict[str, dict[str, float]] = {}  # replica id -> {id: last sent}
        self._watches: dict[str, tuple[asyncio.Task[None], Any]] = {}
        self._counts: dict[str, float] = {}  # model id -> recent requests (decayed)
        self._total = 0.0

    def holders(self, model_id: str) -> list[str]:
        """The replicas known to hold ``model_id`` (reported, or sent to recently)."""
        now = self._loop.time()
        known = {*self._reported, *self._sent}
        return sorted(r for r in known if self._holds(r, model_id, now))

    def reported(self) -> dict[str, frozenset[str]]:
        """The ids each watched replica last reported."""
        return dict(self._reported)

    def choose(self, slots: list[Any], model_id: str) -> Any:
        """The slot for a request for ``model_id`` (see the module), or None: all full."""
        now = self._loop.time()
        holder = other = None
        other_key: tuple[int, int] = (0, 0)
        holders = 0
        count = len(slots)
        start = random.randrange(count) if count > 1 else 0
        for index in range(count):
            slot = slots[(start + index) % count]
            replica_id = slot.info.replica_id
            if replica_id not in self._watches:
                self._watch(slot)
            held = self._holds(replica_id, model_id, now)
            holders += held
            if slot.in_flight >= slot.limit:
                continue
            if held:
                if holder is None or slot.in_flight < holder.in_flight:
                    holder = slot
            else:
                key = (slot.in_flight, len(self._reported.get(replica_id, _EMPTY)))
                if other is None or key < other_key:
                    other, other_key = slot, key
        chosen = holder if holder is not None else other
        if (
            holder is not None
            and other is not None
            and other.in_flight < holder.in_flight
            and self._hot(model_id, holders, count)
            and self._loaded(holder, model_id)
        ):
            chosen = other  # spread the model to one more replica
        if chosen is not None:
            self._record(chosen.info.replica_id, model_id, now)
            self._count(model_id)
        return chosen

    def _hot(self, model_id: str, holders: int, replicas: int) -> bool:
        """Whether ``model_id`` takes a larger share of the recent requests than its
        holders are of the replicas."""
        total = self._total
        if total < SHARE_MIN_SAMPLE:
            return False
        return self._counts.get(model_id, 0.0) / total > holders / replicas

    def _loaded(self, slot: Any, model_id: str) -> bool:
        """Whether the replica of ``slot`` reported ``model_id`` loaded (not loading)."""
        replica_id = slot.info.replica_id
        return model_id in self._reported.get(
            replica_id, _EMPTY
        ) and model_id not in self._loading.get(replica_id, _EMPTY)

    def _count(self, model_id: str) -> None:
        counts = self._counts
        counts[model_id] = counts.get(model_id, 0.0) + 1.0
        self._total += 1.0
        if self._total >= SHARE_WINDOW:  # halve: older requests weigh less
            for key in list(counts):
                value = counts[key] / 2
                if value < 0.5:
                    del counts[key]
                else:
                    counts[key] = value
            self._total = sum(counts.values())

    def shares(self) -> dict[str, float]:
        """Each model's share of this router's recent multiplexed requests."""
        total = self._total
        return {m: c / total for m, c in self._counts.items()} if total else {}

    def _holds(self, replica_id: str, model_id: str, now: float) -> bool:
        if model_id in self._reported.get(replica_id, _EMPTY):
            return True
        sent = self._sent.get(replica_id, _NONE).get(model_id)
        return sent is not None and now - sent < SENT_GRACE_S

    def _record(self, replica_id: str, model_id: str, now: float) -> None:
        sent = self._sent.get(replica_id)
        if sent is None:
            sent = self._sent[replica_id] = {}
        sent[model_id] = now
        if len(sent) > 256:
            self._prune(replica_id, now)

    def _prune(self, replica_id: str, now: float) -> None:
        sent = self._sent.get(replica_id)
        if sent:
            reported = self._reported.get(replica_id, _EMPTY)
            stale = [m for m, t in sent.items() if m in reported or now - t >= SENT_GRACE_S]
            for model_id in stale:
                del sent[model_id]

    # --- the replicas' reports -------------------------------------------------------

    def _watch(self, slot: Any) -> None:
        replica_id = slot.info.replica_id
        try:
            stream = slot.client.stream(Request(WATCH_METHOD, (), {}, "", True))
        except Exception as exc:  # the replica is going away; its loss is handled elsewhere
            logger.debug("cannot watch the models of replica %s: %r", replica_id, exc)
            stream = None
        task = self._loop.create_task(self._read(replica_id, stream))
        self._watches[replica_id] = (task, stream)

    async def _read(self, replica_id: str, stream: Any) -> None:
        if stream is None:
            return
        try:
            while type(message := await stream.next()) is StreamItem:
                loaded, loading = message.value
                self._reported[replica_id] = frozenset((*loaded, *loading))
                self._loading[replica_id] = frozenset(loading)
                self._prune(replica_id, self._loop.time())
        except Exception as exc:  # the replica died: the router drops it (forget)
            logger.debug("watch of replica %s ended: %r", replica_id, exc)

    def forget(self, replica_id: str) -> None:
        """Replica ``replica_id`` left the router: stop watching it, drop what it held."""
        watch = self._watches.pop(replica_id, None)
        if watch is not None:
            task, stream = watch
            task.cancel()
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
        self._reported.pop(replica_id, None)
        self._loading.pop(replica_id, None)
        self._sent.pop(replica_id, None)

    def retain(self, replica_ids: Iterable[str]) -> None:
        """Forget every replica not in ``replica_ids`` (the current replica set)."""
        keep = set(replica_ids)
        for replica_id in [r for r in {*self._watches, *self._sent} if r not in keep]:
            self.forget(replica_id)
