"""Supervision of one deployment's running replicas: liveness and health.

See :meth:`Supervisor.run` for what is watched and what happens to a replica
that stops answering or keeps failing its health check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shoal._config import TIMEOUTS, DeploymentConfig
from shoal._controller.status import DeploymentStatus, ReplicaState
from shoal._errors import ShoalError, TransportError

if TYPE_CHECKING:
    from shoal._controller.deployment_state import DeploymentState, ReplicaRecord

logger = logging.getLogger("shoal.controller")

#: Consecutive failed health checks after which a replica is replaced (Ray Serve's
#: REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD).
_UNHEALTHY_THRESHOLD = 3
#: A replica silent for health_check_timeout_s is out of routing; it is killed unless
#: its event loop answers within this much more (then it is drained, not killed).
#: Bounds of how often the supervisor looks at a deployment's replicas.
_MIN_TICK_S = 0.05
_MAX_TICK_S = 5.0


class Supervisor:
    """Watches the running replicas of one deployment; replaces the dead and the sick."""

    def __init__(self, state: DeploymentState) -> None:
        self.state = state

    async def run(self) -> None:
        """Watch every running replica, each on its own schedule (a slow or blocked
        one never delays the others, the controller, or another deployment):

        - Liveness. Its event loop is pinged every tick (no user code runs). A
          replica that has answered nothing for ``health_check_timeout_s`` has a
          blocked loop or a hung process: it cannot serve, so it leaves routing at
          once (the silent process itself is not waited for), its replacement
          starts, and it is killed unless it answers within
          ``TIMEOUTS.unresponsive_kill_s`` more (then it is drained instead). So it
          is out of routing at most ``health_check_timeout_s`` after its loop
          blocked, and killed about ``TIMEOUTS.unresponsive_kill_s`` later.
        - Health. Every ``health_check_period_s`` the user's ``check_health`` runs
          (within ``health_check_timeout_s``). As in Ray Serve, after
          ``_UNHEALTHY_THRESHOLD`` consecutive failures (raised, or timed out while
          the loop still answers) the replica is replaced, then drained; a success
          resets the count.

        A replica whose process died is replaced at once (the runtime reports it).
        """
        while not self.state.deleting and self.state.spec is not None:
            config = self.state.spec.config
            tick = _tick_s(config)
            await asyncio.sleep(tick)
            self.tick(config, tick, time.monotonic())

    def tick(self, config: DeploymentConfig, tick_s: float, now: float) -> list[asyncio.Task[Any]]:
        """One look at every running replica (its cost is linear in their number): a health
        check to each one due at ``now``, a ping to each other one not being pinged.
        Returns the tasks it started.

        A replica whose check starts is not also pinged in this tick: its answer proves
        liveness as well, and a loop that blocks meanwhile is still caught by the next
        tick's ping, whose deadline counts from the last answer (``alive_at``), not from
        when it is sent. So one task per replica per tick, not two (docs/scaling.md)."""
        started = []
        for record in self.state.replicas:
            if record.state is not ReplicaState.RUNNING:
                continue
            if not record.checking and now - record.checked_at >= config.health_check_period_s:
                record.checking = True
                check = self._check(record, config.health_check_timeout_s)
                started.append(self.state.spawn(check, "check"))
            elif not record.pinging:
                record.pinging = True
                ping = self._ping(record, config.health_check_timeout_s, tick_s)
                started.append(self.state.spawn(ping, "ping"))
        return started

    async def _ping(self, record: ReplicaRecord, silence_limit_s: float, tick_s: float) -> None:
        """One ping, answered or not by the time the replica has been silent for
        ``silence_limit_s`` (at least ``tick_s``: a stalled controller is not the
        replica's fault); if not, the replica is retired as unresponsive."""
        try:
            budget = record.alive_at + silence_limit_s - time.monotonic()
            await record.handle.ping(max(budget, tick_s))
            record.alive_at = time.monotonic()
        except TimeoutError:
            if record in self.state.replicas and record.state is ReplicaState.RUNNING:
                self.state.spawn(self._retire_unresponsive(record), "retire")
        except (ShoalError, TransportError):
            pass  # its process is gone: the runtime reports the death
        finally:
            record.pinging = False

    async def _check(self, record: ReplicaRecord, timeout_s: float) -> None:
        result: Exception | None = None
        try:
            # A passed check brings the replica's status details (serve.status() shows them).
            record.details = await record.handle.check_health(timeout_s)
        except Exception as exc:
            result = exc
        finally:
            record.checking, record.checked_at = False, time.monotonic()
        if not isinstance(result, TimeoutError):
            record.alive_at = record.checked_at  # an answer, even a failure, proves liveness
        if record in self.state.replicas and record.state is ReplicaState.RUNNING:
            self._health_checked(record, result)

    async def _retire_unresponsive(self, record: ReplicaRecord) -> None:
        """Out of routing and replaced at once; killed unless its loop answers soon."""
        replica_id = record.handle.info.replica_id
        logger.warning(
            "replica %s has answered nothing for %.1f s (health_check_timeout_s): its event "
            "loop is blocked or it hangs; taking it out of routing and replacing it",
            replica_id, time.monotonic() - record.alive_at,
        )  # fmt: skip
        record.state = ReplicaState.STOPPING
        state = self.state
        state.status = DeploymentStatus.UNHEALTHY
        state.message = (
            f"replica {replica_id} stopped answering (blocked event loop?); replacing it"
        )
        state.spawn(state.publish(), "publish")  # routers drop it; its own ack is not awaited
        state.spawn(state.add_replica(), "replace")
        try:
            await record.handle.ping(TIMEOUTS.unresponsive_kill_s)
        except (ShoalError, TransportError):
            logger.warning("killing replica %s (pid %s): still no answer", replica_id,
                           record.handle.pid)  # fmt: skip
            record.handle.kill()  # its death, reported by the runtime, drops its record
            return
        await self.state.stop_replicas([record])  # its loop is back: drain it, as if replaced

    def _health_checked(self, record: ReplicaRecord, result: Any) -> None:
        replica_id = record.handle.info.replica_id
        if not isinstance(result, Exception):
            if record.health_failures:
                logger.info(
                    "replica %s passed the health check after %d consecutive failures",
                    replica_id,
                    record.health_failures,
                )
            record.health_failures = 0
            return
        record.health_failures += 1
        dead = isinstance(result, TransportError)  # its process is gone: no point in waiting
        if not dead and record.health_failures < _UNHEALTHY_THRESHOLD:
            logger.warning(
                "replica %s failed its health check (%d in a row): %s",
                replica_id,
                record.health_failures,
                result,
            )
            return
        logger.warning(
            "replica %s failed the health check %d times in a row (%s); replacing it",
            replica_id,
            record.health_failures,
            result,
        )
        reason = (
            f"replica {replica_id} failed its health check {record.health_failures} times in "
            f"a row: {type(result).__name__}: {result}"
        )  # the why, for serve.status() and shoal status
        self.state.spawn(self.retire(record, reason), "retire")

    async def retire(self, record: ReplicaRecord, reason: str = "") -> None:
        """Take an unhealthy replica out of routing, start its replacement, then stop it."""
        state = self.state
        state.status, state.message = (
            DeploymentStatus.UNHEALTHY,
            reason or "a replica failed its health check",
        )
        state.spawn(state.add_replica(), "replace")
        await state.stop_replicas([record])  # graceful; a hung replica is killed after the timeout


def _tick_s(config: DeploymentConfig) -> float:
    """How often the supervisor looks at replicas: a fifth of the silence a replica
    may keep, and twice per health-check period."""
    wanted = min(config.health_check_timeout_s / 5, config.health_check_period_s / 2)
    return min(max(wanted, _MIN_TICK_S), _MAX_TICK_S)
