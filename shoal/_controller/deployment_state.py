"""The controller's view of one deployment: desired spec vs running replicas.

Guarantees:
- a code/argument/option change starts the new replicas first, switches
  traffic to them, then drains the old ones (no window without replicas);
- a ``user_config`` change is applied in place with ``reconfigure()``;
- a replica that dies or fails its health check is replaced, with backoff
  when replacements keep failing;
- a replica whose event loop answers nothing for ``health_check_timeout_s``
  leaves routing at once and is killed soon after (see :meth:`_supervise`);
- a failed update leaves the previous spec as the desired one: replacements
  start the version still serving;
- routers stop picking a replica before it is asked to stop;
- a replica starts only once the ledger grants its resources (until then it is
  PENDING, with the short resource in the deployment's message) and gives them
  back once it has stopped or died.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal._config import DeploymentConfig
from shoal._controller.resources import Demand, Grant, Ledger
from shoal._controller.status import (
    DeploymentStatus,
    DeploymentStatusOverview,
    ReplicaState,
    ReplicaStatus,
)
from shoal._errors import DeploymentError, ShoalError, TransportError
from shoal._seam.protocols import ReplicaHandle, Runtime
from shoal._seam.specs import DeploymentSpec, ReplicaSpec
from shoal._seam.startup import RECONFIGURE, mark_startup_step, startup_failed, startup_step
from shoal._transport.failures import failure_from
from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate

logger = logging.getLogger("shoal.controller")

_RECONFIGURE_TIMEOUT_S = 60.0
_MAX_BACKOFF_S = 30.0
#: Consecutive failed health checks after which a replica is replaced (Ray Serve's
#: REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD).
_UNHEALTHY_THRESHOLD = 3
#: A replica silent for health_check_timeout_s is out of routing; it is killed unless
#: its event loop answers within this much more (then it is drained, not killed).
_UNRESPONSIVE_KILL_GRACE_S = 2.0
#: Bounds of how often the supervisor looks at a deployment's replicas.
_MIN_TICK_S = 0.05
_MAX_TICK_S = 5.0


@dataclass
class ReplicaRecord:
    handle: ReplicaHandle
    code_version: str
    config_version: int = 0
    state: ReplicaState = ReplicaState.RUNNING
    grant: Grant | None = None
    health_failures: int = 0  # consecutive failed health checks
    alive_at: float = field(default_factory=time.monotonic)  # its event loop last answered
    checked_at: float = field(default_factory=time.monotonic)  # its last health check ended
    pinging: bool = False
    checking: bool = False


class DeploymentState:
    """Drives one deployment's replicas towards its spec."""

    def __init__(
        self,
        app: str,
        runtime: Runtime,
        publish: Callable[[ReplicaSetUpdate], Awaitable[None]],
        is_ingress: bool,
        ledger: Ledger,
    ) -> None:
        self.app = app
        self.spec: DeploymentSpec | None = None
        self.is_ingress = is_ingress
        self.status = DeploymentStatus.UPDATING
        self.message = ""
        self.replicas: list[ReplicaRecord] = []
        self._runtime = runtime
        self._publish_update = publish
        self._deleting = False
        self._failures = 0
        self.config_version = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ledger = ledger
        self.pending: dict[str, str] = {}  # replica id -> the resource it waits for
        self.starting: set[str] = set()  # replica ids whose process is starting
        self._acquiring: set[asyncio.Task[Grant]] = set()
        self._abort: str | None = None

    @property
    def name(self) -> str:
        assert self.spec is not None
        return self.spec.name

    # --- deploying -----------------------------------------------------------------

    async def deploy(self, spec: DeploymentSpec) -> None:
        """Bring replicas to ``spec``; raises DeploymentError, leaving old replicas serving."""
        previous, self.spec = self.spec, spec
        previous_config_version = self.config_version
        self.status, self.message = DeploymentStatus.UPDATING, ""
        target = spec.config.target_replicas()
        try:
            if previous is None or previous.code_version != spec.code_version:
                if previous is not None and spec.config.user_config != previous.config.user_config:
                    self.config_version += 1
                await self._replace_all(target)
            else:
                if spec.config.user_config != previous.config.user_config:
                    self.config_version += 1
                    await self._reconfigure(spec.config.user_config)
                await self._scale(target)
        except (Exception, asyncio.CancelledError) as exc:
            # A DeploymentError, a constructor's own (local testing), or serve.run gave up.
            self.status, self.message = DeploymentStatus.DEPLOY_FAILED, failure_message(exc)
            if previous is not None:
                await self._roll_back(previous, previous_config_version)
            raise
        self.status, self.message = DeploymentStatus.HEALTHY, ""
        self._failures = 0
        if not any(t.get_name() == "supervise" for t in self._tasks):
            self._spawn(self._supervise(), "supervise")

    async def _roll_back(self, previous: DeploymentSpec, config_version: int) -> None:
        """Make ``previous`` (the spec still serving) the desired one again after a
        failed update. Replicas that took the failed update's ``user_config`` get the
        previous one back (or are replaced); replicas an update stopped first (short
        of resources) are started again, in the background."""
        failed_version = self.config_version
        self.spec, self.config_version = previous, config_version
        running = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
        drifted = [r for r in running if r.config_version == failed_version != config_version]
        results = await asyncio.gather(
            *(r.handle.reconfigure(previous.config.user_config, _RECONFIGURE_TIMEOUT_S)
              for r in drifted),
            return_exceptions=True,
        )  # fmt: skip
        for record, result in zip(drifted, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("replica %s kept a failed user_config (%s); replacing it",
                               record.handle.info.replica_id, result)  # fmt: skip
                self._spawn(self._retire(record), "retire")
            else:
                record.config_version = config_version
        replacing = sum(1 for t in self._tasks if t.get_name() == "replace" and not t.done())
        for _ in range(previous.config.target_replicas() - len(running) - replacing):
            self._spawn(self._replace_dead(), "replace")

    def adopt(self, spec: DeploymentSpec, candidates: list[tuple[ReplicaHandle, Any]]) -> list[Any]:
        """Take over running replicas of ``spec`` that rejoined a restarted controller
        (``candidates``: handle and what each said of itself); returns the handles not
        adopted (another code version or user_config, or short of resources)."""
        self.spec = spec
        demand = Demand.of(spec.config.ray_actor_options)
        rejected = []
        for handle, said in candidates:
            current = (said.code_version, said.user_config) == (
                spec.code_version, spec.config.user_config,
            )  # fmt: skip
            grant = self._ledger.try_acquire(demand) if current else None
            if grant is None:
                rejected.append(handle)
                continue
            self.replicas.append(
                ReplicaRecord(handle, spec.code_version, self.config_version, grant=grant)
            )
        return rejected

    async def _replace_all(self, target: int) -> None:
        old = list(self.replicas)
        assert self.spec is not None
        needed = Demand.of(self.spec.config.ray_actor_options).times(target)
        if old and not needed.empty and self._ledger.shortage(needed) is not None:
            # The new replicas fit only in what the old ones hold: without stopping
            # those first, the update would wait for itself forever.
            logger.warning(
                "deployment '%s': stopping the old replicas before starting the new ones "
                "(not enough free resources to run both)",
                self.name,
            )
            await self._stop(old)
            await self._start(target)
            return
        await self._start(target)
        await self._stop([record for record in old if record in self.replicas])

    async def _scale(self, target: int) -> None:
        running = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
        if len(running) < target:
            await self._start(target - len(running))
        elif len(running) > target:
            await self._stop(running[target:])

    async def _reconfigure(self, user_config: Any) -> None:
        records = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
        results = await asyncio.gather(
            *(r.handle.reconfigure(user_config, _RECONFIGURE_TIMEOUT_S) for r in records),
            return_exceptions=True,
        )
        for record, result in zip(records, results, strict=True):
            if not isinstance(result, BaseException):
                record.config_version = self.config_version
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            error = errors[0]
            mark_startup_step(error, RECONFIGURE)
            raise startup_failed(self.name, error, _traceback_text(error)) from error

    async def _start(self, count: int) -> list[ReplicaRecord]:
        """Start ``count`` replicas concurrently; all or none (started ones are stopped)."""
        if count <= 0:
            return []
        results = await asyncio.gather(
            *(self._start_one() for _ in range(count)), return_exceptions=True
        )
        started = [r for r in results if isinstance(r, ReplicaRecord)]
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            await self._stop(started)
            error = errors[0]
            if isinstance(error, DeploymentError) or is_user_startup_error(error):
                raise error
            raise DeploymentError(f"deployment '{self.name}' failed to start: {error!r}") from error
        return started

    async def _start_one(self) -> ReplicaRecord:
        spec = self.spec
        assert spec is not None
        replica_id = f"{self.app}#{spec.name}#{uuid.uuid4().hex[:6]}"
        grant = await self._reserve(replica_id, Demand.of(spec.config.ray_actor_options))
        replica_spec = ReplicaSpec(
            self.app, spec.name, replica_id, spec.code, _with_gpus(spec.config, grant),
            self.is_ingress, spec.code_version,
        )  # fmt: skip
        self.starting.add(replica_id)
        try:
            handle = await self._runtime.start_replica(replica_spec)
        except BaseException:
            self._ledger.release(grant)
            raise
        finally:
            self.starting.discard(replica_id)
        record = ReplicaRecord(handle, spec.code_version, self.config_version, grant=grant)
        if self._deleting or self.spec is not spec:  # superseded while starting
            await handle.stop(0.0, 0.0)
            self._ledger.release(grant)
            raise DeploymentError(f"deployment '{spec.name}' changed while starting a replica")
        self.replicas.append(record)
        await self.publish()
        return record

    async def _reserve(self, replica_id: str, demand: Demand) -> Grant:
        """The replica's resources; while they are short it is listed as PENDING."""
        grant = self._ledger.try_acquire(demand)
        if grant is not None:
            return grant

        def waiting(reason: str) -> None:
            if replica_id not in self.pending:
                logger.warning(
                    "replica %s is pending until resources free up: %s", replica_id, reason
                )
            self.pending[replica_id] = reason
            self.message = f"{len(self.pending)} replica(s) pending: {reason}"

        task = asyncio.ensure_future(self._ledger.acquire(demand, waiting))
        self._acquiring.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            if self._abort is None or not task.cancelled():
                raise
            raise DeploymentError(self._abort) from None
        finally:
            self._acquiring.discard(task)
            self.pending.pop(replica_id, None)

    def abort_pending(self, reason: str) -> None:
        """Make every replica waiting for resources fail with DeploymentError(reason)."""
        self._abort = reason
        for task in list(self._acquiring):
            task.cancel()

    async def _stop(self, records: list[ReplicaRecord]) -> None:
        if not records:
            return
        for record in records:
            record.state = ReplicaState.STOPPING
        await self.publish()  # routers stop picking them before they are asked to stop
        assert self.spec is not None
        config = self.spec.config
        await asyncio.gather(
            *(
                r.handle.stop(
                    config.graceful_shutdown_wait_loop_s, config.graceful_shutdown_timeout_s
                )
                for r in records
            ),
            return_exceptions=True,
        )
        for record in records:
            if record in self.replicas:
                self.replicas.remove(record)
                self._ledger.release(record.grant)

    async def publish(self) -> None:
        assert self.spec is not None
        infos = [r.handle.info for r in self.replicas if r.state is ReplicaState.RUNNING]
        await self._publish_update(replica_set(self.app, self.spec, infos, self.is_ingress))

    async def delete(self) -> None:
        """Stop every replica (gracefully) and tell routers the deployment is gone."""
        self._deleting = True
        self.abort_pending(f"deployment '{self.spec.name if self.spec else ''}' was deleted")
        for task in list(self._tasks):
            task.cancel()
        await self._stop(list(self.replicas))
        await self._publish_update(ReplicaSetUpdate(self.app, self.name, [], False))

    # --- supervision ---------------------------------------------------------------

    def replica_died(self, handle: ReplicaHandle) -> bool:
        """Called by the runtime when a replica ends; True if it was one of ours."""
        record = next((r for r in self.replicas if r.handle is handle), None)
        if record is None:
            return False
        self.replicas.remove(record)
        self._ledger.release(record.grant)
        if record.state is ReplicaState.STOPPING or self._deleting:
            return True
        logger.warning("replica %s died; starting a replacement", handle.info.replica_id)
        self._spawn(self.publish(), "publish")
        self._spawn(self._replace_dead(), "replace")
        return True

    async def _replace_dead(self) -> None:
        while not self._deleting:
            try:
                await self._start(1)
                self._failures = 0
                self.status, self.message = DeploymentStatus.HEALTHY, ""
                return
            except Exception as exc:  # keep trying, with backoff, whatever the failure
                self._failures += 1
                self.status = DeploymentStatus.UNHEALTHY
                self.message = f"replacing a dead replica failed: {exc}"
                await asyncio.sleep(min(_MAX_BACKOFF_S, 0.5 * 2**self._failures))

    async def _supervise(self) -> None:
        """Watch every running replica, each on its own schedule (a slow or blocked
        one never delays the others, the controller, or another deployment):

        - Liveness. Its event loop is pinged every tick (no user code runs). A
          replica that has answered nothing for ``health_check_timeout_s`` has a
          blocked loop or a hung process: it cannot serve, so it leaves routing at
          once (the silent process itself is not waited for), its replacement
          starts, and it is killed unless it answers within
          ``_UNRESPONSIVE_KILL_GRACE_S`` more (then it is drained instead). So it
          is out of routing at most ``health_check_timeout_s`` after its loop
          blocked, and killed about ``_UNRESPONSIVE_KILL_GRACE_S`` later.
        - Health. Every ``health_check_period_s`` the user's ``check_health`` runs
          (within ``health_check_timeout_s``). As in Ray Serve, after
          ``_UNHEALTHY_THRESHOLD`` consecutive failures (raised, or timed out while
          the loop still answers) the replica is replaced, then drained; a success
          resets the count.

        A replica whose process died is replaced at once (the runtime reports it).
        """
        while not self._deleting and self.spec is not None:
            config = self.spec.config
            tick = _tick_s(config)
            await asyncio.sleep(tick)
            now = time.monotonic()
            for record in self.replicas:
                if record.state is not ReplicaState.RUNNING:
                    continue
                if not record.pinging:
                    record.pinging = True
                    self._spawn(self._ping(record, config.health_check_timeout_s, tick), "ping")
                if not record.checking and now - record.checked_at >= config.health_check_period_s:
                    record.checking = True
                    self._spawn(self._check(record, config.health_check_timeout_s), "check")

    async def _ping(self, record: ReplicaRecord, silence_limit_s: float, tick_s: float) -> None:
        """One ping, answered or not by the time the replica has been silent for
        ``silence_limit_s`` (at least ``tick_s``: a stalled controller is not the
        replica's fault); if not, the replica is retired as unresponsive."""
        try:
            budget = record.alive_at + silence_limit_s - time.monotonic()
            await record.handle.ping(max(budget, tick_s))
            record.alive_at = time.monotonic()
        except TimeoutError:
            if record in self.replicas and record.state is ReplicaState.RUNNING:
                self._spawn(self._retire_unresponsive(record), "retire")
        except (ShoalError, TransportError):
            pass  # its process is gone: the runtime reports the death
        finally:
            record.pinging = False

    async def _check(self, record: ReplicaRecord, timeout_s: float) -> None:
        result: Exception | None = None
        try:
            await record.handle.check_health(timeout_s)
        except Exception as exc:
            result = exc
        finally:
            record.checking, record.checked_at = False, time.monotonic()
        if not isinstance(result, TimeoutError):
            record.alive_at = record.checked_at  # an answer, even a failure, proves liveness
        if record in self.replicas and record.state is ReplicaState.RUNNING:
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
        self.status = DeploymentStatus.UNHEALTHY
        self.message = f"replica {replica_id} stopped answering (blocked event loop?); replacing it"
        self._spawn(self.publish(), "publish")  # routers drop it; its own ack is not awaited
        self._spawn(self._replace_dead(), "replace")
        try:
            await record.handle.ping(_UNRESPONSIVE_KILL_GRACE_S)
        except (ShoalError, TransportError):
            logger.warning("killing replica %s (pid %s): still no answer", replica_id,
                           record.handle.pid)  # fmt: skip
            record.handle.kill()  # its death, reported by the runtime, drops its record
            return
        await self._stop([record])  # its loop is back: drain it like any replaced replica

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
        self._spawn(self._retire(record), "retire")

    async def _retire(self, record: ReplicaRecord) -> None:
        """Take an unhealthy replica out of routing, start its replacement, then stop it."""
        self.status, self.message = DeploymentStatus.UNHEALTHY, "a replica failed its health check"
        self._spawn(self._replace_dead(), "replace")
        await self._stop([record])  # graceful; a hung replica is killed after the timeout

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- status --------------------------------------------------------------------

    def overview(self) -> DeploymentStatusOverview:
        states = Counter(str(r.state) for r in self.replicas)
        replicas = [
            ReplicaStatus(
                r.handle.info.replica_id, r.state, r.handle.pid, r.code_version, r.config_version
            )
            for r in self.replicas
        ]
        version = self.spec.code_version if self.spec else ""
        for replica_id in self.starting:
            states[str(ReplicaState.STARTING)] += 1
            replicas.append(
                ReplicaStatus(replica_id, ReplicaState.STARTING, None, version, self.config_version)
            )
        for replica_id, reason in self.pending.items():
            states[str(ReplicaState.PENDING)] += 1
            replicas.append(
                ReplicaStatus(
                    replica_id, ReplicaState.PENDING, None, version, self.config_version, reason
                )
            )
        target = self.spec.config.target_replicas() if self.spec else 0
        return DeploymentStatusOverview(
            self.status, self.message, dict(states), replicas, target, self.config_version
        )


def _tick_s(config: DeploymentConfig) -> float:
    """How often the supervisor looks at replicas: a fifth of the silence a replica
    may keep, and twice per health-check period."""
    wanted = min(config.health_check_timeout_s / 5, config.health_check_period_s / 2)
    return min(max(wanted, _MIN_TICK_S), _MAX_TICK_S)


def _with_gpus(config: DeploymentConfig, grant: Grant) -> DeploymentConfig:
    """``config`` with CUDA_VISIBLE_DEVICES set to the granted GPUs (if any) in its env_vars."""
    if not grant.gpu_ids:
        return config
    actor = config.ray_actor_options
    env = dict(actor.runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), "CUDA_VISIBLE_DEVICES": ",".join(grant.gpu_ids)}
    return config.model_copy(
        update={"ray_actor_options": actor.model_copy(update={"runtime_env": env})}
    )


def is_user_startup_error(exc: BaseException) -> bool:
    """True for a user's own exception raised by a startup step and passed on as itself
    (the constructor's, in local testing mode, as in Ray Serve)."""
    return startup_step(exc) is not None and not isinstance(exc, ShoalError)


def failure_message(exc: BaseException) -> str:
    """The deployment status message for a failed deploy."""
    if is_user_startup_error(exc):
        return f"{startup_step(exc)} raised {type(exc).__name__}: {exc}"
    return str(exc)


def _traceback_text(exc: BaseException) -> str:
    """The user's traceback for ``exc``: its own frames if raised in this process,
    else the remote traceback the transport put in its notes."""
    if exc.__traceback__ is not None:
        return failure_from(exc).traceback
    return "".join(n for n in getattr(exc, "__notes__", []) if isinstance(n, str))


def replica_set(
    app: str, spec: DeploymentSpec, infos: list[ReplicaInfo], is_ingress: bool
) -> ReplicaSetUpdate:
    """The update routers get for ``spec``'s replicas: the set and the limits they apply."""
    config = spec.config
    return ReplicaSetUpdate(
        app, spec.name, infos, True, is_ingress,
        config.max_queued_requests, config.no_replica_timeout_s,
    )  # fmt: skip
