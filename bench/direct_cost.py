"""Instructions per HTTP request of the processes that serve W1, by callgrind (issue 12).

``python -m bench.direct_cost [--n1 300 --n2 1500] [--variants off,default,tracing]
[--path direct|proxy] [--save]``: for each variant of ``bench.observability`` (off,
default, tracing at 100%), a server (``python -m bench.observability --serve``) runs
under ``valgrind --tool=callgrind --trace-children=yes`` with ``SHOAL_FORK_SERVER=0``
(every worker is a ``python -m`` child, so callgrind follows it). After a warm-up, this
process (outside valgrind) sends ``n1`` then ``n2`` sequential ``POST /echo`` requests on
one keep-alive connection (or on ``--clients`` connections at once: with ``--app
w1_defaults``, whose ``max_ongoing_requests`` is Ray's 5, more than 5 make requests
queue), and reads every process's instruction counter
(``callgrind_control -e Ir``, named driver, proxy or replica by its command line, and
by thread: thread 1 is the main one)
before, between and after: ``(Ir(n2) - Ir(n1)) / (n2 - n1)`` is its instructions per
request, start-up, shutdown and the cost of a reading cancelled. Unlike wrk's figures,
these do not depend on the machine's load. (One server per variant, not one per N:
shoal SIGKILLs workers that exit slowly at shutdown, as they do under valgrind.)

What it does not cancel: work done per second rather than per request (health checks,
metrics pushes) counts in proportion to the requests' wall time, which valgrind
stretches ~50x. The "periodic" column estimates it: the counters over an idle interval
as long as the ``n2`` requests took, scaled to one request's share of the wall time.
Work shared by the requests of one interval is overstated for the same reason: access
lines share a time stamp per millisecond and a write per 0.1 s, which at full speed
several requests share and under valgrind one or a few do.
The served total is the replica (``--path direct``: at its direct ingress port) or
proxy + replica (``--path proxy``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ECHO_BODY
from bench.observability import variants
from bench.procs import HOST, free_port

WARMUP = 50
READY_DEADLINE_S = 600.0  # start-up under callgrind takes tens of seconds, more when busy
STOP_DEADLINE_S = 300.0
POLL_S = 1.0  # the polls come before the first reading: they do not count
_HEADERS = {"Content-Type": "application/json"}


def _role(cmd: str) -> str:
    if "proxy_worker" in cmd:
        return "proxy"
    if "shoal._runtime.process.worker" in cmd:
        return "replica"
    return "driver" if "bench.observability" in cmd else "other"


def _group(pgid: int) -> list[int]:
    """The processes of process group ``pgid`` (the server and its workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def _counters(pgid: int) -> dict[str, int]:
    """Instructions so far of every process of the server under callgrind (all threads),
    summed by role and by role and thread, read with ``callgrind_control -e Ir`` (the
    process goes on running)."""
    pids = [str(pid) for pid in _group(pgid)]
    result = subprocess.run(["callgrind_control", "-e", "Ir", *pids],
                            capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    totals: dict[str, int] = {}
    role = ""
    for line in result.stdout.splitlines():
        head = re.match(r"PID (\d+): (.*)", line)
        if head:
            role = _role(head.group(2))
            totals.setdefault(role, 0)
        thread = re.match(r"\s*Th (\d+)\s+([\d,]+)", line)
        if thread and role:
            count = int(thread.group(2).replace(",", ""))
            totals[role] += count
            # Threads by their number (1: the main thread; in a replica the next ones are
            # the log files' flusher, then the span exporter when tracing: by start order).
            key = f"{role} thread {thread.group(1)}"
            totals[key] = totals.get(key, 0) + count
    return totals


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> int:
    """Poll ``POST /echo`` until it answers 200; the number of answers that were not 200."""
    deadline, refused = time.monotonic() + READY_DEADLINE_S, 0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        try:
            conn.request("POST", "/echo", body=ECHO_BODY, headers=_HEADERS)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return refused
            refused += 1
        except OSError:
            pass  # not listening yet: costs the server nothing
        finally:
            conn.close()
        time.sleep(POLL_S)
    raise TimeoutError(f"not ready after {READY_DEADLINE_S}s: {log.read_text()[-2000:]}")


def _send(port: int, n: int, clients: int = 1) -> float:
    """``n`` requests, sequential on each of ``clients`` keep-alive connections at once
    (``n`` shared among them); their wall time in seconds."""
    failures: list[BaseException] = []

    def client(count: int) -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            for _ in range(count):
                conn.request("POST", "/echo", body=ECHO_BODY, headers=_HEADERS)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        except BaseException as exc:  # re-raised below, in the caller
            failures.append(exc)
        finally:
            conn.close()

    counts = [n // clients + (i < n % clients) for i in range(clients)]
    threads = [threading.Thread(target=client, args=(count,)) for count in counts]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return time.monotonic() - started


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the driver (it shuts shoal down); wait until its whole process group (the
    workers) has exited; SIGKILL what is left of the group after the deadline."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_DEADLINE_S
    try:
        proc.wait(STOP_DEADLINE_S)
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run(options: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One server under callgrind: after the warm-up, ``n1`` then ``n2`` requests, the
    counters read before, between and after; instructions per request by role."""
    port = free_port()
    direct_port = next(p for p in iter(free_port, None) if p != port)
    argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
            "--callgrind-out-file=/dev/null", sys.executable, "-m", "bench.observability",
            "--serve", json.dumps(options), str(port)]  # fmt: skip
    argv += [str(direct_port) if args.path == "direct" else "0", args.app]
    target = direct_port if args.path == "direct" else port
    log = Path(tempfile.mkstemp(prefix="server-", suffix=".log", dir=work)[1])
    env = {**os.environ, "SHOAL_FORK_SERVER": "0"}
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        polls = _wait_ready(proc, target, log)
        ready = time.monotonic() - started
        _send(target, WARMUP, args.clients)
        c0 = _counters(proc.pid)
        wall1 = _send(target, args.n1, args.clients)
        c1 = _counters(proc.pid)
        wall2 = _send(target, args.n2, args.clients)
        c2 = _counters(proc.pid)
        idle = threading.Event()  # no requests as long as the n2 ones took: periodic work
        idle.wait(wall2)
        c3 = _counters(proc.pid)
    finally:
        _stop(proc)
    # Ir(n) = counter difference over n requests; (Ir(n2) - Ir(n1)) / (n2 - n1) cancels
    # what each reading costs and any other fixed cost of a segment.
    dn = args.n2 - args.n1
    per = {r: ((c2.get(r, 0) - c1.get(r, 0)) - (c1.get(r, 0) - c0.get(r, 0))) / dn
           for r in sorted(set(c0) | set(c2))}  # fmt: skip
    # What the same processes do per request's worth of wall time with no requests.
    periodic = {r: (c3.get(r, 0) - c2.get(r, 0)) / wall2 * (wall2 - wall1) / dn
                for r in per}  # fmt: skip
    served = ("replica",) if args.path == "direct" else ("proxy", "replica")
    return {
        "per_request": per, "served": sum(per.get(r, 0.0) for r in served),
        "served_net": sum(per.get(r, 0.0) - periodic.get(r, 0.0) for r in served),
        "periodic_per_request": periodic, "counters": [c0, c1, c2, c3],
        "ready_s": ready, "requests_s": [wall1, wall2], "non_200_polls": polls,
        "run_s": time.monotonic() - started,
    }  # fmt: skip


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Per variant (one server each): instructions per request by role, and timings."""
    chosen = variants(str(work / "spans.jsonl"))
    results: dict[str, Any] = {}
    for name in args.variants.split(","):
        result = results[name] = _run(chosen[name], args, work)
        print(f"{name}: ready in {result['ready_s']:.0f} s, n1/n2 requests in "
              f"{result['requests_s'][0]:.0f}/{result['requests_s'][1]:.0f} s, run "
              f"{result['run_s']:.0f} s; per request {result['per_request']}",
              file=sys.stderr, flush=True)  # fmt: skip
    return results


def render(
    results: dict[str, Any], args: argparse.Namespace, started: datetime, env: dict[str, Any]
) -> str:
    served = "replica" if args.path == "direct" else "proxy + replica"
    lines = [
        f"# Instructions per W1 request ({started.isoformat(timespec='seconds')})",
        "",
        f"- path {args.path}; app {args.app}; {args.clients} client(s) at once; callgrind, "
        f"(Ir(n2) - Ir(n1)) / (n2 - n1), n1 {args.n1}, n2 {args.n2}, {WARMUP} warm-up "
        f"requests; served = {served}",
        f"- commit {env['git_commit']} (dirty tree: {env['git_dirty']}); "
        f"{env['machine']['cpu_model']}; Python {env['python']['version']}; "
        f"packages {env['packages']}",
        "",
        "| variant | process | instructions/request | of which periodic (idle estimate) |",
        "| --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        for role, per in result["per_request"].items():
            idle = result["periodic_per_request"].get(role, 0.0)
            if " thread " in role and abs(per) < 1 and abs(idle) < 1:
                continue  # a thread with nothing to do
            lines.append(f"| {name} | {role} | {per:,.0f} | {idle:,.0f} |")
        net = result["served_net"]
        lines.append(f"| {name} | **served** | **{result['served']:,.0f}** | (net {net:,.0f}) |")
    lines.append("")
    for a, b in (("default", "off"), ("tracing", "default")):
        if a in results and b in results and results[b]["served_net"]:
            ratio = results[a]["served"] / results[b]["served"]
            net = results[a]["served_net"] / results[b]["served_net"]
            lines.append(f"- {a} / {b} (served): {ratio:.3f}; net of periodic work: {net:.3f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.direct_cost")
    parser.add_argument("--n1", type=int, default=300)
    parser.add_argument("--n2", type=int, default=1500)
    parser.add_argument("--variants", default="off,default,tracing")
    parser.add_argument("--path", choices=("direct", "proxy"), default="direct")
    parser.add_argument(
        "--app", choices=("w1", "w1_defaults"), default="w1",
        help="w1_defaults: max_ongoing_requests=5, so with --clients above 5 requests queue",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, default=1, help="connections sending at once")
    parser.add_argument("--save", action="store_true", help="write bench/results/direct-cost-*")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, not {args.clients}")
    started = datetime.now(UTC)
    from bench import report

    env = report.environment({"name": "valgrind --tool=callgrind"}, started)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-direct-cost-"))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(results, args, started, env)
    print(text)
    if args.save:
        name = "direct-cost" if args.path == "direct" else "direct-cost-proxy"
        name += "" if args.app == "w1" else f"-{args.app.replace('_', '-')}"
        name += "" if args.clients == 1 else f"-c{args.clients}"
        results = {"args": vars(args), "environment": env, **results}
        report.write_named_results(name, started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
