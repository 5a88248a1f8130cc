"""``python -m bench.startup``: how fast the demo starts and how much memory it holds.

Issue 15's start-up targets: ``python -m shoal demo`` from launch to every application
RUNNING (the line ``shoal demo: serving`` it prints once ``serve.run_many`` returned,
then a first 200 from its ensemble) in ≤ 3 s, and the memory of all its processes
(PSS, which divides each shared page among the processes sharing it) ≤ 700 MB; and
the W1 cold start (``python -m shoal run bench.apps:w1``, launch to first 200) ≤ 0.4 s.

Each is measured two ways in the same run, interleaved round by round so that drift in
the machine hits both alike: **fork** (workers forked from the fork server, the
default) and **spawn** (``SHOAL_FORK_SERVER=0``: every worker starts with
``python -m``). The foreign CPU (used by anything but this script and its servers) is
measured per launch; a launch above 15% of one core is marked not valid and left out
of the medians. Results go to ``bench/results/startup-<UTC timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ECHO_BODY
from bench.control_plane import ForeignCpu, _dirty
from bench.procs import (
    HOST,
    ServerProcess,
    compile_ahead,
    descendants,
    free_port,
    stat_fields,
    tree_memory,
)

INVALID_CORE_PCT = 15.0
KINDS = ("demo", "cold")
VARIANTS = {"fork": {"SHOAL_FORK_SERVER": "1"}, "spawn": {"SHOAL_FORK_SERVER": "0"}}
READY_DEADLINE_S = 180.0
#: After the demo runs, how long it idles before its memory is read (the standby proxy
#: process starts 3 s after the proxy; the figure includes it).
SETTLE_S = 5.0


def _demo(variant: str, work: Path, meter: ForeignCpu, tag: str) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "shoal", "demo", "--host", HOST, "--port", str(port)]
    proc = ServerProcess(f"demo-{variant}-{tag}", argv, work, env=_env(variant))
    meter.window()
    started = time.perf_counter()
    proc.start()
    meter.roots.add(proc.pid)
    try:
        _wait_for_line(proc, "shoal demo: serving", READY_DEADLINE_S)
        running = time.perf_counter() - started
        cpu_by_role = tree_cpu(proc.pid)
        proc.wait_http_ok(port, "POST", "/ensemble", b'{"x": 3}', 30.0)
        first_200 = time.perf_counter() - started
        cpu = meter.window()
        time.sleep(SETTLE_S)  # a fixed idle period before the memory reading, by design
        memory = tree_memory(proc.pid)
    finally:
        proc.stop()
    return {
        "running_s": running, "first_200_s": first_200, "pss_mb": memory["pss_mb"],
        "rss_mb": memory["rss_mb"], "processes": memory["processes"],
        "cpu_s": sum(cpu_by_role.values()), "cpu_by_role": cpu_by_role,
        "fork_server_cpu_s": cpu_by_role.get("fork server"), **_validity(cpu),
    }  # fmt: skip


def _cold(variant: str, work: Path, meter: ForeignCpu, tag: str) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "shoal", "run", "bench.apps:w1", "--route-prefix", "/",
            "--host", HOST, "--port", str(port)]  # fmt: skip
    proc = ServerProcess(f"cold-{variant}-{tag}", argv, work, env=_env(variant))
    meter.window()
    started = time.perf_counter()
    proc.start()
    meter.roots.add(proc.pid)
    try:
        ready = proc.wait_http_ok(port, "POST", "/echo", ECHO_BODY, READY_DEADLINE_S)
        cpu_by_role = tree_cpu(proc.pid)
        cpu = meter.window()
    finally:
        proc.stop()
    return {"first_200_s": ready - started, "cpu_s": sum(cpu_by_role.values()),
            "cpu_by_role": cpu_by_role, **_validity(cpu)}  # fmt: skip


#: A server process's role, by what its command line runs (forked workers set their title).
ROLES = (("zygote", "fork server"), ("proxy_worker", "proxy"), ("process.worker", "workers"))


def tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) of ``root`` (the driver) and its live descendants, all
    started by its launch, summed by role: what a start-up costs the machine, which on
    ``os.cpu_count()`` cores takes at least that divided by the cores. A process that
    already exited is not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    by_role: dict[str, float] = {}
    for pid in [root, *descendants(root)]:
        fields = stat_fields(pid)
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if fields is None:
            continue
        role = next((name for key, name in ROLES if key.encode() in command), "driver")
        seconds = (int(fields[11]) + int(fields[12])) / tick
        by_role[role] = by_role.get(role, 0.0) + seconds
    return by_role


def _validity(cpu: dict[str, float]) -> dict[str, Any]:
    core_pct = cpu["foreign_cpu_pct"] * (os.cpu_count() or 1)  # % of the machine -> of a core
    return {"foreign_core_pct": core_pct, "valid": core_pct <= INVALID_CORE_PCT}


def _wait_for_line(proc: ServerProcess, text: str, deadline_s: float) -> None:
    """Until the server's log holds ``text`` (RuntimeError with its tail if it exits or
    the deadline passes)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if text in proc.log_path.read_text(errors="replace"):
            return
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        time.sleep(0.01)
    raise RuntimeError(f"{proc.name}: no {text!r} within {deadline_s:g} s:\n{proc.log_tail()}")


def _env(variant: str) -> dict[str, str]:
    return dict(VARIANTS[variant])


def measure(rounds: int, work: Path, kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    meter = ForeignCpu()
    runs: list[dict[str, Any]] = []
    launches = {"demo": _demo, "cold": _cold}
    try:
        # Not measured: with --bytecode-cache, the first launch compiles every module it
        # imports (scikit-learn's too, ~10 s of the demo); any launch fills the page cache.
        for kind in kinds:
            launches[kind]("fork", work, meter, "warm-up")
        for round_ in range(rounds):
            for kind in kinds:
                launch = launches[kind]
                for variant in VARIANTS:
                    run = {"round": round_, "kind": kind, "variant": variant,
                           **launch(variant, work, meter, str(round_))}  # fmt: skip
                    runs.append(run)
                    print(json.dumps(run), file=sys.stderr, flush=True)
    finally:
        meter.close()
    return {"runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(kind: str, variant: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["kind"] == kind and r["variant"] == variant
                  and r["valid"] and r.get(key) is not None]  # fmt: skip
        return statistics.median(values) if values else None

    return {
        variant: {
            "demo_running_s": median("demo", variant, "running_s"),
            "demo_first_200_s": median("demo", variant, "first_200_s"),
            "demo_pss_mb": median("demo", variant, "pss_mb"),
            "demo_rss_mb": median("demo", variant, "rss_mb"),
            "demo_cpu_s": median("demo", variant, "cpu_s"),
            "demo_fork_server_cpu_s": median("demo", variant, "fork_server_cpu_s"),
            "cold_first_200_s": median("cold", variant, "first_200_s"),
            "cold_cpu_s": median("cold", variant, "cpu_s"),
        }
        for variant in VARIANTS
    } | {"valid_runs": sum(r["valid"] for r in runs), "runs": len(runs)}


def render(results: dict[str, Any]) -> str:
    env, s = results["environment"], results["summary"]
    fork, spawn = s["fork"], s["spawn"]
    rows = [
        ("demo: launch → all apps RUNNING (s)", "demo_running_s", 3.0, 2),
        ("demo: launch → first 200 (s)", "demo_first_200_s", None, 2),
        ("demo: memory, PSS of all processes (MB)", "demo_pss_mb", 700.0, 0),
        ("demo: memory, RSS summed (MB)", "demo_rss_mb", None, 0),
        ("demo: CPU of all processes, launch → RUNNING (s)", "demo_cpu_s", None, 2),
        ("demo: of which the fork server's (s)", "demo_fork_server_cpu_s", None, 2),
        ("W1 cold start: launch → first 200 (s)", "cold_first_200_s", 0.4, 2),
        ("W1 cold start: CPU of all processes (s)", "cold_cpu_s", None, 2),
    ]
    lines = [
        f"# Start-up and memory ({results['started']})",
        "",
        f"- commit {env['git_commit']} (dirty tree: {results['dirty']}); "
        f"{env['machine']['cpu_model']}, {env['machine']['nproc']} cores; Python "
        f"{env['python']['version']}; packages {env['packages']}; {results['rounds']} rounds",
        f"- modules compiled ahead (--bytecode-cache): {results.get('bytecode_cache', False)}; "
        f"PYTHONDONTWRITEBYTECODE set: {results.get('dont_write_bytecode', False)}",
        "- one launch of each kind before the rounds, not measured (it fills the bytecode "
        "and page caches)",
        f"- valid launches {s['valid_runs']} of {s['runs']} (foreign CPU ≤ "
        f"{INVALID_CORE_PCT:g}% of a core); medians of the valid ones",
        "",
        "| measure | fork (default) | spawn (SHOAL_FORK_SERVER=0) | fork / spawn | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, key, target, digits in rows:
        a, b = fork[key], spawn[key]
        ratio = f"{a / b:.2f}" if a is not None and b else "n/a"
        verdict = "" if target is None or a is None else (
            f"≤ {target:g}: {'PASS' if a <= target else 'FAIL'}"
        )  # fmt: skip
        lines.append(f"| {label} | {_f(a, digits)} | {_f(b, digits)} | {ratio} | {verdict} |")
    lines += [
        "",
        "Per launch (foreign CPU in % of one core):",
        "",
        "| round | kind | variant | running s | first 200 s | PSS MB | processes | CPU s "
        "(fork server) | foreign | valid |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['round']} | {r['kind']} | {r['variant']} | {_f(r.get('running_s'), 2)} | "
            f"{_f(r['first_200_s'], 2)} | {_f(r.get('pss_mb'), 0)} | {r.get('processes', '')} | "
            f"{_f(r.get('cpu_s'), 2)} ({_f(r.get('fork_server_cpu_s'), 2)}) | "
            f"{r['foreign_core_pct']:.0f}% | {'yes' if r['valid'] else 'NO'} |"
        )
    cores = env["machine"]["nproc"]
    lines += [
        "",
        f"CPU: user + system seconds of every process of the launch alive at that point, "
        f"summed. On {cores} cores a launch takes at least its CPU / {cores}, however well "
        "its processes overlap.",
    ]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, results not written")
    parser.add_argument(
        "--only", choices=KINDS, help="measure only the demo or only the W1 cold start"
    )
    parser.add_argument(
        "--bytecode-cache", action="store_true",
        help="if PYTHONDONTWRITEBYTECODE is set, servers still read their modules "
        "compiled (a cache in a temporary directory), as an installed package's are",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    from bench import report

    started = datetime.now(UTC)
    env = report.environment({"name": "none"}, started)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-startup-"))
    try:
        compiled = compile_ahead(work) if args.bytecode_cache else False
        measured = measure(rounds, work, (args.only,) if args.only else KINDS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"started": started.isoformat(timespec="seconds"), "environment": env,
               "dirty": _dirty(), "rounds": rounds, "bytecode_cache": compiled,
               "dont_write_bytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
               **measured}  # fmt: skip
    text = render(results)
    print(text)
    if not args.quick:
        report.write_named_results("startup", started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
