"""Canary: send a share of traffic to a candidate; take it away when the candidate misbehaves."""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from shoal._api.deployment import deployment
from shoal._api.handle import DeploymentHandle
from shoal._errors import ConfigError
from shoal._observe.metrics import counter
from shoal.patterns._common import (
    METRIC_LABELS,
    KeyFunction,
    LatencyWindow,
    PatternBase,
    RoutedResult,
    call_user,
    check_fraction,
    check_keys,
    current_request_id,
    deployment_name,
    describe_error,
    metric_labels,
    named_members,
    replica_id,
    sticky_key,
    unit_hash,
)

logger = logging.getLogger("shoal.patterns")

_OPTIONS = {"weight", "max_error_rate", "window_s", "min_requests"}


@deployment(max_ongoing_requests=100)
class Canary(PatternBase):
    """Send ``weight`` of the requests to ``candidate``, the rest to ``stable``.

    Guarantees:

    * the weight changes live, without restarting anything: deploy a new
      ``user_config`` (``{"weight": 0.2}``, applied by ``reconfigure``) or call
      ``set_weight``. Setting a weight also clears an earlier rollback;
    * automatic rollback: as soon as, over the last ``window_s`` seconds, at
      least ``min_requests`` candidate requests were made and more than
      ``max_error_rate`` of them failed (raised, or ``check(output)`` returned
      False), every later request goes to ``stable``. Only requests routed to
      the candidate can fail because of it, and the caller still gets the
      candidate's exception for those;
    * with ``sticky_key`` a key (a user id) stays on one side, in every replica
      and across restarts; raising the weight only moves keys to the candidate.

    Each replica judges the traffic it routes, and a rollback lives in its
    memory: to make one permanent, deploy ``user_config={"weight": 0}``.
    """

    def __init__(
        self,
        stable: DeploymentHandle,
        candidate: DeploymentHandle,
        *,
        weight: float = 0.0,
        max_error_rate: float = 0.1,
        window_s: float = 60.0,
        min_requests: int = 20,
        check: Callable[[Any], Any] | None = None,
        sticky_key: KeyFunction = None,
        salt: str | None = None,
    ) -> None:
        self.name = deployment_name("Canary")
        self.what = f"Canary '{self.name}'"
        members = named_members([stable, candidate], self.what)
        self.stable_name, self.candidate_name = list(members)
        self.stable, self.candidate = stable, candidate
        self.check = check
        self.sticky_key = sticky_key
        self.salt = self.name if salt is None else salt
        self.outcomes: deque[tuple[float, bool]] = deque()  # candidate (time, failed) in window
        self.window_failures = 0
        self.rollback_reason: str | None = None
        self.requests = {"stable": 0, "candidate": 0}
        self.errors = {"stable": 0, "candidate": 0}
        self.last_candidate_error: str | None = None
        self.latency = {"stable": LatencyWindow(), "candidate": LatencyWindow()}
        requests = counter(
            "shoal_canary_requests",
            "Requests a Canary routed, by arm (stable, candidate) and result (ok, error: "
            "raised, or check() returned False).",
            (*METRIC_LABELS, "arm", "result"),
        )
        labels = metric_labels(self.name)
        self._routed = {
            (arm, failed): requests.labels(*labels, arm, "error" if failed else "ok")
            for arm in ("stable", "candidate")
            for failed in (False, True)
        }
        self.weight, self.max_error_rate, self.window_s, self.min_requests = 0.0, 0.1, 60.0, 20
        self._configure(
            weight=weight,
            max_error_rate=max_error_rate,
            window_s=window_s,
            min_requests=min_requests,
        )

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply ``user_config``: any of weight, max_error_rate, window_s, min_requests."""
        check_keys(config, _OPTIONS, self.what)
        self._configure(**config)

    def _configure(self, **options: Any) -> None:
        if "weight" in options:
            self.weight = check_fraction(options["weight"], "weight", self.what)
            self.rollback_reason = None  # a new weight is a new decision: start judging afresh
            self.outcomes.clear()
            self.window_failures = 0
        if "max_error_rate" in options:
            self.max_error_rate = check_fraction(
                options["max_error_rate"], "max_error_rate", self.what
            )
        if "window_s" in options:
            window = options["window_s"]
            if isinstance(window, bool) or not isinstance(window, int | float) or window <= 0:
                raise ConfigError(f"{self.what}: window_s must be a number > 0, got {window!r}")
            self.window_s = float(window)
        if "min_requests" in options:
            count = options["min_requests"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"{self.what}: min_requests must be an int >= 1, got {count!r}")
            self.min_requests = count

    async def set_weight(self, weight: float) -> dict[str, Any]:
        """Change this replica's candidate share now (for every replica: use ``user_config``)."""
        self._configure(weight=weight)
        return await self.stats()

    async def rollback(self, reason: str = "rolled back by hand") -> dict[str, Any]:
        """Send all traffic to ``stable`` until a weight is set again."""
        self._roll_back(reason)
        return await self.stats()

    def _roll_back(self, reason: str) -> None:
        if self.rollback_reason is None:
            self.rollback_reason = reason
            logger.warning(
                "%s: candidate '%s' rolled back: %s", self.what, self.candidate_name, reason
            )

    def _to_candidate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if self.rollback_reason is not None or self.weight <= 0:
            return False
        key = sticky_key(self.sticky_key, args, kwargs)
        return (random.random() if key is None else unit_hash(key, self.salt)) < self.weight

    def _record_candidate(self, failed: bool, reason: str) -> None:
        """Add one candidate outcome to the time window; roll back if the window says so."""
        now = time.monotonic()
        self.outcomes.append((now, failed))
        self.window_failures += failed
        while self.outcomes and self.outcomes[0][0] < now - self.window_s:
            self.window_failures -= self.outcomes.popleft()[1]
        count = len(self.outcomes)
        if count >= self.min_requests and self.window_failures / count > self.max_error_rate:
            self._roll_back(
                f"{self.window_failures} of the last {count} candidate requests failed "
                f"(> max_error_rate={self.max_error_rate} over window_s={self.window_s}); "
                f"last failure: {reason}"
            )

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Any) -> Any:
        side = "candidate" if self._to_candidate(args, kwargs) else "stable"
        member = self.candidate if side == "candidate" else self.stable
        self.requests[side] += 1
        started = time.perf_counter()
        try:
            value = await member.remote(*args, **kwargs)
        except Exception as exc:
            self.errors[side] += 1
            self._routed[side, True].inc()
            if side == "candidate":
                self.last_candidate_error = describe_error(exc)
                self._record_candidate(True, self.last_candidate_error)
            raise
        self.latency[side].add((time.perf_counter() - started) * 1000)
        ok = True
        if side == "candidate":
            ok = self.check is None or bool(await call_user(self.check, value))
            if not ok:
                self.errors[side] += 1
                self.last_candidate_error = "check() returned False"
            self._record_candidate(not ok, "check() returned False")
        self._routed[side, not ok].inc()
        name = self.candidate_name if side == "candidate" else self.stable_name
        return RoutedResult(value, name, current_request_id())

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows for this replica: the weights in force and why."""
        count = len(self.outcomes)
        details: dict[str, Any] = {
            "stable": self.stable_name,
            "candidate": self.candidate_name,
            "weight": self.weight,
            "effective_weight": 0.0 if self.rollback_reason else self.weight,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "window_error_rate": round(self.window_failures / count, 4) if count else None,
        }
        if self.rollback_reason is not None:
            details["rolled_back"] = self.rollback_reason
        return details

    async def stats(self) -> dict[str, Any]:
        """Weight, rollback state, the candidate's window, and per-side counts of this replica."""
        count = len(self.outcomes)
        return {
            "canary": self.name,
            "replica": replica_id(),
            "stable": self.stable_name,
            "candidate": self.candidate_name,
            "weight": self.weight,
            "effective_weight": 0.0 if self.rollback_reason else self.weight,
            "rolled_back": self.rollback_reason is not None,
            "rollback_reason": self.rollback_reason,
            "window": {
                "requests": count,
                "failures": self.window_failures,
                "error_rate": self.window_failures / count if count else None,
            },
            "max_error_rate": self.max_error_rate,
            "window_s": self.window_s,
            "min_requests": self.min_requests,
            "requests": self.requests,
            "errors": self.errors,
            "last_candidate_error": self.last_candidate_error,
            "latency_ms": {side: window.summary() for side, window in self.latency.items()},
        }
