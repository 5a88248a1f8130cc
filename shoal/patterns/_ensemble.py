"""Ensemble: ask every member at once, leave out the slow and the failing, combine the rest.

A combiner is any function ``combine(outputs) -> answer`` (sync or async),
where ``outputs`` maps each member that answered to its output, in the order
the members were given. When the ensemble has ``weights`` the combiner is
called with ``weights=`` too, and with ``meta_model=`` when it has a meta-model.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shoal._api.deployment import deployment
from shoal._api.handle import DeploymentHandle
from shoal._errors import ConfigError
from shoal.patterns._common import (
    Members,
    PatternBase,
    call_user,
    check_keys,
    deployment_name,
    describe_error,
    named_members,
    replica_id,
)
from shoal.patterns._errors import QuorumError

Combiner = Callable[..., Any]


@dataclass(frozen=True)
class EnsembleResult:
    """An ensemble's answer and how it was reached.

    ``outputs``: member -> output for the members that answered (member order);
    ``failed``: member -> why it was left out ("TimeoutError: ..." or "Type: message");
    ``elapsed_ms``: from sending the requests to having every answer (or giving up).
    """

    value: Any
    outputs: dict[str, Any]
    failed: dict[str, str]
    elapsed_ms: float

    def metadata(self) -> dict[str, Any]:
        """JSON-able metadata for HTTP: failures by exception type only (messages may be secret)."""
        return {
            "responded": list(self.outputs),
            "failed": {name: reason.split(":", 1)[0] for name, reason in self.failed.items()},
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


# --- combiners -------------------------------------------------------------------------------


def _label_key(label: Any) -> Any:
    """A hashable stand-in for a label: numpy values by value, lists and dicts by repr."""
    if hasattr(label, "tolist"):  # numpy scalars and arrays: np.int64(1) votes with 1
        label = label.tolist()
    try:
        hash(label)
    except TypeError:
        return repr(label)
    return label


def vote(outputs: Mapping[str, Any], weights: Mapping[str, float] | None = None) -> Any:
    """The label with the most votes (or the largest total weight; members default to 1).

    Deterministic: a tie goes to the tied label given by the earliest member,
    in the order the members were passed to the ensemble.
    """
    if not outputs:
        raise ValueError("vote() needs at least one output")
    totals: dict[Any, float] = {}
    labels: dict[Any, Any] = {}
    for member, label in outputs.items():  # dict order: the members' order
        key = _label_key(label)
        totals[key] = totals.get(key, 0.0) + (1.0 if weights is None else weights.get(member, 1.0))
        labels.setdefault(key, label)
    best = max(totals.values())
    return next(labels[key] for key, total in totals.items() if total == best)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def mean(outputs: Mapping[str, Any], weights: Mapping[str, float] | None = None) -> Any:
    """The (weighted) mean of numbers, numpy arrays or nested lists of one shape.

    Numbers give a float, numpy inputs a numpy array, lists a list (so the
    answer stays JSON-able). Members missing from ``weights`` weigh 1.
    """
    if not outputs:
        raise ValueError("mean() needs at least one output")
    values = list(outputs.values())
    factors = None if weights is None else [float(weights.get(m, 1.0)) for m in outputs]
    if factors is not None and not math.fsum(factors) > 0:
        raise ValueError(f"mean(): the weights of {list(outputs)} sum to 0")
    if all(_is_number(v) for v in values):  # the common case, without numpy's overhead
        if factors is None:
            return math.fsum(values) / len(values)
        return math.fsum(v * f for v, f in zip(values, factors, strict=True)) / math.fsum(factors)
    import numpy as np

    result = np.average(np.asarray(values, dtype=float), axis=0, weights=factors)
    if any(isinstance(v, np.ndarray) for v in values):
        return result
    return result.tolist()  # numpy scalars -> float, lists -> lists


async def stack(outputs: Mapping[str, Any], meta_model: DeploymentHandle) -> Any:
    """Stacking: the meta-model deployment receives ``{member: output}`` and answers."""
    return await meta_model.remote(dict(outputs))


# --- the deployment --------------------------------------------------------------------------


async def _collect(response: Any, timeout_s: float | None, started: float) -> tuple[bool, Any]:
    """(True, output) or (False, why) for one member; raises only on cancellation.

    Waits until ``started + timeout_s`` (the loop's clock) at most; then the
    member's request is cancelled.
    """
    try:
        if timeout_s is None:
            return True, await response
        async with asyncio.timeout_at(started + timeout_s):
            return True, await response
    except TimeoutError as exc:
        if timeout_s is None:
            return False, describe_error(exc)  # the member itself raised TimeoutError
        return False, f"TimeoutError: no answer within {timeout_s} s"
    except Exception as exc:
        return False, describe_error(exc)


@deployment(max_ongoing_requests=100)
class Ensemble(PatternBase):
    """Fan a request out to every member concurrently and combine their outputs.

    Guarantees: all members are called at once (latency is the slowest
    member's, capped by ``timeout_s``); a member that fails, or has not
    answered ``timeout_s`` (a number, or a dict per member) after the requests
    were sent, is left out, its request cancelled, and it is named in the
    result's ``failed``; if the caller cancels, the members' requests are
    cancelled too; with fewer than
    ``min_responses`` answers (default: all members) the call raises
    :class:`QuorumError` naming each failed member and why.
    ``user_config`` keys (applied live by ``reconfigure``): ``weights``,
    ``timeout_s``, ``min_responses``.
    """

    def __init__(
        self,
        members: Members,
        combine: Combiner,
        *,
        weights: Mapping[str, float] | None = None,
        meta_model: DeploymentHandle | None = None,
        timeout_s: float | Mapping[str, float] | None = None,
        min_responses: int | None = None,
    ) -> None:
        self.name = deployment_name("Ensemble")
        self.what = f"Ensemble '{self.name}'"
        self.members = named_members(members, self.what)
        self.combine = combine
        self.meta_model = meta_model
        self.weights: dict[str, float] | None = None
        self.timeouts: dict[str, float | None] = {}
        self.min_responses = len(self.members)
        self._configure(weights=weights, timeout_s=timeout_s, min_responses=min_responses)
        self.calls = 0
        self.quorum_failures = 0
        self.counts = {name: {"answered": 0, "failed": 0} for name in self.members}

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        check_keys(config, {"weights", "timeout_s", "min_responses"}, self.what)
        self._configure(**config)

    def _configure(self, **options: Any) -> None:
        """Validate and apply the options given; ConfigError names the bad one."""
        if options.get("weights") is not None:
            weights = options["weights"]
            unknown = sorted(set(weights) - set(self.members))
            if unknown or not all(_is_number(w) and w >= 0 for w in weights.values()):
                raise ConfigError(
                    f"{self.what}: weights must be >= 0 and name members {list(self.members)}, "
                    f"got {dict(weights)}"
                )
            self.weights = {name: float(weights.get(name, 1.0)) for name in self.members}
        if "timeout_s" in options:
            timeout = options["timeout_s"]
            per_member = (
                timeout if isinstance(timeout, Mapping) else dict.fromkeys(self.members, timeout)
            )
            if set(per_member) - set(self.members) or not all(
                t is None or (_is_number(t) and t > 0) for t in per_member.values()
            ):
                raise ConfigError(
                    f"{self.what}: timeout_s must be None, a number > 0, or a dict of them "
                    f"by member {list(self.members)}; got {timeout!r}"
                )
            self.timeouts = {name: per_member.get(name) for name in self.members}
        if options.get("min_responses") is not None:
            count = options["min_responses"]
            if not isinstance(count, int) or not 1 <= count <= len(self.members):
                raise ConfigError(
                    f"{self.what}: min_responses must be 1..{len(self.members)}, got {count!r}"
                )
            self.min_responses = count
        self._check_combine()
        # Computed once here rather than on every request.
        self._plan = [(name, self.timeouts.get(name)) for name in self.members]
        self._combine_kwargs = self._extras()

    def _extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        if self.weights is not None:
            extras["weights"] = self.weights
        if self.meta_model is not None:
            extras["meta_model"] = self.meta_model
        return extras

    def _check_combine(self) -> None:
        """Fail at deployment time, not on the first request, if ``combine`` cannot be called."""
        if not callable(self.combine):
            raise ConfigError(f"{self.what}: combine must be a function, got {self.combine!r}")
        try:
            signature = inspect.signature(self.combine)
        except (TypeError, ValueError):
            return  # some builtins have no signature: let the first call tell
        extras = self._extras()
        try:
            signature.bind({}, **extras)
        except TypeError as exc:
            name = getattr(self.combine, "__name__", repr(self.combine))
            given = "".join(f", {key}=..." for key in extras)
            raise ConfigError(f"{self.what}: cannot call {name}(outputs{given}): {exc}") from None

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Any) -> Any:
        started = asyncio.get_running_loop().time()  # deadlines are on the loop's clock
        clock = time.perf_counter()  # precise: uvloop's loop.time() counts milliseconds
        # Send every request before awaiting any: the members work concurrently, so
        # collecting the answers one after another takes as long as the slowest member
        # (each within its own deadline), with no task per member.
        pending = [
            (name, member.remote(*args, **kwargs), timeout)
            for (name, timeout), member in zip(self._plan, self.members.values(), strict=True)
        ]
        outputs, failed = {}, {}
        try:
            for name, response, timeout in pending:
                answered, value = await _collect(response, timeout, started)
                if answered:
                    outputs[name] = value
                else:
                    failed[name] = value
                self.counts[name]["answered" if answered else "failed"] += 1
        except BaseException:  # cancelled (the caller gave up): so are the members' requests
            for _, response, _ in pending:
                response.cancel()
            raise
        elapsed_ms = (time.perf_counter() - clock) * 1000
        self.calls += 1
        if len(outputs) < self.min_responses:
            self.quorum_failures += 1
            raise QuorumError(self._quorum_message(outputs, failed), failed, list(outputs))
        value = await call_user(self.combine, outputs, **self._combine_kwargs)
        return EnsembleResult(value, outputs, failed, elapsed_ms)

    def _quorum_message(self, outputs: dict[str, Any], failed: dict[str, str]) -> str:
        reasons = "; ".join(f"'{name}' {reason}" for name, reason in failed.items())
        return (
            f"{self.what}: {len(outputs)} of {len(self.members)} members answered, "
            f"min_responses={self.min_responses} required. Left out: {reasons}"
        )

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows for this replica: calls, and each member's answers."""
        details: dict[str, Any] = {
            "calls": self.calls,
            "quorum_failures": self.quorum_failures,
            "min_responses": self.min_responses,
            "members": {name: dict(counts) for name, counts in self.counts.items()},
        }
        if self.weights is not None:
            details["weights"] = dict(self.weights)
        return details

    async def stats(self) -> dict[str, Any]:
        """Calls, quorum failures and per-member answered/failed counts of this replica."""
        return {
            "ensemble": self.name,
            "replica": replica_id(),
            "calls": self.calls,
            "quorum_failures": self.quorum_failures,
            "min_responses": self.min_responses,
            "timeout_s": self.timeouts,
            "weights": self.weights,
            "members": self.counts,
        }
