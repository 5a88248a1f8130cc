"""Bandit router: learn online which member earns the best reward, and send traffic there.

Two deployments: :class:`BanditRouter` (scale it freely) routes requests and
forwards rewards; :class:`BanditState` (one replica) holds what was learned,
so every router replica shares it and it outlives a router replica's restart.
The policies are plain functions of the arms' statistics.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from shoal._api.deployment import deployment
from shoal._api.handle import DeploymentHandle
from shoal._errors import ConfigError
from shoal._observe.metrics import counter
from shoal.patterns._common import (
    METRIC_LABELS,
    KeyFunction,
    Members,
    PatternBase,
    RoutedResult,
    check_fraction,
    current_request_id,
    deployment_name,
    error_response,
    metric_labels,
    named_members,
    relative_path,
    replica_id,
    sticky_key,
)
from shoal.patterns._errors import FeedbackError

POLICIES = ("thompson", "epsilon_greedy")


@dataclass
class ArmStats:
    """What one arm (member) earned in one context. Rewards are in [0, 1]."""

    chosen: int = 0
    rewarded: int = 0
    reward_sum: float = 0.0

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.rewarded if self.rewarded else None


def thompson_choice(arms: Mapping[str, ArmStats], rng: random.Random) -> str:
    """Thompson sampling: draw each arm's Beta(1 + rewards, 1 + misses) and take the largest.

    Fractional rewards count fractionally, so any reward in [0, 1] works.
    """
    draws = {
        name: rng.betavariate(1.0 + arm.reward_sum, 1.0 + arm.rewarded - arm.reward_sum)
        for name, arm in arms.items()
    }
    return max(draws, key=draws.__getitem__)


def epsilon_greedy_choice(arms: Mapping[str, ArmStats], rng: random.Random, epsilon: float) -> str:
    """Try each arm once; then explore a random arm with probability epsilon, else the best mean.

    Ties between best means are broken at random.
    """
    untried = [name for name, arm in arms.items() if arm.chosen == 0]
    if untried:
        return untried[0]
    means = {name: arm.mean_reward for name, arm in arms.items() if arm.rewarded}
    if not means or rng.random() < epsilon:
        return rng.choice(list(arms))
    best = max(m for m in means.values() if m is not None)
    return rng.choice([name for name, m in means.items() if m == best])


def _check_reward(reward: Any) -> float:
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not 0 <= reward <= 1:
        raise FeedbackError(f"a reward must be a number in [0, 1] (1 = best), got {reward!r}")
    return float(reward)


@deployment(num_replicas=1, max_ongoing_requests=1000)
class BanditState:
    """The learned state of a bandit: per context, per arm, choices and rewards.

    Keep it at one replica (the default): that one replica is what every
    router replica consults, so they all learn from every reward. Its methods
    are async and never await, so each runs whole: no locks needed. A choice
    waits for its reward at most ``pending_ttl_s``; at most ``max_pending``
    choices and ``max_contexts`` contexts are kept (oldest dropped first).
    The state lives in this replica's memory: it is lost if it restarts.
    """

    def __init__(
        self,
        policy: str = "thompson",
        *,
        epsilon: float = 0.1,
        seed: int | None = None,
        max_pending: int = 100_000,
        pending_ttl_s: float = 3600.0,
        max_contexts: int = 10_000,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"BanditState: policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.epsilon = check_fraction(epsilon, "epsilon", "BanditState")
        self.rng = random.Random(seed)
        self.max_pending, self.pending_ttl_s, self.max_contexts = (
            max_pending, pending_ttl_s, max_contexts,
        )  # fmt: skip
        self.contexts: OrderedDict[str, dict[str, ArmStats]] = OrderedDict()
        self.pending: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self.counts = {"chosen": 0, "rewarded": 0, "unknown_feedback": 0, "expired": 0}

    def _arms(self, context: str, names: list[str]) -> dict[str, ArmStats]:
        table = self.contexts.get(context)
        if table is None:
            table = self.contexts[context] = {}
            while len(self.contexts) > self.max_contexts:
                self.contexts.popitem(last=False)
        self.contexts.move_to_end(context)
        for name in names:
            table.setdefault(name, ArmStats())
        return {name: table[name] for name in names}

    async def choose(self, request_id: str, arms: list[str], context: str = "") -> str:
        """Pick an arm among ``arms`` for ``context``; remember it until its reward arrives."""
        table = self._arms(context, arms)
        if self.policy == "thompson":
            arm = thompson_choice(table, self.rng)
        else:
            arm = epsilon_greedy_choice(table, self.rng, self.epsilon)
        table[arm].chosen += 1
        self.counts["chosen"] += 1
        now = time.monotonic()
        self.pending[request_id] = (context, arm, now)
        self.pending.move_to_end(request_id)
        while self.pending and (
            len(self.pending) > self.max_pending
            or next(iter(self.pending.values()))[2] < now - self.pending_ttl_s
        ):
            self.pending.popitem(last=False)
            self.counts["expired"] += 1
        return arm

    async def feedback(self, request_id: str, reward: float) -> str | None:
        """Credit ``reward`` (in [0, 1]) to the arm chosen for ``request_id``; return that arm.

        None when the id is unknown, was already rewarded, or expired.
        """
        value = _check_reward(reward)
        entry = self.pending.pop(request_id, None)
        if entry is None:
            self.counts["unknown_feedback"] += 1
            return None
        context, arm, chosen_at = entry
        table = self.contexts.get(context)
        if table is None or time.monotonic() - chosen_at > self.pending_ttl_s:
            self.counts["expired"] += 1
            return None
        table[arm].rewarded += 1
        table[arm].reward_sum += value
        self.counts["rewarded"] += 1
        return arm

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows: the policy and each arm's totals over all contexts."""
        arms: dict[str, ArmStats] = {}
        for table in self.contexts.values():
            for name, arm in table.items():
                total = arms.setdefault(name, ArmStats())
                total.chosen += arm.chosen
                total.rewarded += arm.rewarded
                total.reward_sum += arm.reward_sum
        return {
            "policy": self.policy,
            "contexts": len(self.contexts),
            "pending": len(self.pending),
            **self.counts,
            "arms": {
                name: {
                    "chosen": arm.chosen,
                    "rewarded": arm.rewarded,
                    "mean_reward": None if arm.mean_reward is None else round(arm.mean_reward, 4),
                }
                for name, arm in arms.items()
            },
        }

    async def stats(self, max_contexts: int = 100) -> dict[str, Any]:
        """Policy, counters, and per-arm statistics of the ``max_contexts`` most recent contexts."""
        recent = list(self.contexts.items())[-max_contexts:]
        return {
            "policy": self.policy,
            "epsilon": self.epsilon if self.policy == "epsilon_greedy" else None,
            "state_replica": replica_id(),
            "pending": len(self.pending),
            **self.counts,
            "context_count": len(self.contexts),
            "contexts": {
                context: {
                    name: {
                        "chosen": arm.chosen,
                        "rewarded": arm.rewarded,
                        "mean_reward": arm.mean_reward,
                    }
                    for name, arm in table.items()
                }
                for context, table in recent
            },
        }


@deployment(max_ongoing_requests=100)
class BanditRouter(PatternBase):
    """Route each request to the member the bandit picks; learn from rewards reported later.

    * ``state``: a bound :class:`BanditState` (it holds the policy and what was learned);
    * ``context_key``: a field of a dict input (or a function of the input) whose
      value keeps separate statistics, e.g. a user id or segment, to learn which
      member each user prefers; without it one set of statistics is learned;
    * rewards: ``await router.feedback.remote(request_id, reward)``, or over
      HTTP ``POST <prefix>/feedback`` with ``{"request_id": ..., "reward": ...}``
      (404 for an unknown or expired id). The request id is the request's
      ``x-request-id`` (returned in that response header), the caller's request
      id, or one generated and returned in ``with_metadata``'s ``request_id``;
    * a member that raises earns ``failure_reward`` at once (None: no reward).
    """

    def __init__(
        self,
        members: Members,
        state: DeploymentHandle,
        *,
        context_key: KeyFunction = None,
        failure_reward: float | None = 0.0,
    ) -> None:
        self.name = deployment_name("BanditRouter")
        self.what = f"BanditRouter '{self.name}'"
        self.members = named_members(members, self.what)
        if not isinstance(state, DeploymentHandle):
            raise ConfigError(f"{self.what}: state must be BanditState.bind(...), got {state!r}")
        self.state = state
        self.names = list(self.members)
        self.context_key = context_key
        self.failure_reward = (
            None if failure_reward is None else _check_reward_config(failure_reward, self.what)
        )
        self._metrics = _BanditMetrics(self.name, self.names)
        self.pulls = dict.fromkeys(self.names, 0)

    async def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], headers: Any) -> Any:
        request_id = current_request_id()
        context = sticky_key(self.context_key, args, kwargs) or ""
        arm = await self.state.choose.remote(request_id, self.names, context)
        self.pulls[arm] += 1
        self._metrics.pulls[arm].inc()
        try:
            value = await self.members[arm].remote(*args, **kwargs)
        except Exception:
            if self.failure_reward is not None:
                with contextlib.suppress(Exception):  # the member's error matters more
                    if await self.state.feedback.remote(request_id, self.failure_reward):
                        self._metrics.rewarded(arm, self.failure_reward)
            raise
        return RoutedResult(value, arm, request_id, {"context": context} if context else {})

    async def feedback(self, request_id: str, reward: float) -> str | None:
        """Report the reward of request ``request_id``; returns the member credited, or None."""
        _check_reward(reward)  # fail here, with the caller's context, not in the state replica
        result: str | None = await self.state.feedback.remote(request_id, reward)
        if result is not None:
            self._metrics.rewarded(result, reward)
        return result

    async def status_details(self) -> dict[str, Any]:
        """What ``serve.status()`` shows for this router replica: the requests it sent to
        each arm (what was learned is in the BanditState deployment's details)."""
        return {"pulls": dict(self.pulls)}

    async def stats(self) -> dict[str, Any]:
        """The shared state's statistics (the same from every router replica)."""
        shared = await self.state.stats.remote()
        return {
            "router": self.name,
            "router_replica": replica_id(),
            "members": self.names,
            **shared,
        }

    async def _serve_http(self, request: Request) -> Response:
        if request.method == "POST" and relative_path(request) == "/feedback":
            return await self._http_feedback(request)
        return await super()._serve_http(request)

    async def _http_feedback(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            request_id, reward = str(body["request_id"]), body["reward"]
        except (ValueError, KeyError, TypeError):
            return error_response(400, 'expected {"request_id": "...", "reward": <0..1>}')
        try:
            member = await self.feedback(request_id, reward)
        except FeedbackError as exc:
            return error_response(400, str(exc))
        if member is None:
            return error_response(404, f"no pending request {request_id!r} (unknown or expired)")
        return JSONResponse({"request_id": request_id, "member": member, "reward": reward})


def _check_reward_config(reward: Any, what: str) -> float:
    try:
        return _check_reward(reward)
    except FeedbackError as exc:
        raise ConfigError(f"{what}: failure_reward: {exc}") from None


class _BanditMetrics:
    """A bandit router's counters, children cached per arm: ``shoal_bandit_pulls`` (requests
    sent to the arm), ``shoal_bandit_feedback`` (rewards credited to it) and
    ``shoal_bandit_reward`` (their sum: reward / feedback is the arm's mean reward)."""

    def __init__(self, name: str, arms: list[str]) -> None:
        labels = metric_labels(name)
        names = (*METRIC_LABELS, "arm")
        pulls = counter("shoal_bandit_pulls", "Requests a BanditRouter sent to each arm.", names)
        rewards = counter("shoal_bandit_feedback", "Rewards credited to each arm.", names)
        sums = counter("shoal_bandit_reward", "Sum of the rewards credited to each arm.", names)
        self.pulls = {arm: pulls.labels(*labels, arm) for arm in arms}
        self._rewards = {arm: rewards.labels(*labels, arm) for arm in arms}
        self._sums = {arm: sums.labels(*labels, arm) for arm in arms}

    def rewarded(self, arm: str, reward: float) -> None:
        if arm in self._rewards:
            self._rewards[arm].inc()
            self._sums[arm].inc(reward)
