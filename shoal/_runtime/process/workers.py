"""The runtime's handles on its processes: workers it started (or adopted), attached
processes that receive replica sets, and the replicas workers host.

Every call to a process has a timeout; a reply that arrived when the time was up
still counts (see :func:`ask`). A worker that does not exit when told is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from shoal._config import TIMEOUTS
from shoal._errors import RequestTimeoutError, ShoalError, TransportError
from shoal._runtime.process.adopt import AdoptedProcess
from shoal._runtime.process.forks import exit_future
from shoal._transport.connection import Connection
from shoal._transport.failures import exception_from
from shoal._transport.messages import (
    AutoscalingStats,
    Failure,
    HealthCheck,
    Message,
    Ping,
    Reconfigure,
    ReplicaInfo,
    StopReplica,
)

logger = logging.getLogger("shoal.runtime")


class WorkerProcess:
    """A worker OS process and its control connection (controller side)."""

    def __init__(
        self, worker_id: str, process: Any, exited: asyncio.Future[int] | None = None
    ) -> None:
        """``process``: a ``subprocess.Popen``, or what stands for one (a forked or an
        adopted worker); ``exited``: its exit code's future, if not found by pid."""
        self.worker_id = worker_id
        self.process = process
        self.conn: Connection | None = None
        self.stopping = False
        self.exited: asyncio.Future[int] = exited if exited is not None else exit_future(process)

    async def request(self, msg: Message, timeout_s: float) -> Any:
        if self.conn is None or self.conn.closed:
            raise TransportError(f"worker {self.worker_id} is not connected")
        reply = await ask(self.conn, msg, timeout_s)
        if isinstance(reply, Failure):
            raise exception_from(reply)
        return reply.value  # type: ignore[attr-defined]

    async def wait_exit(self, timeout_s: float) -> None:
        """Wait for the process to end; SIGKILL it after ``timeout_s``."""
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
        except TimeoutError:
            self.process.kill()
            await asyncio.wait_for(asyncio.shield(self.exited), TIMEOUTS.worker_exit_s)


async def reap_lost(worker: WorkerProcess, replica_ids: Sequence[str]) -> None:
    """Wait for a worker whose connection was lost to end (killed after
    ``TIMEOUTS.worker_exit_s``); if nobody asked it to stop, log how it ended (its exit code,
    or the signal that killed it) and the replicas it hosted: the controller learned of
    the loss before the process had ended, without a cause."""
    with contextlib.suppress(TimeoutError):
        await worker.wait_exit(TIMEOUTS.worker_exit_s)
    if worker.stopping or not worker.exited.done() or worker.exited.cancelled():
        return
    hosted = f" (replica {', '.join(replica_ids)})" if replica_ids else ""
    logger.warning("worker %s%s %s", worker.worker_id, hosted, ending(worker))


def ending(worker: WorkerProcess) -> str:
    """How an ended worker ended: its exit code, or the signal that killed it (unknown
    for one adopted after a restart: its exit status went to the process that started it)."""
    if isinstance(worker.process, AdoptedProcess):
        return "ended (adopted after a restart: its exit status is not known here)"
    code = worker.exited.result()
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


async def ask(conn: Connection, msg: Message, timeout_s: float) -> Message:
    """Send ``msg``; its reply within ``timeout_s``, else RequestTimeoutError.

    A reply that has already arrived when the time is up still counts: if this
    loop itself was stalled, the timer may fire before the socket is read, and
    the worker must not be blamed for the controller's stall.
    """
    future = conn.call(msg)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout_s)
        if not done:
            for _ in range(2):  # one I/O poll, whether the loop runs timers or I/O first
                await asyncio.sleep(0)
        if not future.done():
            raise RequestTimeoutError(
                f"{type(msg).__name__} to {conn.name} got no reply within {timeout_s:g} s"
            )
        return future.result()
    finally:
        if not future.done():
            future.cancel()  # a late reply is dropped by the connection


async def send_in_order(
    worker: WorkerProcess | Subscriber, messages: Sequence[Message], timeout_s: float
) -> None:
    """Send ``messages`` to ``worker`` at once, in order (no other task can send it anything
    in between), then wait at most ``timeout_s`` for every reply; raises the first failure.

    A new worker's configuration and the replica sets of the moment must reach it before
    any update published later: sent one task each, an update published meanwhile
    arrived first and the older set it replaced was then applied over it (a proxy
    forked in milliseconds kept answering 500, with no replica, in a cold start).
    """
    conn = worker.conn
    if conn is None or conn.closed:
        raise TransportError(f"worker {worker.worker_id} is not connected")
    futures = [conn.call(message) for message in messages]
    try:
        replies = await asyncio.wait_for(
            asyncio.gather(*futures, return_exceptions=True), timeout_s
        )
    except TimeoutError:
        raise RequestTimeoutError(
            f"{worker.worker_id} did not acknowledge its configuration within {timeout_s:g} s"
        ) from None
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Failure):
            raise exception_from(reply)


async def started(standby: asyncio.Future[WorkerProcess]) -> WorkerProcess | None:
    """The standby proxy process once started (shoal and the proxy's modules imported,
    replica sets applied; not serving), or None if it failed or has died since."""
    try:
        worker = await asyncio.shield(standby)  # cancelling the caller leaves it running
    except asyncio.CancelledError:
        if not standby.cancelled():
            raise
        return None
    except (ShoalError, OSError) as exc:
        logger.debug("the standby proxy process failed to start: %r", exc)
        return None
    return worker if worker.conn is not None and not worker.conn.closed else None


def ignore_failure(future: asyncio.Future[Any]) -> None:
    """Retrieve a background future's exception (it is dealt with where it is awaited)."""
    if not future.cancelled():
        future.exception()


#: Hello ids of processes that attach to an instance to route (not workers it started).
SUBSCRIBER_PREFIX = "attached-"


class Subscriber:
    """An attached process's control connection: it receives replica-set updates."""

    stopping = False

    def __init__(self, worker_id: str, conn: Connection) -> None:
        self.worker_id = worker_id
        self.conn: Connection | None = conn

    async def request(self, msg: Message, timeout_s: float) -> Any:
        assert self.conn is not None
        reply = await self.conn.request(msg, timeout_s)
        if isinstance(reply, Failure):
            raise exception_from(reply)
        return None


class ProcessReplica:
    """ReplicaHandle for a replica in a worker process."""

    def __init__(self, worker: WorkerProcess, info: ReplicaInfo) -> None:
        self.worker = worker
        self.info = info
        self.pid: int | None = worker.process.pid

    async def reconfigure(self, user_config: Any, timeout_s: float) -> None:
        await self.worker.request(Reconfigure(user_config), timeout_s)

    async def check_health(self, timeout_s: float) -> dict[str, Any] | None:
        details: dict[str, Any] | None = await self.worker.request(HealthCheck(), timeout_s)
        return details

    async def ping(self, timeout_s: float) -> None:
        await self.worker.request(Ping(), timeout_s)

    async def autoscaling_stats(self, timeout_s: float) -> dict[str, float] | None:
        stats: dict[str, float] | None = await self.worker.request(
            AutoscalingStats(timeout_s), timeout_s + TIMEOUTS.stop_reply_slack_s
        )
        return stats

    async def stop(self, wait_loop_s: float, timeout_s: float) -> None:
        self.worker.stopping = True
        try:
            stop = StopReplica(wait_loop_s, timeout_s)
            await self.worker.request(stop, timeout_s + TIMEOUTS.stop_reply_slack_s)
        except (ShoalError, TransportError) as exc:
            logger.debug("replica %s did not stop cleanly: %s", self.info.replica_id, exc)
        await self.worker.wait_exit(TIMEOUTS.worker_exit_s)

    def kill(self) -> None:
        self.worker.process.kill()
