"""Routers: one per deployment in every process that holds handles to it.

A router picks a replica by power-of-two choices on its own in-flight counts,
never sends a replica more than ``max_ongoing_requests`` at once (excess
requests wait here, in FIFO order, not on the replica), and drops a replica
the moment its connection breaks. A request that could not be handed to a
replica (its connection was already gone) is retried on another one; a
request a replica had accepted fails with :class:`ReplicaDiedError` if that
replica dies, because it may have had side effects.

Waiting requests are held as what is needed to send them (see
:mod:`shoal._router.waiting`): when a replica's slot frees, the next one is sent to it
from that same callback (a direct hand-off), not woken to send itself a turn later.

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
    DeploymentUnavailableError,
    NotFoundError,
    ReplicaDiedError,
    RequestTimeoutError,
    TransportError,
)
from shoal._observe.metrics.standard import deadline_expired, queued_queries, requests_shed
from shoal._router.load import LoadReporter
from shoal._router.models import ModelRouting
from shoal._router.waiting import Queued, WaitingRoom
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
        # Requests waiting for a replica: one FIFO per priority class, sent from there.
        self._room = WaitingRoom(self)
        self._queue = self._room.queue
        self.max_queued_requests = -1
        self.no_replica_timeout_s = NO_REPLICA_TIMEOUT_S
        #: > 0: the deployment autoscales; this process reports its load that often.
        self.metrics_interval_s = 0.0
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
            self._room.fail_all(self._deleted())
            return
        queued_queries().watch(self._waiting, self.deployment, self.app)  # read when collected
        if not self._slots:
            self._room.no_replica()
        self._room.timeout_changed()
        if self._active:
            self._connect_missing()
            if self.metrics_interval_s > 0:
                self._registry.load.track(self)

    @property
    def waiting(self) -> int:
        """Requests waiting here for a replica (queued, not sent)."""
        return self._queue.size

    def _waiting(self) -> int:
        return self._queue.size

    def has_replicas(self) -> bool:
        return bool(self._slots)

    def starved(self) -> None:
        """Requests wait and no replica is connected: report it now (an autoscaler)."""
        self._registry.load.starved(self)

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
        self._room.replica_connected()
        self._serve_queue()

    def died(self, slot: _Slot, cause: TransportError) -> ReplicaDiedError:
        """What a caller gets when ``slot``'s replica died with its request unanswered."""
        return ReplicaDiedError(
            f"replica {slot.info.replica_id} of deployment '{self.deployment}' died while "
            f"handling the request ({cause}); it may have run in part"
        )

    def _lost(self, slot: _Slot) -> None:
        if self.models is not None:
            self.models.forget(slot.info.replica_id)
        if slot in self._slots:
            self._slots.remove(slot)
            if not self._slots:
                self._room.no_replica()

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

    def _open(self, slot: _Slot, request: Request) -> _CountedStream:
        stream = slot.client.stream(request)
        slot.in_flight += 1
        return _CountedStream(stream, functools.partial(self._finished, slot, None), slot, self)

    def _finished(self, slot: _Slot, _future: Any) -> None:
        slot.in_flight -= 1
        if self._queue.size:
            self._serve_queue()

    def _serve_queue(self) -> None:
        """Send waiting requests, highest class first, FIFO in each, while a replica has
        room: the direct hand-off, in the turn a slot freed (or a replica connected)."""
        queue = self._queue
        while (entry := queue.peek_next()) is not None:
            if entry.future.done():  # its caller gave up; it leaves on its next turn
                queue.pop_next()
                continue
            slot = self.choose(entry.request.multiplexed_model_id)
            if slot is None:
                return
            queue.pop_next()  # (``entry``: the head peeked at)
            self._hand_off(entry, slot)

    def _hand_off(self, entry: Queued, slot: _Slot) -> None:
        """Send ``entry``'s request to ``slot``; its caller receives ``(slot, sent)``."""
        if entry.timer is not None:
            entry.timer.cancel()
        request, future = entry.request, entry.future
        try:
            if entry.deadline is not None:
                self._stamp(request, entry.deadline)
            sent: Any = self._open(slot, request) if entry.stream else self.send(slot, request)
        except Exception as exc:  # past its deadline, or it cannot be encoded: unsent
            future.set_exception(exc)
            return
        future.set_result((slot, sent))

    async def _sent(
        self, request: Request, deadline: float | None, stream: bool
    ) -> tuple[_Slot, Any]:
        """Send ``request`` (as a call, or a ``stream``) as soon as a replica has room:
        at once if one has and nobody waits, else from the queue. The replica's slot,
        and the reply future or stream."""
        self.activate()
        if not self.exists:
            raise self._deleted()
        if deadline is not None and deadline <= time.monotonic():
            raise self.timed_out("before it could be sent")
        if not self._queue.size:  # nobody waits: take a free replica without queueing
            slot = self.choose(request.multiplexed_model_id)
            if slot is not None:
                if deadline is not None:
                    self._stamp(request, deadline)
                return slot, self._open(slot, request) if stream else self.send(slot, request)
        entry = self._room.enter(request, deadline, stream)
        try:
            result: tuple[_Slot, Any] = await entry.future
        except asyncio.CancelledError:
            self._room.leave(entry)  # (or undo its sending, if it was sent meanwhile)
            raise
        return result

    async def assign(self, request: Request, deadline: float | None = None) -> Message:
        """Send ``request`` as soon as a replica has room; return its reply message.

        With a ``deadline`` (``time.monotonic()``), the reply is awaited until the
        deadline plus :data:`REPLY_GRACE_S` (time for the replica's own timeout reply);
        then the request is cancelled in the replica and RequestTimeoutError raised.
        """
        while True:
            slot, future = await self._sent(request, deadline, False)
            if future.done() and isinstance(future.exception(), TransportError):
                continue  # never reached the replica: safe to send elsewhere
            try:
                if deadline is None:
                    reply = await future
                else:
                    reply = await self._reply_by(future, deadline)
            except TransportError as exc:
                raise self.died(slot, exc) from None
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
        _slot, stream = await self._sent(request, deadline, True)
        result: Stream = stream
        return result

    def queue_stream(self, request: Request, deadline: float | None = None) -> Queued:
        """Start a streaming request without a task: queued (or sent at once, if a
        replica has room and nobody waits); :meth:`opened` waits for its stream. Raises
        at once what :meth:`open_stream` raises before it waits (BackPressureError, the
        deployment deleted, the deadline passed). The entry's ``close()`` takes it out of
        the queue (its caller left: ``opened`` raises RequestCancelledError)."""
        self.activate()
        if not self.exists:
            raise self._deleted()
        if deadline is not None and deadline <= time.monotonic():
            raise self.timed_out("before it could be sent")
        entry = self._room.enter(request, deadline, True)
        if self._queue.size == 1:  # nobody else waits: a replica may have room, sent now
            self._serve_queue()
        return entry

    async def opened(self, entry: Queued) -> Stream:
        """The stream of a request queued by :meth:`queue_stream`, once it is sent."""
        try:
            _slot, stream = await entry.future
        except asyncio.CancelledError:
            self._room.leave(entry)  # (or undo its sending, if it was sent meanwhile)
            raise
        result: Stream = stream
        return result

    def try_open_stream(self, request: Request, deadline: float | None = None) -> Stream | None:
        """Open a stream at once if a replica has room and nobody waits; else None
        (then :meth:`open_stream` waits, or refuses). Never suspends."""
        if self._queue.size or not self.exists:
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
        return self._open(slot, request)

    def _stamp(self, request: Request, deadline: float) -> None:
        """Give ``request`` the time it has left, now that it is sent (or fail it unsent)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
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

    def _deleted(self) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(
            f"deployment '{self.deployment}' of application '{self.app}' was deleted"
        )


def stopped_unrun(reply: Message) -> bool:
    """Whether ``reply`` says its replica had stopped and did not run the request
    (``ReplicaStoppedError``): safe to send to another replica."""
    return type(reply) is Failure and reply.kind == "ReplicaStoppedError"


class _CountedStream:
    """A stream that releases its replica slot exactly once: when the replica's last
    message arrives, if the stream can tell (a socket stream calls back as it reads
    it, before the consumer's next turn: the next request waiting for that replica is
    sent from that callback, which with the default ``max_ongoing_requests`` of 5 is
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
        except TransportError as exc:  # the connection to the replica was lost: it died
            self.close()
            raise self._router.died(self._slot, exc) from None
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
