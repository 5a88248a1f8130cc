"""The four scenarios of ``python -m bench.overload`` and their parameters.

Each ``run_*`` function (:data:`RUNNERS`) starts its own server (:func:`server`),
deploys ``bench.apps_overload`` with the options under test, drives it with the load
clients of :mod:`bench.overload_clients`, and returns its raw figures (computed by
:mod:`bench.overload_analysis`) with the foreign CPU of its measured loads
(:func:`cpu_window`). :func:`bench.overload.main` sets :data:`METER` and
:data:`BACKOFF_S` before it runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.control_plane import ForeignCpu, Instance, _http, log, wait_for
from bench.overload_analysis import (
    ReplicaPoller,
    analyse_steps,
    latency,
    rate,
    replica_lives,
    statuses,
    windows,
)
from bench.overload_clients import run_client
from bench.procs import HOST, _status_kb, stat_fields

SECTIONS = ("overload", "goodput", "autoscale", "zero")
INVALID_CORE_PCT = 15.0  # foreign CPU above this share of one core invalidates a figure

# overload and goodput: one replica of bench.apps_overload:work (20 ms)
MAX_ONGOING, MAX_QUEUED = 2, 10
OVERLOAD_FACTOR = 10.0
GOODPUT_CLIENTS, CLIENT_TIMEOUT_S, BACKOFF_S = 200, 1.0, (0.1, 0.3)
# autoscale: bench.apps_overload:slow_work (50 ms)
STEP_MAX_ONGOING, STEP_LOW, STEP_HIGH = 4, 2, 16
AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 10,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 5.0,
}
# zero: the 20 ms handler from zero replicas; upscale_delay_s as in autoscale (it must not
# delay a start from zero: nothing can be served until a replica runs)
ZERO_AUTOSCALING: dict[str, Any] = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 1,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 2.0,
    "downscale_to_zero_delay_s": 2.0,  # dropped when shoal's AutoscalingConfig lacks it
}


# --- one scenario's server ----------------------------------------------------------------------
METER: ForeignCpu | None = None  # set by bench.overload.main (as BACKOFF_S, from --backoff-ms)


def cpu_window() -> dict[str, Any]:
    """The foreign CPU since the last call, as % of the machine and of one core; invalid
    above INVALID_CORE_PCT of a core."""
    assert METER is not None
    window = METER.window()
    core = round(window["foreign_cpu_pct"] * (os.cpu_count() or 1), 1)
    return {**window, "foreign_core_pct": core, "invalid": core > INVALID_CORE_PCT}


@contextlib.contextmanager
def server(work: Path, apps: list[dict[str, Any]]) -> Iterator[Instance]:
    """A started instance serving ``apps`` (config file entries), converged and answering."""
    inst = Instance(work)
    try:
        inst.start()
        assert METER is not None
        METER.roots.add(inst.server_pid())
        inst.put({"http_options": {"host": HOST, "port": inst.http_port}, "applications": apps})
        names = [app["name"] for app in apps]
        wait_for(lambda: inst.converged(names), 300, f"{', '.join(names)} RUNNING", 0.05)
        inst.remember()
        yield inst
    finally:
        inst.stop()


def app_entry(name: str, import_path: str, **options: Any) -> dict[str, Any]:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": f"bench.apps_overload:{import_path}",
        "deployments": [{"name": "Work", **options}],
    }


def replica_stats(inst: Instance, name: str) -> dict[str, Any]:
    status, body = _http(inst.http_port, "GET", f"/{name}/stats", timeout=10)
    if status != 200:
        return {"error": f"HTTP {status}"}
    return dict(json.loads(body))


def proxy_memory(pid: int) -> dict[str, float | None]:
    rss, pss = _status_kb(pid, "status", "VmRSS"), _status_kb(pid, "smaps_rollup", "Pss")
    return {
        "rss_mb": None if rss is None else round(rss / 1024, 2),
        "pss_mb": None if pss is None else round(pss / 1024, 2),
    }


def cpu_jiffies(pid: int) -> int:
    """utime + stime of one process (0 when it is gone)."""
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def measure_capacity(port: int, path: str, seconds: float) -> dict[str, Any]:
    """Closed loop at saturation without refusals: max_ongoing + 2 clients."""
    clients = MAX_ONGOING + 2
    out = run_client("steps", seconds, port=port, path=path, steps=[[clients, seconds]])
    records = out["records"]
    capacity = rate(records, out["starts"][0] + 0.2, out["end"])
    return {
        "clients": clients,
        "capacity_rps": round(capacity, 1),
        "statuses": statuses(records),
        **latency(records),
    }


# --- (1) overload ---------------------------------------------------------------------------------
def run_overload(work: Path, quick: bool) -> dict[str, Any]:
    duration = 5.0 if quick else 60.0
    app = app_entry(
        "overload", "work", max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED
    )
    with server(work / "overload", [app]) as inst:
        port = inst.http_port
        run_client("steps", 1, port=port, path="/overload", steps=[[MAX_ONGOING, 1.0]])  # warm
        cpu_window()
        unloaded_s = 2.0 if quick else 5.0
        out = run_client("steps", unloaded_s, port=port, path="/overload", steps=[[1, unloaded_s]])
        unloaded = {**latency(out["records"]), "statuses": statuses(out["records"])}
        capacity = measure_capacity(port, "/overload", 1.5 if quick else 3.0)
        cap = capacity["capacity_rps"]
        before_stats = replica_stats(inst, "overload")
        proxy_pid = inst.proxy_pid()
        offered = OVERLOAD_FACTOR * cap
        log(
            f"  overload: unloaded p99 {unloaded['p99_ms']} ms, capacity {cap} req/s; "
            f"offering {offered:.0f} req/s for {duration:.0f} s"
        )
        out, proxy, cpu = _open_load(port, proxy_pid, offered, duration)
        after_stats = replica_stats(inst, "overload")
    records = out.pop("records")
    queue_wait_ms = 1e3 * MAX_QUEUED / cap if cap > 0 else None
    bound = (
        None
        if unloaded["p99_ms"] is None or queue_wait_ms is None
        else round(2 * unloaded["p99_ms"] + queue_wait_ms, 2)
    )
    begin = out["begin"]
    result = {
        "duration_s": duration,
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
        "unloaded": unloaded,
        "capacity": capacity,
        "offered_rps": round(offered, 1),
        "sent_rps": round(out["sent"] / duration, 1),
        "client": {k: v for k, v in out.items() if k != "begin"},
        "statuses": statuses(records),
        "refused": latency(records, 503),
        "accepted": latency(records, 200),
        "accepted_rps": round(rate(records, begin + 1.0, begin + duration), 1),
        "windows": windows(records, begin, duration, 5.0),
        "queue_wait_bound_ms": None if queue_wait_ms is None else round(queue_wait_ms, 2),
        "accepted_p99_bound_ms": bound,
        "proxy": proxy,
        "replica": {"before": before_stats, "after": after_stats},
        **cpu,
    }
    log(f"  overload: {json.dumps({k: v for k, v in result.items() if k != 'proxy'})}")
    return result


def _open_load(
    port: int, proxy: int, offered: float, duration: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The open-loop load of ``offered`` req/s with the proxy's memory sampled every
    second: (the client's result, the proxy's figures, the foreign CPU of the load)."""
    samples: list[dict[str, Any]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while True:
            samples.append({"t_s": round(time.monotonic() - t0, 2), **proxy_memory(proxy)})
            if stop.wait(1.0):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    mem_start, cpu_start, wall_start = proxy_memory(proxy), cpu_jiffies(proxy), time.monotonic()
    sampler.start()
    try:
        out = run_client(
            "open", duration, port=port, path="/overload", rate=offered, duration_s=duration
        )
    finally:
        stop.set()
        sampler.join(5)
    mem_end = proxy_memory(proxy)
    proxy_cpu = 100.0 * (cpu_jiffies(proxy) - cpu_start) / os.sysconf("SC_CLK_TCK")
    proxy_cpu /= time.monotonic() - wall_start
    cpu = cpu_window()
    time.sleep(2.0)
    mem_idle = proxy_memory(proxy)
    ten = [s for s in samples if s["t_s"] >= min(10.0, duration / 2)]
    figures = {
        "pid": proxy,
        "start": mem_start,
        "end": mem_end,
        "idle_2s_after": mem_idle,
        "cpu_core_pct": round(proxy_cpu, 1),  # the proxy's CPU during the load
        "rss_growth_mb": _growth(mem_start, mem_end, "rss_mb"),
        "pss_growth_mb": _growth(mem_start, mem_end, "pss_mb"),
        "rss_growth_from_10s_mb": _growth(ten[0] if ten else None, mem_end, "rss_mb"),
        "samples": samples,
    }
    return out, figures, cpu


def _growth(a: dict[str, Any] | None, b: dict[str, Any], key: str) -> float | None:
    return None if a is None or a[key] is None or b[key] is None else round(b[key] - a[key], 2)


# --- (2) goodput ----------------------------------------------------------------------------------
def _goodput_run(
    inst: Instance, name: str, duration: float, warmup: float, capacity: float
) -> dict[str, Any]:
    before = replica_stats(inst, name)
    out = run_client(
        "retry",
        duration + CLIENT_TIMEOUT_S,
        port=inst.http_port,
        path=f"/{name}",
        clients=GOODPUT_CLIENTS,
        duration_s=duration,
        timeout_s=CLIENT_TIMEOUT_S,
        backoff_s=list(BACKOFF_S),
    )
    time.sleep(CLIENT_TIMEOUT_S + 0.5)  # what the server still does for abandoned requests
    after = replica_stats(inst, name)
    records, begin = out["records"], out["begin"]
    goodput = rate(records, begin + warmup, begin + duration)
    ok = statuses(records).get("200", 0)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("started", "completed", "cancelled")}
    return {
        "goodput_rps": round(goodput, 1),
        "goodput_share": round(goodput / capacity, 3) if capacity > 0 else None,
        "attempts_rps": round(len(records) / duration, 1),
        "statuses": statuses(records),
        "error_kinds": out.get("error_kinds"),
        "accepted": latency(records, 200),
        "refused": latency(records, 503),
        "replica": delta,
        # handler runs nobody got an answer from: completed after the client gave up,
        # or cancelled half-way
        "wasted_runs": delta["completed"] - ok + delta["cancelled"],
    }


def run_goodput(work: Path, quick: bool) -> dict[str, Any]:
    duration, warmup = (5.0, 2.0) if quick else (20.0, 5.0)
    apps = [
        app_entry(
            "limited", "work", max_ongoing_requests=MAX_ONGOING, max_queued_requests=MAX_QUEUED
        ),
        app_entry("unlimited", "work", max_ongoing_requests=MAX_ONGOING),
    ]
    with server(work / "goodput", apps) as inst:
        for name in ("limited", "unlimited"):
            run_client("steps", 1, port=inst.http_port, path=f"/{name}", steps=[[2, 0.5]])
        cpu_window()
        capacity = measure_capacity(inst.http_port, "/limited", 1.5 if quick else 3.0)
        cap = capacity["capacity_rps"]
        log(f"  goodput: capacity {cap} req/s; {GOODPUT_CLIENTS} clients for {duration:.0f} s")
        limited = _goodput_run(inst, "limited", duration, warmup, cap)
        limited.update(cpu_window())
        log(f"  goodput (max_queued_requests={MAX_QUEUED}): {limited}")
        unlimited = _goodput_run(inst, "unlimited", duration, warmup, cap)
        unlimited.update(cpu_window())
        log(f"  goodput (no max_queued_requests): {unlimited}")
    return {
        "duration_s": duration,
        "warmup_s": warmup,
        "clients": GOODPUT_CLIENTS,
        "timeout_s": CLIENT_TIMEOUT_S,
        "backoff_s": list(BACKOFF_S),
        "max_queued_requests": MAX_QUEUED,
        "capacity": capacity,
        "limited": limited,
        "unlimited": unlimited,
        **{k: limited[k] for k in ("foreign_cpu_pct", "foreign_core_pct", "invalid")},
    }


def _autoscaling_ready() -> str | None:
    """Why autoscaling cannot be measured in this tree, or None."""
    from shoal._config import NOT_SUPPORTED_YET

    if "autoscaling_config" in NOT_SUPPORTED_YET:
        return "autoscaling_config is refused in this tree (shoal._config.NOT_SUPPORTED_YET)"
    return None


# --- (3) step load ------------------------------------------------------------------------------
def run_autoscale(work: Path, quick: bool) -> dict[str, Any]:
    reason = _autoscaling_ready()
    if reason:
        return {"available": False, "reason": reason}
    config = dict(AUTOSCALING)
    needed = STEP_HIGH // int(config["target_ongoing_requests"])
    low_s, high_s = (3.0, 12.0) if quick else (6.0, 20.0)
    down_s = config["downscale_delay_s"] + (6.0 if quick else 10.0)
    app = app_entry(
        "autoscale", "slow_work", max_ongoing_requests=STEP_MAX_ONGOING, autoscaling_config=config
    )
    with server(work / "autoscale", [app]) as inst:
        run_client("steps", 1, port=inst.http_port, path="/autoscale", steps=[[1, 0.5]])
        cpu_window()
        steps = [[STEP_LOW, low_s], [STEP_HIGH, high_s], [STEP_LOW, down_s]]
        log(f"  autoscale: clients {steps} (clients, seconds); needed at 8x: {needed}")
        with ReplicaPoller(inst, "autoscale") as poller:
            out = run_client(
                "steps",
                low_s + high_s + down_s,
                port=inst.http_port,
                path="/autoscale",
                steps=steps,
            )
            time.sleep(0.3)
        cpu = cpu_window()
    result = {
        "available": True,
        "autoscaling_config": config,
        "max_ongoing_requests": STEP_MAX_ONGOING,
        "clients": [STEP_LOW, STEP_HIGH, STEP_LOW],
        "step_s": [low_s, high_s, down_s],
        **analyse_steps(
            poller.samples,
            out["records"],
            out["starts"],
            out["end"],
            needed,
            config,
            poller.extra.get("scaling_decisions") or (),
            time.time() - time.monotonic(),
        ),
        "error_kinds": out.get("error_kinds"),
        **cpu,
    }
    log(f"  autoscale: {result}")
    return result


# --- (4) scale from zero ------------------------------------------------------------------------
def run_zero(work: Path, quick: bool) -> dict[str, Any]:
    reason = _autoscaling_ready()
    if reason:
        return {"available": False, "reason": reason}
    from shoal._config import AutoscalingConfig

    config = {k: v for k, v in ZERO_AUTOSCALING.items() if k in AutoscalingConfig.model_fields}
    repeats = 1 if quick else 3
    zero = app_entry("zero", "work", max_ongoing_requests=MAX_ONGOING, autoscaling_config=config)
    cold = app_entry("cold", "work", max_ongoing_requests=MAX_ONGOING, num_replicas=1)
    with server(work / "zero", [zero]) as inst:
        cpu_window()
        cold_start, deployed = _cold_start(inst, [zero, cold])
        runs: list[dict[str, Any]] = []
        for i in range(repeats):
            try:
                wait_for(lambda: _at_zero(inst), 60, "zero replicas", 0.1)
            except TimeoutError as exc:
                runs.append({"error": str(exc)})
                break
            run = _from_zero(inst)
            runs.append(run)
            log(f"  zero #{i + 1}: {run}")
        cpu = cpu_window()
    latencies = [float(r["latency_s"]) for r in runs if r.get("status") == 200]
    bound = cold_start + 0.5
    result = {
        "available": True,
        "autoscaling_config": config,
        "cold_start_s": round(cold_start, 3),  # the cold replica: listed -> RUNNING
        "cold_deploy_s": round(deployed, 3),  # PUT returned -> the cold app RUNNING
        "runs": runs,
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_max_s": max(latencies) if latencies else None,
        "bound_s": round(bound, 3),
        "met": bool(latencies) and len(latencies) == len(runs) and max(latencies) <= bound,
        **cpu,
    }
    log(f"  zero: {result}")
    return result


def _cold_start(inst: Instance, apps: list[dict[str, Any]]) -> tuple[float, float]:
    """Deploys ``apps`` (``zero`` and ``cold``, its 1-replica twin): (cold's replica
    listed -> RUNNING, ``PUT`` returned -> both RUNNING), in s."""
    config_all = {"http_options": {"host": HOST, "port": inst.http_port}, "applications": apps}
    with ReplicaPoller(inst, "cold", 0.02) as cold_poll:
        inst.put(config_all)
        put_returned = time.perf_counter()
        ready = wait_for(lambda: inst.converged(["zero", "cold"]), 300, "cold RUNNING", 0.01)
    deployed = ready - put_returned
    lives = list(replica_lives(cold_poll.samples).values())
    cold_start = lives[0].start_s if lives else None
    if cold_start is None:
        raise RuntimeError("the cold application's replica was never seen RUNNING")
    return cold_start, deployed


def _at_zero(inst: Instance) -> bool:
    app = inst.details()["applications"]["zero"]
    return not next(iter(app["deployments"].values())).get("replicas")


def _from_zero(inst: Instance) -> dict[str, Any]:
    """One ``GET /zero`` at zero replicas: its status and latency, and when its replica
    was listed and RUNNING."""
    with ReplicaPoller(inst, "zero", 0.02) as poller:
        sent = time.monotonic()
        status: int | str
        try:
            status, _ = _http(inst.http_port, "GET", "/zero", timeout=60)
        except OSError as exc:
            status = type(exc).__name__
        took = time.monotonic() - sent
        time.sleep(0.1)
    life = next(iter(replica_lives(poller.samples).values()), None)
    run: dict[str, Any] = {"status": status, "latency_s": round(took, 3)}
    if life is not None:
        run["replica_listed_after_s"] = round(life.first_seen - sent, 3)
        if life.first_running is not None:
            run["replica_running_after_s"] = round(life.first_running - sent, 3)
            # what the path from zero added to the replica's own start
            own = life.first_running - life.first_seen
            run["beyond_replica_start_s"] = round(took - own, 3)
    return run


RUNNERS: dict[str, Callable[[Path, bool], dict[str, Any]]] = {
    "overload": run_overload,
    "goodput": run_goodput,
    "autoscale": run_autoscale,
    "zero": run_zero,
}
