"""Cheap smoke tests of the benchmark suite's own pieces (bench/), without shoal servers.

Starts one reference Starlette server on a free 127.0.0.1 port, drives it for about a
second with each load generator, checks the hand-written W3 batcher, the ramp and the
streaming clients against it, and checks the report writer and the process helpers;
bench.overload's load clients run against the same server, its figures on synthetic data.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent

from bench import loadgen, observability, report  # noqa: E402
from bench.__main__ import parse_only  # noqa: E402
from bench.batcher import Batcher  # noqa: E402
from bench.common import percentile  # noqa: E402
from bench.procs import (  # noqa: E402
    INVALID_CORE_PCT,
    BackgroundCpu,
    ForeignCpu,
    ServerProcess,
    descendants,
    free_port,
    http_request,
    is_alive,
    process_roles,
    tree_memory,
)
from bench.stream import count_stream, first_chunks, run_async  # noqa: E402
from bench.suite import (  # noqa: E402
    WORKLOADS,
    Measured,
    aggregate,
    aggregate_measured,
    measured_load,
    reference_server,
    shoal_server,
)
from bench.w3 import get_stats, run_ramp  # noqa: E402

BODY = b'{"x": 1}'


@pytest.fixture(scope="module")
def starlette_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    server = reference_server("starlette", port, tmp_path_factory.mktemp("logs"))
    server.start()
    pid = server.pid
    try:
        server.wait_http_ok(port, "POST", "/echo", BODY, deadline_s=15.0)
        yield server, port
    finally:
        server.stop()
    assert not is_alive(pid)


@pytest.fixture(scope="module")
def starlette_port(starlette_server: tuple[ServerProcess, int]) -> int:
    return starlette_server[1]


def _check_clean_run(result: loadgen.LoadResult) -> None:
    assert result.requests > 10
    assert result.errors == 0
    assert result.throughput_rps > 0
    assert result.p50_ms is not None and result.p99_ms is not None
    assert 0 < result.p50_ms <= result.p99_ms


def test_python_loadgen_against_starlette(starlette_port: int) -> None:
    spec = loadgen.LoadSpec(starlette_port, "/echo", "POST", BODY, concurrency=4, duration_s=1.0)
    started = time.perf_counter()
    result = loadgen.run_load(spec, "python")
    assert time.perf_counter() - started < 10
    _check_clean_run(result)
    assert result.generator == "bench.loadgen"


@pytest.mark.skipif(loadgen.wrk_path() is None, reason="wrk not installed")
def test_wrk_loadgen_against_starlette(starlette_port: int) -> None:
    spec = loadgen.LoadSpec(starlette_port, "/echo", "POST", BODY, concurrency=2, duration_s=1.0)
    result = loadgen.run_load(spec, "wrk")
    _check_clean_run(result)
    assert result.generator == "wrk"


def test_loadgen_counts_http_errors(starlette_port: int) -> None:
    spec = loadgen.LoadSpec(starlette_port, "/missing", "GET", None, concurrency=2, duration_s=0.5)
    result = loadgen.run_load(spec, "python")
    assert result.requests > 0
    assert result.errors == result.requests
    assert result.p50_ms is None


def test_reference_workloads_answer(starlette_port: int) -> None:
    assert http_request(starlette_port, "POST", "/echo", BODY) == (200, b'{"x":1}')
    status, payload = http_request(starlette_port, "POST", "/w2", BODY)
    assert status == 200 and json.loads(payload) == {"y": 1.0}
    status, payload = http_request(starlette_port, "GET", "/w4")
    assert status == 200 and json.loads(payload) == {"mean": 2.0}


def test_stop_kills_descendants_in_other_sessions(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
        " start_new_session=True)\n"
        "time.sleep(30)\n"
    )
    server = ServerProcess("sleeper", [sys.executable, "-c", code], tmp_path)
    server.start()
    try:
        wait_until(lambda: descendants(server.pid), 10, "the sleeper's child")
        tree = [server.pid, *descendants(server.pid)]
        assert len(tree) == 2
        assert tree_memory(server.pid)["processes"] == 2
    finally:
        server.stop(grace_s=2.0)
    assert not any(is_alive(pid) for pid in tree)


def test_tree_memory_of_self() -> None:
    mem = tree_memory(os.getpid())
    assert mem["processes"] >= 1
    assert mem["rss_mb"] > 1.0


# --- BackgroundCpu, checked against /proc read here independently of bench.procs ---------
BURN = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n    pass\n"
MIN_BURN = 30  # jiffies (0.3 s of CPU at 100 Hz): enough to dwarf the counters' granularity
TICK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1


def _cpu_jiffies(pid: int) -> int:
    """utime + stime of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _machine_busy_jiffies() -> int:
    """All CPUs' time in user, nice, system, irq, softirq and steal."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    return sum(values) - values[3] - values[4]  # not idle, not iowait


def _burn(pid: int, since: int) -> int:
    """Wait until ``pid`` has used MIN_BURN jiffies more than ``since``; returns how many."""

    def burnt() -> int:
        used = _cpu_jiffies(pid) - since
        return used if used >= MIN_BURN else 0

    return int(wait_until(burnt, 20, f"process {pid} to burn {MIN_BURN} jiffies"))


def test_background_cpu_counts_a_busy_process_outside_the_bench() -> None:
    burner = _outside_burner()  # double fork: its parent exits at once
    try:
        assert burner not in descendants(os.getpid())
        meter = BackgroundCpu()
        burnt = _burn(burner, _cpu_jiffies(burner))
        measured = meter.percent()
        seconds = time.monotonic() - meter.wall
    finally:
        os.kill(burner, signal.SIGKILL)
    share = 100.0 * burnt / (seconds * TICK * CPUS)  # the burner's share of the machine
    assert measured >= 0.8 * share > 0, (measured, share)


def test_background_cpu_leaves_out_the_bench_and_its_children() -> None:
    # The bench's own servers and load generators are its descendants: a busy child,
    # even one reaped before the reading, is the bench's work, not interference.
    busy_before = _machine_busy_jiffies()
    meter = BackgroundCpu()
    child = subprocess.Popen([sys.executable, "-c", BURN])
    try:
        burnt = _burn(child.pid, 0)
    finally:
        child.kill()
        child.wait()
    seconds = time.monotonic() - meter.wall
    measured = meter.percent()
    busy = _machine_busy_jiffies() - busy_before
    # At most what the whole machine did minus the child, over the meter's window
    # (this window contains the meter's), with 3 jiffies for the counters' granularity.
    bound = 100.0 * (busy - burnt + 3) / (seconds * TICK * CPUS)
    assert measured <= bound, (measured, bound, busy, burnt)


def _outside_burner() -> int:
    """A busy process that is nobody's child here (double fork); returns its pid."""
    launcher = (
        "import os\n"
        "if os.fork():\n    os._exit(0)\n"
        "os.setsid()\n"
        "print(os.getpid(), flush=True)\n"
        "null = os.open(os.devnull, os.O_RDWR)\n"
        "for fd in (0, 1, 2):\n    os.dup2(null, fd)\n" + BURN
    )
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    return int(out)


def test_foreign_cpu_counts_outside_work_and_leaves_out_the_servers() -> None:
    """bench.procs.ForeignCpu (one meter for every bench script): a busy process outside
    is foreign; a busy server (a root) and a process its tree starts within the window are
    not, and their CPU seconds are in ``processes``."""
    burner = _outside_burner()
    # The "server": starts a busy child of its own after a moment (born within the window).
    code = (
        "import subprocess, sys, time\n"
        f"time.sleep(0.3)\nsubprocess.Popen([sys.executable, '-c', {BURN!r}])\n" + BURN
    )
    server = subprocess.Popen([sys.executable, "-c", code])
    meter = ForeignCpu(interval_s=None)
    try:
        meter.roots.add(server.pid)
        busy_before = _machine_busy_jiffies()
        meter.window()  # the window starts now
        child = wait_until(lambda: descendants(server.pid), 10, "the server's child")[0]
        burnt_out = _burn(burner, _cpu_jiffies(burner))
        _burn(child, 0)
        server_j, child_j = _cpu_jiffies(server.pid), _cpu_jiffies(child)
        cpu = meter.window()
        busy = _machine_busy_jiffies() - busy_before
    finally:
        os.kill(burner, signal.SIGKILL)
        for pid in (*descendants(server.pid), server.pid):
            os.kill(pid, signal.SIGKILL)
        server.wait()
    share = 100.0 * burnt_out / (cpu["seconds"] * TICK)  # % of one core
    assert cpu["foreign_core_pct"] >= 0.8 * share > 0, (cpu, share)
    assert cpu["foreign_core_pct"] == pytest.approx(cpu["foreign_cpu_pct"] * CPUS, abs=0.2)
    assert meter.processes[child] >= 0.9 * child_j / TICK  # counted from its birth
    assert meter.processes[server.pid] >= 0.9 * server_j / TICK > 0
    # The servers' CPU is not foreign: at most what the whole machine did minus theirs, over
    # this test's window (which contains the meter's), 3 jiffies for the counters' grain.
    mine = (meter.processes[child] + meter.processes[server.pid]) * TICK
    bound = 100.0 * (busy - mine + 3) / (cpu["seconds"] * TICK)
    assert cpu["foreign_core_pct"] <= bound, (cpu, bound)
    meter.close()


def test_process_roles_from_command_lines() -> None:
    """Labels of a server's tree from /proc/<pid>/cmdline (shoal's workers keep their
    ``python -m`` module in their command line), numbered when a role has several."""
    sleep = "import time; time.sleep(30)"
    modules = ["shoal._runtime.process.proxy_worker", "shoal._runtime.process.worker",
               "shoal._runtime.process.worker", "shoal._runtime.process.zygote", "x.y"]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", sleep, m, "arg"]) for m in modules]
    try:
        pids = [p.pid for p in procs]

        def started() -> bool:  # a loaded CI once read one child's command line too early
            return all(
                m in Path(f"/proc/{pid}/cmdline").read_text()
                for pid, m in zip(pids, modules, strict=True)
            )

        wait_until(started, 10, "the children's command lines")
        roles = process_roles(os.getpid(), pids)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert roles == {
        os.getpid(): "server", pids[0]: "proxy", pids[1]: "replica-1", pids[2]: "replica-2",
        pids[3]: "fork-server", pids[4]: "other",
    }  # fmt: skip


def test_measured_load_against_starlette(starlette_server: tuple[ServerProcess, int]) -> None:
    """One measured run: foreign CPU and validity, the server's and the load generator's
    CPU seconds; aggregate_measured turns them into µs per request."""
    server, port = starlette_server
    meter = ForeignCpu(interval_s=None)
    meter.roots.add(server.pid)
    spec = loadgen.LoadSpec(port, "/echo", "POST", BODY, concurrency=4, duration_s=1.0)
    run = measured_load(meter, server.pid, lambda: loadgen.run_load(spec, "python"))
    _check_clean_run(run.result)
    assert set(run.cpu_s) == {"server"} and run.cpu_s["server"] > 0.05
    assert run.loadgen_cpu_s > 0.05  # the python client is busy for a second
    assert run.foreign_core_pct >= 0 and run.valid == (run.foreign_core_pct <= INVALID_CORE_PCT)
    data = run.to_dict()
    assert {"foreign_core_pct", "valid", "cpu_s", "loadgen_cpu_s", "p50_ms"} <= set(data)
    point = aggregate_measured([run])
    served = run.result.requests - run.result.errors
    assert point["cpu_us_per_request"]["server"] == pytest.approx(
        run.cpu_s["server"] / served * 1e6, rel=0.01
    )
    assert point["loadgen_cpu_us_per_request"] > 0 and point["server_cores"] > 0
    meter.close()


def test_uvicorn_two_workers_reference(tmp_path: Path) -> None:
    """The `starlette-2w` reference: uvicorn's supervisor and two worker processes."""
    port = free_port()
    server = reference_server("starlette-2w", port, tmp_path)
    assert server.argv[-2:] == ["--workers", "2"]
    server.start()
    try:
        server.wait_http_ok(port, "POST", "/echo", BODY, deadline_s=30.0)
        roles = process_roles(server.pid, descendants(server.pid))
    finally:
        server.stop()
    assert {"server", "worker-1", "worker-2"} <= set(roles.values()), roles
    with pytest.raises(ValueError, match="unknown reference server 'tornado'"):
        reference_server("tornado", port, tmp_path)


def _measured(rps: float, p50: float, foreign: float, proxy_s: float) -> Measured:
    result = loadgen.LoadResult(1000, 0, 1.0, rps, p50, p50, p50, p50, "wrk")
    return Measured(result, foreign, {"server": 0.01, "proxy": proxy_s, "replica": 0.2}, 0.05)


def test_aggregate_measured_leaves_invalid_runs_out() -> None:
    runs = [_measured(900.0, 0.5, 3.0, 0.3), _measured(100.0, 5.0, 40.0, 0.9),
            _measured(1000.0, 0.4, 15.0, 0.5)]  # fmt: skip
    point = aggregate_measured(runs)
    assert point["valid"] is True and point["runs_valid"] == 2
    assert point["throughput_rps"] == pytest.approx(950.0)  # median of the two valid runs
    assert point["p50_ms"] == pytest.approx(0.45)
    assert (point["requests"], len(point["runs"])) == (3000, 3)  # counts over all runs
    assert point["foreign_core_pct"] == [3.0, 40.0, 15.0]
    assert [r["valid"] for r in point["runs"]] == [True, False, True]
    assert point["cpu_us_per_request"] == {"server": 10.0, "proxy": 400.0, "replica": 200.0}
    assert point["server_cpu_us_per_request"] == pytest.approx(610.0)
    assert point["loadgen_cpu_us_per_request"] == pytest.approx(50.0)
    assert point["server_cores"] == pytest.approx(0.61)
    none_valid = aggregate_measured([runs[1]])
    assert none_valid["valid"] is False and none_valid["throughput_rps"] == 100.0


def test_parse_wrk_output_and_script() -> None:
    line = (
        'BENCHJSON {"responses": 100, "duration_us": 1000000, "connect": 0, "read": 1, '
        '"write": 0, "status": 4, "timeout": 0, "p50_us": 150.0, "p90_us": 200.0, '
        '"p99_us": 400.0, "mean_us": 160.0}'
    )
    result = loadgen.parse_wrk_output("Running 1s test\n" + line + "\n")
    assert (result.requests, result.errors) == (101, 5)
    assert result.throughput_rps == pytest.approx(96.0)
    assert result.p50_ms == pytest.approx(0.15)
    script = loadgen.wrk_script("POST", BODY)
    assert 'wrk.method = "POST"' in script and '[==[{"x": 1}]==]' in script
    script = loadgen.wrk_script("POST", BODY, (("x-api-key", "k"),))
    assert "wrk.headers[ [==[x-api-key]==] ] = [==[k]==]" in script


def test_loadgen_sends_headers() -> None:
    spec = loadgen.LoadSpec(1, "/p", "POST", BODY, headers=(("x-api-key", "k"),))
    assert b"\r\nx-api-key: k\r\n" in loadgen.build_request(spec)


def test_batcher_forms_batches() -> None:
    async def handler(xs: list[int]) -> list[int]:
        await asyncio.sleep(0.002)
        return [x * 2 for x in xs]

    async def main() -> tuple[list[int], dict[str, Any]]:
        batcher = Batcher(handler, max_size=32, wait_s=0.005)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
        return list(results), batcher.stats()

    results, stats = asyncio.run(main())
    assert results == [2 * i for i in range(40)]
    assert (stats["batches"], stats["requests"]) == (2, 40)  # 32, then 8 after the 5 ms wait


def test_reference_batcher_and_ramp(starlette_server: tuple[ServerProcess, int]) -> None:
    server, starlette_port = starlette_server
    status, payload = http_request(starlette_port, "POST", "/w3", b'{"x": 3}')
    assert (status, json.loads(payload)) == (200, {"y": 3})
    before = get_stats(starlette_port)
    meter = ForeignCpu(interval_s=None)
    meter.roots.add(server.pid)
    steps = run_ramp(starlette_port, (1, 16), 0.5, "python", meter)
    assert [s["concurrency"] for s in steps] == [1, 16]
    for step in steps:  # each step's foreign CPU and validity
        assert step["foreign_core_pct"] >= 0
        assert step["valid"] == (step["foreign_core_pct"] <= INVALID_CORE_PCT)
    assert steps[0]["batch_size_mean"] == pytest.approx(1.0)
    assert steps[1]["batch_size_mean"] > 4  # 16 clients, 5 ms wait: batches fill up
    assert steps[1]["plan_batch_size"] == 32 and steps[1]["plan_max_wait_ms"] is None
    assert get_stats(starlette_port)["requests"] - before["requests"] == sum(
        s["requests"] for s in steps
    )


def test_stream_clients(starlette_port: int) -> None:
    samples = run_async(first_chunks(starlette_port, 4))
    assert len(samples) == 4
    for sample in samples:
        assert 19.0 <= sample["generator_ms"] <= sample["ttfc_ms"]
        assert sample["overhead_ms"] > 0.0
    # The first request of a route can be slow (lazy imports): the bench warms up first.
    assert statistics.median(s["overhead_ms"] for s in samples[1:]) < 15.0
    rate = run_async(count_stream(starlette_port, 2000))
    assert rate["items"] == 2000 and rate["bytes"] == 32_000 and rate["items_per_s"] > 0


def test_percentile_and_only() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert math.isnan(percentile([], 50))
    assert parse_only("w1,Handle,cold_start,w1d") == ["cold", "W1", "W1-defaults", "handle"]
    assert parse_only("business,w3-latency,STREAM,w1-fastapi,W3") == [
        "W1-fastapi", "W3", "W3-latency", "stream", "business"
    ]  # fmt: skip
    assert parse_only("w1-defaults-direct,W1-direct,w1") == [
        "W1", "W1-direct", "W1-defaults-direct"
    ]  # fmt: skip
    with pytest.raises(ValueError):
        parse_only("W5")


def _fake_results() -> dict[str, Any]:
    run = loadgen.LoadResult(1000, 0, 1.0, 1000.0, 0.4, 0.6, 0.9, 0.45, "wrk")
    slow = loadgen.LoadResult(500, 2, 1.0, 498.0, 0.8, 1.0, math.nan, 0.8, "wrk")
    points = []
    for server, result in (("shoal", slow), ("starlette", run), ("starlette-2w", run)):
        for c in (1, 64):
            point = {"workload": "W1", "server": server, "concurrency": c}
            foreign = 40.0 if (server, c) == ("shoal", 1) else 2.0  # shoal c=1: not valid
            cpu = {"server": 0.01, "proxy": 0.3, "replica": 0.2} if server == "shoal" else {}
            measured = Measured(result, foreign, cpu or {"server": 0.2}, 0.05)
            points.append({**point, **aggregate_measured([measured])})
    points.append({"workload": "W2", "server": "shoal", "concurrency": 1, "error": "Boom\nmore"})
    w3 = loadgen.LoadResult(6000, 0, 3.0, 2000.0, 30.0, 35.0, 50.0, 31.0, "wrk")
    for wl, server, thr, size in (
        ("W3", "shoal", 2000.0, 31.5),
        ("W3", "starlette", 2300.0, 32.0),
        ("W3-latency", "shoal", 2100.0, 40.0),
    ):
        run = loadgen.LoadResult(6000, 0, 3.0, thr, 30.0, 35.0, 50.0, 31.0, "wrk")
        points.append(
            {
                "workload": wl,
                "server": server,
                "concurrency": 64,
                **aggregate([run]),
                "batches": 190,
                "batch_size_mean": size,
            }
        )
    points.append(
        {
            "workload": "W3-latency",
            "server": "shoal",
            "concurrency": 1,
            **aggregate([w3]),
            "batches": 90,
            "batch_size_mean": 1.0,
        }
    )
    step = {
        "concurrency": 8,
        "throughput_rps": 400.0,
        "p50_ms": 19.0,
        "p99_ms": 25.0,
        "requests": 1200,
        "errors": 0,
        "batches": 150,
        "batch_size_mean": 8.0,
        "plan_batch_size": 64,
        "plan_max_wait_ms": 22.5,
        "arrival_rate_per_s": 380.0,
        "cost_fitted": True,
        "foreign_core_pct": 3.0,
        "valid": True,
    }
    first = {
        "requests": 50,
        "ttfc_p50_ms": 21.5,
        "generator_p50_ms": 20.2,
        "overhead_p50_ms": 1.3,
        "overhead_p90_ms": 1.9,
        "request_in_p50_ms": 0.7,
        "delivery_p50_ms": 0.6,
    }
    return {
        "schema": 1,
        "environment": report.environment({"name": "wrk", "version": "test"}, datetime.now(UTC)),
        "settings": {"duration_s": 1.0, "repeats": 1, "warmup_s": 0.0},
        "points": points,
        "handle": {"p50_us": 90.0, "p90_us": 150.0, "p99_us": 300.0, "sequential_calls": 10,
                   "calls_per_s": 9000.0, "valid": True, "runs_valid": 5, "runs_total": 6},
        "cold_start": {"runs": [1.2], "median_s": 1.2},
        "idle_rss": {"error": "RuntimeError: nope"},
        "w3_ramp": {"server": "W3-latency shoal", "step_s": 3.0, "steps": [step]},
        "stream": {"first_delay_ms": 20.0, "items": 200000,
                   "first_chunk": {"shoal": first, "starlette": {"error": "Down"}},
                   "rate": {"shoal": {"items_per_s": 15000.0, "http_chunks_per_item": 1.0},
                            "starlette": {"error": "Down"}}},
    }  # fmt: skip


def test_report_writer(tmp_path: Path) -> None:
    results = report.finalize(_fake_results())
    json_path, md_path = report.write_results(results, tmp_path)
    data = json.loads(json_path.read_text())
    assert (tmp_path / "latest.json").read_text() == json_path.read_text()
    assert (tmp_path / "latest.md").read_text() == md_path.read_text()
    assert data["environment"]["machine"]["nproc"] == os.cpu_count()
    assert data["points"][0]["p99_ms"] is None  # NaN became null
    assert isinstance(data["environment"]["git_dirty"], bool)  # this is a git checkout
    assert data["environment"]["git_commit"]
    shoal_c1 = data["points"][0]
    assert (shoal_c1["valid"], shoal_c1["runs_valid"], shoal_c1["foreign_core_pct"]) == (
        False, 0, [40.0]
    )  # fmt: skip
    assert shoal_c1["runs"][0]["valid"] is False and shoal_c1["runs"][0]["cpu_s"]["proxy"] == 0.3
    assert shoal_c1["cpu_us_per_request"]["proxy"] == pytest.approx(0.3 / 498 * 1e6, abs=0.1)
    assert shoal_c1["loadgen_cpu_us_per_request"] is not None
    verdicts = {t["key"]: t["met"] for t in data["targets"]}
    valid = {t["key"]: t["valid"] for t in data["targets"]}
    assert verdicts["W1-thr-c64"] is False and valid["W1-thr-c64"] is True  # 498 / 1000 < 0.8
    assert verdicts["W1-p50-c1"] is False and valid["W1-p50-c1"] is False
    assert verdicts["W1-p50r-c1"] is False  # 0.8 / 0.4 = 2x > 1.5x
    assert verdicts["handle-p50"] is True and valid["handle-p50"] is True
    assert "; 5 of 6 runs valid (foreign CPU ≤ 15% of a core)" in md_path.read_text()
    busy = _fake_results()
    busy["handle"].update(valid=False, runs_valid=0)
    [handle] = [t for t in report.finalize(busy)["targets"] if t["key"] == "handle-p50"]
    assert handle["met"] is True and handle["valid"] is False  # every run had too much
    assert verdicts["cold-start"] is False
    assert verdicts["idle-rss"] is None
    assert verdicts["W3-thr-c64"] is False  # 2000 / 2300
    assert verdicts["W3-size-c64"] is True
    assert verdicts["W3L-thr-c64"] is True  # 2100 / 2000
    assert verdicts["W3L-p50-c1"] is False  # 30 ms
    assert verdicts["stream-first"] is True and verdicts["stream-rate"] is False
    assert verdicts["W1F-thr-c64"] is None
    ratio = next(r for r in data["ratios"] if r["concurrency"] == 64)
    assert ratio["throughput_ratio"] == pytest.approx(0.498) and ratio["valid"] is True
    two = {
        (r["concurrency"], r["valid"]) for r in data["ratios"] if r["reference"] == "starlette-2w"
    }
    assert two == {(1, False), (64, True)}
    text = md_path.read_text()
    assert "(clean tree)" in text or "**uncommitted changes**" in text
    assert "- **NOT VALID: 1 of 10 points had no run" in text
    assert "points had runs left out" not in text
    assert (
        "| W1 | shoal | 1 | 500 | 2 | 498 | 0.800 | 1.000 | - | 40 | 0/1 | **NOT VALID** |" in text
    )
    assert "| W1 | 64 | starlette-2w | 0.50x | 2.00x | yes |" in text
    assert "| W1 p50 latency c=1, proxy | <= 0.5 ms | 0.800 ms | **missed** (NOT VALID) |" in text
    assert "## Direct ingress vs the proxy path" not in text  # no -direct workload measured
    assert "## CPU per request, per process" in text
    assert (
        "| W1 | shoal | 64 | 1,024 | 0.51 | server 20, proxy 602, replica 402 | 100 | yes |" in text
    )
    assert "| W1 | shoal | 64 |" in text and "failed: Boom" in text and "**missed**" in text
    assert "## W3-latency load ramp" in text and "| 1 | 8 | 400 | 19.00 |" in text
    assert "| 22.50 | 380 | 3 | yes |" in text  # the ramp step's foreign CPU and validity
    assert "| W3-latency | shoal | 64 | 2,100 |" in text
    assert "| shoal | 50 | 21.50 | 20.20 | 1.30 |" in text and "| starlette | failed: Down" in text


def test_direct_ingress_workloads_and_report(tmp_path: Path) -> None:
    """W1-direct is W1 driven at shoal's --direct-ingress-port; its ratios sit beside W1's
    and issue 15's W1 targets are evaluated for both paths."""
    assert WORKLOADS["W1-direct"].direct and not WORKLOADS["W1"].direct
    for key in ("W1", "W1-defaults"):
        direct = WORKLOADS[f"{key}-direct"]
        assert (direct.app, direct.concurrencies, direct.references) == (
            WORKLOADS[key].app, WORKLOADS[key].concurrencies, WORKLOADS[key].references
        )  # fmt: skip
    argv = shoal_server("w1", 8000, tmp_path, direct_port=8001).argv
    assert argv[-2:] == ["--direct-ingress-port", "8001"] and "8000" in argv
    assert "--direct-ingress-port" not in shoal_server("w1", 8000, tmp_path).argv
    points = []
    for wl, server, rps, p50 in (
        ("W1", "shoal", 700.0, 0.3), ("W1-direct", "shoal", 1000.0, 0.14),
        ("W1", "starlette", 1000.0, 0.1), ("W1-direct", "starlette", 1000.0, 0.1),
    ):  # fmt: skip
        for c in (1, 64):
            run = loadgen.LoadResult(int(rps), 0, 1.0, rps, p50, p50, p50, p50, "wrk")
            cpu = {"proxy": 0.001, "replica": 0.1} if server == "shoal" else {"server": 0.1}
            measured = aggregate_measured([Measured(run, 1.0, cpu, 0.01)])
            points.append({"workload": wl, "server": server, "concurrency": c, **measured})
    env = report.environment({"name": "wrk", "version": "test"}, datetime.now(UTC))
    results = report.finalize(
        {
            "environment": env,
            "points": points,
            "settings": {"duration_s": 1.0, "repeats": 1, "warmup_s": 0.0},
        }
    )
    verdicts = {t["key"]: (t["met"], t["value"]) for t in results["targets"]}
    assert verdicts["W1-thr-c64"] == (False, pytest.approx(0.7))
    assert verdicts["W1X-thr-c64"] == (True, pytest.approx(1.0))
    assert verdicts["W1-p50r-c1"] == (False, pytest.approx(3.0))
    assert verdicts["W1X-p50r-c1"] == (True, pytest.approx(1.4))
    assert verdicts["W1DX-thr-c64"] == (None, None)  # W1-defaults-direct not measured
    text = report.render_markdown(results)
    assert "| W1 throughput c=64 vs Starlette (1 process), direct ingress | >= 0.8 x |" in text
    assert "## Direct ingress vs the proxy path" in text
    assert "| W1 | 64 | starlette | 0.70x | 1.00x | 3.00x | 1.40x | yes / yes |" in text


def test_control_plane_report_has_verdicts_and_says_what_was_not_available() -> None:
    """bench.control_plane's table from synthetic figures: verdicts against issue 10's
    targets, a failed deploy with its reason, and (c) reported as not available."""
    from bench import control_plane

    cpu = {"foreign_cpu_pct": 40.0, "own_cpu_pct": 60.0, "loadavg_1m": 3.5}
    results: dict[str, Any] = {
        "deploy": {"runs": [
            {"command_s": 1.0, "running_after_return_s": 2.5, "running_after_start_s": 3.5,
             "applications": 11, "replicas": 30, **cpu},
            {"command_s": 1.0, "failed": "2 of 11 application(s) DEPLOY_FAILED: x: boom",
             "failed_after_return_s": 61.0, "applications": 11, **cpu},
        ]},
        "proxy": {"runs": [{"serving_again_s": 1.5, **cpu}]},
        "controller": {"available": False, "reason": "no restart recovery in this tree"},
        "blocked": {"health_check_timeout_s": 4.0, "out_of_routing_s": 3.9, "killed_s": 9.5, **cpu},
    }  # fmt: skip
    rows = control_plane.rows(results)
    verdicts = [(row["value"], row["met"]) for row in rows]
    assert verdicts == [
        (2.5, True), (3.5, "info"), ("DEPLOY_FAILED after 61.0 s", False), (1.5, False),
        ("not available", None), (3.9, True), (9.5, False),
    ]  # fmt: skip
    env = {"date": "d", "machine": {"nproc": 2, "cpu_model": "cpu"}, "python": {"version": "3"}}
    settings = {"foreign_cpu_pct": 50.0, "loadavg_start": [1.0], "loadavg_end": [2.0]}
    text = control_plane.render({"environment": env, "settings": settings, "rows": rows})
    assert "| controller kill -9 under c=16 | not available |" in text
    assert "- controller kill -9 under c=16: no restart recovery in this tree" in text
    assert "40% (load 3.5)" in text and "DEPLOY_FAILED: x: boom" in text


# --- bench.overload: its load clients against the reference server, its figures ------------------
def test_overload_clients_against_starlette(starlette_port: int) -> None:
    """The three client processes of bench.overload (open loop, retrying clients with a
    timeout, closed-loop steps) drive GET /w4 (5 ms) and record every request."""
    from bench.overload_analysis import failed, latency, rate, statuses
    from bench.overload_clients import run_client

    out = run_client("open", 1, port=starlette_port, path="/w4", rate=200.0, duration_s=0.5, pool=4)
    assert 50 <= out["sent"] <= 200 and out["not_sent"] == 0
    assert statuses(out["records"]) == {"200": out["sent"]}
    assert 5.0 <= latency(out["records"])["p50_ms"] < 500
    out = run_client(
        "retry", 1, port=starlette_port, path="/missing", clients=3, duration_s=0.3,
        timeout_s=1.0, backoff_s=[0.01, 0.02],
    )  # fmt: skip
    assert set(statuses(out["records"])) == {"404"} and len(out["records"]) >= 3
    out = run_client("steps", 1, port=starlette_port, path="/w4", steps=[[1, 0.3], [3, 0.3]])
    records, starts = out["records"], out["starts"]
    assert len(starts) == 2 and failed(records) == 0
    first = rate(records, starts[0], starts[1])
    second = rate(records, starts[1], out["end"])
    assert 0 < first < second  # 3 clients serve more than 1


def test_overload_step_analysis() -> None:
    """bench.overload's scale-up/down figures from a synthetic replica timeline."""
    from bench.overload_analysis import analyse_steps

    config = {"upscale_delay_s": 1.0, "downscale_delay_s": 5.0}
    states = {"a": "RUNNING"}
    samples: list[tuple[float, int | None, dict[str, str]]] = [(0.0, 1, dict(states))]
    for t in (11.5, 12.0):  # 8x from 10 s: 7 replicas listed at 11.5, RUNNING at 12.0 (+ 0.5 s)
        states = {"a": "RUNNING", **{f"r{i}": "STARTING" if t < 12 else "RUNNING"
                                     for i in range(7)}}  # fmt: skip
        samples.append((t, 8, dict(states)))
    samples.append((25.2, 8, {**states, "r0": "STOPPING"}))  # 1x from 20 s: a drain
    samples.append((25.4, 1, {"a": "RUNNING"}))
    records = [(t / 10, 0.05, 200) for t in range(300)] + [(15.0, 0.05, 503)]
    decisions = [
        {"time": 100.0 + 15.0, "from_replicas": 8, "to_replicas": 7, "reason": "flap"},
        {"time": 100.0 + 25.1, "from_replicas": 7, "to_replicas": 1, "reason": "x"},
    ]  # times are time.time(): 100 s ahead of the samples' clock
    out = analyse_steps(samples, records, [0.0, 10.0, 20.0], 30.0, 8, config, decisions, 100.0)
    assert out["running_at_1x"] == 1 and out["up_s"] == 2.0
    assert out["replica_start_s"] == {"n": 7, "max": 0.5, "median": 0.5}
    assert out["up_bound_s"] == 2.5 and out["up_met"] is True and out["overshoot"] == 0
    assert (out["failed_1x"], out["failed_up"], out["failed_down"]) == (0, 1, 0)
    assert out["first_removal_s"] == 5.1 and out["down_s"] == 5.4 and out["down_met"] is True
    assert out["decisions"] == [[15.0, 8, 7, "flap"], [25.1, 7, 1, "x"]]
    assert out["downscales_at_8x"] == [5.0]
    assert out["timeline"][0] == [0.0, 1, 1, 1] and out["timeline"][-1] == [25.4, 1, 1, 1]
    early = analyse_steps(samples, records, [0.0, 10.0, 22.0], 30.0, 8, config)
    assert early["down_met"] is False  # 3.4 s after the step down: before downscale_delay_s


def test_overload_report_has_verdicts_and_marks_invalid_runs() -> None:
    from bench import overload_report

    quiet = {"foreign_cpu_pct": 2.0, "foreign_core_pct": 4.0, "invalid": False, "loadavg_1m": 0.5}
    busy = {"foreign_cpu_pct": 40.0, "foreign_core_pct": 80.0, "invalid": True, "loadavg_1m": 3.0}
    lat = {"n": 100, "p50_ms": 1.0, "p99_ms": 4.0, "max_ms": 5.0}
    results: dict[str, Any] = {
        "overload": {
            "duration_s": 60.0, "offered_rps": 1000.0, "capacity": {"capacity_rps": 100.0},
            "statuses": {"200": 6000, "503": 54000, "timeout": 2}, "refused": lat,
            "accepted": {**lat, "p99_ms": 150.0}, "accepted_rps": 99.0,
            "unloaded": {"p99_ms": 22.0}, "queue_wait_bound_ms": 100.0,
            "accepted_p99_bound_ms": 144.0,
            "proxy": {"start": {"rss_mb": 50.0}, "end": {"rss_mb": 52.0}, "rss_growth_mb": 2.0,
                      "pss_growth_mb": 1.5, "rss_growth_from_10s_mb": 0.1},
            **quiet,
        },
        "goodput": {
            "capacity": {"capacity_rps": 100.0}, "max_queued_requests": 10, "clients": 200,
            "timeout_s": 1.0,
            "limited": {"statuses": {"200": 1900}, "attempts_rps": 1000.0, "wasted_runs": 0,
                        "goodput_rps": 95.0, "goodput_share": 0.95, **busy},
            "unlimited": {"statuses": {"200": 40}, "attempts_rps": 200.0, "wasted_runs": 900,
                          "goodput_rps": 2.0, "goodput_share": 0.02, **busy},
        },
        "autoscale": {"available": False, "reason": "not in this tree"},
        "zero": {"error": "TimeoutError: zero replicas: not within 60 s"},
    }  # fmt: skip
    rows = overload_report.rows(results)
    verdicts = [(row["scenario"], row["value"], row["met"]) for row in rows]
    assert verdicts == [
        ("overload", "4.00 ms", True), ("overload", "150.00 ms", False),
        ("overload", "2.0 MB", True), ("overload", '{"timeout": 2}', False),
        ("goodput", "95.0 req/s = 95.0%", True), ("goodput", "2.0 req/s = 2.0%", "info"),
        ("autoscale", "not available", None), ("zero", "error", False),
    ]  # fmt: skip
    env = {"date": "d", "machine": {"nproc": 2, "cpu_model": "cpu"},
           "python": {"version": "3"}, "packages": {}}  # fmt: skip
    settings = {"foreign_core_pct": 30.0, "invalid": True, "loadavg_start": [1.0],
                "loadavg_end": [2.0], "wall_s": 300.0}  # fmt: skip
    text = overload_report.render(
        {"environment": env, "settings": settings, "rows": rows, **results}
    )
    assert "**INVALID**" in text and "| PASS (INVALID) |" in text and "| MISS |" in text
    assert "**INVALID**: 80.0% of a core (load 3.0)" in text and "4.0% of a core" in text
    assert "- autoscale: not available: not in this tree" in text
    assert "- zero: TimeoutError: zero replicas" in text


# --- bench.ray_cluster: its settings, its "not available" rule and its report (no cluster) -------
def _ray_cluster_runs(side: str, rps: float, p50_ms: float, handle_us: float) -> list[Any]:
    runs: list[dict[str, Any]] = []
    for workload in ("W1", "W2"):
        for c in (64, 1):
            foreign = 40.0 if (workload, c) == ("W2", 1) else 2.0  # W2 c=1: not valid
            p50 = p50_ms
            result = loadgen.LoadResult(int(rps), 0, 1.0, rps, p50, p50, p50, p50, "wrk")
            runs.append({"round": 0, "side": side, "workload": workload, "concurrency": c,
                         "foreign_core_pct": foreign, "valid": foreign <= INVALID_CORE_PCT,
                         "system_cpu_s": 0.5, **result.to_dict()})  # fmt: skip
    runs.append({"round": 0, "side": side, "workload": "handle", "concurrency": 1,
                 "foreign_core_pct": 1.0, "valid": True, "system_cpu_s": 0.1, "n": 300,
                 "p50_us": handle_us, "p90_us": handle_us, "p99_us": handle_us,
                 "mean_us": handle_us})  # fmt: skip
    return runs


def test_ray_cluster_settings_and_report_without_a_cluster() -> None:
    """python -m bench.ray_cluster without Ray running: --quick and normal settings, which
    shoal failures mean "no Ray runtime", and the table from synthetic runs: verdicts when
    both sides ran, "not measured" with shoal's reason when its side was not available."""
    from bench import ray_cluster, ray_cluster_report
    from shoal._errors import ConfigError

    parser = ray_cluster.build_parser()
    quick = ray_cluster.make_settings(parser.parse_args(["--quick"]))
    assert (quick.rounds, quick.duration_s, quick.warmup_s, quick.quick) == (1, 2.0, 0.0, True)
    normal = ray_cluster.make_settings(parser.parse_args(["--sides", "shoal,ray"]))
    assert (normal.rounds, normal.duration_s, normal.sides) == (3, 3.0, ("shoal", "ray"))
    with pytest.raises(ValueError, match="spark"):
        ray_cluster.make_settings(parser.parse_args(["--sides", "ray,spark"]))
    assert ray_cluster.is_unavailable(ConfigError("unknown runtime 'ray'; known runtimes: local"))
    assert ray_cluster.is_unavailable(TypeError("start() got an unexpected keyword 'runtime'"))
    assert not ray_cluster.is_unavailable(ConfigError("http_options.port: 70000 is not a port"))
    assert not ray_cluster.is_unavailable(RuntimeError("unknown runtime"))

    started = datetime.now(UTC)
    env = ray_cluster_report.environment({"name": "wrk"}, started)
    assert env["packages"]["ray"] and isinstance(env["git_dirty"], bool)
    ray_side = {"side": "ray", "round": 0, "state": "measured", "start_s": 30.0,
                "placement": {"caller_node": "a", "callee_node": "b"},
                "settle": {"seconds": 4.0, "tree_core_pct": 12.0, "quiet": True},
                "runs": _ray_cluster_runs("ray", 100.0, 8.0, 2300.0)}  # fmt: skip
    shoal_side = {"side": "shoal", "round": 0, "state": "measured", "start_s": 9.0,
                  "placement": {"caller_node": "a", "callee_node": "b"},
                  "runs": _ray_cluster_runs("shoal", 1200.0, 0.8, 250.0)}  # fmt: skip
    results = ray_cluster_report.build_results(normal, env, started, [ray_side, shoal_side])
    json.dumps(results)
    text = ray_cluster_report.render(results)
    assert "| W1 throughput c=64 (req/s) | 100 | 1,200 | 12.00x | ≥ 10x Ray Serve | met |" in text
    assert "| W2 p50 c=1 (ms) | 8.000 | 0.800 | 0.10x | ≤ 1 ms | met (NOT VALID) |" in text
    assert "| handle round trip across nodes, p50 (µs) | 2,300.0 | 250.0 |" in text
    row = "| W2 c=1 | shoal-on-Ray | 1,200 | 0.800 ms | 0.800 ms | 0 | 40 | 0/1 **NOT VALID**"
    assert row in text
    assert "different nodes in every round: yes" in text and "quiet after: 4 s (12%)" in text

    absent = {"side": "shoal", "round": 0, "state": "not available",
              "reason": "ConfigError: unknown runtime 'ray'; known runtimes: local"}  # fmt: skip
    results = ray_cluster_report.build_results(quick, env, started, [ray_side, absent])
    text = ray_cluster_report.render(results)
    assert "| W1 p50 c=1 (ms) | 8.000 | n/a | n/a | ≤ 1 ms | not measured (shoal-on-Ray " in text
    assert "- **shoal-on-Ray: not available**: round 0: ConfigError: unknown runtime 'ray'" in text


def test_a_run_is_dirty_for_changed_code_not_for_results_written_before_it(
    tmp_path: Path,
) -> None:
    """A bench records whether the tree was dirty: an earlier run's results (untracked
    under bench/results/) do not make the next run dirty; a changed or new file does."""
    from bench.procs import git_dirty

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "code")
    assert git_dirty(tmp_path) is False
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "w1-x.md").write_text("results\n")
    assert git_dirty(tmp_path) is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_dirty(tmp_path) is True
    git("checkout", "-q", "code.py")
    (tmp_path / "new.py").write_text("y = 1\n")
    assert git_dirty(tmp_path) is True


BURNER = """
import subprocess, sys, time
if sys.argv[1] == "child":  # spends its CPU seconds, then idles
    end = time.process_time() + float(sys.argv[2])
    while time.process_time() < end:
        pass
    time.sleep(600)
subprocess.Popen([sys.executable, __file__, "child", sys.argv[1]])
print("started", flush=True)
time.sleep(600)
"""


def test_wait_quiet_waits_for_a_busy_child_and_gives_up_on_a_spinning_one(
    tmp_path: Path,
) -> None:
    """A server's start-up work (a child of it busy for a while, as the fork server's
    imports) is over before the bench measures; a server that never quiets is measured
    after the deadline anyway (wait_quiet returns False)."""
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    for seconds, deadline_s, expected in (("1.5", 20.0, True), ("600", 3.0, False)):
        server = ServerProcess("burner", [sys.executable, str(script), seconds], tmp_path)
        server.start()
        try:
            wait_until(lambda: "started" in server.log_tail(), 30, "the burner to start")  # noqa: B023
            server.remember_tree()
            began = time.perf_counter()
            assert server.wait_quiet(deadline_s=deadline_s) is expected
            waited = time.perf_counter() - began
            if expected:  # not before the child's CPU second and a half was spent
                assert waited >= 1.0, waited
            else:
                assert waited >= deadline_s
        finally:
            server.stop(grace_s=1.0)


def _observability_run(round_: int, variant: str, concurrency: int, rps: float) -> dict[str, Any]:
    return {
        "round": round_, "variant": variant, "concurrency": concurrency, "valid": True,
        "foreign_core_pct": 0.0, "cpu_s": {"proxy-1": 1.0}, "throughput_rps": rps,
        "p50_ms": 1000.0 / rps, "p99_ms": 2000.0 / rps, "requests": int(rps), "errors": 0,
    }  # fmt: skip


def _observability_text(
    runs: list[dict[str, Any]], summary: dict[str, Any], rounds: int, baseline: str | None
) -> str:
    """bench.observability's report of ``runs`` (a run of the proxy path on a fake machine)."""
    return observability.render({
        "started": "2026-12-02T00:00:00+00:00", "dirty": False, "loadgen": "wrk",
        "rounds": rounds, "duration_s": 5.0, "path": "proxy", "baseline": baseline,
        "runs": runs, "summary": summary,
        "environment": {"git_commit": "abc", "machine": {"cpu_model": "cpu", "nproc": 2},
                        "python": {"version": "3.11"}, "packages": {}},
    })  # fmt: skip


def test_observability_summary_compares_builds_with_the_rounds_spread() -> None:
    """bench.observability with --baseline: each variant against the other build's, and
    every ratio with the mean and standard error of its per-round ratios."""
    throughput = {"off": (1000, 1100, 900), "default": (950, 990, 900),
                  "off@base": (800, 900, 700), "default@base": (760, 810, 700)}  # fmt: skip
    runs = [
        _observability_run(round_, name, concurrency, rps[round_])
        for round_ in range(3) for name, rps in throughput.items() for concurrency in (1, 64)
    ]  # fmt: skip
    runs.append({**_observability_run(3, "default", 64, 10.0), "valid": False})  # left out
    summary = observability.summarize(runs, ["", "@base"])
    ratios = summary["ratios"]
    assert ratios["default / off, c=64"]["ratio"] == pytest.approx(950 / 1000)
    per_round = [0.95, 0.9, 1.0]
    assert ratios["default / off, c=64"]["round_mean"] == pytest.approx(statistics.mean(per_round))
    assert ratios["default / off, c=64"]["round_standard_error"] == pytest.approx(
        statistics.stdev(per_round) / math.sqrt(3)
    )
    assert ratios["off / off@base, c=64"]["ratio"] == pytest.approx(1000 / 800)
    assert ratios["default / default@base, c=1"]["ratio"] == pytest.approx(760 / 950)
    assert "tracing / default, c=64" not in ratios  # not served
    text = _observability_text(runs, summary, rounds=3, baseline="base")
    assert "| default / off, c=64 | 0.950 | 0.950 ± 0.029 (3) | ≥ 0.95: PASS |" in text
    assert "| off / off@base, c=64 | 1.250 |" in text
    assert "NAME@base: served from a worktree of base" in text


def test_observability_marks_the_runs_whose_server_dropped_spans(tmp_path: Path) -> None:
    """A run whose server logged a dropped span (the SDK's warning or shoal's) since the
    last run is marked, and counted in the header: its figures are of fewer spans."""
    log = tmp_path / "server.log"
    log.write_bytes(b"INFO ... POST /echo 200 0.3ms\n")
    assert not observability._logged_drops(log)
    with log.open("ab") as file:
        file.write(b"Queue full, dropping Span.\n")
    assert observability._logged_drops(log)
    assert not observability._logged_drops(log)  # nothing new since
    runs = [
        {**_observability_run(0, "default", 64, 1000.0), "spans_dropped": False},
        {**_observability_run(0, "otlp", 64, 800.0), "spans_dropped": True},
    ]
    text = _observability_text(runs, observability.summarize(runs), rounds=1, baseline=None)
    assert "- spans dropped (logged by the server) in 1 run(s)" in text
    assert "| 0 | otlp (spans dropped) | 64 | 800 |" in text
    assert "| 0 | default | 64 | 1,000 |" in text
    assert "| otlp / default, c=64 | 0.800 |" in text


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--baseline", "no-such-ref"], "--baseline: 'no-such-ref'"),
     (["--variants", "off,bogus"], "--variants: unknown bogus")],
)  # fmt: skip
def test_observability_refuses_a_bad_baseline_or_variant(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        observability.main(argv)
    assert exited.value.code == 2 and named in capsys.readouterr().err
