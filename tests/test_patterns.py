"""The pattern building blocks (shoal.patterns): ensembles, selectors, shadows, canaries, bandits.

Tests taking ``deploy`` run on both runtimes (in-process and multi-process);
the HTTP tests use the session's multi-process shoal. Readiness is never
waited for with sleeps: ``serve.run`` returns when replicas are ready, and
background work is awaited through the blocks' own methods (``wait_for_mirrors``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Deploy, async_wait_until

from shoal import serve
from shoal.patterns import (
    METADATA_HEADER,
    BanditRouter,
    BanditState,
    Canary,
    Ensemble,
    EnsembleResult,
    FeedbackError,
    QuorumError,
    RoutedResult,
    SelectionError,
    Selector,
    Shadow,
    mean,
    stack,
    vote,
)
from shoal.patterns._bandit import ArmStats, thompson_choice
from shoal.patterns._common import pick_weighted, unit_hash

_names = itertools.count()


# --- members ---------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=100)
class Constant:
    """Answers ``value`` after ``delay_s``; counts its calls and cancelled calls."""

    def __init__(self, value: Any, delay_s: float = 0.0) -> None:
        self.value, self.delay_s = value, delay_s
        self.calls = self.cancelled = 0

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.value

    async def counts(self) -> dict[str, int]:
        return {"calls": self.calls, "cancelled": self.cancelled}


@serve.deployment(max_ongoing_requests=100)
class Failing:
    async def __call__(self, *args: Any) -> Any:
        raise ValueError("database password is hunter2")


@serve.deployment(max_ongoing_requests=100)
class Linear:
    """``slope * x`` for a number ``x`` or ``{"x": x}``."""

    def __init__(self, slope: float) -> None:
        self.slope = slope

    async def __call__(self, x: Any) -> float:
        return self.slope * float(x["x"] if isinstance(x, dict) else x)


@serve.deployment(max_ongoing_requests=100)
class Flaky:
    """Fails every other call (50%); the failures are ValueError("candidate failed")."""

    def __init__(self, value: Any) -> None:
        self.value, self.calls = value, 0

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls % 2 == 0:
            raise ValueError("candidate failed")
        return self.value


@serve.deployment
class MetaModel:
    async def __call__(self, outputs: dict[str, float]) -> float:
        return 10 * outputs["a"] + outputs["b"]


@serve.deployment(max_ongoing_requests=100)
class Arm:
    """A bandit arm: answers its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, *args: Any) -> str:
        return self.name


def named(name: str, deployment: Any = Constant) -> Any:
    return deployment.options(name=name)


def by_animal(image: dict[str, str]) -> str:
    """The seed's dynamic selection: cats to model A, dogs to model B."""
    return "model_a" if image["animal"] == "cat" else "model_b"


@pytest.fixture
def local() -> Iterator[Any]:
    """``local(app)``: serve.run in-process under a fresh name, deleted afterwards."""
    names: list[str] = []

    def run(app: Any) -> Any:
        names.append(f"example{next(_names)}")
        return serve.run(app, name=names[-1], route_prefix=None, _local_testing_mode=True)

    yield run
    for name in names:
        serve.delete(name)


def test_public_api_is_pinned() -> None:
    import shoal
    import shoal.patterns

    assert sorted(shoal.patterns.__all__) == sorted(
        ["BanditRouter", "BanditState", "Canary", "Ensemble", "EnsembleResult", "FeedbackError",
         "METADATA_HEADER", "PatternError", "QuorumError", "RoutedResult", "SelectionError",
         "Selector", "Shadow", "mean", "stack", "vote"]
    )  # fmt: skip
    assert all(hasattr(shoal.patterns, name) for name in shoal.patterns.__all__)
    assert "patterns" not in shoal.__all__  # imported explicitly, never by `import shoal`
    assert issubclass(QuorumError, serve.ShoalError) and issubclass(SelectionError, LookupError)
    assert issubclass(FeedbackError, ValueError)


# --- combiners (pure functions) ----------------------------------------------------------------


def test_vote_majority_weights_and_deterministic_ties() -> None:
    assert vote({"a": "cat", "b": "dog", "c": "cat"}) == "cat"
    assert vote({"a": "cat", "b": "dog", "c": "cat"}, weights={"b": 3.0}) == "dog"
    # A tie goes to the label of the earliest member, whatever the order of arrival.
    assert vote({"a": "dog", "b": "cat"}) == "dog"
    assert vote({"b": "cat", "a": "dog"}) == "cat"
    assert vote({"a": "cat", "b": "dog", "c": "dog", "d": "cat"}) == "cat"
    # numpy labels vote with their Python equals; unhashable labels work too.
    assert vote({"a": np.int64(1), "b": 1, "c": 2}) == np.int64(1)
    assert vote({"a": [1, 2], "b": [1, 2], "c": [3]}) == [1, 2]
    with pytest.raises(ValueError, match="at least one"):
        vote({})


def test_mean_numbers_lists_numpy_and_weights() -> None:
    assert mean({"a": 1, "b": 2.0, "c": 6}) == pytest.approx(3.0)
    assert mean({"a": 1.0, "b": 4.0}, weights={"a": 2.0, "b": 1.0}) == pytest.approx(2.0)
    assert mean({"a": 1.0, "b": 4.0}, weights={"a": 2.0}) == pytest.approx(2.0)  # b weighs 1
    assert mean({"a": [1.0, 2.0], "b": [3.0, 4.0]}) == [2.0, 3.0]
    arrays = mean({"a": np.array([1.0, 3.0]), "b": np.array([3.0, 5.0])})
    assert isinstance(arrays, np.ndarray) and arrays.tolist() == [2.0, 4.0]
    assert mean({"a": np.float32(1.0), "b": np.float64(2.0)}) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="sum to 0"):
        mean({"a": 1.0}, weights={"a": 0.0})


# --- ensemble ----------------------------------------------------------------------------------


async def test_ensemble_combiners(deploy: Deploy) -> None:
    classifiers = [named("a").bind("cat"), named("b").bind("dog"), named("c").bind("cat")]
    assert await deploy(Ensemble.bind(classifiers, vote)).remote({"image": 1}) == "cat"

    regressors = [named("a", Linear).bind(1.0), named("b", Linear).bind(3.0)]
    handle = deploy(Ensemble.bind(regressors, mean))
    result = await handle.with_metadata.remote({"x": 2})
    assert isinstance(result, EnsembleResult)
    assert result.value == pytest.approx(4.0)
    assert result.outputs == {"a": 2.0, "b": 6.0} and result.failed == {}
    assert 0 < result.elapsed_ms < 10_000

    arrays = [named("a").bind(np.arange(3.0)), named("b").bind(np.arange(3.0) + 2)]
    assert (await deploy(Ensemble.bind(arrays, mean)).remote()).tolist() == [1.0, 2.0, 3.0]

    stacked = Ensemble.bind(regressors, stack, meta_model=MetaModel.bind())
    assert await deploy(stacked).remote(1.0) == pytest.approx(13.0)


async def test_ensemble_weights_custom_combiners_and_live_options(local: Any) -> None:
    classifiers = [named("a").bind("cat"), named("b").bind("dog"), named("c").bind("cat")]
    assert await local(Ensemble.bind(classifiers, vote, weights={"b": 2.5})).remote() == "dog"

    async def spread(outputs: dict[str, float]) -> float:  # any function, sync or async
        return max(outputs.values()) - min(outputs.values())

    regressors = [named("a", Linear).bind(1.0), named("b", Linear).bind(3.0)]
    assert await local(Ensemble.bind(regressors, spread)).remote(2.0) == pytest.approx(4.0)

    def app(config: dict[str, Any]) -> Any:
        return Ensemble.options(user_config=config).bind(classifiers, vote)

    name = f"live{next(_names)}"
    handle = serve.run(app({}), name=name, route_prefix=None, _local_testing_mode=True)
    try:
        assert await handle.remote() == "cat"
        handle = serve.run(
            app({"weights": {"b": 3.0}}), name=name, route_prefix=None, _local_testing_mode=True
        )
        assert await handle.remote() == "dog"  # reconfigured in place
    finally:
        serve.delete(name)


async def test_ensemble_leaves_out_failing_and_slow_members(deploy: Deploy) -> None:
    members = [named("fast").bind(1.0), named("slow").bind(2.0, 30.0), Failing.bind()]
    app = Ensemble.bind(members, mean, timeout_s={"slow": 0.2}, min_responses=1)
    handle = deploy(app)
    started = time.perf_counter()
    result = await handle.with_metadata.remote()
    assert time.perf_counter() - started < 10.0  # far below the slow member's 30 s
    assert result.value == 1.0 and result.outputs == {"fast": 1.0}
    assert result.failed == {
        "slow": "TimeoutError: no answer within 0.2 s",
        "Failing": "ValueError: database password is hunter2",
    }
    assert result.elapsed_ms > 150  # deadlines use the loop clock (uvloop: whole ms)
    # The timed-out member's request was cancelled in its replica, not left running.
    slow = serve.get_deployment_handle("slow", handle.app_name)

    async def cancelled() -> bool:
        return bool((await slow.counts.remote())["cancelled"] == 1)

    await async_wait_until(cancelled)
    stats = await handle.stats.remote()
    assert stats["members"]["slow"] == {"answered": 0, "failed": 1}
    assert stats["calls"] == 1 and stats["quorum_failures"] == 0


async def test_ensemble_cancelled_by_its_caller_cancels_its_members(deploy: Deploy) -> None:
    handle = deploy(Ensemble.bind([named("slow").bind(1.0, 30.0), named("fast").bind(2.0)], mean))
    slow = serve.get_deployment_handle("slow", handle.app_name)
    response = handle.remote()

    async def started() -> bool:
        return bool((await slow.counts.remote())["calls"] == 1)

    async def cancelled() -> bool:
        return bool((await slow.counts.remote())["cancelled"] == 1)

    await async_wait_until(started)
    response.cancel()
    await async_wait_until(cancelled)


async def test_ensemble_below_quorum_says_who_failed_and_why(deploy: Deploy) -> None:
    members = [named("ok").bind(1.0), named("slow").bind(2.0, 30.0), Failing.bind()]
    handle = deploy(Ensemble.bind(members, mean, timeout_s=0.2, min_responses=2))
    with pytest.raises(QuorumError) as caught:
        await handle.remote()
    error = caught.value
    assert "1 of 3 members answered, min_responses=2" in str(error)
    assert "'slow' TimeoutError: no answer within 0.2 s" in str(error)
    assert "'Failing' ValueError: database password is hunter2" in str(error)
    assert set(error.failed) == {"slow", "Failing"} and error.responded == ["ok"]
    assert (await handle.stats.remote())["quorum_failures"] == 1


def test_ensemble_options_are_checked_at_deploy_time() -> None:
    members = [named("a").bind(1.0), named("b").bind(2.0)]
    cases = [
        (Ensemble.bind(members, stack), "meta_model"),
        (Ensemble.bind(members, vote, weights={"zz": 1.0}), "weights"),
        (Ensemble.bind(members, mean, min_responses=3), "min_responses must be 1..2"),
        (Ensemble.bind(members, mean, timeout_s=-1), "timeout_s"),
        (Ensemble.bind([Constant.bind(1), Constant.bind(1)], mean), "Constant_1"),
    ]
    for app, message in cases[:4]:
        with pytest.raises(serve.DeploymentError, match=message):
            serve.run(app, name=f"bad{next(_names)}", route_prefix=None, _local_testing_mode=True)
    # The same deployment bound twice gets two names (Constant, Constant_1): allowed.
    handle = serve.run(cases[4][0], name="twice", route_prefix=None, _local_testing_mode=True)
    assert handle.with_metadata.remote().result(timeout_s=10).outputs == {
        "Constant": 1,
        "Constant_1": 1,
    }
    serve.delete("twice")


# --- selector ----------------------------------------------------------------------------------


async def test_selector_by_input(deploy: Deploy) -> None:
    members = [named("model_a").bind("A says cat"), named("model_b").bind("B says dog")]
    handle = deploy(Selector.bind(members, choose=by_animal))
    assert await handle.remote({"animal": "cat"}) == "A says cat"
    routed = await handle.with_metadata.remote({"animal": "dog"})
    assert isinstance(routed, RoutedResult)
    assert (routed.value, routed.member) == ("B says dog", "model_b")
    assert (await handle.stats.remote())["requests"] == {"model_a": 1, "model_b": 1}

    wrong = deploy(Selector.bind(members, choose=lambda image: "model_z"))
    with pytest.raises(SelectionError, match="'model_z', which is not a member"):
        await wrong.remote({"animal": "cat"})


async def test_selector_weights_are_sticky_across_replicas(deploy: Deploy) -> None:
    members = {"a": named("a").bind("a"), "b": named("b").bind("b")}
    weights = {"a": 0.7, "b": 0.3}
    app = Selector.options(num_replicas=2).bind(
        members, weights=weights, sticky_key="user", salt="exp-1"
    )
    handle = deploy(app)
    users = [f"user-{i}" for i in range(300)]
    first = [await handle.remote({"user": user}) for user in users]
    again = [await handle.remote({"user": user}) for user in users]  # other replica, often
    assert first == again
    # The assignment is a pure function of (salt, key): the same after any restart.
    assert first == [pick_weighted(weights, unit_hash(user, "exp-1")) for user in users]
    assert 0.6 < first.count("a") / len(users) < 0.8
    # Without a key the draw is random, by weight.
    unkeyed = Counter([await handle.remote({}) for _ in range(200)])
    assert set(unkeyed) == {"a", "b"}


def test_unit_hash_is_stable() -> None:
    # Pinned values: if these change, every user moves to another model on upgrade.
    assert unit_hash("user-1", "exp-1") == pytest.approx(0.7675713010507157, abs=1e-15)
    assert unit_hash("42", "") == pytest.approx(0.4007431775196431, abs=1e-15)
    assert unit_hash("user-1", "exp-2") != unit_hash("user-1", "exp-1")
    assert pick_weighted({"a": 1.0, "b": 1.0}, 0.49) == "a"
    assert pick_weighted({"a": 1.0, "b": 1.0}, 0.5) == "b"
    assert pick_weighted({"a": 0.0, "b": 1.0}, 0.0) == "b"


# --- shadow ------------------------------------------------------------------------------------


async def test_shadow_never_waits_for_a_slow_candidate_and_stays_bounded(deploy: Deploy) -> None:
    # The candidate is far slower (1 s) than the primary (0 s); at most 4 mirrors may run.
    app = Shadow.bind(
        named("primary").bind("v1"), named("candidate").bind("v1", 1.0), max_in_flight=4
    )
    handle = deploy(app)
    started = time.perf_counter()
    answers = [await handle.remote({"i": i}) for i in range(40)]
    elapsed = time.perf_counter() - started
    stats = await handle.stats.remote()
    assert answers == ["v1"] * 40
    # Ordering: all 40 answers came back before any mirror finished (each takes 1 s),
    # so no primary request waited for the candidate.
    assert stats["completed"] == 0 and elapsed < 1.0
    assert (stats["requests"], stats["mirrored"], stats["dropped"]) == (40, 4, 36)
    assert stats["in_flight"] == 4
    stats = await handle.wait_for_mirrors.remote(30.0)
    assert (stats["completed"], stats["in_flight"], stats["agreement_rate"]) == (4, 0, 1.0)
    assert stats["latency_ms"]["candidate"]["p50"] >= 1000 > stats["latency_ms"]["primary"]["p99"]


async def test_shadow_records_metrics_and_candidate_errors(deploy: Deploy) -> None:
    def distance(primary: float, candidate: float) -> float:
        return abs(primary - candidate)

    metric = deploy(
        Shadow.bind(named("p", Linear).bind(1.0), named("c", Linear).bind(1.5), compare=distance)
    )
    for x in (2.0, 4.0):
        await metric.remote(x)
    stats = await metric.wait_for_mirrors.remote()
    assert stats["metric_mean"] == pytest.approx(1.5) and stats["agreement_rate"] is None

    failing = deploy(Shadow.bind(named("p").bind("ok"), Failing.bind()))
    assert [await failing.remote() for _ in range(3)] == ["ok"] * 3  # the primary never fails
    stats = await failing.wait_for_mirrors.remote()
    assert stats["candidate_errors"] == 3
    assert stats["last_candidate_error"] == "ValueError: database password is hunter2"


async def test_shadow_agreement_and_fraction(local: Any) -> None:
    disagree = local(Shadow.bind(named("p").bind("cat"), named("c").bind("dog")))
    assert await disagree.remote() == "cat"
    assert (await disagree.wait_for_mirrors.remote())["agreement_rate"] == 0.0

    def app(config: dict[str, Any]) -> Any:
        return Shadow.options(user_config=config).bind(named("p").bind(1), named("c").bind(1))

    name = f"half{next(_names)}"
    half = serve.run(app({"fraction": 0.5}), name=name, route_prefix=None, _local_testing_mode=True)
    try:
        for _ in range(200):
            await half.remote()
        stats = await half.wait_for_mirrors.remote()
        assert 50 < stats["mirrored"] < 150 and stats["agreement_rate"] == 1.0
        # A new user_config reaches the running replica (reconfigure): no more mirrors.
        half = serve.run(
            app({"fraction": 0.0}), name=name, route_prefix=None, _local_testing_mode=True
        )
        await half.remote()
        after = await half.stats.remote()
        assert (after["requests"], after["mirrored"]) == (stats["requests"] + 1, stats["mirrored"])
    finally:
        serve.delete(name)


# --- canary ------------------------------------------------------------------------------------


async def test_canary_rolls_back_a_failing_candidate(deploy: Deploy) -> None:
    app = Canary.bind(
        named("stable").bind("stable answer"),
        named("candidate", Flaky).bind("candidate answer"),
        weight=0.2,
        max_error_rate=0.2,
        window_s=60.0,
        min_requests=10,
        sticky_key="user",
    )
    handle = deploy(app)
    started = time.monotonic()
    routed: list[str] = []
    for i in range(400):
        try:
            routed.append((await handle.with_metadata.remote({"user": f"u{i}"})).member)
        except ValueError as exc:
            assert "candidate failed" in str(exc)
            routed.append("failed")
    stats = await handle.stats.remote()
    assert stats["rolled_back"] and "of the last 10 candidate requests" in stats["rollback_reason"]
    assert time.monotonic() - started < stats["window_s"]
    last_candidate = max(i for i, member in enumerate(routed) if member != "stable")
    before = routed[: last_candidate + 1]
    to_candidate = sum(member != "stable" for member in before)
    failed = before.count("failed")
    # Within the window: the candidate got min_requests requests, then no more at all.
    assert to_candidate == 10 == stats["requests"]["candidate"]
    assert set(routed[last_candidate + 1 :]) == {"stable"}
    assert len(routed) - len(before) > 200
    # Only candidate requests failed, and no more than the candidate's share of the traffic.
    assert failed == 5 == stats["errors"]["candidate"] and stats["errors"]["stable"] == 0
    assert failed / len(before) <= 0.2


async def test_canary_weight_changes_live_without_restarts(deploy: Deploy) -> None:
    def app(weight: float) -> Any:
        return Canary.options(user_config={"weight": weight}).bind(
            named("stable").bind("v1"), named("candidate").bind("v2")
        )

    name = f"canary{next(_names)}"
    handle = deploy(app(0.0), name=name)
    replica = (await handle.stats.remote())["replica"]
    assert {await handle.remote() for _ in range(20)} == {"v1"}
    handle = deploy(app(1.0), name=name)  # a new user_config: reconfigure(), same replica
    stats = await handle.stats.remote()
    assert (stats["replica"], stats["weight"]) == (replica, 1.0)
    assert {await handle.remote() for _ in range(20)} == {"v2"}
    assert (await handle.rollback.remote("bad latency"))["rollback_reason"] == "bad latency"
    assert {await handle.remote() for _ in range(20)} == {"v1"}
    stats = await handle.set_weight.remote(1.0)  # a new weight clears the rollback
    assert not stats["rolled_back"] and await handle.remote() == "v2"


async def test_canary_of_an_ensemble(deploy: Deploy) -> None:
    # Blocks compose: the candidate is itself an ensemble of two regressors.
    ensemble = Ensemble.bind([named("a", Linear).bind(1.0), named("b", Linear).bind(3.0)], mean)
    app = Canary.bind(named("stable", Linear).bind(2.5), ensemble, weight=1.0)
    handle = deploy(app)
    routed = await handle.with_metadata.remote({"x": 2})
    assert (routed.value, routed.member) == (pytest.approx(4.0), "Ensemble")
    await handle.set_weight.remote(0.0)
    assert await handle.remote({"x": 2}) == pytest.approx(5.0)


def test_canary_user_config_is_checked() -> None:
    app = Canary.options(user_config={"wieght": 0.5}).bind(named("s").bind(1), named("c").bind(2))
    with pytest.raises(serve.DeploymentError, match="unknown user_config keys"):
        serve.run(app, name=f"bad{next(_names)}", route_prefix=None, _local_testing_mode=True)


# --- bandit ------------------------------------------------------------------------------------

BEST_ARM_REWARDS = {"low": 0.2, "mid": 0.5, "high": 0.8}


async def _simulate(state: Any, requests: int, rng: random.Random) -> list[str]:
    """Drive a BanditState directly with Bernoulli rewards; returns the arms chosen."""
    chosen = []
    for i in range(requests):
        arm = await state.choose(f"r{i}", list(BEST_ARM_REWARDS))
        reward = 1.0 if rng.random() < BEST_ARM_REWARDS[arm] else 0.0
        assert await state.feedback(f"r{i}", reward) == arm
        chosen.append(arm)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_thompson_sampling_converges_to_the_best_arm(seed: int) -> None:
    state = BanditState.func_or_class("thompson", seed=seed)  # the plain class, no replica
    chosen = await _simulate(state, 5000, random.Random(seed))
    assert chosen[-1000:].count("high") / 1000 >= 0.85


async def test_epsilon_greedy_converges_to_the_best_arm() -> None:
    state = BanditState.func_or_class("epsilon_greedy", epsilon=0.1, seed=3)
    chosen = await _simulate(state, 5000, random.Random(3))
    assert chosen[-1000:].count("high") / 1000 >= 0.85  # 90% exploit + 1/3 of 10% explore


def test_thompson_choice_prefers_evidence() -> None:
    arms = {"a": ArmStats(100, 100, 10.0), "b": ArmStats(100, 100, 90.0)}
    picks = Counter(thompson_choice(arms, random.Random(0)) for _ in range(200))
    assert picks["b"] == 200


async def test_bandit_state_bookkeeping() -> None:
    state = BanditState.func_or_class("thompson", seed=0, max_pending=2)
    for request_id in ("r1", "r2", "r3"):
        await state.choose(request_id, ["a", "b"])
    assert await state.feedback("r1", 1.0) is None  # evicted: max_pending=2
    assert await state.feedback("r2", 1.0) in {"a", "b"}
    assert await state.feedback("r2", 1.0) is None  # already rewarded
    with pytest.raises(FeedbackError, match=r"in \[0, 1\]"):
        await state.feedback("r3", 2.0)
    stats = await state.stats()
    assert (stats["chosen"], stats["rewarded"], stats["expired"]) == (3, 1, 1)
    assert stats["unknown_feedback"] == 2 and stats["pending"] == 1


async def test_bandit_two_router_replicas_share_one_state(deploy: Deploy) -> None:
    arms = {name: named(name, Arm).bind(name) for name in BEST_ARM_REWARDS}
    router = BanditRouter.options(num_replicas=2)
    name = f"bandit{next(_names)}"
    handle = deploy(router.bind(arms, BanditState.bind("thompson", seed=7)), name=name)
    rng = random.Random(7)
    chosen = []
    for _ in range(400):
        routed = await handle.with_metadata.remote({"q": 1})
        assert routed.value == routed.member and len(routed.request_id) == 32
        reward = 1.0 if rng.random() < BEST_ARM_REWARDS[routed.member] else 0.0
        assert await handle.feedback.remote(routed.request_id, reward) == routed.member
        chosen.append(routed.member)
    assert chosen[-100:].count("high") >= 75
    # Every replica reports the same shared state, which learned from all 400 rewards.
    views = [await handle.stats.remote() for _ in range(40)]
    assert len({view["router_replica"] for view in views}) == 2
    assert {(v["state_replica"], v["chosen"], v["rewarded"]) for v in views} == {
        (views[0]["state_replica"], 400, 400)
    }
    learned = views[0]["contexts"][""]
    assert learned["high"]["mean_reward"] > learned["low"]["mean_reward"]

    # Replacing the routers (new arguments) keeps the state deployment and what it learned.
    replaced = router.bind(arms, BanditState.bind("thompson", seed=7), failure_reward=None)
    handle = deploy(replaced, name=name)
    after = await handle.stats.remote()
    assert after["router_replica"] not in {view["router_replica"] for view in views}
    assert (after["state_replica"], after["rewarded"]) == (views[0]["state_replica"], 400)


async def test_bandit_contexts_and_failures(deploy: Deploy) -> None:
    arms = {"good": named("good", Arm).bind("good"), "bad": Failing.bind()}
    app = BanditRouter.bind(arms, BanditState.bind("epsilon_greedy", seed=1), context_key="user")
    handle = deploy(app)
    for _ in range(10):
        with contextlib.suppress(ValueError):
            await handle.remote({"user": "alice"})
    stats = await handle.stats.remote()
    alice = stats["contexts"]["alice"]
    # A failing member earns failure_reward (0) at once: no feedback needed for it.
    assert alice["bad"]["rewarded"] == alice["bad"]["chosen"] >= 1
    assert alice["bad"]["mean_reward"] == 0.0
    assert stats["pending"] == alice["good"]["chosen"]
    with pytest.raises(FeedbackError):
        await handle.feedback.remote("whatever", -1)
    assert await handle.feedback.remote("unknown-id", 1.0) is None


# --- HTTP ----------------------------------------------------------------------------------------


@pytest.fixture
def http_app(base_url: str) -> Iterator[Any]:
    """``http_app(app) -> httpx.Client`` for an app served under its own route prefix."""
    names: list[str] = []
    clients: list[httpx.Client] = []

    def run(app: Any) -> httpx.Client:
        name = f"http{next(_names)}"
        names.append(name)
        serve.run(app, name=name, route_prefix=f"/{name}")
        clients.append(httpx.Client(base_url=f"{base_url}/{name}", timeout=30.0))
        return clients[-1]

    yield run
    for client in clients:
        client.close()
    for name in names:
        with contextlib.suppress(serve.NotFoundError):
            serve.delete(name)


def test_http_ensemble_body_metadata_and_quorum(http_app: Any) -> None:
    regressors = [named("a", Linear).bind(1.0), named("b", Linear).bind(3.0), Failing.bind()]
    client = http_app(Ensemble.bind(regressors, mean, min_responses=2))
    response = client.post("", json={"x": 2})
    assert response.status_code == 200 and response.json() == pytest.approx(4.0)
    metadata = json.loads(response.headers[METADATA_HEADER])
    assert metadata["responded"] == ["a", "b"] and metadata["failed"] == {"Failing": "ValueError"}
    assert client.get("/stats").json()["calls"] == 1
    assert client.post("", content=b"not json").status_code == 400

    strict = http_app(Ensemble.bind(regressors, mean))
    response = strict.post("", json={"x": 2})
    assert response.status_code == 503
    assert response.json()["failed"] == {"Failing": "ValueError"}
    assert "hunter2" not in response.text  # member exception messages stay in the replica


def test_http_selector_by_header(http_app: Any) -> None:
    members = [named("model_a").bind({"model": "A"}), named("model_b").bind({"model": "B"})]
    client = http_app(Selector.bind(members, header="x-model", default="model_a"))
    assert client.post("", json={}, headers={"x-model": "model_b"}).json() == {"model": "B"}
    response = client.post("", json={})
    assert response.json() == {"model": "A"}
    assert '"member":"model_a"' in response.headers[METADATA_HEADER]
    response = client.post("", json={}, headers={"x-model": "model_z"})
    assert response.status_code == 400 and "model_z" in response.json()["error"]


def test_http_bandit_feedback_route(http_app: Any) -> None:
    arms = {name: named(name, Arm).bind(name) for name in ("left", "right")}
    client = http_app(BanditRouter.bind(arms, BanditState.bind(seed=0)))
    response = client.post("", json={"user": 1}, headers={"x-request-id": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    member = response.text  # a str answer is sent as text/plain, as shoal sends any str
    assert member in arms and f'"member":"{member}"' in response.headers[METADATA_HEADER]
    feedback = client.post("/feedback", json={"request_id": "req-42", "reward": 1})
    assert feedback.status_code == 200 and feedback.json()["member"] == member
    again = client.post("/feedback", json={"request_id": "req-42", "reward": 1})
    assert again.status_code == 404
    assert client.post("/feedback", json={"request_id": "x", "reward": 5}).status_code == 400
    assert client.post("/feedback", json={"reward": 1}).status_code == 400
    assert client.get("/stats").json()["contexts"][""][member]["rewarded"] == 1


# --- the examples (in-process) -----------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]

from examples import (  # noqa: E402
    demo,
    patterns_bandit,
    patterns_ensemble,
    patterns_model_update,
    patterns_pipeline,
    patterns_selection,
)


async def test_example_pipeline_and_ensemble(local: Any) -> None:
    pipeline = local(patterns_pipeline.app)
    image = {"description": "pointy ears, whiskers, four paws down"}
    assert await pipeline.describe.remote(image) == {"caption": "a standing cat"}
    ensemble = local(patterns_ensemble.app)
    assert await ensemble.remote({"description": "floppy ears, barks: woof"}) == "dog"
    long = "pointy ears, long whiskers and a fluffy tail; it purrs all day long"
    result = await ensemble.with_metadata.remote({"description": long})
    assert (result.value, list(result.failed)) == ("cat", ["whiskers"])


async def test_example_selection(local: Any) -> None:
    select = local(patterns_selection.app)
    assert (await select.remote({"animal": "dog", "description": "big"}))["breed"] == "Great Dane"
    assert (await select.with_metadata.remote({"animal": "owl"})).member == "generalist"
    ab = local(patterns_selection.ab_app)
    users = [{"user_id": f"u{i}"} for i in range(50)]
    first = [(await ab.with_metadata.remote(user)).member for user in users]
    assert first == [(await ab.with_metadata.remote(user)).member for user in users]


async def test_example_model_update(local: Any) -> None:
    shadow = local(patterns_model_update.shadow_app)
    for text in patterns_model_update.TRAFFIC:
        assert (await shadow.with_metadata.remote({"description": text})).member.endswith("V1")
    stats = await shadow.wait_for_mirrors.remote()
    assert stats["mirrored"] == len(patterns_model_update.TRAFFIC)
    assert stats["agreement_rate"] == pytest.approx(6 / 7)  # v2 knows foxes; v1 does not
    canary = local(patterns_model_update.canary(1.0))
    for _ in range(10):  # v2's answers fail the check on emoji: rolled back after 10
        assert await canary.remote({"description": "meow 🦄"}) == "🦄"
    assert await canary.remote({"description": "meow 🦄"}) == "cat"
    assert (await canary.stats.remote())["rolled_back"]


async def test_example_bandit_learns_each_users_favourite(local: Any) -> None:
    router = local(patterns_bandit.app)
    rng = random.Random(5)
    late: Counter[tuple[str, str]] = Counter()
    for visit in range(600):
        user = rng.choice(list(patterns_bandit.CLICK_RATES))
        routed = await router.with_metadata.remote({"user_id": user})
        clicked = rng.random() < patterns_bandit.CLICK_RATES[user][routed.member]
        await router.feedback.remote(routed.request_id, float(clicked))
        if visit >= 450:
            late[user, routed.member] += 1
    for user, rates in patterns_bandit.CLICK_RATES.items():
        favourite = max(rates, key=rates.__getitem__)
        total = sum(count for (who, _), count in late.items() if who == user)
        assert late[user, favourite] >= 0.6 * total


def test_demo_serves_the_pattern_examples() -> None:
    entries = {name: prefix for name, prefix, _ in demo.APPS if name.startswith("patterns-")}
    assert entries == {
        f"patterns-{name}": f"/patterns/{name}"
        for name in ("pipeline", "ensemble", "selection", "shadow", "canary", "bandit")
    }
    for name in entries:
        assert demo.curl_command("http://h", name, entries[name]).endswith(
            f"-d '{demo.SAMPLE_BODIES[name]}'"
        )
