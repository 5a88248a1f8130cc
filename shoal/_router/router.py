"""Routers: one per deployment in every process that holds handles to it.

A router picks a replica by power-of-two choices on its own in-flight counts,
never sends a replica more than ``max_ongoing_requests`` at once (excess
requests wait here, in FIFO order, not on the replica), and drops a replica
the moment its connection breaks. A request that could not be handed to a
replica (its connection was already gone) is retried on another one; a
request a replica had accepted fails with :class:`ReplicaDiedError` if that
replica dies, because it may have had side effects.

Priorities (``Request.priority``, see :mod:`shoal._router.queue`): waiting requests
of a higher class leave the queue first; within a class, in arrival order.

Multiplexed models (``Request.multiplexed_model_id``, see :mod:`shoal._router.models`):
a request for a model goes to a replica holding it when one has room.

Load shedding (the queue's guarantees):

- at most ``max_queued_requests`` requests wait here, whatever their class; one
  more is refused at once with :class:`BackPressureError` (nothing is sent), unless
  a request of lower priority waits: then the most recent of the lowest class is
  pushed out instead, with the same error (it was never sent either);
- a new request never overtakes one of its class (or a higher one) already waiting;
- a waiting request whose caller gives up (its task is cancelled: a timeout,
  ``response.cancel()``, an HTTP client gone) leaves the queue at once and is
  never sent;
- while the deployment has no replica able to serve, a request waits at most
  ``no_replica_timeout_s`` (whatever its class), then fails with
  :class:`DeploymentUnavailableError`;
- a request with a deadline (``time.monotonic()``) leaves the queue unsent when it
  passes, and one whose deadline passed before it could be sent fails at once: both
  with :class:`RequestTimeoutError`. It is sent with the time it has left
  (``Request.remaining_s``), measured when it is sent.

None of this costs anything on the fast path (a free replica, nobody waiting):
no task, no timer, no allocation beyond the request's own future.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from typing import Any

from shoal._config import NO_REPLICA_TIMEOUT_S
from shoal._errors import (
    BackPressureError,
    DeploymentUnavailableError,
    NotFoundError,
    ReplicaDiedError,
    RequestTimeoutError,
    TransportError,
)
from shoal._observe.metrics.standard import deadline_expired, queued_queries, requests_shed
from shoal._router.load import LoadReporter
from shoal._router.models import ModelRouting
from shoal._router.queue import PRIORITIES, WaitQueue
from shoal._seam.protocols import Connector, ReplicaClient, Stream
from shoal._transport.messages import (
    Failure,
    Message,
    ReplicaInfo,
    ReplicaSetUpdate,
    Request,
    StreamItem,
)

logger = logging.getLogger("shoal.router")

#: Timers may fire this much early; a waiter this close to its deadline counts as expired.
_TIMER_SLACK_S = 0.001
#: How long past a request's deadline its caller waits for the replica's own timeout reply
#: before it gives up and cancels the request (a hung replica must not hold the caller).
REPLY_GRACE_S = 0.05


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
        self._registry = registry
        self._connector = registry.connector
        self._infos: dict[str, ReplicaInfo] = {}
        self._slots: list[_Slot] = []
        self._connecting: set[str] = set()
        # Waiting requests: one FIFO per priority class of wake-up futures.
        self._waiters = WaitQueue()
        #: Requests waiting for a replica (in ``_waiters``, or woken and about to pick one).
        self.waiting = 0
        self.max_queued_requests = -1
        self.no_replica_timeout_s = NO_REPLICA_TIMEOUT_S
        #: > 0: the deployment autoscales; this process reports its load that often.
        self.metrics_interval_s = 0.0
        self._no_replica_since: float | None = self.loop.time()  # None: a replica is connected
        self._expiry: asyncio.TimerHandle | None = None  # fails waiters past no_replica_timeout_s
        self._active = False
        self.exists = True
        self._shed = requests_shed()
        self._expired = deadline_expired()
        #: Which replica holds which multiplexed model (created by the first such request).
        self.models: ModelRouting | None = None

    # --- membership ----------------------------------------------------------------

    def apply(self, update: ReplicaSetUpdate) -> None:
        self.exists = update.exists
        self.max_queued_requests = update.max_queued_requests
        self.no_replica_timeout_s = update.no_replica_timeout_s
        self.metrics_interval_s = update.metrics_interval_s
        self._infos = {info.replica_id: info for info in update.replicas}
        self._slots = [slot for slot in self._slots if slot.info.replica_id in self._infos]
        if self.models is not None:
            self.models.retain(self._infos)
        if not self.exists:
            queued_queries().remove(self.deployment, self.app)  # a deleted one's series goes
            self._fail_waiters()
            return
        queued_queries().watch(self._waiting, self.deployment, self.app)  # read when collected
        if not self._slots:
            self._no_replica()
        if self._expiry is not None:  # the timeout may have changed
            self._expiry.cancel()
            self._arm_expiry()
        if self._active:
            self._connect_missing()
            if self.metrics_interval_s > 0:
                self._registry.load.track(self)

    def _waiting(self) -> int:
        return self.waiting

    def activate(self) -> None:
        """Start connecting to replicas (routers connect only once they are used)."""
        if not self._active:
            self._active = True
            self._connect_missing()
            if self.metrics_interval_s > 0:
                self._registry.load.track(self)

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
        if self.models is not None:
            self.models.forget(slot.info.replica_id)
        if slot in self._slots:
            self._slots.remove(slot)
            if not self._slots:
                self._no_replica()

    def load_sample(self) -> tuple[int, dict[str, int]]:
        """Requests waiting here, and requests sent to each replica not yet answered."""
        return self.waiting, {slot.info.replica_id: slot.in_flight for slot in self._slots}

    # --- assignment ----------------------------------------------------------------

    def choose(self, model_id: str = "") -> _Slot | None:
        """Power of two choices among replicas below their limit; None if all are full.
        With a multiplexed ``model_id``: a replica holding the model first (models.py)."""
        slots = self._slots
        if model_id:
            if self.models is None:
                self.models = ModelRouting(self.loop)
            return self.models.choose(slots, model_id)
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
        if self._waiters.size:
            self._wake(1)

    async def assign(self, request: Request, deadline: float | None = None) -> Message:
        """Send ``request`` as soon as a replica has room; return its reply message.

        With a ``deadline`` (``time.monotonic()``), the reply is awaited until the
        deadline plus :data:`REPLY_GRACE_S` (time for the replica's own timeout reply);
        then the request is cancelled in the replica and RequestTimeoutError raised.
        """
        while True:
            model_id = request.multiplexed_model_id
            slot = await self._wait_for_slot(deadline, request.priority, model_id)
            if deadline is not None:
                self._stamp(request, deadline)
            future = self.send(slot, request)
            if future.done() and isinstance(future.exception(), TransportError):
                continue  # never reached the replica: safe to send elsewhere
            try:
                if deadline is None:
                    reply = await future
                else:
                    reply = await self._reply_by(future, deadline)
            except TransportError as exc:
                raise ReplicaDiedError(
                    f"replica {slot.info.replica_id} of deployment '{self.deployment}' died "
                    f"while handling the request ({exc})"
                ) from None
            if not stopped_unrun(reply):
                return reply
            # Sent a moment before this router learned that replica stopped: it did not
            # run there. Dropped here at once, and another replica takes the request.
            self._lost(slot)

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

    async def open_stream(self, request: Request, deadline: float | None = None) -> Stream:
        """Start a streaming request; the slot stays busy until the stream ends.

        A ``deadline`` bounds the wait for a replica and travels with the request; the
        caller enforces it on the stream itself (it covers the whole response)."""
        slot = await self._wait_for_slot(deadline, request.priority, request.multiplexed_model_id)
        if deadline is not None:
            self._stamp(request, deadline)
        stream = slot.client.stream(request)
        slot.in_flight += 1
        return _CountedStream(stream, functools.partial(self._finished, slot, None), slot, self)

    def try_open_stream(self, request: Request, deadline: float | None = None) -> Stream | None:
        """Open a stream at once if a replica has room and nobody waits; else None
        (then :meth:`open_stream` waits, or refuses). Never suspends."""
        if self.waiting or not self.exists:
            return None
        self.activate()
        slot = self.choose(request.multiplexed_model_id)
        if slot is None:
            return None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None  # open_stream refuses it
            request.remaining_s = remaining
        stream = slot.client.stream(request)
        slot.in_flight += 1
        return _CountedStream(stream, functools.partial(self._finished, slot, None), slot, self)

    async def _wait_for_slot(
        self, deadline: float | None, priority: int, model_id: str = ""
    ) -> _Slot:
        self.activate()
        if not self.exists:
            raise self._deleted()
        if deadline is not None and deadline <= time.monotonic():
            raise self.timed_out("before it could be sent")
        if not self.waiting:  # nobody waits: take a free replica without queueing
            slot = self.choose(model_id)
            if slot is not None:
                return slot
        return await self._queue(deadline, priority, model_id)

    def _stamp(self, request: Request, deadline: float) -> None:
        """Give ``request`` the time it has left, now that it is sent (or fail it unsent)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if self._waiters.size:
                self._wake(1)  # we took a turn we cannot use: pass it on
            raise self.timed_out("before it could be sent")
        request.remaining_s = remaining

    async def _reply_by(self, future: asyncio.Future[Message], deadline: float) -> Message:
        """The reply, if it comes by the deadline (and a grace); else cancel the request
        (the replica gets a Cancel). A timer rather than ``wait_for``, which costs a
        future and its callbacks more on every call."""
        delay = deadline - time.monotonic() + REPLY_GRACE_S
        timer = self.loop.call_later(delay, future.cancel)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller gave up (the future was cancelled with it)
            raise self.timed_out("before the replica answered; it was cancelled", "reply") from None
        finally:
            timer.cancel()

    def timed_out(self, when: str, where: str = "queue") -> RequestTimeoutError:
        """The error of a request to this deployment that reached its deadline ``when``
        (counted: ``where`` is "queue" before it was sent, "reply" after)."""
        self._expired.labels(self.app, self.deployment, where).inc()
        return RequestTimeoutError(
            f"the request to deployment '{self.deployment}' of application '{self.app}' "
            f"reached its deadline {when} (handle.options(timeout_s=...), "
            "http_options.request_timeout_s, or the deadline of the request calling it)"
        )

    def count_shed(self, reason: str) -> None:
        """Count a request of this deployment refused by load shedding (a metric)."""
        self._shed.labels(self.app, self.deployment, reason).inc()

    def refuses(self, priority: int) -> bool:
        """Whether a request of ``priority`` that has to wait would be refused: the queue
        is full (``max_queued_requests``) and no request of lower priority waits in it."""
        full = 0 <= self.max_queued_requests <= self.waiting
        return full and not self._waiters.has_below(priority)

    def _admit(self, priority: int) -> None:
        """Make room in the queue for a request of ``priority``, or refuse it."""
        if not 0 <= self.max_queued_requests <= self.waiting:
            return
        pushed_out = self._waiters.pop_newest_below(priority)
        error = BackPressureError(self.waiting, self.max_queued_requests, self.deployment, self.app)
        self.count_shed("queue_full")  # this request, or the one it pushes out
        if pushed_out is None:
            raise error
        # The newest of the lowest class leaves unsent (still counted in ``waiting`` until
        # its task runs, so the queue holds one fewer meanwhile, never one more). One
        # already cancelled is leaving anyway.
        if not pushed_out.done():
            error.add_note(
                f"it was pushed out of the queue by a {PRIORITIES[priority]}-priority request"
            )
            pushed_out.set_exception(error)

    async def _queue(self, deadline: float | None, priority: int, model_id: str = "") -> _Slot:
        """Wait for a free replica, by class then in FIFO order; see the module's guarantees."""
        self._admit(priority)
        self.waiting += 1
        if not self._slots and self.metrics_interval_s > 0:
            self._registry.load.starved(self)  # an autoscaler at zero replicas must know now
        started = self.loop.time()
        woken = False
        try:
            while True:
                waiter: asyncio.Future[None] = self.loop.create_future()
                # Woken, but its replica was lost meanwhile: it keeps its place (first).
                self._waiters.push(waiter, started, priority, first=woken)
                if not self._slots and self._expiry is None:
                    self._no_replica()
                timer = None
                if deadline is not None:  # leaves the queue unsent when the deadline passes
                    delay = deadline - time.monotonic()
                    timer = self.loop.call_later(delay, self._leave_at_deadline, waiter, priority)
                try:
                    await waiter
                except asyncio.CancelledError:
                    if not self._waiters.remove(waiter, priority) and _woken(waiter):
                        self._wake(1)  # we were woken but leave: pass the turn on
                    raise
                finally:
                    if timer is not None:
                        timer.cancel()
                if not self.exists:
                    raise self._deleted()
                slot = self.choose(model_id)
                if slot is not None:
                    return slot
                woken = True
        finally:
            self.waiting -= 1

    def _leave_at_deadline(self, waiter: asyncio.Future[None], priority: int) -> None:
        if self._waiters.remove(waiter, priority) and not waiter.done():
            waiter.set_exception(self.timed_out("while it waited for a replica; it was not sent"))

    def _wake(self, count: int) -> None:
        """Give ``count`` waiting requests a turn: the highest class first, FIFO in each."""
        waiters = self._waiters
        while count > 0 and (waiter := waiters.pop_next()) is not None:
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _fail_waiters(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for waiter in self._waiters.drain():
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
        if self._expiry is None and self._waiters.size:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        """Time the failure of the longest-waiting request (waiters expire in arrival
        order, whatever their class)."""
        self._expiry = None
        oldest = self._waiters.oldest()
        if self._no_replica_since is None or oldest is None:
            return
        deadline = max(oldest[1], self._no_replica_since) + self.no_replica_timeout_s
        self._expiry = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        since = self._no_replica_since
        if since is None:
            return
        now = self.loop.time()
        timeout = self.no_replica_timeout_s
        while (oldest := self._waiters.oldest()) is not None:
            waiter, started, priority = oldest
            waited = now - max(started, since)
            if waited < timeout - _TIMER_SLACK_S:
                break
            self._waiters.remove(waiter, priority)
            if not waiter.done():
                self.count_shed("no_replica_timeout")
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


def stopped_unrun(reply: Message) -> bool:
    """Whether ``reply`` says its replica had stopped and did not run the request
    (``ReplicaStoppedError``): safe to send to another replica."""
    return type(reply) is Failure and reply.kind == "ReplicaStoppedError"


class _CountedStream:
    """A stream that releases its replica slot exactly once: when the replica's last
    message arrives, if the stream can tell (a socket stream calls back as it reads
    it, before the consumer's next turn: the next request waiting for that replica is
    woken a loop turn sooner, which with the default ``max_ongoing_requests`` of 5 is
    most of a busy proxy's turnaround), else when the consumer reads it or closes it."""

    __slots__ = ("_closed", "_release", "_router", "_slot", "_stream")

    def __init__(self, stream: Stream, release: Any, slot: _Slot, router: Router) -> None:
        self._stream = stream
        self._release = release
        self._closed = False
        self._slot, self._router = slot, router  # a replica that refuses, stopped: dropped
        on_end = getattr(stream, "on_end", None)
        if on_end is not None:
            on_end(self._released)

    def _released(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    async def next(self) -> Message:
        try:
            msg = await self._stream.next()
        except BaseException:
            self.close()
            raise
        if type(msg) is not StreamItem:
            if stopped_unrun(msg):
                self._router._lost(self._slot)
            self.close()
        return msg

    def send_input(self, value: Any) -> None:
        self._stream.send_input(value)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream.close()
            self._released()


class RouterRegistry:
    """The routers of one process, fed with replica sets by the controller."""

    def __init__(self, connector: Connector, loop: asyncio.AbstractEventLoop) -> None:
        self.connector = connector
        self.loop = loop
        self.load = LoadReporter(loop)
        self._routers: dict[tuple[str, str], Router] = {}
        self._ingress: dict[str, str] = {}  # app -> its ingress deployment, from the updates

    def ingress_of(self, app: str) -> str | None:
        """The ingress deployment of ``app`` as known in this process, or None."""
        return self._ingress.get(app)

    def applications(self) -> dict[str, str]:
        """Every application known in this process -> its ingress deployment (a copy)."""
        return dict(self._ingress)

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
