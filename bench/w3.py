"""W3, request batching: shoal's ``@serve.batch`` against a hand-written asyncio batcher.

Servers (all up together, runs interleaved as in the other workloads):

* ``W3 shoal``: ``bench.apps:w3``, ``@serve.batch(max_batch_size=32,
  batch_wait_timeout_s=0.005)`` over a handler that sleeps 10 ms + 0.1 ms per item;
* ``W3 starlette``: the same handler behind ``bench.batcher.Batcher`` in one bare Starlette
  process (``python -m bench.reference starlette``);
* ``W3-latency shoal``: ``bench.apps:w3_latency``, the same handler with
  ``@serve.batch(max_batch_size=64, target_latency_s=0.05)``.

Every server answers ``GET /w3/stats`` with its batch counters; the mean batch size of a
point is (requests / batches) formed during its measured runs. The latency-target app is
also driven through a load ramp (1 -> 64 -> 1 connections), reading what its planner chose
between steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from bench.common import ECHO_BODY
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.procs import INVALID_CORE_PCT, ForeignCpu, ServerProcess, free_port, http_request
from bench.suite import (
    READY_DEADLINE_S,
    Log,
    Measured,
    Settings,
    aggregate_measured,
    error_text,
    fmt,
    measured_load,
    reference_server,
    shoal_server,
    validity_note,
)

W3_PATH = "/w3"
STATS_PATH = "/w3/stats"
HIGH_C, LOW_C = 64, 1


def get_stats(port: int) -> dict[str, Any]:
    """The server's batch counters (shoal: ``dataclasses.asdict(batch_stats())``)."""
    status, payload = http_request(port, "GET", STATS_PATH, timeout=10.0)
    if status != 200:
        raise RuntimeError(f"GET {STATS_PATH} -> HTTP {status}: {payload[:200]!r}")
    data = json.loads(payload)
    if not isinstance(data, dict) or "batches" not in data:
        raise RuntimeError(f"GET {STATS_PATH}: unexpected answer {payload[:200]!r}")
    return data


def batch_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    """(batches, requests) formed between two stats snapshots."""
    return after["batches"] - before["batches"], after["requests"] - before["requests"]


def mean_size(deltas: list[tuple[int, int]]) -> float | None:
    batches = sum(b for b, _ in deltas)
    return sum(r for _, r in deltas) / batches if batches else None


def measured_run(port: int, concurrency: int, duration: float, kind: str) -> tuple[
    LoadResult, tuple[int, int], dict[str, Any]
]:  # fmt: skip
    """One load run on ``POST /w3``, with the batches formed during it and the stats after."""
    before = get_stats(port)
    result = run_load(LoadSpec(port, W3_PATH, "POST", ECHO_BODY, concurrency, duration), kind)
    after = get_stats(port)
    return result, batch_delta(before, after), after


def run_ramp(
    port: int, steps: tuple[int, ...], step_s: float, kind: str, meter: ForeignCpu | None = None
) -> list[dict[str, Any]]:
    """Drive ``POST /w3`` at each concurrency in turn; after each step, read what the batcher
    did (mean size of the batches formed in the step) and chose (its latency plan); with
    ``meter``, each step's foreign CPU (% of one core) and validity too."""
    out = []
    for concurrency in steps:
        if meter is not None:
            meter.window()
        result, (batches, requests), after = measured_run(port, concurrency, step_s, kind)
        foreign = None if meter is None else meter.window()["foreign_core_pct"]
        plan = after.get("latency") or {}
        wait = plan.get("max_wait_s")
        out.append(
            {
                "concurrency": concurrency,
                "throughput_rps": result.throughput_rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "requests": result.requests,
                "errors": result.errors,
                "batches": batches,
                "batch_size_mean": requests / batches if batches else None,
                "plan_batch_size": plan.get("batch_size", after.get("max_batch_size")),
                "plan_max_wait_ms": None if wait is None else wait * 1e3,
                "arrival_rate_per_s": plan.get("arrival_rate_per_s"),
                "cost_fitted": plan.get("cost_fitted"),
                "foreign_core_pct": foreign,
                "valid": None if foreign is None else foreign <= INVALID_CORE_PCT,
            }
        )
    return out


@dataclass
class _Server:
    workload: str
    name: str
    proc: ServerProcess
    port: int
    runs: list[Measured] = field(default_factory=list)
    deltas: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None


def _start(specs: list[tuple[str, str, str]], settings: Settings, log: Log) -> list[_Server]:
    servers = []
    for workload, name, app in specs:
        port = free_port()
        if name == "shoal":
            proc = shoal_server(app, port, settings.log_dir)
        else:
            proc = reference_server(name, port, settings.log_dir, tag="-W3")
        servers.append(_Server(workload, name, proc, port))
        proc.start()
    for server in servers:
        try:
            server.proc.wait_http_ok(server.port, "POST", W3_PATH, ECHO_BODY, READY_DEADLINE_S)
            server.proc.remember_tree()
        except Exception as exc:
            _fail(server, exc, log)
    for server in servers:  # every server's start-up work done before any is measured
        if server.error is None and not server.proc.wait_quiet():
            log(f"  {server.name}: still busy 20 s after it answered; measured anyway")
    return servers


def _fail(server: _Server, exc: BaseException, log: Log) -> None:
    server.error = error_text(exc)
    log(f"  {server.workload} {server.name}: FAILED: {server.error.splitlines()[0]}")
    log(f"  (server log: {server.proc.log_path})")
    server.proc.stop()


def _block(
    servers: list[_Server], concurrency: int, settings: Settings, log: Log
) -> list[dict[str, Any]]:
    """Warm-up, then the repeats round-robin over the servers; one point per server."""
    meter = ForeignCpu(interval_s=None)  # read between runs only
    meter.roots.update(s.proc.pid for s in servers if s.error is None)
    for server in servers:
        server.runs, server.deltas = [], []
    rounds = [(settings.warmup_s, False)] if settings.warmup_s > 0 else []
    rounds += [(settings.duration_s, True)] * settings.repeats
    for duration, measured in rounds:
        for server in (s for s in servers if s.error is None):
            spec = LoadSpec(server.port, W3_PATH, "POST", ECHO_BODY, concurrency, duration)
            try:
                before = get_stats(server.port)
                run = measured_load(
                    meter, server.proc.pid, partial(run_load, spec, settings.loadgen)
                )
                after = get_stats(server.port)
            except Exception as exc:
                _fail(server, exc, log)
                continue
            if measured:
                server.runs.append(run)
                server.deltas.append(batch_delta(before, after))
    points = []
    for server in servers:
        point: dict[str, Any] = {"workload": server.workload, "server": server.name}
        point.update(concurrency=concurrency)
        if server.error is not None:
            points.append({**point, "error": server.error})
            continue
        point.update(aggregate_measured(server.runs))
        valid = [d for run, d in zip(server.runs, server.deltas, strict=True) if run.valid]
        deltas = valid or server.deltas  # the runs the medians use
        point["batches"] = sum(b for b, _ in deltas)
        point["batch_size_mean"] = mean_size(deltas)
        points.append(point)
        log(
            f"  {server.workload:<10} {server.name:<9} c={concurrency:<3} "
            f"{fmt(point['throughput_rps'], 0):>6} req/s  p50 {fmt(point['p50_ms'], 2)} ms  "
            f"p99 {fmt(point['p99_ms'], 2)} ms  mean batch {fmt(point['batch_size_mean'], 1)}  "
            f"errors {point['errors']}  {validity_note(point)}"
        )
    return points


def run_w3(settings: Settings, log: Log, fixed: bool, latency: bool) -> dict[str, Any]:
    """W3 (fixed batching vs the hand-written batcher, c=64) and/or W3-latency (c=1, c=64
    against the fixed configuration, then the ramp). Returns points and the ramp."""
    specs = [("W3", "shoal", "w3")]  # the fixed configuration: W3-latency compares with it
    if fixed:
        specs.append(("W3", "starlette", "starlette"))
    if latency:
        specs.append(("W3-latency", "shoal", "w3_latency"))
    log(f"W3: POST {W3_PATH} batched, servers {[f'{w} {n}' for w, n, _ in specs]}")
    servers: list[_Server] = []
    out: dict[str, Any] = {"points": []}
    try:
        servers = _start(specs, settings, log)
        out["points"] += _block(servers, HIGH_C, settings, log)
        if latency:
            shoal_only = [s for s in servers if s.name == "shoal"]
            out["points"] += _block(shoal_only, LOW_C, settings, log)
            target = servers[-1]
            meter = ForeignCpu(interval_s=None)  # every W3 server up is the bench's
            meter.roots.update(s.proc.pid for s in servers if s.error is None)
            out["ramp"] = _ramp(target, settings, log, meter)
        return out
    finally:
        for server in servers:
            server.proc.stop()


def _ramp(server: _Server, settings: Settings, log: Log, meter: ForeignCpu) -> dict[str, Any]:
    steps = settings.ramp_steps
    step_s = settings.duration_s
    log(f"  W3-latency ramp: {list(steps)} connections, {step_s:g} s each")
    if server.error is not None:
        return {"error": server.error}
    try:
        rows = run_ramp(server.port, steps, step_s, settings.loadgen, meter)
    except Exception as exc:
        _fail(server, exc, log)
        return {"error": error_text(exc)}
    for row in rows:
        log(
            f"    c={row['concurrency']:<3} {fmt(row['throughput_rps'], 0):>6} req/s  "
            f"p50 {fmt(row['p50_ms'], 2)} ms  p99 {fmt(row['p99_ms'], 2)} ms  "
            f"mean batch {fmt(row['batch_size_mean'], 1)}  plan size {row['plan_batch_size']} "
            f"wait {fmt(row['plan_max_wait_ms'], 2)} ms  "
            f"foreign {fmt(row['foreign_core_pct'], 0)}% of a core"
            f"{'' if row['valid'] else ' NOT VALID'}"
        )
    return {"server": "W3-latency shoal", "step_s": step_s, "steps": rows}
