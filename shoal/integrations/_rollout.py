"""Registry-driven rollout, per replica: the serving version, a candidate, shadow and canary.

Registry-agnostic: a version is a :class:`ModelRef`; loading one and running a
request on it are callables given by the integration (``mlflow.py``).

Guarantees of :class:`RolloutEngine` (one per replica):

* a request runs on one version from start to end; switching versions is one
  assignment, and ``activate`` returns only after the requests still running on
  the old version finished (at most ``drain_timeout_s``), so once every replica
  answered ``activate``, every response produced afterwards comes from the new version;
* shadow: after a request was answered by the serving version, it is run again
  on the candidate in the background (at most ``max_mirrors`` at once per
  replica; more are dropped, never queued) and the outputs are compared. The
  caller never waits for, nor sees, the candidate;
* canary: ``canary_fraction`` of requests run on the candidate; if the
  candidate raises, the request is run again on the serving version, so the
  caller gets an answer and the candidate gets an error counted against it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger("shoal.integrations.rollout")

T = TypeVar("T")

IDLE, STAGED, SHADOW, CANARY = "idle", "staged", "shadow", "canary"
DECISIONS = ("promote", "rollback", "fail")
MAX_HISTORY = 200
_COUNTERS = ("shadow_requests", "shadow_agreed", "shadow_errors", "shadow_dropped",
             "canary_requests", "canary_errors")  # fmt: skip


@dataclass(frozen=True)
class ModelRef:
    """One model version: ``uri`` loads exactly it; ``version`` names it in answers and history."""

    uri: str
    version: str
    name: str | None = None
    run_id: str | None = None


def same_output(a: Any, b: Any) -> bool:
    """The default shadow comparison: equal outputs (arrays and tables element-wise)."""
    import numpy as np

    try:
        if hasattr(a, "equals") and type(a) is type(b):  # pandas
            return bool(a.equals(b))
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except Exception:
        return False


@dataclass(frozen=True)
class RolloutPolicy:
    """How a new version found in the registry replaces the serving one.

    The default rolls it out directly: load it on every replica, then switch.
    With ``shadow_requests`` it is first shadowed on that many live requests
    (counted over all replicas); with ``canary_fraction`` and ``canary_requests``
    it then serves that share of traffic until that many requests were served by
    it. After each phase: more than ``max_error_rate`` of its requests failing,
    or (shadow) agreeing with the serving version on less than ``min_agreement``
    of them, rolls it back. A phase without enough traffic within
    ``phase_timeout_s`` rolls back too. A version that failed to load is retried
    after ``retry_failed_after_s``; a rolled-back one only when the alias moves again.
    """

    shadow_requests: int = 0
    min_agreement: float | None = None
    canary_fraction: float = 0.0
    canary_requests: int = 0
    max_error_rate: float = 0.0
    phase_timeout_s: float = 600.0
    check_interval_s: float = 1.0
    max_mirrors: int = 4
    drain_timeout_s: float = 30.0
    retry_failed_after_s: float = 600.0
    compare: Callable[[Any, Any], bool] | None = None

    def __post_init__(self) -> None:
        for name in ("shadow_requests", "canary_requests", "max_mirrors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RolloutPolicy.{name} must be an int >= 0, got {value!r}")
        for name in ("canary_fraction", "max_error_rate", "min_agreement"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"RolloutPolicy.{name} must be in [0, 1], got {value!r}")
        for name in ("phase_timeout_s", "check_interval_s", "drain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RolloutPolicy.{name} must be > 0")
        if (self.canary_fraction > 0) != (self.canary_requests > 0):
            raise ValueError("set both canary_fraction and canary_requests, or neither")

    def phases(self) -> list[str]:
        """The phases a rollout goes through before the switch, in order."""
        return [SHADOW] * bool(self.shadow_requests) + [CANARY] * bool(self.canary_requests)

    def judge(self, phase: str, counts: dict[str, int]) -> tuple[bool, str] | None:
        """``(passed, why)`` once the phase's evidence suffices, else None (keep going)."""
        needed = self.shadow_requests if phase == SHADOW else self.canary_requests
        done, errors = counts[f"{phase}_requests"], counts[f"{phase}_errors"]
        limit = f"max_error_rate={self.max_error_rate:g}"
        if errors > self.max_error_rate * needed:  # already too many, whatever comes next
            return False, f"{phase}: {errors} of {done} requests failed on it ({limit})"
        if done < needed:
            return None
        summary = f"{phase}: {done} requests, {errors} failed ({limit})"
        if phase == SHADOW and done > errors:
            agreement = counts["shadow_agreed"] / (done - errors)
            summary += f", agreement {agreement:.1%}"
            if self.min_agreement is not None and agreement < self.min_agreement:
                return False, f"{summary} < min_agreement={self.min_agreement:g}"
        return True, summary


@dataclass
class Slot:
    """A loaded version and the requests running on it."""

    ref: ModelRef
    model: Any
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def version(self) -> str:
        return self.ref.version


class RolloutEngine:
    """One replica's versions: the serving one, at most one candidate, and the history."""

    def __init__(
        self,
        active: Slot,
        load: Callable[[ModelRef], Awaitable[Slot]],
        policy: RolloutPolicy,
        replica_id: str,
    ) -> None:
        self.active = active
        self.candidate: Slot | None = None
        self.phase = IDLE
        self.fraction = 0.0
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.history: list[dict[str, Any]] = []
        self.policy = policy
        self.replica_id = replica_id
        self.started_at = time.time()
        self._load_fn = load
        self._loading: dict[str, asyncio.Future[Slot]] = {}
        self._mirrors: set[asyncio.Task[None]] = set()

    # --- requests --------------------------------------------------------------------

    async def serve(self, call: Callable[[Slot], Awaitable[T]]) -> tuple[T, Slot]:
        """Run ``call`` on the version this request gets; returns its output and that version."""
        candidate = self.candidate
        if candidate is not None and self.phase == CANARY and random.random() < self.fraction:
            self.counts["canary_requests"] += 1
            try:
                return await _run(candidate, call), candidate
            except Exception:
                active = self.active
                output = await _run(active, call)  # raises too if the input was the problem
                if self.candidate is candidate:  # it failed where the serving version did not
                    self.counts["canary_errors"] += 1
                return output, active
        active = self.active
        output = await _run(active, call)
        if candidate is not None and self.phase == SHADOW and candidate is not active:
            self._mirror(candidate, call, output)
        return output, active

    def _mirror(self, candidate: Slot, call: Callable[[Slot], Awaitable[Any]], served: Any) -> None:
        if len(self._mirrors) >= self.policy.max_mirrors:
            self.counts["shadow_dropped"] += 1  # bounded: a slow candidate never builds a queue
            return
        task = asyncio.get_running_loop().create_task(self._shadow(candidate, call, served))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _shadow(
        self, candidate: Slot, call: Callable[[Slot], Awaitable[Any]], served: Any
    ) -> None:
        try:
            output = await _run(candidate, call)
        except Exception:
            agreed, failed = False, True
        else:
            try:
                agreed, failed = bool((self.policy.compare or same_output)(served, output)), False
            except Exception:
                agreed, failed = False, False
        if self.candidate is candidate and self.phase == SHADOW:  # still the same experiment
            self.counts["shadow_requests"] += 1
            self.counts["shadow_errors"] += failed
            self.counts["shadow_agreed"] += agreed

    # --- control (called by the leader through broadcasts) -----------------------------

    async def prepare(self, ref: ModelRef) -> str:
        """Load ``ref`` as the candidate (idempotent); the serving version is untouched."""
        if ref.version != self.active.version and (
            self.candidate is None or self.candidate.version != ref.version
        ):
            slot = await self._load(ref)
            if self.active.version != ref.version:
                self.candidate, self.phase, self.fraction = slot, STAGED, 0.0
                self.counts = dict.fromkeys(_COUNTERS, 0)
        return ref.version

    async def set_phase(self, ref: ModelRef, phase: str, fraction: float) -> str:
        """Start shadowing or canarying ``ref`` (loading it first if this replica has not)."""
        await self.prepare(ref)
        if self.candidate is not None and self.candidate.version == ref.version:
            self.phase, self.fraction = phase, fraction
            self.counts = dict.fromkeys(_COUNTERS, 0)
        return ref.version

    async def activate(self, ref: ModelRef) -> str:
        """Serve ``ref`` from now on; returns once no request runs on the previous version."""
        if self.active.version != ref.version:
            candidate = self.candidate
            if candidate is not None and candidate.version == ref.version:
                slot = candidate
            else:
                slot = await self._load(ref)
            if self.active.version != ref.version:
                old, self.active = self.active, slot  # the switch: one assignment
                self.candidate, self.phase, self.fraction = None, IDLE, 0.0
                try:
                    await asyncio.wait_for(old.idle.wait(), self.policy.drain_timeout_s)
                except TimeoutError:
                    logger.warning(
                        "requests on version %s still running after the switch", old.version
                    )
        return self.active.version

    def abort(self, version: str) -> str:
        """Drop the candidate ``version`` (the serving version is untouched)."""
        if self.candidate is not None and self.candidate.version == version:
            self.candidate, self.phase, self.fraction = None, IDLE, 0.0
        return self.active.version

    async def _load(self, ref: ModelRef) -> Slot:
        future = self._loading.get(ref.version)
        if future is None:  # concurrent prepare/activate of one version share one load
            future = asyncio.ensure_future(self._load_fn(ref))
            self._loading[ref.version] = future
            future.add_done_callback(lambda _: self._loading.pop(ref.version, None))
        return await asyncio.shield(future)

    # --- state and history -----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "replica": self.replica_id,
            "started_at": self.started_at,
            "version": self.active.version,
            "ref": self.active.ref,
            "candidate": self.candidate.version if self.candidate else None,
            "phase": self.phase,
            "counts": dict(self.counts),
            "history": self.history,
        }

    def record(self, action: str, version: str, reason: str, **extra: Any) -> dict[str, Any]:
        now = time.time()
        event = {
            "id": uuid.uuid4().hex[:12],
            "time": now,
            "when": _iso(now),
            "action": action,
            "version": version,
            "reason": reason,
            "replica": self.replica_id,
            **extra,
        }
        self.merge_history([event])
        logger.info("rollout: %s version %s: %s", action, version, reason)
        return event

    def merge_history(self, events: list[dict[str, Any]]) -> None:
        known = {event["id"] for event in self.history}
        new = [event for event in events if event["id"] not in known]
        if new:
            merged = sorted([*self.history, *new], key=lambda event: event["time"])
            self.history = merged[-MAX_HISTORY:]


def _iso(timestamp: float) -> str:
    """UTC, to the millisecond: ``2026-01-31T12:00:00.123Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
    return f"{seconds}.{int(timestamp % 1 * 1000):03d}Z"


async def _run(slot: Slot, call: Callable[[Slot], Awaitable[T]]) -> T:
    slot.in_flight += 1
    slot.idle.clear()
    try:
        return await call(slot)
    finally:
        slot.in_flight -= 1
        if slot.in_flight == 0:
            slot.idle.set()
