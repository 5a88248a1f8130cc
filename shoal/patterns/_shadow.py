"""Shadow: answer with the primary, mirror traffic to a candidate, and compare them."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from shoal._api.deployment import deployment
from shoal._api.handle import DeploymentHandle
from shoal._errors import ConfigError
from shoal._observe.metrics import counter
from shoal.patterns._common import (
    METRIC_LABELS,
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
)

_OPTIONS = {"fraction", "max_in_flight", "timeout_s"}
#: ``result`` of shoal_shadow_comparisons: compare() said True / False, gave a number,
#: or there was nothing to compare (the candidate failed or timed out, compare() raised).
_RESULTS = ("agree", "disagree", "scored", "error")


def same(primary: Any, candidate: Any) -> bool:
    """The default comparison: equal values (numpy arrays element-wise and of one shape)."""
    try:
        if hasattr(primary, "shape") or hasattr(candidate, "shape"):
            import numpy as np

            return bool(np.array_equal(primary, candidate))
        return bool(primary == candidate)
    except Exception:
        return False


def _positive(value: Any, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{what}: {name} must be a number > 0, got {value!r}")


@deployment(max_ongoing_requests=100)
class Shadow(PatternBase):
    """Answer every request with ``primary``; mirror ``fraction`` of them to ``candidate``.

    Guarantees:

    * the primary path never waits for, and never fails because of, the
      candidate: a request is mirrored only after the primary answered, in a
      background task whose errors are counted, not raised;
    * memory stays bounded: at most ``max_in_flight`` mirrors run at once; a
      request that would exceed it is not mirrored and counted in ``dropped``;
      a mirror running longer than ``timeout_s`` is cancelled and counted;
    * ``compare(primary_output, candidate_output)`` (sync or async; default:
      equality) returns a bool (reported as ``agreement_rate``) or a number
      (reported as ``metric_mean``). ``stats()`` also has both sides'
      latencies (the last ``window`` requests) and the candidate's errors.

    ``user_config`` keys (applied live by ``reconfigure``): ``fraction``,
    ``max_in_flight``, ``timeout_s``. Counters are per replica.
    """

    def __init__(
        self,
        primary: DeploymentHandle,
        candidate: DeploymentHandle,
        *,
        fraction: float = 1.0,
        compare: Callable[[Any, Any], Any] | None = None,
        max_in_flight: int = 64,
        timeout_s: float = 30.0,
        window: int = 1000,
    ) -> None:
        self.name = deployment_name("Shadow")
        self.what = f"Shadow '{self.name}'"
        self.primary_name, self.candidate_name = list(
            named_members([primary, candidate], self.what)
        )
        self.primary, self.candidate = primary, candidate
        self.compare = compare
        self.fraction, self.max_in_flight, self.timeout_s = 1.0, 64, 30.0
        self._configure(fraction=fraction, max_in_flight=max_in_flight, timeout_s=timeout_s)
        self.mirrors: set[asyncio.Task[None]] = set()
        self.counts = dict.fromkeys(
            ["requests", "mirrored", "dropped", "completed", "candidate_errors",
             "candidate_timeouts", "compared", "agreements", "compare_errors"], 0,
        )  # fmt: skip
        self.metric_sum, self.metric_count = 0.0, 0
        self.last_candidate_error: str | None = None
        self.latency = {"primary": LatencyWindow(window), "candidate": LatencyWindow(window)}
        comparisons = counter(
            "shoal_shadow_comparisons",
            "Mirrored requests of a Shadow by result: agree, disagree, scored (compare() gave "
            "a number), error (the candidate failed or timed out, or compare() raised).",
            (*METRIC_LABELS, "result"),
        )
        labels = metric_labels(self.name)
        self._compared = {result: comparisons.labels(*labels, result) for result in _RESULTS}

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        check_keys(config, _OPTIONS, self.what)
        self._configure(**config)

    def _configure(self, **options: Any) -> None:
        if "fraction" in options:
            self.fraction = check_fraction(options["fraction"], "fraction", self.what)
        if "max_in_flight" in options:
            _positive(options["max_in_flight"], "max_in_flight", self.what)
            self.max_in_flight = int(options["max_in_flight"])
        if "timeout_s" in options:
            _positive(options["timeout_s"], "timeout_s", self.what)
            self.timeout_s = float(options["timeout_s"])

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Any) -> Any:
        started = time.perf_counter()
        value = await self.primary.remote(
            *args, **kwargs
        )  # its failure is the caller's, unmirrored
        self.latency["primary"].add((time.perf_counter() - started) * 1000)
        self.counts["requests"] += 1
        if self.fraction > 0 and random.random() < self.fraction:
            self._mirror(args, kwargs, value)
        return RoutedResult(value, self.primary_name, current_request_id())

    def _mirror(self, args: tuple[Any, ...], kwargs: dict[str, Any], primary_value: Any) -> None:
        if len(self.mirrors) >= self.max_in_flight:
            self.counts["dropped"] += 1  # bounded: never queue behind a slow candidate
            return
        self.counts["mirrored"] += 1
        task = asyncio.get_running_loop().create_task(self._shadow(args, kwargs, primary_value))
        self.mirrors.add(task)  # a strong reference, so the task is not garbage-collected
        task.add_done_callback(self.mirrors.discard)

    async def _shadow(self, args: tuple[Any, ...], kwargs: dict[str, Any], primary: Any) -> None:
        """Run one mirror: call the candidate, record its latency or error, compare."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                value = await self.candidate.remote(*args, **kwargs)
        except TimeoutError:
            self.counts["candidate_timeouts"] += 1
            self.last_candidate_error = f"TimeoutError: no answer within {self.timeout_s} s"
            self._compared["error"].inc()
            return
        except Exception as exc:
            self.counts["candidate_errors"] += 1
            self.last_candidate_error = describe_error(exc)
            self._compared["error"].inc()
            return
        finally:
            self.counts["completed"] += 1
        self.latency["candidate"].add((time.perf_counter() - started) * 1000)
        try:
            verdict = await call_user(self.compare or same, primary, value)
        except Exception:
            self.counts["compare_errors"] += 1
            self._compared["error"].inc()
            return
        if isinstance(verdict, bool) or type(verdict).__name__ == "bool_":  # numpy.bool_ too
            self.counts["compared"] += 1
            self.counts["agreements"] += bool(verdict)
            self._compared["agree" if verdict else "disagree"].inc()
        else:
            self.metric_sum += float(verdict)
            self.metric_count += 1
            self._compared["scored"].inc()

    async def wait_for_mirrors(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait (at most ``timeout_s``) for this replica's running mirrors; then ``stats()``."""
        if self.mirrors:
            await asyncio.wait(set(self.mirrors), timeout=timeout_s)
        return await self.stats()

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows for this replica: the agreement so far."""
        counts = self.counts
        details: dict[str, Any] = {
            "primary": self.primary_name,
            "candidate": self.candidate_name,
            "fraction": self.fraction,
            **{key: counts[key] for key in ("requests", "mirrored", "dropped", "compared")},
            "agreement_rate": _rate(counts["agreements"], counts["compared"]),
            "candidate_errors": counts["candidate_errors"],
            "candidate_timeouts": counts["candidate_timeouts"],
        }
        if self.metric_count:
            details["metric_mean"] = self.metric_sum / self.metric_count
        if self.last_candidate_error is not None:
            details["last_candidate_error"] = self.last_candidate_error
        return details

    async def stats(self) -> dict[str, Any]:
        """Mirroring counters, agreement or metric, latencies, candidate errors (this replica)."""
        counts = self.counts
        return {
            "shadow": self.name,
            "replica": replica_id(),
            "primary": self.primary_name,
            "candidate": self.candidate_name,
            "fraction": self.fraction,
            "max_in_flight": self.max_in_flight,
            "in_flight": len(self.mirrors),
            **counts,
            "agreement_rate": counts["agreements"] / counts["compared"]
            if counts["compared"]
            else None,
            "metric_mean": self.metric_sum / self.metric_count if self.metric_count else None,
            "last_candidate_error": self.last_candidate_error,
            "latency_ms": {side: window.summary() for side, window in self.latency.items()},
        }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
