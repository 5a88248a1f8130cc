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
  batch processor to a JSON-lines file (``exporter="file"``);
* **otlp** (only when asked for, ``--variants default,tracing,otlp``): the same with
  OTLP over gRPC, the production exporter, to a collector that discards the spans, in
  threads of the server's own process (its CPU is the table's ``server``).

A run whose server logged a dropped span (shoal's warning or the SDK's) is marked in the
per-run table: its figures are of fewer spans than requests made.

Each round starts new servers, one per variant, and measures every variant at c=1 and
c=64 (wrk, or the Python load generator), the variants interleaved, in an order rotated
from one round to the next, so that drift in the machine hits all three alike; the
figures are the medians over the rounds (12 by default, about 10 minutes: fewer resolve
no better than ±10% at c=64 on a 2-core machine). New servers every round, because two
servers of the same build differ by up to ±20% in CPU per request at c=64 on a 2-core
machine: one server per variant for the whole run measured that difference along with
the variants'.

``--variants off,default`` serves only those; ``--baseline REF`` also serves each from a
worktree of commit REF (``default@REF``...), in the same rounds: a change's effect,
measured in one run. Besides the ratio of the medians, each ratio is given as the mean of
the per-round ratios and its standard error: what the run resolves (at c=64 a round's
ratio varies by about ±0.09, so 24 rounds resolve about ±0.02).

Targets: *default* within 5% of *off* (throughput at c=64, p50 at c=1); *tracing* (and
*otlp*) costs at most 15%. The foreign CPU (used by anything but
this script and its servers) is measured per run; a run above 15% of one core is marked
not valid. Results go to ``bench/results/observability-<UTC timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import ECHO_BODY, median_or_none
from bench.loadgen import LoadSpec, run_load, wrk_path
from bench.procs import HOST, INVALID_CORE_PCT, REPO_ROOT, ForeignCpu, ServerProcess, free_port
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
        "otlp": {
            "tracing_options": {
                "enabled": True,
                "sampling_ratio": 1.0,
                "exporter": "otlp",
                "endpoint": OTLP_COLLECTOR,
            }
        },
    }


#: The endpoint of the otlp variant: the server starts a collector and puts its own there.
OTLP_COLLECTOR = "http://127.0.0.1:0"
#: What a server's log says when spans were dropped (shoal's warning, the SDK's).
_DROPPED = (b"were dropped, the oldest first", b"dropping Span")


def _start_collector() -> str:
    """An OTLP collector over gRPC on a free loopback port, in threads of this process,
    that discards the spans it receives; returns its endpoint."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as service
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as rpc

    class Collector(rpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            return service.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    rpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    _collectors.append(server)  # a gRPC server stops when collected
    return f"http://{HOST}:{port}"


_collectors: list[Any] = []


def serve_main(variant_json: str, port: int, direct_port: int = 0, app: str = "w1") -> int:
    """A server process: W1 on ``port`` with the variant's options, until SIGTERM; with
    ``direct_port``, its ingress replica also serves HTTP itself there (direct ingress).
    ``app``: ``bench.apps``'s W1 application of that name (``w1_defaults``: Ray's default
    options)."""
    from bench import apps
    from shoal import serve

    options = json.loads(variant_json)
    tracing_options = options.get("tracing_options", {})
    if tracing_options.get("endpoint") == OTLP_COLLECTOR:
        tracing_options["endpoint"] = _start_collector()
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
    """One new server per variant (and per build, with ``--baseline``: ``NAME@REF`` runs
    REF's worktree), each answering and quiet (its start-up work done)."""
    servers: dict[str, tuple[ServerProcess, int]] = {}
    options_of = variants(str(work / "spans.jsonl"))
    try:
        for suffix, root in args.builds.items():
            for variant in args.variants:
                name = variant + suffix
                port = free_port()
                argv = [sys.executable, "-m", "bench.observability", "--serve"]
                argv += [json.dumps(options_of[variant]), str(port)]
                if args.direct:  # the load goes to the ingress replica's own port
                    port = next(p for p in iter(free_port, None) if p != port)
                    argv += [str(port)]
                proc = ServerProcess(f"shoal-{name}-{round_}", argv, work, root=root)
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


@contextlib.contextmanager
def _builds(baseline: str | None, work: Path) -> Iterator[dict[str, Path]]:
    """The checkouts to serve from, by name suffix: this one (""), and with ``baseline``
    a detached worktree of that commit ("@REF"), removed afterwards."""
    if baseline is None:
        yield {"": REPO_ROOT}
        return
    tree = work / "baseline"
    git = ["git", "-C", str(REPO_ROOT)]
    subprocess.run([*git, "worktree", "add", "-q", "--detach", str(tree), baseline], check=True)
    try:
        yield {"": REPO_ROOT, f"@{baseline}": tree}
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


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
    return {"loadgen": loadgen, "runs": runs, "summary": summarize(runs, list(args.builds))}


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
    dropped = _logged_drops(proc.log_path)
    line = (f"round {round_} {name} c={concurrency}: {result.throughput_rps:.0f} req/s "
            f"p50 {result.p50_ms:.3f} ms (foreign {core_pct:.0f}% of a core)")  # fmt: skip
    print(line, file=sys.stderr, flush=True)
    return {
        "round": round_, "variant": name, "concurrency": concurrency,
        "valid": measured.valid, "foreign_core_pct": core_pct,
        "cpu_s": measured.cpu_s, "spans_dropped": dropped, **result.to_dict(),
    }  # fmt: skip


_log_read: dict[Path, int] = {}  # a server's log -> how far _logged_drops has read it


def _logged_drops(log: Path) -> bool:
    """Whether the server logged dropped spans since the last call (for this log)."""
    try:
        with log.open("rb") as file:
            file.seek(_log_read.get(log, 0))
            text = file.read()
    except FileNotFoundError:
        return False
    _log_read[log] = _log_read.get(log, 0) + len(text)
    return any(marker in text for marker in _DROPPED)


#: Issue 12's targets: (variant, compared with, concurrency, figure, limit, higher is better).
TARGETS = (
    ("default", "off", 64, "throughput_rps", 0.95, True),
    ("default", "off", 1, "p50_ms", 1.05, False),
    ("tracing", "default", 64, "throughput_rps", 0.85, True),
    ("tracing", "default", 1, "p50_ms", 1.15, False),
    ("otlp", "default", 64, "throughput_rps", 0.85, True),
    ("otlp", "default", 1, "p50_ms", 1.15, False),
)


def summarize(runs: list[dict[str, Any]], suffixes: list[str] | None = None) -> dict[str, Any]:
    """Each server's medians, the targets' ratios (this build's variants) and, with a
    baseline build (``suffixes``: ``["", "@REF"]``), each variant against REF's."""
    valid = [r for r in runs if r["valid"]]
    names = list(dict.fromkeys(r["variant"] for r in runs))
    points = {name: _point(name, valid, runs) for name in names}
    compared = [(a, b, c, figure) for a, b, c, figure, _limit, _higher in TARGETS]
    for suffix in (suffixes or [""])[1:]:
        compared += [(v, v + suffix, c, figure) for v in names if v + suffix in names
                     for c, figure in ((64, "throughput_rps"), (1, "p50_ms"))]  # fmt: skip
    ratios = {}
    for a, b, c, figure in compared:
        if a in points and b in points:
            ratios[_key(a, b, c)] = _compare(valid, a, b, c, figure, points)
    return {"points": points, "ratios": ratios, "valid_runs": len(valid), "runs": len(runs)}


def _key(a: str, b: str, concurrency: int) -> str:
    return f"{a} / {b}, c={concurrency}"


def _point(name: str, valid: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [r for r in valid if r["variant"] == name]
    # CPU per request: from every run when none is valid (a shared machine), as the
    # table's header says; the ratios use valid runs only.
    cpu_runs = [r for r in (mine or runs) if r["variant"] == name and r["concurrency"] == 64]
    return {
        "c64_rps": median_or_none([r["throughput_rps"] for r in mine if r["concurrency"] == 64]),
        "c1_p50_ms": median_or_none([r["p50_ms"] for r in mine if r["concurrency"] == 1]),
        "c64_cpu_us_per_request": _cpu_per_request(cpu_runs),
    }


def _compare(
    valid: list[dict[str, Any]], a: str, b: str, concurrency: int, figure: str,
    points: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """``a``'s median over ``b``'s, and the spread of the per-round ratios (rounds where
    both ran validly): their mean and its standard error, what the bench resolves."""
    point = "c64_rps" if concurrency == 64 else "c1_p50_ms"
    by_round: dict[int, dict[str, float]] = {}
    for r in valid:
        if r["concurrency"] == concurrency and r["variant"] in (a, b):
            by_round.setdefault(r["round"], {})[r["variant"]] = r[figure]
    each = [v[a] / v[b] for v in by_round.values() if len(v) == 2 and v[b]]
    mean = statistics.mean(each) if each else None
    error = statistics.stdev(each) / math.sqrt(len(each)) if len(each) > 1 else None
    return {
        "ratio": _ratio(points[a][point], points[b][point]),
        "rounds": len(each), "round_mean": mean, "round_standard_error": error,
    }  # fmt: skip


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
        f"W1 driven through the {results.get('path', 'proxy')}{_baseline(results)}",
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
    lines += ["", "| ratio | of the medians | per-round mean ± s.e. (rounds) | target |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    limits = {_key(a, b, c): (limit, higher) for a, b, c, _figure, limit, higher in TARGETS}
    for key, found in s["ratios"].items():
        lines.append(_ratio_row(key, found, limits.get(key)))
    lines += [
        "",
        "Per run (foreign CPU in % of one core):",
        "",
        "| round | variant | c | req/s | p50 ms | p99 ms | foreign | valid |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["runs"]:
        dropped = " (spans dropped)" if r.get("spans_dropped") else ""
        lines.append(
            f"| {r['round']} | {r['variant']}{dropped} | {r['concurrency']} | "
            f"{_f(r['throughput_rps'], 0)} | {_f(r['p50_ms'], 3)} | {_f(r['p99_ms'], 3)} | "
            f"{r['foreign_core_pct']:.0f}% | {'yes' if r['valid'] else 'NO'} |"
        )
    dropping = sum(1 for r in results["runs"] if r.get("spans_dropped"))
    if dropping:
        lines.insert(3, f"- spans dropped (logged by the server) in {dropping} run(s)")
    return "\n".join(lines) + "\n"


def _baseline(results: dict[str, Any]) -> str:
    ref = results.get("baseline")
    return f"; NAME@{ref}: served from a worktree of {ref}" if ref else ""


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio_row(key: str, found: dict[str, Any], target: tuple[float, bool] | None) -> str:
    ratio, mean, error = found["ratio"], found["round_mean"], found["round_standard_error"]
    spread = "n/a" if mean is None else f"{mean:.3f}"
    if error is not None:
        spread += f" ± {error:.3f}"
    spread += f" ({found['rounds']})"
    if target is None:
        verdict = "-"
    elif ratio is None:
        verdict = "no valid data"
    else:
        limit, higher = target
        met = ratio >= limit if higher else ratio <= limit
        verdict = f"{'≥' if higher else '≤'} {limit:g}: {'PASS' if met else 'FAIL'}"
    return f"| {key} | {_f(ratio, 3)} | {spread} | {verdict} |"


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
        "--variants", default="off,default,tracing",
        help="which of off, default, tracing, otlp to serve (comma-separated)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", metavar="REF",
        help="also serve each variant from a worktree of commit REF (NAME@REF), in the "
        "same rounds: this build against REF's, in one run",
    )  # fmt: skip
    parser.add_argument(
        "--direct", action="store_true",
        help="drive W1 at its direct ingress port (docs/direct-ingress.md), not the proxy's",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(variants(""))
    if unknown:
        parser.error(
            f"--variants: unknown {', '.join(sorted(unknown))} (off, default, tracing, otlp)"
        )
    if args.baseline is not None:
        verify = ["git", "-C", str(REPO_ROOT), "rev-parse", "-q", "--verify"]
        if subprocess.run([*verify, f"{args.baseline}^{{commit}}"], capture_output=True).returncode:
            parser.error(f"--baseline: {args.baseline!r} names no commit of this repository")
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1.0, 0.3
    from bench import report

    started = datetime.now(UTC)
    env = report.environment({"name": "wrk or bench.loadgen"}, started)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-observability-"))
    try:
        with _builds(args.baseline, work) as args.builds:
            measured = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "started": started.isoformat(timespec="seconds"), "environment": env,
        "dirty": _dirty(), "rounds": args.rounds, "duration_s": args.duration,
        "path": "direct ingress" if args.direct else "proxy", "baseline": args.baseline,
        **measured,
    }  # fmt: skip
    text = render(results)
    print(text)
    if not args.quick:
        name = "observability-direct" if args.direct else "observability"
        report.write_named_results(name, started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
