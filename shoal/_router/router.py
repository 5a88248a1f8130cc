"""Routers: one per deployment in every process that holds handles to it.

A router picks a replica by power-of-two choices on its own in-flight counts,
never sends a replica more than ``max_ongoing_requests`` at once (excess
requests wait here, in FIFO order, not on the replica), and drops a replica
the moment its connection breaks. A request that could not be handed to a
replica (its connection was already gone) is retried on another one; a
request a replica had accepted fails with :class:`ReplicaDiedError` if that
replica dies, because it may have had side effects.

Load shedding (the queue's guarantees):

- at most ``max_queued_requests`` requests wait here; one more is refused at
  once with :class:`BackPressureError` (nothing is sent);
- a new request never overtakes one already waiting;
- a waiting request whose caller gives up (its task is cancelled: a timeout,
  ``response.cancel()``, an HTTP client gone) leaves the queue at once and is
  never sent;
- while the deployment has no replica able to serve, a request waits at most
  ``no_replica_timeout_s``, then fails with :class:`DeploymentUnavailableError`.

None of this costs anything on the fast path (a free replica, nobody waiting):
no task, no timer, no allocation beyond the request's own future.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import random
from typing import Any

from shoal._config import NO_REPLICA_TIMEOUT_S
from shoal._errors import (
    BackPressureError,
    DeploymentUnavailableError,
    NotFoundError,
    ReplicaDiedError,
    TransportError,
)
from shoal._seam.protocols import Connector, ReplicaClient, Stream
from shoal._transport.messages import Message, ReplicaInfo, ReplicaSetUpdate, Request, StreamItem

logger = logging.getLogger("shoal.router")

#: Timers may fire this much early; a waiter this close to its deadline counts as expired.
_TIMER_SLACK_S = 0.001


class _Slot:
    __slots__ = ("client", "in_flight", "info", "limit")

    def __init__(self, info: ReplicaInfo, client: ReplicaClient) -> None:
        self.info = info
        self.client = client
        self.limit = info.max_ongoing_requests
        self.in_flight = 0


class Router:
    """Routes requests of one deployment to its replicas. Lives on one event loop."""

    def __init__(self, registry: RouterRegistry, app: str, deployment: str) -> None:
        self.app = app
        self.deployment = deployment
        self.loop = registry.loop
        self._connector = registry.connector
        self._infos: dict[str, ReplicaInfo] = {}
        self._slots: list[_Slot] = []
        self._connecting: set[str] = set()
        # Waiting requests in FIFO order: each one's wake-up future -> when it started
        # waiting (an ordered dict: a cancelled one leaves from the middle in O(1)).
        self._waiters: collections.OrderedDict[asyncio.Future[None], float] = (
            collections.OrderedDict()
        )
        #: Requests waiting for a replica (in ``_waiters``, or woken and about to pick one).
        self.waiting = 0
        self.max_queued_requests = -1
        self.no_replica_timeout_s = NO_REPLICA_TIMEOUT_S
        self._no_replica_since: float | None = self.loop.time()  # None: a replica is connected
        self._expiry: asyncio.TimerHandle | None = None  # fails waiters past no_replica_timeout_s
        self._active = False
        self.exists = True

    # --- membership ----------------------------------------------------------------

    def apply(self, update: ReplicaSetUpdate) -> None:
        self.exists = update.exists
        self.max_queued_requests = update.max_queued_requests
        self.no_replica_timeout_s = update.no_replica_timeout_s
        self._infos = {info.replica_id: info for info in update.replicas}
        self._slots = [slot for slot in self._slots if slot.info.replica_id in self._infos]
        if not self.exists:
            self._fail_waiters()
            return
        if not self._slots:
            self._no_replica()
        if self._expiry is not None:  # the timeout may have changed
            self._expiry.cancel()
            self._arm_expiry()
        if self._active:
            self._connect_missing()

    def activate(self) -> None:
        """Start connecting to replicas (routers connect only once they are used)."""
        if not self._active:
            self._active = True
            self._connect_missing()

    def _connect_missing(self) -> None:
        present = {slot.info.replica_id for slot in self._slots}
        for replica_id, info in self._infos.items():
            if replica_id not in present and replica_id not in self._connecting:
                self._connecting.add(replica_id)
                self.loop.create_task(self._connect(info))

    async def _connect(self, info: ReplicaInfo) -> None:
        try:
            client = await self._connector.connect(info)
        except Exception as exc:  # the replica is gone or going; the controller will tell us
            logger.debug("cannot connect to replica %s: %r", info.replica_id, exc)
            return
        finally:
            self._connecting.discard(info.replica_id)
        # Compare by value: every replica-set update brings fresh (unpickled) info
        # objects, so an update that arrives while we connect must not orphan this one.
        current = self._infos.get(info.replica_id)
        if client.closed or current != info:
            client.close()
            if current is not None and self._active:
                self._connect_missing()  # its address changed while we connected
            return
        slot = _Slot(current, client)
        self._slots.append(slot)
        client.on_close(functools.partial(self._lost, slot))
        self._no_replica_since = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._wake(slot.limit)

    def _lost(self, slot: _Slot) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
            if not self._slots:
                self._no_replica()

    # --- assignment ----------------------------------------------------------------

    def choose(self) -> _Slot | None:
        """Power of two choices among replicas below their limit; None if all are full."""
        slots = self._slots
        count = len(slots)
        if count == 1:
            only = slots[0]
            return only if only.in_flight < only.limit else None
        if count == 0:
            return None
        first, second = random.sample(slots, 2)
        if second.in_flight < first.in_flight:
            first, second = second, first
        if first.in_flight < first.limit:
            return first
        free = [slot for slot in slots if slot.in_flight < slot.limit]
        return min(free, key=lambda slot: slot.in_flight) if free else None

    def send(self, slot: _Slot, request: Request) -> asyncio.Future[Message]:
        future = slot.client.call(request)
        slot.in_flight += 1
        future.add_done_callback(functools.partial(self._finished, slot))
        return future

    def _finished(self, slot: _Slot, _future: Any) -> None:
        slot.in_flight -= 1
        if self._waiters:
            self._wake(1)

    async def assign(self, request: Request) -> Message:
        """Send ``request`` as soon as a replica has room; return its reply message."""
        while True:
            slot = await self._wait_for_slot()
            future = self.send(slot, request)
            if future.done() and isinstance(future.exception(), TransportError):
                continue  # never reached the replica: safe to send elsewhere
            try:
                return await future
            except TransportError as exc:
                raise ReplicaDiedError(
                    f"replica {slot.info.replica_id} of deployment '{self.deployment}' died "
                    f"while handling the request ({exc})"
                ) from None

    async def broadcast(self, request: Request) -> dict[str, Message]:
        """Send ``request`` to every replica in the current set; their replies by replica id.

        Control-like calls (reloading weights, clearing caches) bypass the
        ``max_ongoing_requests`` queue so they are never stuck behind traffic.
        """
        self.activate()
        if not self.exists:
            raise self._deleted()
        connected = {slot.info.replica_id: slot.client for slot in self._slots}
        clients, extra = {}, []
        for replica_id, info in self._infos.items():
            client = connected.get(replica_id)
            if client is None:  # still connecting in the background: use a connection of our own
                try:
                    client = await self._connector.connect(info)
                except (TransportError, OSError):
                    continue  # it went away: it is no longer part of the set
                extra.append(client)
            clients[replica_id] = client
        try:
            replies = await asyncio.gather(
                *(c.call(request) for c in clients.values()), return_exceptions=True
            )
        finally:
            for client in extra:
                client.close()
        results = {}
        for replica_id, reply in zip(clients, replies, strict=True):
            if isinstance(reply, TransportError):
                continue  # died during the broadcast: its replacement starts from scratch
            if isinstance(reply, BaseException):
                raise reply
            results[replica_id] = reply
        return results

    async def open_stream(self, request: Request) -> Stream:
        """Start a streaming request; the slot stays busy until the stream ends."""
        slot = await self._wait_for_slot()
        stream = slot.client.stream(request)
        slot.in_flight += 1
        return _CountedStream(stream, functools.partial(self._finished, slot, None))

    def try_open_stream(self, request: Request) -> Stream | None:
        """Open a stream at once if a replica has room and nobody waits; else None
        (then :meth:`open_stream` waits, or refuses). Never suspends."""
        if self.waiting or not self.exists:
            return None
        self.activate()
        slot = self.choose()
        if slot is None:
            return None
        stream = slot.client.stream(request)
        slot.in_flight += 1
        return _CountedStream(stream, functools.partial(self._finished, slot, None))

    async def _wait_for_slot(self) -> _Slot:
        self.activate()
        if not self.exists:
            raise self._deleted()
        if not self.waiting:  # nobody waits: take a free replica without queueing
            slot = self.choose()
            if slot is not None:
                return slot
        return await self._queue()

    @property
    def queue_full(self) -> bool:
        """Whether a request that has to wait would be refused (``max_queued_requests``)."""
        return 0 <= self.max_queued_requests <= self.waiting

    async def _queue(self) -> _Slot:
        """Wait in FIFO order for a free replica; see the module's guarantees."""
        if self.queue_full:
            raise BackPressureError(
                self.waiting, self.max_queued_requests, self.deployment, self.app
            )
        self.waiting += 1
        started = self.loop.time()
        woken = False
        try:
            while True:
                waiter: asyncio.Future[None] = self.loop.create_future()
                self._waiters[waiter] = started
                if woken:  # woken, but its replica was lost meanwhile: keep its place
                    self._waiters.move_to_end(waiter, last=False)
                if not self._slots and self._expiry is None:
                    self._no_replica()
                try:
                    await waiter
                except asyncio.CancelledError:
                    if self._waiters.pop(waiter, None) is None and _woken(waiter):
                        self._wake(1)  # we were woken but leave: pass the turn on
                    raise
                if not self.exists:
                    raise self._deleted()
                slot = self.choose()
                if slot is not None:
                    return slot
                woken = True
        finally:
            self.waiting -= 1

    def _wake(self, count: int) -> None:
        waiters = self._waiters
        while count > 0 and waiters:
            waiter, _started = waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _fail_waiters(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        while self._waiters:
            waiter, _started = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)  # the waiter re-checks ``exists`` and raises

    def _deleted(self) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(
            f"deployment '{self.deployment}' of application '{self.app}' was deleted"
        )

    # --- no replica able to serve --------------------------------------------------

    def _no_replica(self) -> None:
        """The router has no connected replica: bound the wait of the requests queued."""
        if self._no_replica_since is None:
            self._no_replica_since = self.loop.time()
        if self._expiry is None and self._waiters:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        """Time the failure of the longest-waiting request (waiters expire in FIFO order)."""
        self._expiry = None
        if self._no_replica_since is None or not self._waiters:
            return
        started = next(iter(self._waiters.values()))
        deadline = max(started, self._no_replica_since) + self.no_replica_timeout_s
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        since = self._no_replica_since
        if since is None:
            return
        now = self.loop.time()
        timeout = self.no_replica_timeout_s
        while self._waiters:
            waiter, started = next(iter(self._waiters.items()))
            waited = now - max(started, since)
            if waited < timeout - _TIMER_SLACK_S:
                break
            del self._waiters[waiter]
            if not waiter.done():
                waiter.set_exception(self._unavailable(waited))
        self._arm_expiry()

    def _unavailable(self, waited: float) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(
            f"deployment '{self.deployment}' of application '{self.app}' had no replica able "
            f"to take the request for {waited:.3g} s (no_replica_timeout_s="
            f"{self.no_replica_timeout_s:g}); the request was not sent. serve.status() says "
            "why (replicas starting, failing, or num_replicas=0); raise no_replica_timeout_s "
            "if its replicas need longer to start"
        )


def _woken(waiter: asyncio.Future[None]) -> bool:
    """Whether ``waiter`` was given a turn (not cancelled, not failed)."""
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


class _CountedStream:
    """A stream that releases its replica slot exactly once when it ends or is closed."""

    __slots__ = ("_release", "_stream")

    def __init__(self, stream: Stream, release: Any) -> None:
        self._stream = stream
        self._release = release

    async def next(self) -> Message:
        try:
            msg = await self._stream.next()
        except BaseException:
            self.close()
            raise
        if type(msg) is not StreamItem:
            self.close()
        return msg

    def send_input(self, value: Any) -> None:
        self._stream.send_input(value)

    def close(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            self._stream.close()
            release()


class RouterRegistry:
    """The routers of one process, fed with replica sets by the controller."""

    def __init__(self, connector: Connector, loop: asyncio.AbstractEventLoop) -> None:
        self.connector = connector
        self.loop = loop
        self._routers: dict[tuple[str, str], Router] = {}
        self._ingress: dict[str, str] = {}  # app -> its ingress deployment, from the updates

    def ingress_of(self, app: str) -> str | None:
        """The ingress deployment of ``app`` as known in this process, or None."""
        return self._ingress.get(app)

    def apply(self, update: ReplicaSetUpdate) -> None:
        if update.ingress and update.exists:
            self._ingress[update.app] = update.deployment
        elif self._ingress.get(update.app) == update.deployment:
            del self._ingress[update.app]
        key = (update.app, update.deployment)
        router = self._routers.get(key)
        if router is None:
            if not update.exists:
                return
            router = self._routers[key] = Router(self, update.app, update.deployment)
        router.apply(update)

    def get(self, app: str, deployment: str) -> Router:
        router = self._routers.get((app, deployment))
        if router is None:
            known = sorted(f"{a}/{d}" for (a, d), r in self._routers.items() if r.exists)
            raise NotFoundError(
                f"deployment '{deployment}' of application '{app}' does not exist; "
                f"running deployments (app/deployment): {', '.join(known) or 'none'}"
            )
        return router
