"""The autoscaler of one deployment: load in, replica counts out.

Load comes from every process that routes to the deployment (a
:class:`LoadReport` each ``metrics_interval_s``, at once when a request waits
with no replica), and custom metrics from its replicas
(``record_autoscaling_stats()``, polled every ``metrics_interval_s``). Every
``CONTROL_LOOP_S`` the policy (see :mod:`.policy`) decides the replica count
from their averages over ``look_back_period_s``; a changed count is handed to the
deployment with the reason, which records it.

Guarantees: a process that stops reporting stops counting once its reports leave
the window; a replica that left the deployment stops counting at once; a policy
that raises, returns nonsense or takes longer than ``TIMEOUTS.autoscaling_policy_s`` changes
nothing (logged, and said in the deployment's status); nothing is decided while
the deployment is being updated.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from shoal._config import DEFAULT_POLICY, TIMEOUTS, AutoscalingConfig
from shoal._controller.policy import (
    AutoscalingContext,
    Delays,
    DeploymentID,
    PolicyFunction,
    check_answer,
    cold_start,
    cold_start_reason,
    load_policy,
    settle,
)
from shoal._controller.status import ScalingDecision
from shoal._errors import ShoalError, TransportError
from shoal._seam.protocols import ReplicaHandle
from shoal._transport.messages import LoadReport

logger = logging.getLogger("shoal.autoscaler")

#: How often the policy decides (Ray Serve's control loop period).
CONTROL_LOOP_S = 0.1
#: Longest a custom policy may take; it runs in a thread, so a slow one cannot stall
#: the controller, and its answer after this is ignored.
#: How many scaling decisions a deployment keeps for ``serve.status()``.
DECISIONS_KEPT = 20


class Scalable(Protocol):
    """What the autoscaler needs of its deployment (``DeploymentState``)."""

    app: str
    target: int

    @property
    def name(self) -> str: ...

    @property
    def updating(self) -> bool: ...

    def running(self) -> list[ReplicaHandle]: ...

    def bounds(self) -> tuple[int, int]: ...

    def scale_to(self, count: int) -> None: ...

    def policy_failed(self, message: str) -> None: ...


class LoadWindow:
    """Load reports of one deployment by source, for the look-back window."""

    def __init__(self) -> None:
        # source -> (received at, queued, running by replica id), oldest first
        self._reports: dict[str, collections.deque[tuple[float, float, dict[str, float]]]] = {}

    def record(self, report: LoadReport, now: float) -> None:
        reports = self._reports.setdefault(report.source, collections.deque())
        reports.append((now, report.queued, report.running))

    def averages(
        self, now: float, look_back_s: float, stale_s: float, replicas: set[str]
    ) -> tuple[float, dict[str, float]]:
        """Queued requests, and running requests per live replica: each source's mean
        over the window, summed over sources. A source's newest report counts until it
        is ``stale_s`` old even if older than the window (a window shorter than the
        report interval must not forget a loaded process between its reports)."""
        queued = 0.0
        running = dict.fromkeys(replicas, 0.0)
        for source, reports in list(self._reports.items()):
            while reports and reports[0][0] < now - look_back_s:
                if len(reports) == 1 and reports[0][0] >= now - stale_s:
                    break
                reports.popleft()
            if not reports:
                del self._reports[source]
                continue
            count = len(reports)
            queued += sum(r[1] for r in reports) / count
            for _at, _queued, by_replica in reports:
                for replica_id, value in by_replica.items():
                    if replica_id in running:
                        running[replica_id] += value / count
        return queued, running


class StatsWindow:
    """Custom metrics of each replica (``record_autoscaling_stats()``) for the window."""

    def __init__(self) -> None:
        self._samples: dict[str, collections.deque[tuple[float, dict[str, float]]]] = {}

    def record(self, replica_id: str, stats: dict[str, float], now: float) -> None:
        self._samples.setdefault(replica_id, collections.deque()).append((now, stats))

    def window(
        self, now: float, look_back_s: float, replicas: set[str]
    ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
        """(aggregated, raw): by metric name, then replica id; means and samples."""
        raw: dict[str, dict[str, list[float]]] = {}
        for replica_id in list(self._samples):
            samples = self._samples[replica_id]
            while samples and samples[0][0] < now - look_back_s:
                samples.popleft()
            if replica_id not in replicas or not samples:
                del self._samples[replica_id]
                continue
            for _at, stats in samples:
                for name, value in stats.items():
                    raw.setdefault(name, {}).setdefault(replica_id, []).append(value)
        aggregated = {
            name: {rid: sum(values) / len(values) for rid, values in by_replica.items()}
            for name, by_replica in raw.items()
        }
        return aggregated, raw


class Autoscaler:
    """Decides one deployment's replica count while it autoscales."""

    def __init__(self, deployment: Scalable, config: AutoscalingConfig) -> None:
        self.deployment = deployment
        self.config = config
        self.load = LoadWindow()
        self.stats = StatsWindow()
        self.decisions: collections.deque[ScalingDecision] = collections.deque(
            maxlen=DECISIONS_KEPT
        )
        self.delays = Delays()
        #: True while an application-level policy decides for this deployment.
        self.paused = False
        self._policy: PolicyFunction | None = None
        self._no_stats: set[str] = set()  # replicas whose class defines no stats method
        self._tasks: list[asyncio.Task[None]] = []
        self.last_load: dict[str, float] = {}  # requests per replica at the last decision
        self.last_scale_up: float | None = None
        self.last_scale_down: float | None = None
        #: The policy's last answer before bounds (a metric); None before the first.
        self.desired: float | None = None

    def configure(self, config: AutoscalingConfig) -> None:
        """New options (a redeploy); raises ConfigError if the policy cannot be loaded."""
        policy = load_policy(config.policy.policy_function)
        self.config, self._policy = config, policy

    def start(self) -> None:
        if self._policy is None:
            self._policy = load_policy(self.config.policy.policy_function)
        if not self._tasks:
            self._tasks = [
                asyncio.ensure_future(self._decide_forever()),
                asyncio.ensure_future(self._poll_stats_forever()),
            ]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    def record_load(self, report: LoadReport) -> None:
        self.load.record(report, time.monotonic())

    # --- deciding ------------------------------------------------------------------

    async def _decide_forever(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_LOOP_S)
            if self.deployment.updating or self.paused:
                continue
            try:
                await self.tick()
            except Exception:  # never let the loop die: the next tick tries again
                logger.exception("autoscaler of deployment '%s' failed", self.deployment.name)

    async def tick(self) -> None:
        """One decision: run the policy and hand a changed count to the deployment."""
        now = time.monotonic()
        ctx = self.context(now)
        path = self.config.policy.policy_function
        start = cold_start(ctx)
        if start is not None:
            self.delays.direction = 0
            self.apply(ctx, start, cold_start_reason(ctx))
            return
        policy = self._policy or load_policy(path)
        try:
            answer = policy(ctx) if path == DEFAULT_POLICY else await run_policy(policy, ctx)
            desired, state = check_answer(answer)
        except Exception as exc:
            self.failed(_policy_error(path, exc))
            return
        self.desired = desired
        count, reason = settle(desired, state, ctx, self.delays, now)
        if path != DEFAULT_POLICY:
            reason = f"policy {path}: {reason}"
        self.apply(ctx, count, reason)

    def apply(self, ctx: AutoscalingContext, count: int, reason: str) -> None:
        """Hand ``count`` to the deployment if it changed (recorded with ``reason``)."""
        if count != self.deployment.target:
            self.decided(ctx.target_num_replicas, count, reason)
            self.deployment.scale_to(count)

    def failed(self, message: str) -> None:
        logger.warning("deployment '%s': %s", self.deployment.name, message)
        self.deployment.policy_failed(message)

    def decided(self, before: int, after: int, reason: str) -> None:
        """Record (and log) a change of the replica count from ``before`` to ``after``."""
        wall = time.time()
        if after > before:
            self.last_scale_up = wall
        else:
            self.last_scale_down = wall
        self.decisions.append(ScalingDecision(wall, before, after, reason))
        logger.info(
            "deployment '%s' of application '%s': scaling %d -> %d replicas (%s)",
            self.deployment.name, self.deployment.app, before, after, reason,
        )  # fmt: skip

    def context(self, now: float) -> AutoscalingContext:
        deployment, config = self.deployment, self.config
        live = [handle.info.replica_id for handle in deployment.running()]
        stale_s = 2 * config.metrics_interval_s
        queued, running = self.load.averages(now, config.look_back_period_s, stale_s, set(live))
        aggregated, raw = self.stats.window(now, config.look_back_period_s, set(live))
        total_running = sum(running.values())
        self.last_load = running
        low, high = deployment.bounds()
        return AutoscalingContext(
            deployment_id=DeploymentID(deployment.name, deployment.app),
            deployment_name=deployment.name,
            app_name=deployment.app,
            current_num_replicas=len(live),
            target_num_replicas=deployment.target,
            running_replicas=live,
            total_num_requests=queued + total_running,
            total_queued_requests=queued,
            total_running_requests=total_running,
            requests_per_replica=running,
            aggregated_metrics=aggregated,
            raw_metrics=raw,
            capacity_adjusted_min_replicas=low,
            capacity_adjusted_max_replicas=high,
            policy_state=dict(self.delays.state),
            last_scale_up_time=self.last_scale_up,
            last_scale_down_time=self.last_scale_down,
            current_time=time.time(),
            config=config,
        )

    # --- custom metrics ------------------------------------------------------------

    async def _poll_stats_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            handles = [
                h for h in self.deployment.running() if h.info.replica_id not in self._no_stats
            ]
            if handles:
                await asyncio.gather(*(self._poll(handle) for handle in handles))

    async def _poll(self, handle: ReplicaHandle) -> None:
        replica_id = handle.info.replica_id
        try:
            stats = await handle.autoscaling_stats(self.config.metrics_interval_s)
        except (ShoalError, TransportError, TimeoutError) as exc:
            logger.warning("record_autoscaling_stats() of replica %s failed: %s", replica_id, exc)
            return
        if stats is None:
            self._no_stats.add(replica_id)  # its class has no such method: stop asking
            return
        self.stats.record(replica_id, stats, time.monotonic())


class AppAutoscaler:
    """One policy deciding every autoscaled deployment of an application (Ray Serve's
    application-level ``autoscaling_policy``): ``policy(contexts)`` gets
    ``{DeploymentID: AutoscalingContext}`` and returns ``({DeploymentID: replicas},
    {DeploymentID: policy_state})`` (deployment names work as keys too). Each answer
    goes through its deployment's own rules (factors, bounds, delays, cold start); a
    deployment left out keeps its count."""

    def __init__(self, app: str, path: str, deployments: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.path = path
        self._deployments = deployments
        self._policy = load_policy(path, "autoscaling_policy.policy_function")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._decide_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for autoscaler in self._autoscalers().values():
            autoscaler.paused = False

    def _autoscalers(self) -> dict[str, Autoscaler]:
        found = {}
        for name, state in self._deployments().items():
            if state.autoscaler is not None:
                found[name] = state.autoscaler
        return found

    async def _decide_forever(self) -> None:
        while True:
            await asyncio.sleep(CONTROL_LOOP_S)
            try:
                await self.tick()
            except Exception:  # never let the loop die: the next tick tries again
                logger.exception("autoscaling policy of application '%s' failed", self.app)

    async def tick(self) -> None:
        now = time.monotonic()
        autoscalers = self._autoscalers()
        for autoscaler in autoscalers.values():
            autoscaler.paused = True
        ready = {n: a for n, a in autoscalers.items() if not a.deployment.updating}
        if not ready:
            return
        contexts = {DeploymentID(name, self.app): a.context(now) for name, a in ready.items()}
        try:
            wanted, states = _app_answer(await run_policy(self._policy, contexts))
        except Exception as exc:
            for autoscaler in ready.values():
                autoscaler.failed(_policy_error(self.path, exc))
            return
        for deployment_id, ctx in contexts.items():
            autoscaler = ready[deployment_id.name]
            start = cold_start(ctx)
            if start is not None:
                autoscaler.apply(ctx, start, cold_start_reason(ctx))
                continue
            desired = _lookup(wanted, deployment_id)
            if desired is None:
                continue
            state = _lookup(states, deployment_id) or {}
            count, reason = settle(desired, state, ctx, autoscaler.delays, now)
            autoscaler.apply(ctx, count, f"application policy {self.path}: {reason}")


def _app_answer(answer: Any) -> tuple[dict[Any, float], dict[Any, dict[str, Any]]]:
    """An application policy's ``({deployment: replicas}, {deployment: state})``, checked."""
    if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], dict):
        wanted, states = answer[0], answer[1] or {}
        if isinstance(states, dict):
            return {k: check_answer((v, {}))[0] for k, v in wanted.items()}, states
    raise TypeError(
        "an application autoscaling policy must return ({deployment_id: replicas}, "
        f"{{deployment_id: policy_state}}), got {answer!r}"
    )


def _lookup(mapping: dict[Any, Any], deployment_id: DeploymentID) -> Any:
    """``mapping``'s value for ``deployment_id``, or for its name; None if neither."""
    return mapping.get(deployment_id, mapping.get(deployment_id.name))


async def run_policy(policy: Any, argument: Any) -> Any:
    """Call a user's policy in a thread, within ``TIMEOUTS.autoscaling_policy_s``
    (TimeoutError)."""
    return await asyncio.wait_for(
        asyncio.to_thread(policy, argument), TIMEOUTS.autoscaling_policy_s
    )


def _policy_error(path: str, exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        limit = TIMEOUTS.autoscaling_policy_s
        return f"autoscaling policy {path} took longer than {limit:g} s; ignored"
    return f"autoscaling policy {path} failed ({type(exc).__name__}: {exc}); replica count kept"
