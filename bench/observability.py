"""``python -m bench.observability``: what metrics, logs and traces cost (issue 12's targets).

W1 (the echo deployment of ``bench.apps``, over HTTP through the proxy; with ``--direct``,
at its ingress replica's own port: docs/direct-ingress.md) is served three
ways, by three servers started side by side from the same build, each a
``python -m bench.observability --serve VARIANT PORT`` process (``serve.start`` with the
variant's options, then ``serve.run``):

* **off**: metrics disabled, no access log (``metrics_options={"enabled": False}``,
  ``logging_config={"enable_access_log": False}``), tracing off;
* **default**: shoal's defaults (metrics and the access log on, tracing off);
* **tracing**: the defaults plus tracing at 100% sampling, spans exported by the SDK's
  batch processor to a JSON-lines file (``exporter="file"``).

Each round starts new servers, one per variant, and measures every variant at c=1 and
c=64 (wrk, or the Python load generator), the variants interleaved, in an order rotated
from one round to the next, so that drift in the machine hits all three alike; the
figures are the medians over the rounds (12 by default, about 10 minutes: fewer resolve
no better than ±10% at c=64 on a 2-core machine). New servers every round, because two
servers of the same build differ by up to ±20% in CPU per request at c=64 on a 2-core
machine: one server per variant for the whole run measured that difference along with
the variants'.

Targets: *default* within 5% of *off* (throughput at c=64, p50 at c=1); *tracing* costs
at most 15%. The foreign CPU (used by anything but
this script and its servers) is measured per run; a run above 15% of one core is marked
not valid. Results go to ``bench/results/observability-<UTC timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import ECHO_BODY, median_or_none
from bench.loadgen import LoadSpec, run_load, wrk_path
from bench.procs import HOST, INVALID_CORE_PCT, ForeignCpu, ServerProcess, free_port
from bench.procs import git_dirty as _dirty
from bench.suite import measured_load

CONCURRENCIES = (1, 64)


def variants(trace_file: str) -> dict[str, dict[str, Any]]:
    """The ``serve.start`` keywords of each variant."""
    return {
        "off": {
            "metrics_options": {"enabled": False},
            "logging_config": {"enable_access_log": False},
        },
        "default": {},
        "tracing": {
            "tracing_options": {
                "enabled": True,
                "sampling_ratio": 1.0,
                "exporter": "file",
                "path": trace_file,
            }
        },
    }


def serve_main(variant_json: str, port: int, direct_port: int = 0, app: str = "w1") -> int:
    """A server process: W1 on ``port`` with the variant's options, until SIGTERM; with
    ``direct_port``, its ingress replica also serves HTTP itself there (direct ingress).
    ``app``: ``bench.apps``'s W1 application of that name (``w1_defaults``: Ray's default
    options)."""
    from bench import apps
    from shoal import serve

    options = json.loads(variant_json)
    serve.start(
        http_options={"host": HOST, "port": port}, admin_options={"port": 0}, _attach=False,
        **options,
    )  # fmt: skip
    application = {"w1": apps.w1, "w1_defaults": apps.w1_defaults}[app]
    serve.run(application, name="w1", route_prefix="/", direct_ingress_port=direct_port or None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _start_servers(
    args: argparse.Namespace, work: Path, meter: ForeignCpu, round_: int
) -> dict[str, tuple[ServerProcess, int]]:
    """One new server per variant, each answering and quiet (its start-up work done)."""
    servers: dict[str, tuple[ServerProcess, int]] = {}
    try:
        for name, options in variants(str(work / "spans.jsonl")).items():
            port = free_port()
            argv = [sys.executable, "-m", "bench.observability", "--serve", json.dumps(options)]
            argv += [str(port)]
            if args.direct:  # the load goes to the ingress replica's own port
                port = next(p for p in iter(free_port, None) if p != port)
                argv += [str(port)]
            proc = ServerProcess(f"shoal-{name}-{round_}", argv, work)
            servers[name] = (proc, port)
            proc.start()
            meter.roots.add(proc.pid)
        for proc, port in servers.values():
            proc.wait_http_ok(port, "POST", "/echo", ECHO_BODY, 120.0)
        for proc, _port in servers.values():  # start-up work (the fork server's) done
            proc.wait_quiet()
    except BaseException:
        _stop_servers(servers, meter)
        raise
    return servers


def _stop_servers(servers: dict[str, tuple[ServerProcess, int]], meter: ForeignCpu) -> None:
    for proc, _port in servers.values():
        proc.stop()
        meter.roots.discard(proc.pid)


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The rounds (see the module's doc): new servers each, every variant at c=1 and c=64."""
    meter = ForeignCpu()
    loadgen = "wrk" if wrk_path() and args.loadgen != "python" else "python"
    runs: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            servers = _start_servers(args, work, meter, round_)
            try:
                names = list(servers)
                shift = round_ % len(names)
                order = names[shift:] + names[:shift]
                for concurrency in CONCURRENCIES:
                    for name in order:
                        runs.append(_run(args, loadgen, meter, servers[name], name, round_,
                                         concurrency))  # fmt: skip
            finally:
                _stop_servers(servers, meter)
    finally:
        meter.close()
    return {"loadgen": loadgen, "runs": runs, "summary": summarize(runs)}


def _run(
    args: argparse.Namespace,
    loadgen: str,
    meter: ForeignCpu,
    server: tuple[ServerProcess, int],
    name: str,
    round_: int,
    concurrency: int,
) -> dict[str, Any]:
    """One measured load on one variant's server (after an unrecorded warm-up)."""
    proc, port = server
    spec = LoadSpec(port, "/echo", "POST", ECHO_BODY, concurrency, args.warmup)
    run_load(spec, loadgen)  # warm-up, not recorded
    spec = LoadSpec(port, "/echo", "POST", ECHO_BODY, concurrency, args.duration)
    measured = measured_load(meter, proc.pid, partial(run_load, spec, loadgen))
    result, core_pct = measured.result, measured.foreign_core_pct
    line = (f"round {round_} {name} c={concurrency}: {result.throughput_rps:.0f} req/s "
            f"p50 {result.p50_ms:.3f} ms (foreign {core_pct:.0f}% of a core)")  # fmt: skip
    print(line, file=sys.stderr, flush=True)
    return {
        "round": round_, "variant": name, "concurrency": concurrency,
        "valid": measured.valid, "foreign_core_pct": core_pct,
        "cpu_s": measured.cpu_s, **result.to_dict(),
    }  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [r for r in runs if r["valid"]]
    points: dict[str, dict[str, Any]] = {}
    for name in ("off", "default", "tracing"):
        mine = [r for r in valid if r["variant"] == name]
        # CPU per request: from every run when none is valid (a shared machine), as the
        # table's header says; the ratios use valid runs only.
        cpu_runs = [r for r in (mine or runs) if r["variant"] == name and r["concurrency"] == 64]
        points[name] = {
            "c64_rps": median_or_none(
                [r["throughput_rps"] for r in mine if r["concurrency"] == 64]
            ),
            "c1_p50_ms": median_or_none([r["p50_ms"] for r in mine if r["concurrency"] == 1]),
            "c64_cpu_us_per_request": _cpu_per_request(cpu_runs),
        }
    off, default, tracing = points["off"], points["default"], points["tracing"]
    return {
        "points": points,
        "default_vs_off_c64": _ratio(default["c64_rps"], off["c64_rps"]),
        "default_vs_off_c1_p50": _ratio(default["c1_p50_ms"], off["c1_p50_ms"]),
        "tracing_vs_default_c64": _ratio(tracing["c64_rps"], default["c64_rps"]),
        "tracing_vs_default_c1_p50": _ratio(tracing["c1_p50_ms"], default["c1_p50_ms"]),
        "valid_runs": len(valid),
        "runs": len(runs),
    }


def _cpu_per_request(runs: list[dict[str, Any]]) -> dict[str, float]:
    """CPU microseconds per successful request of each process of a server (``server`` is
    the driver: the controller), over ``runs``."""
    served = sum(r["requests"] - r["errors"] for r in runs)
    roles = sorted({role for r in runs for role in r.get("cpu_s", {})})
    if not served:
        return {}
    return {
        role: round(sum(r.get("cpu_s", {}).get(role, 0.0) for r in runs) / served * 1e6, 1)
        for role in roles
    }


def render(results: dict[str, Any]) -> str:
    env, s = results["environment"], results["summary"]
    lines = [
        f"# Observability cost ({results['started']})",
        "",
        f"- commit {env['git_commit']} (dirty tree: {results['dirty']}); "
        f"{env['machine']['cpu_model']}, {env['machine']['nproc']} cores; Python "
        f"{env['python']['version']}; packages {env['packages']}; load generator "
        f"{results['loadgen']}; {results['rounds']} rounds of {results['duration_s']:g} s; "
        f"W1 driven through the {results.get('path', 'proxy')}",
        f"- valid runs {s['valid_runs']} of {s['runs']} (foreign CPU ≤ {INVALID_CORE_PCT:g}% "
        "of a core)",
        "",
        "| variant | W1 c=64 req/s | W1 c=1 p50 ms | CPU µs per request at c=64, by process "
        "(valid runs; all runs when none is) |",
        "| --- | --- | --- | --- |",
    ]
    for name, point in s["points"].items():
        rps, p50 = point["c64_rps"], point["c1_p50_ms"]
        cpu = point.get("c64_cpu_us_per_request") or {}
        each = ", ".join(f"{role} {us:g}" for role, us in cpu.items()) or "n/a"
        lines.append(f"| {name} | {_f(rps, 0)} | {_f(p50, 3)} | {each} |")
    lines += [
        "",
        "| target | ratio | verdict |",
        "| --- | --- | --- |",
        _target("default / off, c=64 throughput", s["default_vs_off_c64"], 0.95, higher=True),
        _target("default / off, c=1 p50", s["default_vs_off_c1_p50"], 1.05, higher=False),
        _target("tracing / default, c=64 throughput", s["tracing_vs_default_c64"], 0.85, True),
        _target("tracing / default, c=1 p50", s["tracing_vs_default_c1_p50"], 1.15, False),
        "",
        "Per run (foreign CPU in % of one core):",
        "",
        "| round | variant | c | req/s | p50 ms | p99 ms | foreign | valid |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['round']} | {r['variant']} | {r['concurrency']} | "
            f"{_f(r['throughput_rps'], 0)} | {_f(r['p50_ms'], 3)} | {_f(r['p99_ms'], 3)} | "
            f"{r['foreign_core_pct']:.0f}% | {'yes' if r['valid'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _target(what: str, ratio: float | None, limit: float, higher: bool) -> str:
    if ratio is None:
        return f"| {what} | n/a | no valid data |"
    met = ratio >= limit if higher else ratio <= limit
    bound = f"≥ {limit:g}" if higher else f"≤ {limit:g}"
    return f"| {what} | {ratio:.3f} ({bound}) | {'PASS' if met else 'FAIL'} |"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve_main(argv[1], *(int(port) for port in argv[2:4]), *argv[4:5])
    parser = argparse.ArgumentParser(prog="python -m bench.observability")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--loadgen", choices=("auto", "python"), default="auto")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (smoke test)")
    parser.add_argument(
        "--direct", action="store_true",
        help="drive W1 at its direct ingress port (docs/direct-ingress.md), not the proxy's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.3
    from bench import report

    started = datetime.now(UTC)
    env = report.environment({"name": "wrk or bench.loadgen"}, started)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-observability-"))
    try:
        measured = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "started": started.isoformat(timespec="seconds"), "environment": env,
        "dirty": _dirty(), "rounds": args.rounds, "duration_s": args.duration,
        "path": "direct ingress" if args.direct else "proxy", **measured,
    }  # fmt: skip
    text = render(results)
    print(text)
    if not args.quick:
        name = "observability-direct" if args.direct else "observability"
        report.write_named_results(name, started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
