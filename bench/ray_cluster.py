"""``python -m bench.ray_cluster``: shoal-on-Ray against Ray Serve on one Ray cluster (issue 13).

One local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two worker
nodes on 127.0.0.1, the workers offering the custom resources ``node_a`` and ``node_b``,
no dashboard) serves, one framework at a time, the applications of ``bench.apps_ray``
(W1 echo, W2 3-stage pipeline, a handle caller on ``node_a`` calling a callee on
``node_b``): the same source, with ``serve`` from Ray Serve or from shoal.

Each side runs in its own driver process (``python -m bench.ray_cluster --serve SIDE
ADDRESS PORT STATUS``), which connects to the cluster, starts its framework with HTTP on a
free 127.0.0.1 port and ``proxy_location="HeadOnly"`` (Ray Serve: its defaults otherwise;
shoal: ``serve.start(runtime="ray", address=...)``), deploys the applications, reports
ready in a status file and serves until SIGINT/SIGTERM, then shuts its framework down.
Rounds interleave the sides (round 0: Ray Serve then shoal; round 1: shoal then Ray Serve;
...), so that the two never share the cluster and drift hits both alike.

Per side and round, from this process: W1 and W2 with wrk (or ``bench.loadgen``) at c=64
and c=1, then the handle round trip (``GET /handle?n=N``: N sequential calls timed inside
the caller). Every measured run records its foreign CPU (``bench.procs.ForeignCpu``: the
machine's busy time minus this script, its load generator, the cluster and the drivers);
above 15% of a core it is not valid and left out of the medians. When shoal has no "ray"
runtime yet, its side is reported as "not available" with shoal's message, and Ray
Serve's figures are still measured. Results: ``bench/results/ray-cluster-<UTC>.json``
and ``.md`` (not written with ``--quick``); the Markdown is printed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import loadgen
from bench.common import ECHO_BODY
from bench.procs import (
    HOST,
    INVALID_CORE_PCT,
    REPO_ROOT,
    ForeignCpu,
    ServerProcess,
    descendants,
    free_port,
    http_request,
    is_alive,
)

SIDES = ("ray", "shoal")  # Ray Serve (the reference), shoal-on-Ray
SIDE_NAMES = {"ray": "Ray Serve", "shoal": "shoal-on-Ray"}
#: Logical CPUs of each node (the head, node_a, node_b): Ray Serve reserves one per replica
#: by default and the applications have 6 replicas; they only steer placement (2 cores).
NODE_CPUS = (3, 2, 2)
READY_DEADLINE_S = 600.0  # a driver's start: connect, start serving, deploy 6 replicas
STOP_GRACE_S = 90.0  # a driver's serve.shutdown() after SIGINT
HTTP_TIMEOUT_S = 300.0  # one GET /handle?n=N
#: (workload, method, path, body) driven with the load generator.
HTTP_WORKLOADS = (("W1", "POST", "/w1/echo", ECHO_BODY), ("W2", "POST", "/w2", ECHO_BODY))
CONCURRENCIES = (64, 1)
#: Before measuring, wait until this script's tree uses less than this (% of a core).
SETTLE_CORE_PCT = 30.0
#: Which ``serve`` bench.apps_ray binds to ("ray": Ray Serve; else shoal); set by the driver.
FRAMEWORK_ENV = "SHOAL_BENCH_SERVE"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    rounds: int
    duration_s: float
    warmup_s: float
    handle_calls: int
    settle_max_s: float
    loadgen: str  # "wrk" or "python"
    sides: tuple[str, ...]
    quick: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="1 round of short runs, not written")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 3; quick 2)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per workload (default 1)")
    parser.add_argument("--handle-calls", type=int, help="sequential handle calls (default 2000)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: ray,shoal")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    return parser


def make_settings(args: argparse.Namespace) -> Settings:
    """Settings from the parsed arguments; ValueError for an unknown side."""
    quick = bool(args.quick)
    sides = tuple(s.strip().lower() for s in args.sides.split(",") if s.strip())
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        raise ValueError(f"--sides {args.sides!r}: choose from {', '.join(SIDES)}")

    def pick(value: float | None, normal: float, short: float) -> float:
        return (short if quick else normal) if value is None else value

    return Settings(
        rounds=max(1, min(int(pick(args.rounds, 3, 1)), 20)),
        duration_s=max(1.0, min(pick(args.duration, 3.0, 2.0), 600.0)),
        warmup_s=max(0.0, min(pick(args.warmup, 1.0, 0.0), 60.0)),
        handle_calls=max(10, min(int(pick(args.handle_calls, 2000, 300)), 200_000)),
        settle_max_s=15.0 if quick else 60.0,
        loadgen=args.loadgen if args.loadgen == "python" else "auto",
        sides=tuple(dict.fromkeys(sides)),
        quick=quick,
    )


# --- the driver process of one side ------------------------------------------------------------
class NotAvailable(Exception):
    """The framework cannot run on Ray here (shoal without its "ray" runtime)."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``serve.start(runtime="ray", address=...)`` failed because shoal has no Ray
    runtime (an unknown runtime, or keywords it does not take), not because it broke."""
    if isinstance(exc, TypeError):
        return True
    text = str(exc)
    known = ("unknown runtime", "argument 'runtime'", "argument 'address'")
    return type(exc).__name__ == "ConfigError" and any(k in text for k in known)


def start_framework(side: str, address: str, port: int) -> Any:
    """Connect to the cluster and start ``side``'s HTTP proxy; its ``serve`` module."""
    http_options = {"host": HOST, "port": port}
    if side == "ray":
        import ray
        from ray import serve

        ray.init(address=address)
        serve.start(proxy_location="HeadOnly", http_options=http_options)
        return serve
    from shoal import serve as shoal_serve

    try:
        shoal_serve.start(
            runtime="ray",
            address=address,
            proxy_location="HeadOnly",
            http_options=http_options,
            admin_options={"port": 0},
            _attach=False,
        )
    except Exception as exc:
        if is_unavailable(exc):
            raise NotAvailable(f"{type(exc).__name__}: {exc}") from exc
        raise
    return shoal_serve


def _write_status(path: Path, state: str, **fields: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"state": state, "pid": os.getpid(), **fields}))
    tmp.replace(path)


def serve_main(side: str, address: str, port: int, status_path: str) -> int:
    """The driver of one side: serve the applications until SIGINT/SIGTERM."""
    os.environ[FRAMEWORK_ENV] = side  # read when bench.apps_ray is imported (below)
    status = Path(status_path)
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not serving.is_set():  # still starting: stop now, shut down what started
            raise SystemExit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    serve = None
    try:
        started = time.perf_counter()
        serve = start_framework(side, address, port)
        from bench import apps_ray

        for name, route_prefix, app in apps_ray.APPS:
            serve.run(app, name=name, route_prefix=route_prefix)
        serving.set()
        _write_status(status, "ready", start_s=time.perf_counter() - started)
        stop.wait()
        return 0
    except NotAvailable as exc:
        _write_status(status, "not available", reason=str(exc))
        return 0
    except BaseException as exc:
        _write_status(status, "failed", error=f"{type(exc).__name__}: {exc}"[-4000:])
        raise
    finally:
        if serve is not None:
            with contextlib.suppress(Exception):
                serve.shutdown()
        if side == "ray":
            with contextlib.suppress(Exception):
                import ray

                ray.shutdown()


# --- the cluster -------------------------------------------------------------------------------
class LocalCluster:
    """A head and two worker nodes on 127.0.0.1; ``stop`` (also at exit) shuts them down and
    SIGKILLs any Ray process of this script's tree that outlived it."""

    def __init__(self) -> None:
        self.cluster: Any = None
        self.address = ""
        self.pids: dict[int, str] = {}  # pid -> its start time: a reused pid is not ours
        # Ray records the last cluster started here for ray.init("auto"); others' sessions
        # on this machine must not find ours there: its content is put back as it was.
        self.address_file = _read_address_file()

    def start(self) -> str:
        from ray.cluster_utils import Cluster

        atexit.register(self.stop)
        common = {"node_ip_address": HOST, "include_dashboard": False}
        head_cpus, a_cpus, b_cpus = NODE_CPUS
        self.cluster = Cluster()
        # The head's dashboard agent would take its fixed default port: any free one.
        self.cluster.add_node(num_cpus=head_cpus, dashboard_agent_listen_port=None, **common)
        _restore_address_file(self.address_file)
        self.cluster.add_node(num_cpus=a_cpus, resources={"node_a": 1}, **common)
        self.cluster.add_node(num_cpus=b_cpus, resources={"node_b": 1}, **common)
        self.cluster.wait_for_nodes(timeout=120)
        self.address = str(self.cluster.address)
        self.remember()
        return self.address

    def remember(self) -> None:
        for pid in descendants(os.getpid()):
            self.pids.setdefault(pid, _start_time(pid))

    def stop(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is None:
            return
        self.remember()
        try:
            cluster.shutdown()
        except Exception as exc:
            log(f"ray-cluster: cluster shutdown failed: {exc!r}; killing its processes")
        _restore_address_file(self.address_file)
        strays = [pid for pid, started in sorted(self.pids.items())
                  if is_alive(pid) and _start_time(pid) == started and _is_ray(pid)]  # fmt: skip
        for pid in strays:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if strays:
            log(f"ray-cluster: killed {len(strays)} Ray process(es) left after shutdown")


def _address_path() -> Path:
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _read_address_file() -> str | None:
    with contextlib.suppress(Exception):
        return _address_path().read_text()
    return None


def _restore_address_file(content: str | None) -> None:
    with contextlib.suppress(Exception):
        if content is None:
            _address_path().unlink(missing_ok=True)
        else:
            _address_path().write_text(content)


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _is_ray(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ray" in cmd


# --- one side of one round ---------------------------------------------------------------------
def _wait_status(proc: ServerProcess, path: Path, deadline_s: float) -> dict[str, Any]:
    """The driver's status once it is no longer starting (RuntimeError if it exits first
    or the deadline passes)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists():
            status: dict[str, Any] = json.loads(path.read_text())
            return status
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited without a status:\n{proc.log_tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready within {deadline_s:g} s:\n{proc.log_tail()}")


def run_side(
    side: str, round_: int, address: str, settings: Settings, meter: ForeignCpu, work: Path
) -> dict[str, Any]:
    """Start the side's driver, measure, stop it: the side's record for this round."""
    port = free_port()
    status_path = work / f"status-{side}-{round_}.json"
    argv = [
        sys.executable,
        "-m",
        "bench.ray_cluster",
        "--serve",
        side,
        address,
        str(port),
        str(status_path),
    ]
    proc = ServerProcess(f"driver-{side}-{round_}", argv, work)
    record: dict[str, Any] = {"side": side, "round": round_}
    log(f"round {round_}: {SIDE_NAMES[side]}: starting (log {proc.log_path})")
    proc.start()
    try:
        status = _wait_status(proc, status_path, READY_DEADLINE_S)
        record.update(state=status["state"])
        if status["state"] != "ready":
            record.update(reason=status.get("reason") or status.get("error"))
            log(f"round {round_}: {SIDE_NAMES[side]}: {status['state']}: {record['reason']}")
            return record
        record["start_s"] = status.get("start_s")
        proc.wait_http_ok(port, "POST", "/w1/echo", ECHO_BODY, 60.0)
        proc.remember_tree()
        record["placement"] = _get_json(port, "/handle?mode=where")
        record["settle"] = settle(settings.settle_max_s)
        record["runs"] = measure_side(side, round_, port, settings, meter)
        record["state"] = "measured"
    except Exception as exc:
        record.update(state="failed", reason=f"{type(exc).__name__}: {exc}"[-4000:])
        log(f"round {round_}: {SIDE_NAMES[side]}: FAILED: {str(exc).splitlines()[0]}")
    finally:
        proc.stop(grace_s=STOP_GRACE_S)
    return record


def _get_json(port: int, path: str) -> dict[str, Any]:
    status, payload = http_request(port, "GET", path, timeout=HTTP_TIMEOUT_S)
    if status != 200:
        raise RuntimeError(f"GET {path} -> HTTP {status}: {payload[:300]!r}")
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise RuntimeError(f"GET {path} -> unexpected JSON {data!r}")
    return data


def _window(meter: ForeignCpu) -> None:
    """Start a measurement window; every process of this script's tree (the cluster, the
    driver) is the system under test, not foreign."""
    meter.roots.update(descendants(os.getpid()))
    meter.window()


def _close_window(meter: ForeignCpu) -> dict[str, Any]:
    foreign = meter.window()["foreign_core_pct"]
    return {
        "foreign_core_pct": foreign,
        "valid": foreign <= INVALID_CORE_PCT,
        "system_cpu_s": round(sum(meter.processes.values()), 3),
    }


def _tree_jiffies() -> int:
    total = 0
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def settle(max_s: float) -> dict[str, Any]:
    """Wait (at most ``max_s``) until the cluster, its replicas and the driver use less than
    SETTLE_CORE_PCT of a core over a second: workers Ray starts or prestarts after a deploy
    would otherwise take CPU from the first measured runs. Returns how long it took and the
    last second's CPU (% of a core; dead processes' last CPU is missed)."""
    started = time.monotonic()
    tick = os.sysconf("SC_CLK_TCK")
    pct = 0.0
    while True:
        before, wall = _tree_jiffies(), time.monotonic()
        time.sleep(1.0)  # one measuring second, by design
        pct = max(0.0, 100.0 * (_tree_jiffies() - before) / tick / (time.monotonic() - wall))
        waited = time.monotonic() - started
        if pct < SETTLE_CORE_PCT or waited >= max_s:
            return {"seconds": round(waited, 1), "tree_core_pct": round(pct, 1),
                    "quiet": pct < SETTLE_CORE_PCT}  # fmt: skip


def measure_side(
    side: str, round_: int, port: int, settings: Settings, meter: ForeignCpu
) -> list[dict[str, Any]]:
    """W1 and W2 at each concurrency, then the handle round trip; one record per run."""
    kind = loadgen.choose(settings.loadgen)
    runs: list[dict[str, Any]] = []
    for workload, method, path, body in HTTP_WORKLOADS:
        if settings.warmup_s > 0:
            loadgen.run_load(
                loadgen.LoadSpec(port, path, method, body, 64, settings.warmup_s), kind
            )
        for concurrency in CONCURRENCIES:
            spec = loadgen.LoadSpec(port, path, method, body, concurrency, settings.duration_s)
            _window(meter)
            result = loadgen.run_load(spec, kind)
            run = {
                "round": round_,
                "side": side,
                "workload": workload,
                "concurrency": concurrency,
                **_close_window(meter),
                **result.to_dict(),
            }
            runs.append(run)
            log(
                f"  {SIDE_NAMES[side]} {workload} c={concurrency}: "
                f"{result.throughput_rps:,.0f} req/s p50 {_f(result.p50_ms, 3)} ms "
                f"errors {result.errors} (foreign {run['foreign_core_pct']:.0f}% of a core)"
            )
    _get_json(port, f"/handle?n={min(settings.handle_calls, 200)}")  # warm-up
    _window(meter)
    handle = _get_json(port, f"/handle?n={settings.handle_calls}")
    run = {
        "round": round_,
        "side": side,
        "workload": "handle",
        "concurrency": 1,
        **_close_window(meter),
        **handle,
    }
    runs.append(run)
    log(
        f"  {SIDE_NAMES[side]} handle across nodes: p50 {_f(handle.get('p50_us'), 1)} us "
        f"p99 {_f(handle.get('p99_us'), 1)} us (foreign {run['foreign_core_pct']:.0f}%)"
    )
    return runs


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


# --- the whole run -----------------------------------------------------------------------------
def run_rounds(settings: Settings, address: str, cluster: LocalCluster, work: Path) -> list[Any]:
    """Every round, the sides one after the other (order alternating by round); a side that
    is not available is not tried again."""
    meter = ForeignCpu(interval_s=None)  # read between runs only
    records: list[dict[str, Any]] = []
    unavailable: set[str] = set()
    try:
        for round_ in range(settings.rounds):
            order = settings.sides if round_ % 2 == 0 else settings.sides[::-1]
            for side in order:
                if side in unavailable:
                    continue
                record = run_side(side, round_, address, settings, meter, work)
                cluster.remember()
                records.append(record)
                if record["state"] == "not available":
                    unavailable.add(side)
    finally:
        meter.close()
    return records


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _cluster_env() -> None:
    """What the cluster's processes inherit: the checkout on the path (the replicas import
    bench.* and shoal), and no usage-stats reporting over the network."""
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), path]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A driver's ray.init("127.0.0.1:port") resolves 127.0.0.1 to this machine's outward
    # address unless Ray treats the machine as a single-host cluster, and the cluster's
    # GCS listens on 127.0.0.1 only.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _cluster_env()  # before anything imports ray, which reads it then
    if argv[:1] == ["--serve"]:
        if len(argv) != 5 or argv[1] not in SIDES:
            raise SystemExit(
                "usage: python -m bench.ray_cluster --serve {ray,shoal} ADDRESS PORT STATUS_FILE"
            )
        return serve_main(argv[1], argv[2], int(argv[3]), argv[4])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = make_settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    from bench import ray_cluster_report as report

    signal.signal(signal.SIGTERM, _on_sigterm)
    started = datetime.now(UTC)
    kind = loadgen.choose(settings.loadgen)
    env = report.environment(loadgen.describe(kind), started)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-ray-cluster-"))
    log(
        f"ray-cluster: {settings.rounds} round(s), sides {settings.sides}, load generator "
        f"{kind}; logs in {work}"
    )
    cluster = LocalCluster()
    try:
        address = cluster.start()
        signal.signal(signal.SIGTERM, _on_sigterm)  # Ray's head node installed its own
        log(f"ray-cluster: cluster up at {address}")
        records = run_rounds(settings, address, cluster, work)
    finally:
        cluster.stop()
    results = report.build_results(settings, env, started, records)
    text = report.render(results)
    print(text)
    if not settings.quick:
        path = report.write(started, results, text)
        log(f"ray-cluster: wrote {path} (+ .json)")
    log(f"ray-cluster: driver logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
