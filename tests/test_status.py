"""Status people can read: ``print(serve.status())``, ``shoal status`` (YAML), the
``status_details()`` hook (a deployment's and the pattern blocks' own details, the
batchers' plans) and the batch and pattern metrics on the admin API's ``/metrics``.

The hook tests share one set of applications on the session's multi-process shoal,
health-checked every 0.1 s so details arrive quickly; nothing waits with sleeps.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from conftest import wait_until

from shoal import serve
from shoal._cli.ops import status_of
from shoal._controller.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ProxyStatus,
    ReplicaState,
    ReplicaStatus,
    ScalingDecision,
    ServeStatus,
)
from shoal._controller.status_text import WIDTH
from shoal.patterns import BanditRouter, BanditState, Canary, Ensemble, Selector, Shadow, vote

FAST = {"health_check_period_s": 0.1, "health_check_timeout_s": 0.8}  # hook timeout: 0.2 s
PREFIX = "status-test-"


# --- the printed summary (no processes) --------------------------------------------------------


def _sample() -> ServeStatus:
    reason = (
        "replica shop#Model#a1 failed its health check 3 times in a row: ValueError: the GPU "
        'is gone\nTraceback (most recent call last):\n  File "model.py", line 3, in check\n'
    )
    model = DeploymentStatusOverview(
        DeploymentStatus.UNHEALTHY, reason, {"RUNNING": 1, "STARTING": 1},
        [ReplicaStatus("shop#Model#a1", ReplicaState.RUNNING, 11, "v1",
                       details={"weight": 0.25, "arms": {"a": {"chosen": 3}, "b": {"chosen": 4}}}),
         ReplicaStatus("shop#Model#b2", ReplicaState.STARTING, None, "v1")],
        target_replicas=3, autoscaling=True,
        scaling_decisions=[ScalingDecision(1_700_000_000.0, 1, 3, "load 5.0 > target 2")],
    )  # fmt: skip
    ingress = DeploymentStatusOverview(DeploymentStatus.HEALTHY, "", {"RUNNING": 2}, [], 2)
    app = ApplicationStatusOverview(
        ApplicationStatus.UNHEALTHY, "", "/shop", 1_700_000_000.0,
        {"Ingress": ingress, "Model": model},
    )  # fmt: skip
    return ServeStatus({"node-1": ProxyStatus("127.0.0.1", 8000, "HEALTHY", 42)}, {"shop": app})


def test_status_prints_an_indented_summary_and_keeps_its_structured_repr() -> None:
    status = _sample()
    lines = str(status).splitlines()
    assert lines[:4] == [
        "proxies:",
        "  node-1: HEALTHY on 127.0.0.1:8000 (pid 42)",
        "applications:",
        lines[3],
    ]
    assert lines[3].startswith("  shop: UNHEALTHY, route /shop, deployed ")
    assert "    Ingress: HEALTHY, 2 RUNNING (target 2)" in lines
    at = lines.index("    Model: UNHEALTHY, 1 RUNNING, 1 STARTING (autoscaling, target 3)")
    assert lines[at + 1] == "      message:"
    message = "\n".join(lines[at + 2 : at + 6])
    assert "failed its health check 3 times in a row: ValueError: the GPU" in message
    assert '          File "model.py", line 3, in check' in lines  # indentation kept
    assert any(line.endswith("1 -> 3: load 5.0 > target 2") for line in lines)
    assert lines[-6:] == [
        "      details:",
        "        shop#Model#a1:",
        "          weight: 0.25",
        "          arms:",
        "            a: {chosen: 3}",
        "            b: {chosen: 4}",
    ]  # the replica without details is left out
    assert max(len(line) for line in lines) <= WIDTH
    # Every deeper line is indented by two spaces per level.
    assert all((len(line) - len(line.lstrip(" "))) % 2 == 0 for line in lines)

    assert repr(status).startswith("ServeStatus(proxies={'node-1': ProxyStatus('HEALTHY'")
    assert "DeploymentStatusOverview(status=<DeploymentStatus.UNHEALTHY" in repr(status)
    assert status.applications["shop"].deployments["Model"].details == {
        "shop#Model#a1": {"weight": 0.25, "arms": {"a": {"chosen": 3}, "b": {"chosen": 4}}}
    }
    # The parts print the same way on their own.
    assert str(status.applications["shop"]).startswith("application: UNHEALTHY, route /shop")
    assert str(status.applications["shop"].deployments["Ingress"]) == (
        "deployment: HEALTHY, 2 RUNNING (target 2)"
    )
    assert str(ServeStatus()) == "applications: none"


def test_a_long_message_is_wrapped_and_cut() -> None:
    message = "x " * 200 + "\n" + "\n".join(f"line {i}" for i in range(50))
    deployment = DeploymentStatusOverview(DeploymentStatus.DEPLOY_FAILED, message)
    lines = str(deployment).splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert lines[-1].strip() == "... 21 more lines (see its .message)"


def test_shoal_status_yaml_has_what_the_summary_has() -> None:
    details = {
        "proxies": {"node-1": {"status": "HEALTHY"}},
        "applications": {
            "shop": {
                "status": "RUNNING", "route_prefix": "/shop", "message": "",
                "last_deployed_time_s": 1.0,
                "deployments": {
                    "Model": {
                        "status": "HEALTHY", "message": "", "target_num_replicas": 2,
                        "autoscaling": True, "scaling_decisions": [],
                        "replicas": [
                            {"replica_id": "shop#Model#a1", "state": "RUNNING",
                             "details": {"weight": 0.25}},
                            {"replica_id": "shop#Model#b2", "state": "RUNNING", "details": None},
                        ],
                    },
                },
            }
        },
    }  # fmt: skip
    app = status_of(details)["applications"]["shop"]
    assert app["route_prefix"] == "/shop"
    model = app["deployments"]["Model"]
    assert model["replica_states"] == {"RUNNING": 2}
    assert model["target_num_replicas"] == 2 and model["autoscaling"] is True
    assert "scaling_decisions" not in model  # none yet
    assert model["details"] == {"shop#Model#a1": {"weight": 0.25}}


# --- the hook on a running instance -------------------------------------------------------------


@serve.deployment(**FAST)
class Reporter:
    def __init__(self) -> None:
        self.items = 0

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def __call__(self, xs: list[int]) -> list[int]:
        self.items += len(xs)
        return xs

    def status_details(self) -> dict[str, Any]:
        return {"items": self.items, "quality": {"ratio": 0.25, "undefined": float("nan")}}


@serve.deployment(**FAST)
class Raising:
    def __init__(self) -> None:
        self.calls = 0

    def status_details(self) -> dict[str, Any]:
        self.calls += 1
        raise ValueError("no details today")

    def hook_calls(self) -> int:
        return self.calls


@serve.deployment(**FAST)
class Hanging:
    async def status_details(self) -> dict[str, Any]:
        await asyncio.Event().wait()  # never returns
        return {}

    def __call__(self) -> str:
        return "still serving"


@serve.deployment(**FAST)
class Blocking:
    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def status_details(self) -> dict[str, Any]:  # sync: holds a thread while it blocks
        self.calls += 1
        self.release.wait(30)
        return {}

    def hook_calls(self) -> int:
        return self.calls

    def __del__(self) -> None:
        self.release.set()


@serve.deployment(**FAST)
class NotADict:
    def status_details(self) -> Any:
        return [1, 2, 3]


@serve.deployment(**FAST)
class Flaky:
    def __init__(self) -> None:
        self.failing = False

    def fail(self) -> None:
        self.failing = True

    def check_health(self) -> None:
        if self.failing:
            raise RuntimeError("disk full")


@serve.deployment(**FAST)
class Answer:
    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, *args: Any) -> Any:
        return self.value


@serve.deployment
class Hub:
    """The test application's ingress: it only holds the deployments, so that one
    ``serve.run`` starts them all at once."""

    def __init__(self, *deployments: Any) -> None:
        self.deployments = deployments

    def __call__(self) -> int:
        return len(self.deployments)


APP = PREFIX + "app"


@pytest.fixture(scope="module")
def handles(http_port: int) -> Iterator[dict[str, Any]]:
    """One application on the session's multi-process shoal: the hook deployments and
    the pattern blocks, sharing two members (A answers 1, B answers 1: they agree)."""
    a, b = Answer.options(name="A").bind(1), Answer.options(name="B").bind(1)
    state = BanditState.options(**FAST).bind(seed=1)
    bound = [
        Reporter.bind(), Raising.bind(), Hanging.bind(), Blocking.bind(), Flaky.bind(),
        Shadow.options(**FAST).bind(a, b),
        Canary.options(**FAST).bind(a, b, weight=0.5),
        BanditRouter.options(**FAST).bind([a, b], state),
    ]  # fmt: skip
    serve.run(Hub.bind(*bound), name=APP, route_prefix=None)
    try:
        yield {name: serve.get_deployment_handle(name, APP) for name in _overview(APP)}
    finally:
        serve.delete(APP)


def _overview(app: str) -> dict[str, DeploymentStatusOverview]:
    return serve.status().applications[app].deployments


def _details(deployment: str, app: str = APP) -> dict[str, Any]:
    [(_, details)] = _overview(app)[deployment].details.items() or [(None, {})]
    return details


def _admin_url() -> str:
    from shoal._instance import api

    url: str = api._instances["process"].services.admin_url
    return url


def test_a_deployment_reports_its_details_and_its_batcher(handles: dict[str, Any]) -> None:
    responses = [handles["Reporter"].remote(i) for i in range(10)]
    assert [r.result() for r in responses] == list(range(10))
    details = wait_until(
        lambda: (d := _details("Reporter")).get("items") == 10 and d, 10,
        "the reporter's details after 10 items",
    )  # fmt: skip
    assert details["quality"] == {"ratio": 0.25, "undefined": None}  # NaN: null
    batcher = details["batching"]["__call__"]
    assert batcher["requests"] == 10 and batcher["max_batch_size"] == 4
    assert batcher["size"]["max"] <= 4 and batcher["wait_ms"]["p50"] >= 0

    [replica] = _overview(APP)["Reporter"].replicas
    assert replica.details == details
    printed = str(serve.status()).splitlines()
    at = printed.index(f"        {replica.replica_id}:")
    assert printed[at - 1] == "      details:"
    assert printed[at + 1] == "          items: 10"

    # The admin REST API and `shoal status` show the same details.
    applications = httpx.get(f"{_admin_url()}/api/serve/applications/", timeout=30).json()
    [rest] = applications["applications"][APP]["deployments"]["Reporter"]["replicas"]
    assert rest["details"]["items"] == 10 and "batching" in rest["details"]
    shown = subprocess.run(
        [sys.executable, "-m", "shoal", "status", "-a", _admin_url()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    reporter = yaml.safe_load(shown.stdout)["applications"][APP]["deployments"]["Reporter"]
    assert reporter["details"][replica.replica_id]["items"] == 10


def test_a_raising_hook_is_reported_and_never_fails_the_health_check(
    handles: dict[str, Any],
) -> None:
    [before] = _overview(APP)["Raising"].replicas
    # Five failing hooks: more than the three failed health checks that replace a replica.
    wait_until(lambda: handles["Raising"].hook_calls.remote().result() >= 5, 10, "5 hook calls")
    deployment = _overview(APP)["Raising"]
    assert deployment.status == "HEALTHY"
    assert [r.replica_id for r in deployment.replicas] == [before.replica_id]
    assert _details("Raising") == {
        "status_details_error": "status_details() raised ValueError: no details today"
    }


def test_a_hanging_hook_times_out_and_is_not_called_again(handles: dict[str, Any]) -> None:
    def error(deployment: str) -> str:
        return str(_details(deployment).get("status_details_error", ""))

    wait_until(
        lambda: "did not return within 0.2 s" in error("Hanging")
        or "has not returned for" in error("Hanging"),
        10, "the async hook's timeout",
    )  # fmt: skip
    assert handles["Hanging"].remote().result() == "still serving"
    assert _overview(APP)["Hanging"].status == "HEALTHY"

    wait_until(lambda: "has not returned for" in error("Blocking"), 10,
               "a later check to find the sync hook still running")  # fmt: skip
    assert handles["Blocking"].hook_calls.remote().result() == 1  # one thread held, never more
    assert _overview(APP)["Blocking"].status == "HEALTHY"
    assert "not called again until it does" in error("Blocking")


def test_the_local_runtime_reports_details_too() -> None:
    """Local testing mode (no processes): a hook's refused value, a Selector's and an
    Ensemble's details."""
    name = PREFIX + "local"
    x, y = Answer.options(name="X").bind("x"), Answer.options(name="Y").bind("y")
    hub = serve.run(
        Hub.bind(
            NotADict.bind(),
            Selector.options(**FAST).bind([x, y], default="X"),
            Ensemble.options(**FAST).bind([x, y], vote),
        ),
        name=name, route_prefix=None, _local_testing_mode=True,
    )  # fmt: skip
    try:
        assert hub.remote().result() == 3
        selector = serve.get_deployment_handle("Selector", name)
        assert [selector.remote({"k": i}).result() for i in range(3)] == ["x"] * 3
        ensemble = serve.get_deployment_handle("Ensemble", name)
        assert [ensemble.remote({"k": i}).result() for i in range(2)] == ["x"] * 2  # a tie: X
        wait_until(lambda: _details("Selector", name).get("requests") == {"X": 3, "Y": 0}, 10,
                   "the selector's details")  # fmt: skip
        wait_until(lambda: _details("Ensemble", name).get("calls") == 2, 10, "the ensemble's")
        assert _details("Ensemble", name)["members"] == {
            "X": {"answered": 2, "failed": 0}, "Y": {"answered": 2, "failed": 0},
        }  # fmt: skip
        refused = {
            "status_details_error": "status_details() must return a dict of JSON values, got list"
        }
        # Reported by its own periodic checks, as the others' were: waited for the same way
        # (a loaded CI run asserted it before its first check had reported).
        wait_until(lambda: _details("NotADict", name) == refused, 10, "the refused value's")
    finally:
        serve.delete(name)


def test_an_unhealthy_deployment_says_why(handles: dict[str, Any]) -> None:
    handles["Flaky"].fail.remote().result()
    reason = "failed its health check 3 times in a row: RuntimeError: disk full"

    def printed() -> list[str] | None:
        lines = str(serve.status()).splitlines()
        text = " ".join(line.strip() for line in lines)  # the message may wrap
        return lines if "Flaky: UNHEALTHY," in text and reason in text else None

    lines = wait_until(printed, 10, "Flaky to be UNHEALTHY with its reason")
    at = next(i for i, line in enumerate(lines) if line.startswith("    Flaky: UNHEALTHY,"))
    assert lines[at + 1] == "      message:"
    assert lines[at + 2].startswith("        replica status-test-app#Flaky#")
    # Its replacement (the same code: healthy until told to fail) brings it back.
    wait_until(lambda: _overview(APP)["Flaky"].status == "HEALTHY", 30, "Flaky replaced")


# --- the pattern blocks --------------------------------------------------------------------------


def test_pattern_blocks_report_their_details(handles: dict[str, Any]) -> None:
    for _ in range(20):
        handles["Shadow"].remote({"x": 1}).result()
        handles["Canary"].remote({"x": 1}).result()
        request_id = handles["BanditRouter"].with_metadata.remote({"x": 1}).result().request_id
        handles["BanditRouter"].feedback.remote(request_id, 1.0).result()
    handles["Shadow"].wait_for_mirrors.remote().result()

    def reported(deployment: str, key: str, value: Any) -> Any:
        details = _details(deployment)
        return details if details.get(key) == value else None

    shadow = wait_until(lambda: reported("Shadow", "compared", 20), 10, "the shadow's details")
    assert shadow["agreement_rate"] == 1.0 and shadow["candidate"] == "B"
    canary = wait_until(
        lambda: sum(_details("Canary").get("requests", {}).values()) == 20 and _details("Canary"),
        10, "the canary's details",
    )  # fmt: skip
    assert canary["weight"] == 0.5 and canary["effective_weight"] == 0.5
    state = wait_until(lambda: reported("BanditState", "rewarded", 20), 10, "the bandit's")
    arms = state["arms"]
    assert sum(arm["chosen"] for arm in arms.values()) == 20 and set(arms) <= {"A", "B"}
    router = wait_until(
        lambda: sum(_details("BanditRouter").get("pulls", {}).values()) == 20
        and _details("BanditRouter"), 10, "the router's pulls",
    )  # fmt: skip
    assert set(router["pulls"]) == {"A", "B"}
    assert "    Shadow: HEALTHY, 1 RUNNING (target 1)" in str(serve.status()).splitlines()


# --- metrics -------------------------------------------------------------------------------------


def _sample_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_batch_and_pattern_metrics_appear_on_the_admin_api(handles: dict[str, Any]) -> None:
    responses = [handles["Reporter"].remote(i) for i in range(8)]
    assert [r.result() for r in responses] == list(range(8))
    for _ in range(4):
        handles["Shadow"].remote({"x": 2}).result()
        handles["Canary"].remote({"x": 2}).result()
        handles["BanditRouter"].remote({"x": 2}).result()
    handles["Shadow"].wait_for_mirrors.remote().result()
    url = f"{_admin_url()}/metrics"
    ours = {"application": APP}

    def scraped() -> str | None:
        text = httpx.get(url, timeout=30).text
        reporter = {**ours, "deployment": "Reporter", "method": "__call__"}
        ready = (
            _sample_value(text, "shoal_batch_size_count", **reporter) >= 2  # 8 items, <= 4 each
            and _sample_value(text, "shoal_batch_wait_ms_count", **reporter) >= 2
            and _sample_value(text, "shoal_shadow_comparisons_total", **ours, result="agree") >= 4
            and _sample_value(text, "shoal_canary_requests_total", **ours, result="ok") >= 4
            and _sample_value(text, "shoal_bandit_pulls_total", **ours) >= 4
        )  # fmt: skip
        return text if ready else None

    text = wait_until(scraped, 15, "batch and pattern metrics on /metrics")
    assert "# TYPE shoal_batch_size histogram" in text
    assert "# TYPE shoal_batch_wait_ms histogram" in text
    assert f'shoal_batch_size_bucket{{application="{APP}",deployment="Reporter"' in text
    assert _sample_value(text, "shoal_shadow_comparisons_total", **ours, result="error") == 0
