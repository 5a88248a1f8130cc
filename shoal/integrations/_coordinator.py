"""The rollout leader: polls the registry and moves every replica of a deployment together.

Every replica runs a :class:`Coordinator`; at each poll it asks all replicas
for their state (one broadcast) and only the oldest replica acts, so there is
one leader without any other service, and a new one as soon as it dies. The
leader resolves the alias; when it names a version other than the serving one,
it runs the rollout (load everywhere, optional shadow and canary phases, then
switch everywhere, or roll back) and records each step. Between rollouts it
brings every replica to the serving version and the shared history (a
restarted replica, for instance). Registry errors are logged and retried at
the next poll; nothing here can stop a replica from serving.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal._errors import ReplicaDiedError
from shoal.integrations._rollout import (
    CANARY,
    DECISIONS,
    SHADOW,
    ModelRef,
    RolloutEngine,
)

logger = logging.getLogger("shoal.integrations.rollout")

Peers = Callable[..., Awaitable[dict[str, Any]]]  # (method, *args) -> {replica_id: reply}

_ATTEMPTS = 3
#: How often a starting replica asks again for the replica set its router knows.
_SET_POLL_S = 0.05


class _Superseded(Exception):
    def __init__(self, target: ModelRef) -> None:
        super().__init__(target.version)
        self.target = target


class Coordinator:
    """Follows ``describe`` (e.g. ``models:/iris@champion``) for one replica's engine."""

    def __init__(
        self,
        engine: RolloutEngine,
        peers: Peers,
        resolve: Callable[[], Awaitable[ModelRef]],
        describe: str,
        *,
        poll_interval_s: float,
        load_timeout_s: float,
        control_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.policy = engine.policy
        self.peers = peers
        self.resolve = resolve
        self.describe = describe
        self.poll_interval_s = poll_interval_s
        self.load_timeout_s = load_timeout_s
        self.control_timeout_s = control_timeout_s
        self._last_target: str | None = None
        self._last_error = ""

    async def run(self) -> None:
        """Poll forever (cancel the task to stop)."""
        while True:
            # Jitter: replicas started together do not poll in lockstep.
            await asyncio.sleep(self.poll_interval_s * random.uniform(0.8, 1.2))
            try:
                await self.tick()
                self._last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # logged once per distinct error, retried at the next poll
                if repr(exc) != self._last_error:
                    self._last_error = repr(exc)
                    logger.warning("following %s: %r (retrying every poll)", self.describe, exc)

    async def tick(self) -> None:
        states = await self._states()
        if self.engine.replica_id not in states:
            return  # this replica's router has not had a replica set naming it yet: next poll
        leader = min(states.values(), key=lambda s: (s["started_at"], s["replica"]))
        if leader["replica"] != self.engine.replica_id:
            return
        for state in states.values():
            self.engine.merge_history(state["history"])
        serving = self.engine.active.ref
        if not self.engine.history:
            self.engine.record("start", serving.version, f"{self.describe} names it at start")
        target = await self.resolve()
        moved = self._last_target is not None and self._last_target != target.version
        self._last_target = target.version
        if target.version != serving.version and (moved or not self._decided(target.version)):
            await self.roll_out(serving, target)
            states = await self._states()
        await self._converge(states)

    async def sync_from_peers(self) -> None:
        """For a replica that just started: adopt the history and version of the oldest replica.

        The oldest is the leader, whose version is the deployment's; if that is
        this replica, there is nothing newer to learn from the others. Waits (at most
        ``control_timeout_s``, then TimeoutError) until this replica's router knows a
        replica set that names it: a set without it (none yet, in a process whose router
        has just started) could make it take itself for the oldest.
        """
        async with asyncio.timeout(self.control_timeout_s):
            while self.engine.replica_id not in (states := await self._states()):
                await asyncio.sleep(_SET_POLL_S)
        oldest = min(states.values(), key=lambda s: (s["started_at"], s["replica"]))
        if oldest["replica"] == self.engine.replica_id:
            return
        self.engine.merge_history(oldest["history"])
        if oldest["version"] != self.engine.active.version:
            await self.engine.activate(oldest["ref"])

    def _decided(self, version: str) -> bool:
        """Was the last rollout of ``version`` concluded (and, if it failed, recently)?"""
        for event in reversed(self.engine.history):
            if event["version"] != version or event["action"] not in DECISIONS:
                continue
            if event["action"] == "fail":
                return time.time() - event["time"] < self.policy.retry_failed_after_s
            return True
        return False

    async def roll_out(self, serving: ModelRef, target: ModelRef) -> None:
        """Load, (shadow, canary,) then promote or roll back ``target``; record each step."""
        record = self.engine.record
        record("detect", target.version, f"{self.describe} now names version {target.version}",
               from_version=serving.version)  # fmt: skip
        try:
            started = time.monotonic()
            replies = await self._broadcast("rollout_prepare", target, timeout=self.load_timeout_s)
            took = time.monotonic() - started
            record("load", target.version, f"loaded on {len(replies)} replicas in {took:.2f} s")
            evidence = ["no shadow or canary phase configured"]
            if self.policy.phases():
                evidence = []
            for phase in self.policy.phases():
                passed, why = await self._run_phase(phase, target)
                evidence.append(why)
                if not passed:
                    await self._broadcast("rollout_abort", target.version)
                    record("rollback", target.version, why, from_version=serving.version)
                    return
            started = time.monotonic()
            await self._broadcast("rollout_activate", target, timeout=self.load_timeout_s)
            record("promote", target.version,
                   f"{'; '.join(evidence)}; every replica switched in "
                   f"{time.monotonic() - started:.3f} s", from_version=serving.version)  # fmt: skip
        except _Superseded as exc:
            await self._abort_quietly(target)
            record("rollback", target.version,
                   f"{self.describe} moved to version {exc.target.version} before a decision",
                   from_version=serving.version)  # fmt: skip
        except Exception as exc:
            await self._abort_quietly(target)
            record("fail", target.version, f"{type(exc).__name__}: {str(exc)[:500]}",
                   from_version=serving.version)  # fmt: skip

    async def _run_phase(self, phase: str, target: ModelRef) -> tuple[bool, str]:
        fraction = self.policy.canary_fraction if phase == CANARY else 0.0
        await self._broadcast("rollout_phase", target, phase, fraction, timeout=self.load_timeout_s)
        needed = self.policy.shadow_requests if phase == SHADOW else self.policy.canary_requests
        what = "mirroring live requests to it" if phase == SHADOW else f"{fraction:.0%} of requests"
        self.engine.record(phase, target.version, f"{what} until {needed} requests")
        deadline = time.monotonic() + self.policy.phase_timeout_s
        while True:
            await asyncio.sleep(self.policy.check_interval_s)
            totals = dict.fromkeys(self.engine.counts, 0)
            for state in (await self._states()).values():
                if state["candidate"] == target.version and state["phase"] == phase:
                    for key, value in state["counts"].items():
                        totals[key] += value
            verdict = self.policy.judge(phase, totals)
            if verdict is not None:
                return verdict
            if time.monotonic() > deadline:
                done = totals[f"{phase}_requests"]
                return False, (f"{phase}: only {done} of {needed} requests within "
                               f"phase_timeout_s={self.policy.phase_timeout_s:g}")  # fmt: skip
            await self._check_target(target)

    async def _check_target(self, target: ModelRef) -> None:
        try:
            current = await self.resolve()
        except Exception:
            return  # the registry is unreachable: carry on with the phase
        if current.version != target.version:
            raise _Superseded(current)

    async def _converge(self, states: dict[str, Any]) -> None:
        """Bring lagging replicas to the serving version and the leader's history."""
        serving = self.engine.active.ref
        history = self.engine.history
        last = history[-1]["id"] if history else None
        if any(
            s["version"] != serving.version or (s["history"] or [{}])[-1].get("id") != last
            for s in states.values()
        ):
            await self._broadcast("rollout_sync", serving, history, timeout=self.load_timeout_s)

    async def _abort_quietly(self, target: ModelRef) -> None:
        try:
            await self._broadcast("rollout_abort", target.version)
        except Exception as exc:
            logger.warning("could not abort version %s everywhere: %r", target.version, exc)

    async def _states(self) -> dict[str, Any]:
        return await self._broadcast("rollout_state")

    async def _broadcast(
        self, method: str, *args: Any, timeout: float | None = None
    ) -> dict[str, Any]:
        """``method(*args)`` on every replica; retried while the replica set changes."""
        for attempt in range(_ATTEMPTS):
            try:
                async with asyncio.timeout(timeout or self.control_timeout_s):
                    return await self.peers(method, *args)
            except (ReplicaDiedError, OSError):
                if attempt == _ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
