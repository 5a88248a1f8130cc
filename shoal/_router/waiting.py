"""The requests a router holds while all its replicas are full: its waiting room.

A waiting request is held as what is needed to send it (:class:`Queued`: the request,
its deadline, call or stream), not as a task to wake: when a replica's slot frees,
the router sends the next one from that same callback (a *direct hand-off*,
:meth:`Router._serve_queue <shoal._router.router.Router>`), in the loop turn the
reply arrived in, and the waiting caller receives what was already sent. With the
default ``max_ongoing_requests`` of 5, a busy proxy's turnaround is mostly such loop
turns, so each one saved is throughput.

The room keeps the queue's guarantees (see :mod:`shoal._router.router`): the queue's
bound (``max_queued_requests``, pushing out a lower class first), each request's
deadline while it waits, and ``no_replica_timeout_s`` while no replica is connected.
A request leaves the room exactly once: sent (``future`` gets ``(slot, sent)``), or
failed unsent (``future`` gets the error), or cancelled by its caller (removed).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from shoal._errors import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal._router.queue import PRIORITIES, WaitQueue
from shoal._transport.messages import Request

if TYPE_CHECKING:
    from shoal._router.router import Router

#: Timers may fire this much early; a waiter this close to its deadline counts as expired.
_TIMER_SLACK_S = 0.001


class Queued:
    """One waiting request: what the router needs to send it, and where the outcome
    goes (``future``: ``(slot, stream or reply future)`` once sent, or the error that
    made it leave unsent)."""

    __slots__ = ("deadline", "future", "rank", "request", "room", "started", "stream", "timer")

    def __init__(
        self,
        room: WaitingRoom,
        request: Request,
        deadline: float | None,
        stream: bool,
        future: asyncio.Future[Any],
    ) -> None:
        self.room = room
        self.request = request
        self.deadline = deadline
        self.stream = stream
        self.rank = request.priority
        self.future = future
        self.started = future.get_loop().time()
        self.timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        """Its caller left (an HTTP client disconnected): it leaves the queue unsent and
        ``future`` fails with RequestCancelledError; if it was sent meanwhile, the stream
        is closed (the replica gets a Cancel)."""
        self.room.leave(self)
        if not self.future.done():
            self.future.set_exception(RequestCancelledError("the caller left"))


class WaitingRoom:
    """The queue of one router, with its bound, its deadlines and its no-replica timeout.
    Sending is the router's (it knows the replicas); leaving unsent is the room's."""

    __slots__ = ("_expiry", "_router", "no_replica_since", "queue")

    def __init__(self, router: Router) -> None:
        self._router = router
        self.queue: WaitQueue[Queued] = WaitQueue()
        #: Since when no replica is connected (loop time), or None while one is.
        self.no_replica_since: float | None = router.loop.time()
        self._expiry: asyncio.TimerHandle | None = None  # fails waiters past no_replica_timeout_s

    def enter(self, request: Request, deadline: float | None, stream: bool) -> Queued:
        """Queue ``request`` (or refuse it: BackPressureError); the caller awaits the
        entry's future, and calls :meth:`leave` if it gives up."""
        router = self._router
        self._admit(request.priority)
        entry = Queued(self, request, deadline, stream, router.loop.create_future())
        self.queue.push(entry)
        if not router.has_replicas():
            if router.metrics_interval_s > 0:
                router.starved()  # an autoscaler at zero replicas must know now
            if self._expiry is None:
                self.no_replica()
        if deadline is not None:  # leaves the queue unsent when the deadline passes
            delay = deadline - time.monotonic()
            entry.timer = router.loop.call_later(delay, self._leave_at_deadline, entry)
        return entry

    def leave(self, entry: Queued) -> None:
        """Its caller gave up: take ``entry`` out, or undo its sending if it was sent
        in the meantime (the stream is closed, the call cancelled: the replica gets a
        Cancel and its slot frees, which sends the next one)."""
        if entry.timer is not None:
            entry.timer.cancel()
        if self.queue.remove(entry):
            return
        future = entry.future
        if future.done() and not future.cancelled() and future.exception() is None:
            _slot, sent = future.result()
            if entry.stream:
                sent.close()
            else:
                sent.cancel()

    def _admit(self, rank: int) -> None:
        """Make room in the queue for a request of ``rank``, or refuse it."""
        router = self._router
        limit = router.max_queued_requests
        if not 0 <= limit <= self.queue.size:
            return
        error = BackPressureError(self.queue.size, limit, router.deployment, router.app)
        pushed_out = self.queue.pop_newest_below(rank)
        router.count_shed("queue_full")  # this request, or the one it pushes out
        if pushed_out is None:
            raise error
        # The newest of the lowest class leaves unsent. One already cancelled is
        # leaving anyway.
        if pushed_out.timer is not None:
            pushed_out.timer.cancel()
        if not pushed_out.future.done():
            error.add_note(
                f"it was pushed out of the queue by a {PRIORITIES[rank]}-priority request"
            )
            pushed_out.future.set_exception(error)

    def _leave_at_deadline(self, entry: Queued) -> None:
        if self.queue.remove(entry) and not entry.future.done():
            error = self._router.timed_out("while it waited for a replica; it was not sent")
            entry.future.set_exception(error)

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting request with ``error`` (the deployment was deleted)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for entry in self.queue.drain():
            if entry.timer is not None:
                entry.timer.cancel()
            if not entry.future.done():
                entry.future.set_exception(error)

    # --- no replica able to serve --------------------------------------------------

    def no_replica(self) -> None:
        """The router has no connected replica: bound the wait of the requests queued."""
        if self.no_replica_since is None:
            self.no_replica_since = self._router.loop.time()
        if self._expiry is None and self.queue.size:
            self._arm_expiry()

    def replica_connected(self) -> None:
        self.no_replica_since = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def timeout_changed(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        """Time the failure of the longest-waiting request (waiters expire in arrival
        order, whatever their class)."""
        self._expiry = None
        oldest = self.queue.oldest()
        if self.no_replica_since is None or oldest is None:
            return
        router = self._router
        deadline = max(oldest.started, self.no_replica_since) + router.no_replica_timeout_s
        self._expiry = router.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        since = self.no_replica_since
        if since is None:
            return
        router = self._router
        now = router.loop.time()
        timeout = router.no_replica_timeout_s
        while (oldest := self.queue.oldest()) is not None:
            waited = now - max(oldest.started, since)
            if waited < timeout - _TIMER_SLACK_S:
                break
            self.queue.remove(oldest)
            if oldest.timer is not None:
                oldest.timer.cancel()
            if not oldest.future.done():
                router.count_shed("no_replica_timeout")
                oldest.future.set_exception(self._unavailable(waited))
        self._arm_expiry()

    def _unavailable(self, waited: float) -> DeploymentUnavailableError:
        router = self._router
        return DeploymentUnavailableError(
            f"deployment '{router.deployment}' of application '{router.app}' had no replica "
            f"able to take the request for {waited:.3g} s (no_replica_timeout_s="
            f"{router.no_replica_timeout_s:g}); the request was not sent. serve.status() "
            "says why (replicas starting, failing, or num_replicas=0); raise "
            "no_replica_timeout_s if its replicas need longer to start"
        )
