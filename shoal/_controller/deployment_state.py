"""The controller's view of one deployment: desired spec vs running replicas.

Guarantees:
- a code/argument/option change starts the new replicas first, switches
  traffic to them, then drains the old ones (no window without replicas);
- a ``user_config`` change is applied in place with ``reconfigure()``;
- a replica that dies or fails its health check is replaced, with backoff
  when replacements keep failing;
- a replica whose event loop answers nothing for ``health_check_timeout_s``
  leaves routing at once and is killed soon after (see :class:`.supervision.Supervisor`);
- a failed update leaves the previous spec as the desired one: replacements
  start the version still serving;
- routers stop picking a replica before it is asked to stop;
- an autoscaled deployment runs ``target`` replicas, the autoscaler's latest
  decision (:mod:`.autoscaler`); replicas it removes are drained like any other;
- a replica starts only once the ledger grants its resources (until then it is
  PENDING, with the short resource in the deployment's message) and gives them
  back once it has stopped or died.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal._config import TIMEOUTS
from shoal._controller.autoscaler import Autoscaler
from shoal._controller.policy import capacity_adjusted
from shoal._controller.publisher import Publisher
from shoal._controller.resources import Demand, Grant, Ledger, with_gpus
from shoal._controller.status import (
    DeploymentStatus,
    DeploymentStatusOverview,
    ReplicaState,
    deployment_overview,
)
from shoal._controller.supervision import Supervisor
from shoal._errors import DeploymentError
from shoal._seam.protocols import ReplicaHandle, Runtime
from shoal._seam.specs import DeploymentSpec, ReplicaSpec
from shoal._seam.startup import (
    RECONFIGURE,
    failure_message,
    is_user_startup_error,
    mark_startup_step,
    startup_failed,
    traceback_text,
)
from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate

logger = logging.getLogger("shoal.controller")

MAX_BACKOFF_S = 30.0
_SCALING = (DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING)
#: How often a rescale looks again while replicas it asked for are starting.
_RESCALE_POLL_S = 0.1


@dataclass(eq=False)  # by identity: `record in replicas` must not compare every field
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
    details: dict[str, Any] | None = None  # what its last passed health check reported


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
        self.deleting = False
        self._failures = 0
        self.config_version = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ledger = ledger
        self.pending: dict[str, str] = {}  # replica id -> the resource it waits for
        self.starting: set[str] = set()  # replica ids whose process is starting
        self._acquiring: set[asyncio.Task[Grant]] = set()
        # Starts of replicas the runtime's cluster cannot place yet: replica id -> task.
        self._placing: dict[str, asyncio.Task[Any]] = {}
        self._abort: str | None = None
        #: How many replicas should run: num_replicas, or the autoscaler's latest decision.
        self.target = 0
        self.autoscaler: Autoscaler | None = None
        self._deploying = False
        self._rescaling: asyncio.Task[None] | None = None
        self._adding: list[asyncio.Task[Any]] = []  # replicas the autoscaler asked for
        self.supervisor = Supervisor(self)
        self.publisher = Publisher(self._current_set, publish)  # coalesces updates
        #: The instance's ``target_capacity`` (percent; None: 100), set by the controller.
        self.capacity: float | None = None

    @property
    def name(self) -> str:
        assert self.spec is not None
        return self.spec.name

    # --- deploying -----------------------------------------------------------------

    @property
    def updating(self) -> bool:
        """Whether a deploy (or update) of this deployment is under way."""
        return self._deploying

    async def deploy(self, spec: DeploymentSpec) -> None:
        """Bring replicas to ``spec``; raises DeploymentError, leaving old replicas serving."""
        self._deploying = True
        if self._rescaling is not None:
            self._rescaling.cancel()  # the deploy sets the count; the autoscaler resumes after
        try:
            await self._deploy(spec)
        finally:
            self._deploying = False
        self._autoscale(spec)
        self.set_capacity(self.capacity)  # in case it changed while deploying

    async def _deploy(self, spec: DeploymentSpec) -> None:
        previous, self.spec = self.spec, spec
        previous_config_version, previous_target = self.config_version, self.target
        self.status, self.message = DeploymentStatus.UPDATING, ""
        target = self.target = self._initial_target(previous, spec)
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
                await self.publish()  # routers apply the options they enforce at once
        except (Exception, asyncio.CancelledError) as exc:
            # A DeploymentError, a constructor's own (local testing), or serve.run gave up.
            self.status, self.message = DeploymentStatus.DEPLOY_FAILED, failure_message(exc)
            if previous is not None:
                self.target = previous_target
                await self._roll_back(previous, previous_config_version)
            raise
        self.status, self.message = DeploymentStatus.HEALTHY, ""
        self._failures = 0
        if not any(t.get_name() == "supervise" for t in self._tasks):
            self.spawn(self.supervisor.run(), "supervise")

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
            *(r.handle.reconfigure(previous.config.user_config, TIMEOUTS.reconfigure_s)
              for r in drifted),
            return_exceptions=True,
        )  # fmt: skip
        for record, result in zip(drifted, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("replica %s kept a failed user_config (%s); replacing it",
                               record.handle.info.replica_id, result)  # fmt: skip
                self.spawn(self.supervisor.retire(record), "retire")
            else:
                record.config_version = config_version
        replacing = sum(1 for t in self._tasks if t.get_name() == "replace" and not t.done())
        for _ in range(self.target - len(running) - replacing):
            self.spawn(self.add_replica(), "replace")

    def _initial_target(self, previous: DeploymentSpec | None, spec: DeploymentSpec) -> int:
        """How many replicas a deploy runs: ``target_replicas()`` (scaled by the instance's
        ``target_capacity``); an update of an autoscaled deployment keeps the current
        count, within the new bounds (as Ray)."""
        auto = spec.config.autoscaling()
        if auto is None or previous is None or previous.config.autoscaling() is None:
            return capacity_adjusted(spec.config.target_replicas(), self.capacity)
        low, high = self._bounds_of(spec)
        return max(low, min(high, self.target))

    def bounds(self) -> tuple[int, int]:
        """The autoscaling bounds (min_replicas, max_replicas) scaled by target_capacity."""
        assert self.spec is not None
        return self._bounds_of(self.spec)

    def _bounds_of(self, spec: DeploymentSpec) -> tuple[int, int]:
        auto = spec.config.autoscaling()
        if auto is None:
            count = capacity_adjusted(spec.config.target_replicas(), self.capacity)
            return count, count
        low = capacity_adjusted(auto.min_replicas, self.capacity)
        return low, capacity_adjusted(auto.max_replicas, self.capacity)

    def set_capacity(self, target_capacity: float | None) -> None:
        """Scale to the instance's new ``target_capacity`` (a fixed count is scaled by it;
        an autoscaled one is kept within the scaled bounds)."""
        self.capacity = target_capacity
        if self.spec is None or self._deploying or self.deleting:
            return  # a deploy under way reads it when it ends
        low, high = self.bounds()
        count = max(low, min(high, self.target))
        if count != self.target:
            if self.autoscaler is not None:
                why = f"target_capacity={target_capacity}% scales the bounds to {low}..{high}"
                self.autoscaler.decided(self.target, count, why)
            self.scale_to(count)

    # --- autoscaling ---------------------------------------------------------------

    def _autoscale(self, spec: DeploymentSpec) -> None:
        """Start, reconfigure or stop the autoscaler after a deploy of ``spec``."""
        auto = spec.config.autoscaling() if self.spec is spec else None
        if auto is None:
            if self.autoscaler is not None and self.spec is spec:
                self.autoscaler.stop()
                self.autoscaler = None
            return
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(self, auto)
        self.autoscaler.configure(auto)
        self.autoscaler.start()

    def running(self) -> list[ReplicaHandle]:
        """The handles of the replicas in routing."""
        return [r.handle for r in self.replicas if r.state is ReplicaState.RUNNING]

    def scale_to(self, count: int) -> None:
        """Run ``count`` replicas from now on (an autoscaler's decision, target_capacity)."""
        self.target = count
        if self._rescaling is None or self._rescaling.done():
            self._rescaling = asyncio.ensure_future(self._rescale())

    def policy_failed(self, message: str) -> None:
        self.message = message

    async def _rescale(self) -> None:
        """Start or stop replicas until ``target`` run. Each missing replica starts on its
        own (retried with backoff); replicas being started that are no longer needed are
        cancelled first; a replica removed leaves routing at once and finishes its
        requests (``graceful_shutdown_timeout_s``) in the background, the least loaded
        first, so a new decision is acted on while others drain."""
        while not self.deleting and not self._deploying:
            running = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
            coming = len(self.starting) + len(self.pending)
            missing = self.target - len(running) - coming
            if missing < 0 and coming:
                self._cancel_starts(min(-missing, coming))  # cheaper than stopping them later
            if missing > 0:
                self.status = DeploymentStatus.UPSCALING
                for _ in range(missing):
                    self._adding.append(self.spawn(self.add_replica("scaling up"), "replace"))
            elif len(running) > self.target:
                self.status = DeploymentStatus.DOWNSCALING
                victims = self._least_loaded(running, len(running) - self.target)
                for record in victims:  # out of the count now: the loop must not pick them again
                    record.state = ReplicaState.STOPPING
                self.spawn(self._scale_down(victims), "stop")
                continue
            elif coming == 0:
                break
            await asyncio.sleep(_RESCALE_POLL_S)  # replicas are starting: look again
        self._settle_status()

    async def _scale_down(self, records: list[ReplicaRecord]) -> None:
        await self.stop_replicas(records)
        self._settle_status()

    def _settle_status(self) -> None:
        """HEALTHY again once a scaling decision is carried out (``target`` run, none
        starting or stopping)."""
        if self._deploying or self.status not in _SCALING:
            return
        states = [r.state for r in self.replicas]
        done = states.count(ReplicaState.RUNNING) == self.target and len(states) == self.target
        if done and not self.starting and not self.pending:
            self.status, self.message = DeploymentStatus.HEALTHY, ""

    def _cancel_starts(self, count: int) -> None:
        """Stop starting ``count`` of the replicas being started, the most recently asked
        for first (their processes end)."""
        self._adding = [task for task in self._adding if not task.done()]
        for task in self._adding[-count:]:
            task.cancel()

    def _least_loaded(self, running: list[ReplicaRecord], count: int) -> list[ReplicaRecord]:
        """The ``count`` replicas with the fewest requests (the newest on a tie)."""
        load = self.autoscaler.last_load if self.autoscaler is not None else {}
        order = sorted(
            enumerate(running), key=lambda item: (load.get(item[1].handle.info.replica_id, 0.0),
                                                  -item[0]),
        )  # fmt: skip
        return [record for _index, record in order[:count]]

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
        auto = spec.config.autoscaling()
        self.target = len(self.replicas) if auto is not None else spec.config.target_replicas()
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
            await self.stop_replicas(old)
            await self._start(target)
            return
        await self._start(target)
        await self.stop_replicas([record for record in old if record in self.replicas])

    async def _scale(self, target: int) -> None:
        running = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
        if len(running) < target:
            await self._start(target - len(running))
        elif len(running) > target:
            await self.stop_replicas(running[target:])

    async def _reconfigure(self, user_config: Any) -> None:
        records = [r for r in self.replicas if r.state is ReplicaState.RUNNING]
        results = await asyncio.gather(
            *(r.handle.reconfigure(user_config, TIMEOUTS.reconfigure_s) for r in records),
            return_exceptions=True,
        )
        for record, result in zip(records, results, strict=True):
            if not isinstance(result, BaseException):
                record.config_version = self.config_version
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            error = errors[0]
            mark_startup_step(error, RECONFIGURE)
            raise startup_failed(self.name, error, traceback_text(error)) from error

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
            await self.stop_replicas(started)
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
            self.app, spec.name, replica_id, spec.code, with_gpus(spec.config, grant),
            self.is_ingress, spec.code_version, spec.direct_ingress if self.is_ingress else None,
        )  # fmt: skip
        self.starting.add(replica_id)
        try:
            handle = await self._runtime.start_replica(
                replica_spec, lambda reason: self._placement_waits(replica_id, reason)
            )
        except BaseException as exc:
            self._ledger.release(grant)
            placing = self._placing.pop(replica_id, None)
            if isinstance(exc, asyncio.CancelledError) and placing and self._abort is not None:
                raise DeploymentError(self._abort) from None
            raise
        finally:
            self.starting.discard(replica_id)
            self.pending.pop(replica_id, None)
            self._placing.pop(replica_id, None)
        record = ReplicaRecord(handle, spec.code_version, self.config_version, grant=grant)
        if self.deleting or self.spec is not spec:  # superseded while starting
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

    def _placement_waits(self, replica_id: str, reason: str | None) -> None:
        """The runtime's cluster cannot place the replica yet (``reason``: why; None: it
        is placed now): it is listed as PENDING, not STARTING, meanwhile."""
        if reason is None:
            if self.pending.pop(replica_id, None) is not None:
                self.starting.add(replica_id)
            return
        if replica_id not in self.pending:
            logger.warning("replica %s is pending: %s", replica_id, reason)
        task = asyncio.current_task()  # the replica's start: abort_pending cancels it
        if task is not None:
            self._placing[replica_id] = task
        self.starting.discard(replica_id)
        self.pending[replica_id] = reason
        self.message = f"{len(self.pending)} replica(s) pending: {reason}"

    def abort_pending(self, reason: str) -> None:
        """Make every replica waiting for resources fail with DeploymentError(reason)."""
        self._abort = reason
        for task in [*self._acquiring, *self._placing.values()]:
            task.cancel()

    async def stop_replicas(self, records: list[ReplicaRecord]) -> None:
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
        """Deliver the running replicas to every router (coalesced: :mod:`.publisher`)."""
        await self.publisher.publish()

    def _current_set(self) -> ReplicaSetUpdate:
        assert self.spec is not None
        infos = [r.handle.info for r in self.replicas if r.state is ReplicaState.RUNNING]
        return replica_set(self.app, self.spec, infos, self.is_ingress)

    async def delete(self) -> None:
        """Stop every replica (gracefully) and tell routers the deployment is gone."""
        self.deleting = True
        if self.autoscaler is not None:
            self.autoscaler.stop()
        self.abort_pending(f"deployment '{self.spec.name if self.spec else ''}' was deleted")
        for task in list(self._tasks):
            task.cancel()
        await self.stop_replicas(list(self.replicas))
        await self.publisher.idle()  # no set of it may arrive after the deletion
        await self._publish_update(ReplicaSetUpdate(self.app, self.name, [], False))

    # --- supervision ---------------------------------------------------------------

    def replica_died(self, handle: ReplicaHandle, replace: bool = True) -> bool:
        """Called by the runtime when a replica ends; True if it was one of ours. It is
        replaced unless it was stopping, its deployment is being deleted, or not
        ``replace`` (shoal is shutting down)."""
        record = next((r for r in self.replicas if r.handle is handle), None)
        if record is None:
            return False
        self.replicas.remove(record)
        self._ledger.release(record.grant)
        if record.state is ReplicaState.STOPPING or self.deleting or not replace:
            return True
        self.spawn(self.publish(), "publish")
        if self._count() >= self.target:
            logger.warning("replica %s died; not replaced (the deployment was scaled down)",
                           handle.info.replica_id)  # fmt: skip
            return True
        logger.warning("replica %s died; starting a replacement", handle.info.replica_id)
        self.spawn(self.add_replica(), "replace")
        return True

    def _count(self) -> int:
        """Replicas running, starting or waiting for resources (not those stopping)."""
        running = sum(1 for r in self.replicas if r.state is ReplicaState.RUNNING)
        return running + len(self.starting) + len(self.pending)

    async def add_replica(self, why: str = "replacing a dead replica") -> None:
        """Start one replica if fewer than ``target`` run or start; retried with backoff."""
        while not self.deleting and self._count() < self.target:
            try:
                await self._start(1)
            except Exception as exc:  # keep trying, with backoff, whatever the failure
                self._failures += 1
                self.status = DeploymentStatus.UNHEALTHY
                self.message = f"{why} failed: {failure_message(exc)}"
                await asyncio.sleep(min(MAX_BACKOFF_S, 0.5 * 2**self._failures))
                continue
            self._failures = 0
            if self.status in _SCALING:
                self._settle_status()
            elif sum(r.state is ReplicaState.RUNNING for r in self.replicas) >= self.target:
                self.status, self.message = DeploymentStatus.HEALTHY, ""
            return

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; cancelled when the deployment is deleted."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- status --------------------------------------------------------------------

    def overview(self) -> DeploymentStatusOverview:
        return deployment_overview(self)


def replica_set(
    app: str, spec: DeploymentSpec, infos: list[ReplicaInfo], is_ingress: bool
) -> ReplicaSetUpdate:
    """The update routers get for ``spec``'s replicas: the set and the limits they apply."""
    config = spec.config
    auto = config.autoscaling()
    return ReplicaSetUpdate(
        app, spec.name, infos, True, is_ingress,
        config.max_queued_requests, config.no_replica_timeout_s,
        auto.metrics_interval_s if auto is not None else 0.0,
    )  # fmt: skip
