"""Autoscaling: Ray Serve's policy and options, scale to zero and back, draining
scale-downs, custom policies and metrics, and the decisions ``serve.status()`` shows.

The policy's rules are unit tested on contexts (no instance); the rest deploys on
both runtimes with small delays, and drives load through handles or the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Deploy, wait_until

from shoal import serve
from shoal._controller.autoscaler import LoadWindow
from shoal._controller.policy import (
    AutoscalingContext,
    Delays,
    DeploymentID,
    decide,
    replica_queue_length_autoscaling_policy,
)
from shoal._transport.messages import LoadReport
from shoal.serve.config import AutoscalingConfig

FAST = {
    "metrics_interval_s": 0.1,
    "look_back_period_s": 0.5,
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 0.5,
}


# --- the policy's rules, on contexts ----------------------------------------------------


def _ctx(current: int, requests: float, **options: Any) -> AutoscalingContext:
    config = AutoscalingConfig(**{"min_replicas": 0, "max_replicas": 10, **options})
    return AutoscalingContext(
        deployment_id=DeploymentID("d", "app"), deployment_name="d", app_name="app",
        current_num_replicas=current, target_num_replicas=current,
        running_replicas=[f"r{i}" for i in range(current)], total_num_requests=requests,
        total_queued_requests=0.0, total_running_requests=requests, requests_per_replica={},
        aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0, config=config,
    )  # fmt: skip


def _decide(ctx: AutoscalingContext, delays: Delays, now: float) -> int:
    return decide(replica_queue_length_autoscaling_policy, ctx, delays, now)[0]


def test_the_default_policy_aims_at_target_ongoing_requests_per_replica() -> None:
    # 9 requests for target 2 per replica: ceil(4.5) = 5 replicas, at once without delay.
    assert _decide(_ctx(1, 9.0, upscale_delay_s=0), Delays(), 0.0) == 5
    assert _decide(_ctx(4, 8.0), Delays(), 0.0) == 4  # on target: unchanged
    assert _decide(_ctx(1, 90.0, upscale_delay_s=0), Delays(), 0.0) == 10  # max_replicas


def test_scaling_waits_for_the_delays_without_interruption() -> None:
    delays = Delays()
    up = _ctx(1, 6.0, upscale_delay_s=2.0)
    assert _decide(up, delays, 10.0) == 1
    assert _decide(up, delays, 11.9) == 1
    assert _decide(up, delays, 12.0) == 3  # wanted for 2 s
    delays = Delays()
    assert _decide(up, delays, 20.0) == 1
    assert _decide(_ctx(1, 2.0, upscale_delay_s=2.0), delays, 21.0) == 1  # interrupted
    assert _decide(up, delays, 22.5) == 1  # the streak starts again at 22.5
    assert _decide(up, delays, 24.5) == 3
    down = _ctx(4, 2.0, downscale_delay_s=5.0)
    delays = Delays()
    assert _decide(down, delays, 0.0) == 4
    assert _decide(down, delays, 5.0) == 1


def test_while_demand_keeps_rising_further_steps_up_need_no_new_delay() -> None:
    delays = Delays()
    assert _decide(_ctx(1, 6.0, upscale_delay_s=2.0), delays, 0.0) == 1
    assert _decide(_ctx(1, 6.0, upscale_delay_s=2.0), delays, 2.0) == 3  # the first step
    # The window now shows more demand: the next step follows at once (Ray would wait
    # upscale_delay_s again), as long as more replicas stay wanted without a break.
    rising = _ctx(3, 16.0, upscale_delay_s=2.0)
    assert _decide(rising, delays, 2.1) == 8
    assert _decide(_ctx(8, 16.0, upscale_delay_s=2.0), delays, 2.2) == 8  # on target: a break
    assert _decide(_ctx(8, 20.0, upscale_delay_s=2.0), delays, 2.3) == 8  # a new streak waits


def test_only_the_one_to_zero_step_reaches_zero_and_has_its_own_delay() -> None:
    idle = _ctx(3, 0.0, downscale_delay_s=1.0, downscale_to_zero_delay_s=10.0)
    assert _decide(idle, Delays(), 0.0) == 3
    delays = Delays()
    _decide(idle, delays, 0.0)
    assert _decide(idle, delays, 1.0) == 1  # 3 -> 1, not 0
    last = _ctx(1, 0.0, downscale_delay_s=1.0, downscale_to_zero_delay_s=10.0)
    delays = Delays()
    _decide(last, delays, 0.0)
    assert _decide(last, delays, 5.0) == 1
    assert _decide(last, delays, 10.0) == 0


def test_requests_at_zero_replicas_scale_up_at_once() -> None:
    cold = _ctx(0, 1.0, upscale_delay_s=30.0)
    assert decide(replica_queue_length_autoscaling_policy, cold, Delays(), 0.0)[0] == 1
    assert _decide(_ctx(0, 1.0, upscaling_factor=2.5), Delays(), 0.0) == 3
    assert _decide(_ctx(0, 0.0), Delays(), 0.0) == 0


def test_scaling_factors_damp_each_step_but_never_stall_it() -> None:
    # From 2 to the wanted 10 with upscaling_factor 0.5: 2 + 0.5 * 8 = 6.
    assert _decide(_ctx(2, 20.0, upscale_delay_s=0, upscaling_factor=0.5), Delays(), 0.0) == 6
    # Down from 4 to 3 with downscaling_factor 0.1: ceil(3.9) = 4 would stall; it moves by 1.
    delays = Delays()
    ctx = _ctx(4, 6.0, downscale_delay_s=0, downscaling_factor=0.1)
    assert _decide(ctx, delays, 0.0) == 3


def test_a_policy_answer_that_is_not_replicas_and_state_is_refused() -> None:
    with pytest.raises(TypeError, match="must return \\(replicas, policy_state\\)"):
        decide(lambda ctx: 3, _ctx(1, 0.0), Delays(), 0.0)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="a number >= 0"):
        decide(lambda ctx: (-1, {}), _ctx(1, 0.0), Delays(), 0.0)


def test_load_reports_average_over_the_window_and_sum_over_processes() -> None:
    window = LoadWindow()
    report = LoadReport("app", "d", "proxy", 2.0, {"r1": 4.0, "gone": 9.0}, 1.0)
    window.record(report, 100.0)
    window.record(LoadReport("app", "d", "proxy", 0.0, {"r1": 2.0}, 1.0), 101.0)
    window.record(LoadReport("app", "d", "driver", 1.0, {"r1": 1.0}, 1.0), 101.0)
    queued, running = window.averages(101.5, 5.0, 2.0, {"r1"})
    assert queued == pytest.approx(1.0 + 1.0)  # proxy's mean (2+0)/2, plus driver's 1
    assert running == {"r1": pytest.approx(3.0 + 1.0)}  # a replica gone no longer counts
    # Past the window, a source's last report counts until it is stale, then nothing.
    # (window 1 s, stale after 4 s: at 103 only the last reports, of 101, are left)
    assert window.averages(103.0, 1.0, 4.0, {"r1"}) == (1.0, {"r1": 3.0})
    assert window.averages(120.0, 1.0, 4.0, {"r1"}) == (0.0, {"r1": 0.0})


# --- on a running instance ---------------------------------------------------------------


@serve.deployment(max_ongoing_requests=4)
class Slow:
    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s

    async def __call__(self) -> str:
        await asyncio.sleep(self.delay_s)
        return "done"


def _overview(app: str, deployment: str = "Slow") -> Any:
    return serve.status().applications[app].deployments[deployment]


def _running(app: str, deployment: str = "Slow") -> int:
    return int(_overview(app, deployment).replica_states.get("RUNNING", 0))


class _Load:
    """``clients`` callers sending requests one after another, in a thread, until stopped;
    every failure is kept."""

    def __init__(self, call: Any, clients: int) -> None:
        self.done = 0
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(call, clients),))
        self._thread.start()

    async def _run(self, call: Any, clients: int) -> None:
        async def client() -> None:
            while not self._stop.is_set():
                try:
                    await call()
                    self.done += 1
                except Exception as exc:
                    self.failures.append(exc)

        await asyncio.gather(*(client() for _ in range(clients)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _app_name(handle: Any) -> str:
    return str(handle.app_name)


def test_scales_up_under_load_then_down_after_the_delay_without_failures(deploy: Deploy) -> None:
    config = {**FAST, "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2}
    handle = deploy(Slow.options(autoscaling_config=config).bind())
    app = _app_name(handle)
    assert _overview(app).autoscaling and _overview(app).target_replicas == 1
    load = _Load(lambda: handle.remote(), clients=6)  # 6 ongoing / 2 per replica = 3
    try:
        wait_until(lambda: _running(app) == 3, 30, "3 replicas running under load")
    finally:
        load.stop()
    wait_until(lambda: _running(app) == 1 and _overview(app).target_replicas == 1, 30,
               "back to 1 replica once idle")  # fmt: skip
    assert load.failures == [] and load.done > 0
    decisions = _overview(app).scaling_decisions
    assert decisions[0].to_replicas > 1 and decisions[-1].to_replicas == 1
    assert all(d.reason for d in decisions) and decisions[0].time <= time.time()


@serve.deployment(max_ongoing_requests=1)
class SlowToStart:
    async def __init__(self) -> None:
        await asyncio.sleep(3.0)  # a model loading

    async def __call__(self) -> str:
        await asyncio.sleep(0.2)
        return "done"


def _worker_processes() -> set[int]:
    """Live worker processes this test process started (the multi-process runtime's,
    forked by its fork server or started by it with python -m)."""
    processes = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            processes[int(entry.name)] = (parent, (entry / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    ours = {os.getpid()} | {
        pid for pid, (parent, command) in processes.items()
        if parent == os.getpid() and b"shoal._runtime.process.zygote" in command
    }  # fmt: skip
    return {
        pid for pid, (parent, command) in processes.items()
        if parent in ours and b"shoal._runtime.process.worker" in command
    }  # fmt: skip


def test_a_scale_down_cancels_replicas_still_starting(deploy: Deploy) -> None:
    config = {**FAST, "max_replicas": 3, "target_ongoing_requests": 1, "look_back_period_s": 0.3}
    handle = deploy(SlowToStart.options(autoscaling_config=config).bind())
    app = _app_name(handle)
    before = _worker_processes()
    load = _Load(lambda: handle.remote(), clients=3)
    try:
        wait_until(lambda: _overview(app, "SlowToStart").target_replicas >= 2, 10, "a scale-up")
    finally:
        load.stop()  # idle before the new replicas are up: they are not needed any more
    wait_until(lambda: _overview(app, "SlowToStart").target_replicas == 1, 10, "back to 1")
    most_running = 0

    def settled() -> bool:
        nonlocal most_running
        states = _overview(app, "SlowToStart").replica_states
        most_running = max(most_running, states.get("RUNNING", 0))
        return bool(states == {"RUNNING": 1})

    wait_until(settled, 10, "the starting replicas gone")
    assert most_running == 1, "replicas no longer needed were started anyway"
    assert load.failures == []
    wait_until(lambda: _worker_processes() == before, 10, "no worker process left behind")


@serve.deployment(max_ongoing_requests=16)
class Caller:
    def __init__(self, downstream: Any) -> None:
        self.downstream = downstream

    async def __call__(self) -> str:
        return str(await self.downstream.remote())


def test_load_from_another_deployments_replica_scales_its_downstream(deploy: Deploy) -> None:
    # Only the Caller's replica sends Slow requests: its process's routers must report.
    config = {**FAST, "max_replicas": 2, "target_ongoing_requests": 1}
    handle = deploy(Caller.bind(Slow.options(autoscaling_config=config).bind(0.1)))
    app = _app_name(handle)
    load = _Load(lambda: handle.remote(), clients=4)
    try:
        wait_until(lambda: _running(app) == 2, 30, "Slow scaled by its caller's load")
    finally:
        load.stop()
    assert load.failures == []


def test_scale_to_zero_and_back_serves_the_first_request(deploy: Deploy) -> None:
    config = {**FAST, "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2}
    handle = deploy(Slow.options(autoscaling_config=config).bind())
    app = _app_name(handle)
    assert _running(app) == 0
    assert handle.remote().result(timeout_s=30) == "done"  # waits while a replica starts
    assert _overview(app).scaling_decisions[0].reason.startswith("scale from zero")
    wait_until(lambda: _overview(app).target_replicas == 0 and _running(app) == 0, 30,
               "scaled to zero once idle")  # fmt: skip
    assert handle.remote().result(timeout_s=30) == "done"


def test_num_replicas_auto_uses_rays_defaults(deploy: Deploy) -> None:
    handle = deploy(Slow.options(num_replicas="auto").bind())
    overview = _overview(_app_name(handle))
    assert overview.autoscaling and overview.target_replicas == 1
    config = Slow.options(num_replicas="auto").config.autoscaling()
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (
        1, 100, 2.0,
    )  # fmt: skip


# A custom policy and metric, importable by the controller (this module).


@serve.deployment
class Reporting:
    def __init__(self) -> None:
        self.backlog = 7.0

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"backlog": self.backlog}

    def __call__(self) -> str:
        return "ok"


def backlog_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """One replica per 3 units of backlog any replica reports; counts its calls."""
    backlog = max(ctx.aggregated_metrics.get("backlog", {}).values(), default=0.0)
    calls = ctx.policy_state.get("calls", 0) + 1
    return backlog / 3, {"calls": calls}


def failing_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    raise RuntimeError("the policy's own bug")


def test_a_custom_policy_reads_custom_metrics_from_replicas(deploy: Deploy) -> None:
    config = {**FAST, "max_replicas": 4, "policy": {"policy_function": backlog_policy}}
    handle = deploy(Reporting.options(autoscaling_config=config).bind())
    app = _app_name(handle)
    # backlog 7 / 3 -> 3 replicas, with no request at all: only the custom metric says so.
    wait_until(lambda: _running(app, "Reporting") == 3, 30, "3 replicas from the backlog")
    decision = _overview(app, "Reporting").scaling_decisions[-1]
    assert "test_autoscaling:backlog_policy" in decision.reason


class TwoAfterThreeCalls:
    """A policy object: the controller calls the same instance, so it keeps its state."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        self.calls += 1
        return (2 if self.calls > 3 else 1), {}


two_after_three_calls = TwoAfterThreeCalls()


def test_a_policy_object_keeps_its_own_state_between_calls(deploy: Deploy) -> None:
    config = {
        **FAST,
        "max_replicas": 3,
        "policy": {"policy_function": "test_autoscaling:two_after_three_calls"},
    }
    handle = deploy(Slow.options(autoscaling_config=config).bind())
    wait_until(lambda: _running(_app_name(handle)) == 2, 30, "2 replicas after 3 calls")
    assert two_after_three_calls.calls > 3


def test_a_failing_policy_keeps_the_count_and_says_why(deploy: Deploy) -> None:
    config = {**FAST, "max_replicas": 3, "policy": {"policy_function": failing_policy}}
    handle = deploy(Slow.options(autoscaling_config=config).bind())
    app = _app_name(handle)
    wait_until(lambda: "the policy's own bug" in _overview(app).message, 10, "the policy error")
    assert handle.remote().result(timeout_s=10) == "done"
    assert _running(app) == 1


def test_a_policy_that_cannot_be_imported_is_refused_before_anything_starts(
    deploy: Deploy,
) -> None:
    config = {"policy": {"policy_function": "no_such_module:policy"}}
    with pytest.raises(serve.ConfigError, match=r"no_such_module:policy.*cannot be imported"):
        deploy(Slow.options(autoscaling_config=config).bind())


def test_http_load_through_the_proxy_scales_the_ingress(base_url: str) -> None:
    config = {**FAST, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1}
    name = f"autoscale-http-{time.monotonic_ns()}"
    serve.run(Slow.options(autoscaling_config=config).bind(0.1), name=name, route_prefix=f"/{name}")
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:

            def get() -> None:
                client.get(f"/{name}").raise_for_status()

            load = _Load(lambda: asyncio.to_thread(get), clients=4)
            try:
                wait_until(lambda: _running(name) == 2, 30, "2 replicas from the proxy's load")
            finally:
                load.stop()
        assert load.failures == []
    finally:
        serve.delete(name)


@contextlib.contextmanager
def _local_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str
) -> Iterator[tuple[Any, httpx.Client]]:
    """An in-process instance with its admin REST API (and a client for it), serving
    config files that import ``module`` (written from ``source`` into ``tmp_path``)."""
    from shoal._config import AdminOptions
    from shoal._instance.instance import Instance

    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.chdir(tmp_path)  # the build child imports from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))  # the controller imports policies from it
    instance = Instance("local", None, admin=AdminOptions(port=0))
    try:
        assert instance.services is not None and instance.services.admin_url is not None
        with httpx.Client(base_url=instance.services.admin_url, timeout=30) as http:
            yield instance, http
    finally:
        instance.stop()


CAPACITY_APP = """
from shoal import serve

@serve.deployment(num_replicas=4)
class Fixed:
    def __call__(self):
        return "fixed"

@serve.deployment(autoscaling_config={"min_replicas": 2, "max_replicas": 6, "initial_replicas": 4})
class Scaled:
    def __init__(self, fixed):
        self.fixed = fixed

    async def __call__(self):
        return await self.fixed.remote()

app = Scaled.bind(Fixed.bind())
"""


def test_target_capacity_scales_fixed_counts_and_autoscaling_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = {"name": "cap", "route_prefix": None, "import_path": "capacity_app:app"}
    with _local_instance(tmp_path, monkeypatch, "capacity_app", CAPACITY_APP) as (instance, http):

        def counts() -> dict[str, Any]:
            details = http.get("/api/serve/applications/").json()
            deployments = (details["applications"].get("cap") or {}).get("deployments", {})
            running = {
                name: sum(r["state"] == "RUNNING" for r in d["replicas"])
                for name, d in deployments.items()
            }
            return {"capacity": details["target_capacity"], **running}

        def apply(**extra: Any) -> None:
            reply = http.put("/api/serve/applications/", json={"applications": [app], **extra})
            assert reply.status_code == 200, reply.text

        apply()
        wait_until(lambda: counts() == {"capacity": None, "Fixed": 4, "Scaled": 4}, 30)
        # 50%: 4 fixed -> 2; bounds 2..6 -> 1..3, so the 4 running are cut to 3.
        apply(target_capacity=50)
        wait_until(lambda: counts() == {"capacity": 50.0, "Fixed": 2, "Scaled": 3}, 30)
        scaled = instance.status().applications["cap"].deployments["Scaled"]
        assert "target_capacity=50.0%" in scaled.scaling_decisions[-1].reason
        apply(target_capacity=0)  # Ray's rule: 0% runs nothing
        wait_until(lambda: counts() == {"capacity": 0.0, "Fixed": 0, "Scaled": 0}, 30)
        apply()  # a file without it: back to 100% (the autoscaled one to its min)
        wait_until(lambda: counts() == {"capacity": None, "Fixed": 4, "Scaled": 2}, 30)


APP_POLICY_MODULE = """
from shoal import serve

FAST = {"metrics_interval_s": 0.1, "upscale_delay_s": 0, "downscale_delay_s": 0,
        "max_replicas": 4}

@serve.deployment(autoscaling_config=FAST)
class Back:
    def __call__(self):
        return "back"

@serve.deployment(autoscaling_config=FAST)
class Front:
    def __init__(self, back):
        self.back = back

    async def __call__(self):
        return await self.back.remote()

app = Front.bind(Back.bind())

def coordinated(contexts):
    # Two Back replicas per Front replica, the Front count set by the policy's own state.
    wanted, states = {}, {}
    for deployment_id, ctx in contexts.items():
        ticks = ctx.policy_state.get("ticks", 0) + 1
        wanted[deployment_id] = 1 if deployment_id.name == "Front" else 2
        states[deployment_id] = {"ticks": ticks}
    return wanted, states
"""


def test_an_application_policy_decides_for_every_autoscaled_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = {
        "name": "coordinated", "route_prefix": None, "import_path": "app_policy:app",
        "autoscaling_policy": {"policy_function": "app_policy:coordinated"},
    }  # fmt: skip
    with _local_instance(tmp_path, monkeypatch, "app_policy", APP_POLICY_MODULE) as (
        instance,
        http,
    ):
        reply = http.put("/api/serve/applications/", json={"applications": [app]})
        assert reply.status_code == 200, reply.text

        def running() -> dict[str, int]:
            status = instance.status().applications.get("coordinated")
            deployments = status.deployments if status is not None else {}
            return {n: d.replica_states.get("RUNNING", 0) for n, d in deployments.items()}

        wait_until(lambda: running() == {"Front": 1, "Back": 2}, 30, "the policy's counts")
        back = instance.status().applications["coordinated"].deployments["Back"]
        assert "application policy app_policy:coordinated" in back.scaling_decisions[-1].reason
