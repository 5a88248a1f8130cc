"""The measurements: HTTP workloads (shoal and references), handle round trip, cold start
and idle RSS. Each section starts its own server processes and always stops them."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import BUSINESS_DB_ENV, ECHO_BODY, median_or_none
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.procs import (
    HOST,
    INVALID_CORE_PCT,
    ForeignCpu,
    ServerProcess,
    descendants,
    free_port,
    http_request,
    process_roles,
    tree_memory,
)

READY_DEADLINE_S = 60.0

Log = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    duration_s: float
    repeats: int
    warmup_s: float
    loadgen: str  # "wrk" or "python"
    cold_runs: int
    idle_wait_s: float
    handle_n: int
    handle_par_calls: int
    handle_repeats: int
    log_dir: Path
    compiled_ahead: bool = False  # servers read shoal's modules compiled (procs.compile_ahead)
    ramp_steps: tuple[int, ...] = (1, 8, 32, 64, 32, 8, 1)  # W3-latency load ramp (connections)
    stream_requests: int = 50  # first-chunk requests per stream server
    stream_items: int = 200_000  # items of the stream-rate run


@dataclass(frozen=True)
class Workload:
    key: str
    app: str  # attribute of bench.apps
    method: str
    path: str
    body: bytes | None
    concurrencies: tuple[int, ...]
    references: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()
    # Drive shoal at its direct ingress port (``--direct-ingress-port``: the ingress replicas
    # serve HTTP themselves) instead of the proxy's; the references are driven as usual.
    direct: bool = False


PREDICT_BODY = b'{"user_id": 7, "context": {"petal_length_cm": 5.1}}'

WORKLOADS: dict[str, Workload] = {
    "W1": Workload(
        "W1", "w1", "POST", "/echo", ECHO_BODY, (1, 8, 64),
        ("starlette", "starlette-2w", "fastapi"),
    ),
    # W1 with every deployment option at its default (max_ongoing_requests: 5, Ray Serve's):
    # issue 15's W1 throughput target is set "with defaults".
    "W1-defaults": Workload(
        "W1-defaults", "w1_defaults", "POST", "/echo", ECHO_BODY, (1, 64), ("starlette",)
    ),
    "W1-fastapi": Workload(
        "W1-fastapi", "bench.apps_fastapi:w1_fastapi", "POST", "/echo", ECHO_BODY, (1, 64),
        ("fastapi",),
    ),
    "W2": Workload("W2", "w2", "POST", "/w2", ECHO_BODY, (1, 64), ("fastapi",)),
    "W4": Workload("W4", "w4", "GET", "/w4", None, (1, 32), ("fastapi",)),
    "business": Workload(
        "business", "bench.apps_fastapi:business", "POST", "/predict", PREDICT_BODY, (16,), (),
        headers=(("x-api-key", "demo-key"),),
    ),
}  # fmt: skip
# W1, W1-defaults, W2 and W4 again (same app, concurrencies and references), through direct
# ingress.
WORKLOADS.update(
    {
        f"{k}-direct": replace(WORKLOADS[k], key=f"{k}-direct", direct=True)
        for k in ("W1", "W1-defaults", "W2", "W4")
    }
)


def shoal_server(
    app: str, port: int, log_dir: Path, tag: str = "", direct_port: int | None = None
) -> ServerProcess:
    """``python -m shoal run <module:attr>``; a bare name is an attribute of bench.apps.
    With ``direct_port``, the app's ingress replicas also accept HTTP on it (direct ingress)."""
    target = app if ":" in app else f"bench.apps:{app}"
    argv = [sys.executable, "-m", "shoal", "run", target]
    # Any free admin port: servers run side by side (and other shoal instances may hold 8265).
    argv += ["--host", HOST, "--port", str(port), "--admin-port", "0"]
    if direct_port is not None:
        argv += ["--direct-ingress-port", str(direct_port)]
    env = {BUSINESS_DB_ENV: str(log_dir / f"business{tag}.sqlite3")}  # read by apps_fastapi only
    return ServerProcess(f"shoal-{app.rpartition(':')[2]}{tag}", argv, log_dir, env)


# Reference server name -> (framework of bench.reference, uvicorn worker processes).
REFERENCES: dict[str, tuple[str, int]] = {
    "starlette": ("starlette", 1),
    "starlette-2w": ("starlette", 2),  # uvicorn --workers 2: a supervisor and 2 workers
    "fastapi": ("fastapi", 1),
}


def reference_server(name: str, port: int, log_dir: Path, tag: str = "") -> ServerProcess:
    """A reference of ``REFERENCES`` (``python -m bench.reference FRAMEWORK [--workers N]``)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference server {name!r}; choose from {sorted(REFERENCES)}")
    framework, workers = REFERENCES[name]
    argv = [sys.executable, "-m", "bench.reference", framework, "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return ServerProcess(f"{name}{tag}", argv, log_dir)


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-4000:]


# --- HTTP workloads -----------------------------------------------------------------------
def aggregate(runs: list[LoadResult]) -> dict[str, Any]:
    """Sum counts and take medians of rates and latencies over repeated runs."""
    return {
        "requests": sum(r.requests for r in runs),
        "errors": sum(r.errors for r in runs),
        "throughput_rps": median_or_none(r.throughput_rps for r in runs),
        "p50_ms": median_or_none(r.p50_ms for r in runs),
        "p90_ms": median_or_none(r.p90_ms for r in runs),
        "p99_ms": median_or_none(r.p99_ms for r in runs),
        "mean_ms": median_or_none(r.mean_ms for r in runs),
        "runs": [r.to_dict() for r in runs],
    }


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --- one measured load run: foreign CPU (validity) and CPU per process ------------------------
@dataclass(frozen=True)
class Measured:
    """A measured load run, with the foreign CPU during it (% of one core), the CPU seconds
    of each process of the server under load (by role) and of the load generator."""

    result: LoadResult
    foreign_core_pct: float
    cpu_s: dict[str, float]
    loadgen_cpu_s: float

    @property
    def valid(self) -> bool:
        return self.foreign_core_pct <= INVALID_CORE_PCT

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "foreign_core_pct": self.foreign_core_pct,
            "valid": self.valid,
            "cpu_s": self.cpu_s,
            "loadgen_cpu_s": round(self.loadgen_cpu_s, 4),
        }


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_load(meter: ForeignCpu, root: int, run: Callable[[], LoadResult]) -> Measured:
    """Run ``run`` (one load run against the server whose pid is ``root``) in a window of
    ``meter`` (whose roots are every server up: idle ones are the bench's, not foreign)."""
    meter.window()  # starts the window
    children = _children_cpu_s()
    result = run()
    loadgen = _children_cpu_s() - children  # the load generator: the only child reaped meanwhile
    cpu = meter.window()
    roles = process_roles(root, [root, *descendants(root)])
    per_role = {role: round(meter.processes.get(pid, 0.0), 3) for pid, role in roles.items()}
    return Measured(result, cpu["foreign_core_pct"], per_role, loadgen)


def aggregate_measured(measured: list[Measured]) -> dict[str, Any]:
    """``aggregate`` over the valid runs (all of them, marked not valid, when none is);
    requests and errors summed over all runs; CPU per request per process over the runs
    the medians use: their CPU seconds / their successful requests, in microseconds."""
    valid = [m for m in measured if m.valid]
    used = valid or measured
    out = aggregate([m.result for m in used])
    served = sum(m.result.requests - m.result.errors for m in used)
    seconds = sum(m.result.duration_s for m in used)
    roles = sorted({role for m in used for role in m.cpu_s}, key=_role_order)
    per_role = {r: sum(m.cpu_s.get(r, 0.0) for m in used) for r in roles}
    total = sum(per_role.values())

    def us(cpu: float) -> float | None:
        return round(cpu / served * 1e6, 1) if served else None

    out.update(
        requests=sum(m.result.requests for m in measured),
        errors=sum(m.result.errors for m in measured),
        valid=bool(valid),
        runs_valid=len(valid),
        foreign_core_pct=[m.foreign_core_pct for m in measured],
        cpu_us_per_request={r: us(cpu) for r, cpu in per_role.items()},
        server_cpu_us_per_request=us(total),
        loadgen_cpu_us_per_request=us(sum(m.loadgen_cpu_s for m in used)),
        server_cores=round(total / seconds, 2) if seconds else None,
        runs=[m.to_dict() for m in measured],
    )
    return out


def _role_order(role: str) -> tuple[int, str]:
    order = ("server", "proxy", "replica", "worker", "fork-server")
    first = role.rpartition("-")[0] if role[-1:].isdigit() else role
    return (order.index(first) if first in order else len(order), role)


def validity_note(point: dict[str, Any]) -> str:
    runs = point.get("runs", [])
    foreign = "/".join(f"{v:.0f}" for v in point.get("foreign_core_pct", []))
    note = f"foreign {foreign}% of a core"
    if point.get("runs_valid", len(runs)) < len(runs):
        note += f", valid runs {point['runs_valid']}/{len(runs)}"
    return note + ("" if point.get("valid", True) else " NOT VALID")


@dataclass
class _Live:
    """One server of a workload section, with its runs for the current concurrency."""

    name: str
    proc: ServerProcess
    port: int  # the port driven: shoal's direct ingress port for a ``direct`` workload
    runs: list[Measured]
    error: str | None = None


def _start_servers(wl: Workload, settings: Settings, log: Log, servers: list[_Live]) -> None:
    """Start shoal and the references (appending to ``servers``), then wait for each."""
    for name in ("shoal", *wl.references):
        port = free_port()
        if name == "shoal" and wl.direct:
            # The proxy keeps ``port`` (idle, still in the CPU table); the load goes to ``direct``.
            direct = next(p for p in iter(free_port, None) if p != port)
            proc = shoal_server(wl.app, port, settings.log_dir, "-direct", direct)
            port = direct
        elif name == "shoal":
            proc = shoal_server(wl.app, port, settings.log_dir)
        else:
            proc = reference_server(name, port, settings.log_dir, tag=f"-{wl.key}")
        servers.append(_Live(name, proc, port, []))
        proc.start()
    for server in servers:
        try:
            server.proc.wait_http_ok(
                server.port, wl.method, wl.path, wl.body, READY_DEADLINE_S, wl.headers
            )
            server.proc.remember_tree()
        except Exception as exc:
            _fail(server, exc, wl, log)
    for server in servers:  # every server's start-up work done before any is measured
        if server.error is None and not server.proc.wait_quiet():
            log(f"  {server.name}: still busy 20 s after it answered; measured anyway")


def _fail(server: _Live, exc: BaseException, wl: Workload, log: Log) -> None:
    server.error = error_text(exc)
    log(f"  {wl.key} {server.name}: FAILED: {server.error.splitlines()[0]}")
    log(f"  (server log: {server.proc.log_path})")
    server.proc.stop()


def _round(
    wl: Workload,
    servers: list[_Live],
    concurrency: int,
    duration: float,
    settings: Settings,
    log: Log,
    meter: ForeignCpu | None = None,
) -> list[tuple[_Live, Measured]]:
    """One load run against each live server, one after the other (measured with ``meter``;
    without it a warm-up whose figures are dropped)."""
    out = []
    for server in servers:
        if server.error is not None:
            continue
        spec = LoadSpec(
            server.port, wl.path, wl.method, wl.body, concurrency, duration, headers=wl.headers
        )
        try:
            if meter is None:
                run_load(spec, settings.loadgen)
                continue
            run = measured_load(meter, server.proc.pid, partial(run_load, spec, settings.loadgen))
            out.append((server, run))
        except Exception as exc:
            _fail(server, exc, wl, log)
    return out  # fmt: skip


def _measure_concurrency(
    wl: Workload, servers: list[_Live], concurrency: int, settings: Settings, log: Log
) -> list[dict[str, Any]]:
    """Warm every live server up, then run the repeats round-robin across the servers."""
    for server in servers:
        server.runs = []
    meter = ForeignCpu(interval_s=None)  # read between runs only: no sampling during them
    meter.roots.update(s.proc.pid for s in servers if s.error is None)
    if settings.warmup_s > 0:
        _round(wl, servers, concurrency, settings.warmup_s, settings, log)  # not measured
    for _ in range(settings.repeats):
        rounds = _round(wl, servers, concurrency, settings.duration_s, settings, log, meter)
        for server, run in rounds:
            server.runs.append(run)
    points = []
    for server in servers:
        point: dict[str, Any] = {"workload": wl.key, "server": server.name}
        point["concurrency"] = concurrency
        if server.error is not None:
            points.append({**point, "error": server.error})
            continue
        points.append({**point, **aggregate_measured(server.runs)})
        log(
            f"  {wl.key} {server.name:<12} c={concurrency:<3} "
            f"{fmt(points[-1]['throughput_rps'], 0):>8} req/s  "
            f"p50 {fmt(points[-1]['p50_ms'], 3)} ms  p99 {fmt(points[-1]['p99_ms'], 3)} ms  "
            f"errors {points[-1]['errors']}  {validity_note(points[-1])}"
        )
    return points


def run_workload(wl: Workload, settings: Settings, log: Log) -> list[dict[str, Any]]:
    """All servers of the workload up at once (idle ones cost ~nothing); runs interleaved."""
    via = " (shoal via direct ingress)" if wl.direct else ""
    log(f"{wl.key}: {wl.method} {wl.path} at c={list(wl.concurrencies)}{via}")
    servers: list[_Live] = []
    try:
        _start_servers(wl, settings, log, servers)
        points: list[dict[str, Any]] = []
        for concurrency in wl.concurrencies:
            points += _measure_concurrency(wl, servers, concurrency, settings, log)
        return points
    finally:
        for server in servers:
            server.proc.stop()


# --- handle round trip --------------------------------------------------------------------
def _get_json(port: int, path: str, timeout: float = 120.0) -> dict[str, Any]:
    status, payload = http_request(port, "GET", path, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"GET {path} -> HTTP {status}: {payload[:300]!r}")
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise RuntimeError(f"GET {path} -> unexpected JSON {data!r}")
    return data


def _handle_measures(port: int, settings: Settings, root: int) -> dict[str, Any]:
    """The handle section's runs; each records the foreign CPU meanwhile, and the medians
    are over the valid runs (over all, marked not valid, when none is)."""
    n, calls = settings.handle_n, settings.handle_par_calls
    _get_json(port, f"/?mode=seq&n={min(n, 500)}")  # warm-up
    _get_json(port, f"/?mode=par&n={min(calls, 640)}&inflight=64")
    meter = ForeignCpu(interval_s=None)
    meter.roots.add(root)
    try:
        seq = [_metered(meter, port, f"/?mode=seq&n={n}") for _ in range(settings.handle_repeats)]
        par = [_metered(meter, port, f"/?mode=par&n={calls}&inflight=64")
               for _ in range(settings.handle_repeats)]  # fmt: skip
    finally:
        meter.close()
    valid_seq = [r for r in seq if r["foreign_core_pct"] <= INVALID_CORE_PCT]
    valid_par = [r for r in par if r["foreign_core_pct"] <= INVALID_CORE_PCT]
    all_runs = {"seq": seq, "par": par}
    seq, par = valid_seq or seq, valid_par or par
    return {
        "valid": bool(valid_seq) and bool(valid_par),
        "runs_valid": len(valid_seq) + len(valid_par),
        "runs_total": len(all_runs["seq"]) + len(all_runs["par"]),
        "sequential_calls": n,
        "p50_us": median_or_none(float(r["p50_us"]) for r in seq),
        "p90_us": median_or_none(float(r["p90_us"]) for r in seq),
        "p99_us": median_or_none(float(r["p99_us"]) for r in seq),
        "mean_us": median_or_none(float(r["mean_us"]) for r in seq),
        "inflight": 64,
        "parallel_calls": int(par[0]["calls"]),
        "calls_per_s": median_or_none(float(r["calls_per_s"]) for r in par),
        "runs": all_runs,
    }


def _metered(meter: ForeignCpu, port: int, path: str) -> dict[str, Any]:
    """One run of the handle bench (``GET path``) and the foreign CPU (% of a core) meanwhile."""
    meter.window()  # starts the window
    result = _get_json(port, path)
    return {**result, "foreign_core_pct": meter.window()["foreign_core_pct"]}


def run_handle(settings: Settings, log: Log) -> dict[str, Any]:
    log("handle: A -> B noop round trip (measured inside replica A)")
    port = free_port()
    proc = shoal_server("handle_rtt", port, settings.log_dir)
    try:
        proc.start()
        proc.wait_http_ok(port, "GET", "/?mode=seq&n=1", None, READY_DEADLINE_S)
        proc.remember_tree()
        if not proc.wait_quiet():
            log("  still busy 20 s after it answered; measured anyway")
        result = _handle_measures(port, settings, proc.pid)
        log(
            f"  p50 {fmt(result['p50_us'], 1)} us  p99 {fmt(result['p99_us'], 1)} us  "
            f"64 in flight: {fmt(result['calls_per_s'], 0)} calls/s"
        )
        return result
    except Exception as exc:
        log(f"  handle: FAILED: {error_text(exc).splitlines()[0]} (log: {proc.log_path})")
        return {"error": error_text(exc)}
    finally:
        proc.stop()


# --- cold start and idle RSS ---------------------------------------------------------------
def _one_cold_start(run: int, settings: Settings, measure_rss: bool) -> dict[str, Any]:
    port = free_port()
    proc = shoal_server("w1", port, settings.log_dir, tag=f"-cold{run}")
    wl = WORKLOADS["W1"]
    try:
        started = time.perf_counter()
        proc.start()
        ready = proc.wait_http_ok(port, wl.method, wl.path, wl.body, READY_DEADLINE_S)
        sample: dict[str, Any] = {"seconds": ready - started}
        proc.remember_tree()
        if measure_rss:
            time.sleep(settings.idle_wait_s)
            proc.remember_tree()
            sample["memory"] = tree_memory(proc.pid)
        return sample
    finally:
        proc.stop()


def run_cold_start(
    settings: Settings, log: Log, measure_cold: bool, measure_rss: bool
) -> dict[str, Any]:
    """Cold start of ``python -m shoal run bench.apps:w1`` (median of N) and idle RSS."""
    runs = settings.cold_runs if measure_cold else 1
    log(f"cold start / idle RSS: {runs} launch(es) of python -m shoal run bench.apps:w1")
    out: dict[str, Any] = {}
    try:
        if measure_cold:  # not measured: the first launch fills the page cache
            _one_cold_start(-1, settings, measure_rss=False)
        samples = [_one_cold_start(i, settings, measure_rss) for i in range(runs)]
    except Exception as exc:
        log(f"  FAILED: {error_text(exc).splitlines()[0]}")
        error = {"error": error_text(exc)}
        return {
            "cold_start": error if measure_cold else None,
            "idle_rss": error if measure_rss else None,
        }
    if measure_cold:
        times = [s["seconds"] for s in samples]
        out["cold_start"] = {
            "runs": times, "median_s": statistics.median(times), "warmup_launches": 1,
            "compiled_ahead": settings.compiled_ahead,
        }  # fmt: skip
        log(f"  cold start median {statistics.median(times):.3f} s  runs {times}")
    if measure_rss:
        mems = [s["memory"] for s in samples]
        rss = statistics.median(m["rss_mb"] for m in mems)
        pss = median_or_none(m["pss_mb"] for m in mems)
        out["idle_rss"] = {
            "idle_wait_s": settings.idle_wait_s,
            "rss_mb": rss,
            "pss_mb": pss,
            "processes": mems[-1]["processes"],
            "samples": mems,
        }
        log(f"  idle RSS {rss:.1f} MB over {mems[-1]['processes']} processes (PSS {fmt(pss, 1)})")
    return out
