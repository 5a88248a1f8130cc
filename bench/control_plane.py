"""``python -m bench.control_plane``: issue 10's control-plane targets, with real processes.

Every section starts its own ``shoal start`` server (a scratch ``SHOAL_HOME``, free
127.0.0.1 ports, the repository root as its working directory) and stops it at the end
(``shoal shutdown``, then SIGTERM/SIGKILL to every process of its tree that is left).

* **deploy**: ``shoal deploy`` of ``examples/demo.yaml`` (its ``http_options.port``
  set to the instance's) on a started instance: seconds from the command's return
  until every application is RUNNING (target ≤ 3 s), and from the command's start.
  Each repeat deletes the applications first, so every deploy starts cold.
* **hello**: a one-replica application (``hello``) deployed by ``PUT`` on a started
  instance: seconds until its first 200 (no target; ``shoal run``'s cold start has 0.4 s).
  The first right after ``shoal start`` returned, each next after deleting it.
* **proxy**: ``kill -9`` of the serving proxy process (its pid from ``serve.status()``
  in another process): seconds until ``GET /hello`` answers 200 again on a new
  connection (target ≤ 1 s); the next kill waits 2 s, so a standby process is ready.
* **controller**: ``kill -9`` of the ``shoal start`` server process while 16 clients
  (threads, one keep-alive connection each) send ``GET /hello``: failed requests
  (target 0); then ``shoal start`` again on the same ports and state directory:
  seconds from its return (and from its start) until the status has converged (every
  application RUNNING, every deployment at its target of RUNNING replicas; target
  ≤ 2 s), and whether the replicas and the proxy were adopted (same pids) or
  replaced. Reported as *not available* when the tree has no restart recovery
  (``shoal._instance.checkpoint``).
* **blocked**: a replica (``health_check_timeout_s`` 4 s, period 0.5 s, 2 replicas)
  whose event loop a request blocks with ``time.sleep``: seconds until the status no
  longer shows it RUNNING (out of routing; target ≤ ``health_check_timeout_s``) and
  until its process is gone (target ≤ ``health_check_timeout_s`` + 5 s).

The CPU used by everything else on the machine meanwhile (``foreign CPU``: the whole
machine's busy time minus this script's and the servers' processes) is recorded next to
every figure; the machine is often shared. Results go to
``bench/results/control-plane-<UTC timestamp>.json`` and ``.md`` (also printed).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.requests import Request

from bench.procs import HOST, REPO_ROOT, ForeignCpu, descendants, free_port, is_alive
from bench.procs import git_dirty as _dirty  # also imported from here by oip, startup, overload
from shoal import serve

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECTIONS = ("deploy", "hello", "proxy", "controller", "blocked")
APPLICATIONS = "/api/serve/applications/"
BLOCK_TIMEOUT_S = 4.0  # health_check_timeout_s of the blocked section's deployment
CLIENTS = 16


class DeployFailed(Exception):
    """An application is DEPLOY_FAILED: waiting longer cannot make it RUNNING."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the apps (imported by the servers' replicas: keep this module's imports light) -------------
@serve.deployment(num_replicas=2, max_ongoing_requests=64)
class Hello:
    def __call__(self, request: Request) -> str:
        return "hello"


@serve.deployment(num_replicas=2, health_check_period_s=0.5, health_check_timeout_s=BLOCK_TIMEOUT_S)
class Blocking:
    async def __call__(self, request: Request) -> dict[str, int]:
        marker = request.query_params.get("block")
        if marker:
            Path(marker).write_text(str(os.getpid()))
            time.sleep(1000)  # blocks the replica's event loop
        return {"pid": os.getpid()}


hello_app = Hello.bind()
blocking_app = Blocking.bind()


METER: ForeignCpu | None = None


# --- one shoal start instance -------------------------------------------------------------------
def _http(port: int, method: str, path: str, body: bytes | None = None,
          timeout: float = 10.0) -> tuple[int, bytes]:  # fmt: skip
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Instance:
    """A ``shoal start`` server in a scratch SHOAL_HOME, driven through the CLI and REST."""

    def __init__(self, work: Path) -> None:
        self.home = work / "home"
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.http_port, self.admin_port = free_port(), free_port()
        self.address = f"http://{HOST}:{self.admin_port}"
        self.env = {
            **os.environ,
            "SHOAL_HOME": str(self.home),
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
        for name in ("SHOAL_ADDRESS", "RAY_DASHBOARD_ADDRESS", "SHOAL_ADMIN_TOKEN"):
            self.env.pop(name, None)
        self.pids: set[int] = set()  # every process of its tree seen, to kill what is left

    def cli(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shoal", *args], cwd=REPO_ROOT, env=self.env,
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def start(self) -> float:
        """``shoal start``; returns the perf_counter() at which it returned."""
        done = self.cli("start", "--http-port", str(self.http_port),
                        "--admin-port", str(self.admin_port))  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"shoal start failed: {done.stderr.strip() or done.stdout.strip()}")
        returned = time.perf_counter()
        self.remember()
        if METER is not None:
            METER.roots.add(self.server_pid())
        return returned

    def server_pid(self) -> int:
        info = json.loads((self.home / "server" / "server.json").read_text())
        return int(info["pid"])

    def remember(self) -> None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = self.server_pid()
            self.pids.add(pid)
            self.pids.update(descendants(pid))

    def details(self) -> dict[str, Any]:
        status, body = _http(self.admin_port, "GET", APPLICATIONS)
        if status != 200:
            raise RuntimeError(f"GET {APPLICATIONS}: HTTP {status}: {body[:200]!r}")
        return dict(json.loads(body))

    def replicas(self) -> dict[str, list[dict[str, Any]]]:
        """``app/deployment`` -> its replicas as ``GET`` lists them."""
        out = {}
        for app_name, app in (self.details().get("applications") or {}).items():
            for dep_name, dep in (app.get("deployments") or {}).items():
                out[f"{app_name}/{dep_name}"] = list(dep.get("replicas") or [])
        return out

    def converged(self, apps: list[str]) -> bool:
        """Every app RUNNING and every deployment at its target of RUNNING replicas."""
        details = self.details()
        found = details.get("applications") or {}
        failed = {n: found[n].get("message", "") for n in apps if n in found
                  and found[n].get("status") == "DEPLOY_FAILED"}  # fmt: skip
        if failed:
            reasons = "; ".join(
                f"{n}: {m.splitlines()[0] if m else '?'}" for n, m in failed.items()
            )
            raise DeployFailed(
                f"{len(failed)} of {len(apps)} application(s) DEPLOY_FAILED: {reasons}"
            )
        for name in apps:
            app = found.get(name)
            if app is None or app.get("status") != "RUNNING":
                return False
            for dep in (app.get("deployments") or {}).values():
                running = [r for r in dep.get("replicas") or [] if r.get("state") == "RUNNING"]
                if len(running) != dep.get("target_num_replicas", len(running)):
                    return False
        return True

    def put(self, config: dict[str, Any]) -> None:
        status, body = _http(self.admin_port, "PUT", APPLICATIONS, json.dumps(config).encode())
        if status != 200:
            raise RuntimeError(f"PUT {APPLICATIONS}: HTTP {status}: {body[:300]!r}")

    def proxy_pid(self) -> int:
        """The serving proxy's pid, as ``serve.status()`` tells another Python process."""
        code = "from shoal import serve; print(next(iter(serve.status().proxies.values())).pid)"
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"serve.status() from another process failed: {done.stderr}")
        return int(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """``shoal shutdown``, then SIGTERM/SIGKILL whatever of its tree is still alive."""
        self.remember()
        with contextlib.suppress(Exception):
            self.cli("shutdown", "-y", "--address", self.address, timeout=90)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in self.pids if is_alive(pid)]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while any(is_alive(pid) for pid in alive) and time.monotonic() < deadline:
                time.sleep(0.05)


@contextlib.contextmanager
def instance(work: Path) -> Iterator[Instance]:
    inst = Instance(work)
    try:
        yield inst
    finally:
        inst.stop()


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02
) -> float:
    """Poll until ``predicate()``; returns the perf_counter() when it first held."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            if predicate():
                return time.perf_counter()
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def hello_ok(port: int) -> bool:
    with contextlib.suppress(OSError):
        status, body = _http(port, "GET", "/hello", timeout=2.0)
        return status == 200 and body == b"hello"
    return False


def hello_config(inst: Instance, *extra: dict[str, Any]) -> dict[str, Any]:
    apps = [
        {"name": "hello", "route_prefix": "/hello", "import_path": "bench.control_plane:hello_app"}
    ]
    return {
        "http_options": {"host": HOST, "port": inst.http_port},
        "applications": apps + list(extra),
    }


# --- (a) deploy ---------------------------------------------------------------------------------
DEMO_CONFIG = REPO_ROOT / "examples" / "demo.yaml"


def demo_config(port: int, work: Path, source: Path = DEMO_CONFIG) -> tuple[Path, list[str]]:
    """``source`` with its ``http_options.port`` set to the instance's (fixed at start)."""
    import yaml

    config = yaml.safe_load(source.read_text())
    config.setdefault("http_options", {})["port"] = port
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, [app["name"] for app in config["applications"]]


def run_deploy(work: Path, repeats: int, source: Path = DEMO_CONFIG) -> dict[str, Any]:
    runs = []
    with instance(work / "deploy") as inst:
        inst.start()
        path, apps = demo_config(inst.http_port, work, source)
        for i in range(repeats):
            assert METER is not None
            METER.window()
            started = time.perf_counter()
            done = inst.cli("deploy", str(path), "--address", inst.address)
            returned = time.perf_counter()
            if done.returncode != 0:
                raise RuntimeError(f"shoal deploy failed: {done.stderr.strip()}")
            try:
                running = wait_for(lambda: inst.converged(apps), 600, "every app RUNNING", 0.05)
            except DeployFailed as exc:
                run = {"command_s": round(returned - started, 3), "failed": str(exc)[:1500],
                       "failed_after_return_s": round(time.perf_counter() - returned, 3),
                       "applications": len(apps), **METER.window()}  # fmt: skip
                log(f"deploy: {run}")
                runs.append(run)
                break  # the instance is in no state to measure more deploys
            replicas = sum(len(r) for r in inst.replicas().values())
            run = {
                "command_s": round(returned - started, 3),
                "running_after_return_s": round(running - returned, 3),
                "running_after_start_s": round(running - started, 3),
                "applications": len(apps),
                "replicas": replicas,
                **METER.window(),
            }
            log(f"deploy: {run}")
            runs.append(run)
            inst.remember()
            if i + 1 < repeats:  # start the next deploy cold: no applications left
                _http(inst.admin_port, "DELETE", APPLICATIONS)
                wait_for(lambda: not inst.details().get("applications"), 120, "apps deleted")
    done_runs = [r["running_after_return_s"] for r in runs if "failed" not in r]
    return {
        "runs": runs,
        "median_after_return_s": statistics.median(done_runs) if done_runs else None,
        "config": str(
            source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source
        ),
    }


# --- (a2) one small application -----------------------------------------------------------------
def run_hello(work: Path, repeats: int) -> dict[str, Any]:
    runs = []
    with instance(work / "hello") as inst:
        inst.start()
        body = json.dumps(hello_config(inst)).encode()
        for _ in range(repeats):
            assert METER is not None
            METER.window()
            started = time.perf_counter()
            status, payload = _http(inst.admin_port, "PUT", APPLICATIONS, body)
            if status != 200:
                raise RuntimeError(f"PUT {APPLICATIONS} -> {status}: {payload[:300]!r}")
            answered = wait_for(lambda: hello_ok(inst.http_port), 120, "hello answers", 0.005)
            run = {"first_200_s": round(answered - started, 3), **METER.window()}
            log(f"hello: {run}")
            runs.append(run)
            _http(inst.admin_port, "DELETE", APPLICATIONS)
            wait_for(lambda: not inst.details().get("applications"), 120, "apps deleted")
            wait_for(lambda: not hello_ok(inst.http_port), 30, "hello no longer served")
    return {"runs": runs, "median_s": statistics.median(r["first_200_s"] for r in runs)}


# --- (b) proxy kill -9 --------------------------------------------------------------------------
def run_proxy(work: Path, repeats: int) -> dict[str, Any]:
    runs = []
    with instance(work / "proxy") as inst:
        inst.start()
        inst.put(hello_config(inst))
        wait_for(lambda: inst.converged(["hello"]) and hello_ok(inst.http_port), 300, "hello")
        assert METER is not None
        for _ in range(repeats):
            time.sleep(2.0)  # the standby proxy process of the last replacement gets ready
            pid = inst.proxy_pid()
            inst.remember()
            METER.window()
            os.kill(pid, signal.SIGKILL)
            killed = time.perf_counter()
            served = wait_for(
                lambda: hello_ok(inst.http_port), 60, "HTTP 200 after proxy kill", 0.005
            )
            new_pid = inst.proxy_pid()
            run = {"serving_again_s": round(served - killed, 3), "old_pid": pid,
                   "new_pid": new_pid, **METER.window()}  # fmt: skip
            log(f"proxy: {run}")
            runs.append(run)
    values = [r["serving_again_s"] for r in runs]
    return {"runs": runs, "median_s": statistics.median(values), "max_s": max(values)}


# --- (c) controller kill -9 under load ----------------------------------------------------------
class Clients:
    """``CLIENTS`` threads, each sending ``GET /hello`` on one keep-alive connection (a new
    one after an error), recording failures: non-200 answers, errors and timeouts."""

    def __init__(self, port: int) -> None:
        self.port, self.stop = port, threading.Event()
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
                conn.request("GET", "/hello")
                response = conn.getresponse()
                body = response.read()
                failed = (
                    None
                    if response.status == 200 and body == b"hello"
                    else f"HTTP {response.status}"
                )
            except (OSError, http.client.HTTPException) as exc:
                failed = type(exc).__name__
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None
            with self._lock:
                if failed is None:
                    self.ok += 1
                else:
                    self.failures.append((time.perf_counter(), failed))
        if conn is not None:
            conn.close()

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def run_controller(work: Path) -> dict[str, Any]:
    if importlib.util.find_spec("shoal._instance.checkpoint") is None:
        reason = "no restart recovery in this tree (shoal._instance.checkpoint is missing)"
        return {"available": False, "reason": reason}
    assert METER is not None
    with instance(work / "controller") as inst:
        inst.start()
        inst.put(hello_config(inst))
        wait_for(lambda: inst.converged(["hello"]) and hello_ok(inst.http_port), 300, "hello")
        before = {key: sorted(r["pid"] for r in reps) for key, reps in inst.replicas().items()}
        proxy_before = inst.proxy_pid()
        server = inst.server_pid()
        inst.remember()
        METER.window()
        result: dict[str, Any] = {"available": True, "clients": CLIENTS}
        with Clients(inst.http_port) as clients:
            time.sleep(2.0)
            ok_before = clients.ok
            os.kill(server, signal.SIGKILL)
            killed = time.perf_counter()
            time.sleep(3.0)  # the data plane alone, with the routing it has
            ok_alone = clients.ok
            failed_alone = len(clients.failures)
            restart = time.perf_counter()
            try:
                returned = inst.start()
                done = wait_for(lambda: inst.converged(["hello"]), 60, "converged after restart")
                result.update(
                    restart_command_s=round(returned - restart, 3),
                    converged_after_return_s=round(done - returned, 3),
                    converged_after_start_s=round(done - restart, 3),
                )
            except (DeployFailed, RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                result["restart_error"] = str(exc)[-1500:]
            time.sleep(2.0)
        after: dict[str, list[int]] = {}
        with contextlib.suppress(Exception):
            after = {key: sorted(r["pid"] for r in reps) for key, reps in inst.replicas().items()}
        proxy_after = None
        with contextlib.suppress(Exception):
            proxy_after = inst.proxy_pid()
        kinds: dict[str, int] = {}
        for _, kind in clients.failures:
            kinds[kind] = kinds.get(kind, 0) + 1
        result.update(
            requests_ok=clients.ok,
            requests_ok_before_kill=ok_before,
            requests_ok_without_controller=ok_alone - ok_before,
            failed_requests=len(clients.failures),
            failed_without_controller=failed_alone,
            failures_by_kind=kinds,
            first_failure_after_kill_s=(
                round(clients.failures[0][0] - killed, 3) if clients.failures else None
            ),
            replicas_before=before,
            replicas_after=after,
            replicas_adopted=bool(after) and after == before,
            proxy_before=proxy_before,
            proxy_after=proxy_after,
            proxy_adopted=proxy_after == proxy_before,
            **METER.window(),
        )
        log(f"controller: {result}")
        return result


# --- (d) blocked replica ------------------------------------------------------------------------
def run_blocked(work: Path) -> dict[str, Any]:
    assert METER is not None
    with instance(work / "blocked") as inst:
        inst.start()
        config = hello_config(inst)
        config["applications"] = [{"name": "blocking", "route_prefix": "/blocking",
                                   "import_path": "bench.control_plane:blocking_app"}]  # fmt: skip
        inst.put(config)
        wait_for(lambda: inst.converged(["blocking"]), 300, "blocking app")
        marker = work / "blocked-pid"
        METER.window()

        def block() -> None:
            with contextlib.suppress(OSError):
                _http(inst.http_port, "GET", f"/blocking?block={marker}", timeout=60)

        threading.Thread(target=block, daemon=True).start()
        wait_for(
            lambda: marker.exists() and marker.read_text() != "", 60, "the loop to block", 0.005
        )
        blocked_at, pid = time.perf_counter(), int(marker.read_text())

        def out_of_routing() -> bool:
            reps = inst.replicas().get("blocking/Blocking", [])
            return all(r.get("state") != "RUNNING" for r in reps if r.get("pid") == pid)

        out = wait_for(out_of_routing, 60, "the blocked replica out of routing")
        gone = wait_for(lambda: not is_alive(pid), 60, "the blocked replica killed", 0.01)
        replaced = wait_for(lambda: inst.converged(["blocking"]), 120, "a replacement")
        result = {
            "health_check_timeout_s": BLOCK_TIMEOUT_S,
            "out_of_routing_s": round(out - blocked_at, 3),
            "killed_s": round(gone - blocked_at, 3),
            "replaced_s": round(replaced - blocked_at, 3),
            **METER.window(),
        }
        log(f"blocked: {result}")
        return result


# --- report -------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 2) -> str:
    return (
        "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    )


def _cpu(row: dict[str, Any]) -> str:
    return f"{_f(row.get('foreign_cpu_pct'), 0)}% (load {_f(row.get('loadavg_1m'), 1)})"


def _row(
    what: str, value: Any, target: str, met: Any, cpu: str, note: str | None = None
) -> dict[str, Any]:
    return {"what": what, "value": value, "target": target, "met": met, "cpu": cpu, "note": note}


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """(measurement, value, target, met, foreign CPU) for the table."""
    out: list[dict[str, Any]] = []
    deploy = results.get("deploy") or {}
    source = deploy.get("config", "examples/demo.yaml")
    for i, run in enumerate(deploy.get("runs") or []):
        if "failed" in run:
            what = f"deploy #{i + 1} of {source}: all {run['applications']} apps RUNNING"
            value = f"DEPLOY_FAILED after {run['failed_after_return_s']:.1f} s"
            out.append(_row(what, value, "≤ 3 s", False, _cpu(run), run["failed"]))
            continue
        after, start = run["running_after_return_s"], run["running_after_start_s"]
        what = (
            f"deploy #{i + 1} of {source}: all {run['applications']} apps RUNNING after "
            f"`shoal deploy` returned ({run['replicas']} replicas)"
        )
        out.append(_row(what, after, "≤ 3 s", after <= 3.0, _cpu(run)))
        what = f"deploy #{i + 1}: from the command's start (the command: {run['command_s']} s)"
        out.append(_row(what, start, "-", "info", _cpu(run)))
    for i, run in enumerate((results.get("hello") or {}).get("runs") or []):
        what = f"one-replica app (hello) #{i + 1}: PUT on a running server -> first 200"
        out.append(_row(what, run["first_200_s"], "-", "info", _cpu(run)))
    for i, run in enumerate((results.get("proxy") or {}).get("runs") or []):
        value = run["serving_again_s"]
        what = f"proxy kill -9 #{i + 1}: HTTP 200 again"
        out.append(_row(what, value, "≤ 1 s", value <= 1.0, _cpu(run)))
    ctl = results.get("controller")
    if ctl is not None and not ctl.get("available", True):
        what = "controller kill -9 under c=16"
        target = "0 failed; converged ≤ 2 s"
        out.append(_row(what, "not available", target, None, "-", ctl.get("reason")))
    elif ctl and "error" not in ctl:
        failed = ctl["failed_requests"]
        what = (
            f"controller kill -9, c={ctl['clients']}: failed requests (of "
            f"{ctl['requests_ok'] + failed}; {ctl['requests_ok_without_controller']} served "
            "in the 3 s without a controller)"
        )
        out.append(_row(what, failed, "0", failed == 0, _cpu(ctl)))
        if "restart_error" in ctl:
            what = "restarted `shoal start`: converged"
            out.append(_row(what, "failed", "≤ 2 s", False, _cpu(ctl), ctl["restart_error"]))
        else:
            value = ctl["converged_after_return_s"]
            what = (
                f"restarted `shoal start` (the command: {ctl['restart_command_s']} s): "
                f"converged after it returned; replicas adopted: {ctl['replicas_adopted']}, "
                f"proxy adopted: {ctl['proxy_adopted']}"
            )
            out.append(_row(what, value, "≤ 2 s", value <= 2.0, _cpu(ctl)))
    blocked = results.get("blocked")
    if blocked and "error" not in blocked:
        timeout = blocked["health_check_timeout_s"]
        out_s, killed_s = blocked["out_of_routing_s"], blocked["killed_s"]
        what = f"blocked replica: out of routing (health_check_timeout_s={timeout:g})"
        out.append(_row(what, out_s, f"≤ {timeout:g} s", out_s <= timeout, _cpu(blocked)))
        what = "blocked replica: process killed"
        target = f"≤ {timeout + 5:g} s"
        out.append(_row(what, killed_s, target, killed_s <= timeout + 5, _cpu(blocked)))
    for name, section in results.items():
        if isinstance(section, dict) and "error" in section:
            out.append(_row(name, "error", "-", False, "-", section["error"]))
    return out


def render(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    lines = [
        f"# shoal control-plane benchmark {env['date']}",
        "",
        f"{env['machine']['nproc']} CPUs ({env['machine']['cpu_model']}), Python "
        f"{env['python']['version']}, commit {env.get('git_commit')} (working tree "
        f"{'with' if settings.get('dirty') else 'without'} uncommitted changes); foreign CPU "
        f"over the run {settings['foreign_cpu_pct']}%, load average {settings['loadavg_start']} "
        f"at the start, {settings['loadavg_end']} at the end. Each row's last column is the "
        "CPU share of the machine used by other processes during that measurement.",
        "",
        "| measurement | value (s) | target | verdict | foreign CPU |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for row in results["rows"]:
        verdict = {None: "not measured", True: "met", False: "**missed**", "info": "-"}[row["met"]]
        lines.append(
            f"| {row['what']} | {_f(row['value'])} | {row['target']} | {verdict} | {row['cpu']} |"
        )
        if row.get("note"):
            notes.append(f"- {row['what']}: {row['note']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    global METER
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--repeats", type=int, default=3, help="deploys and proxy kills (default 3)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEMO_CONFIG,
        help="what `deploy` deploys (examples/demo.yaml)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    wanted = [s.strip().lower() for s in (args.only or "").split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if not wanted or s in wanted]
    from bench import report  # the main suite's environment facts (machine, versions, commit)

    env = report.environment(
        {"name": f"{CLIENTS} threads, http.client keep-alive"}, datetime.now(UTC)
    )
    signal.signal(signal.SIGTERM, _exit)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-cp-"))
    METER = ForeignCpu()
    whole = ForeignCpu()  # the whole run: the same servers (one set of roots)
    whole.roots = METER.roots
    load_start, started = report.loadavg(), time.perf_counter()
    results: dict[str, Any] = {"schema": 1, "environment": env}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "deploy": lambda: run_deploy(work, args.repeats, args.config.resolve()),
        "proxy": lambda: run_proxy(work, args.repeats),
        "controller": lambda: run_controller(work),
        "blocked": lambda: run_blocked(work),
        "hello": lambda: run_hello(work, args.repeats),
    }
    try:
        for name in sections:
            log(f"bench.control_plane: {name}")
            try:
                results[name] = runners[name]()
            except (
                DeployFailed, RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired
            ) as exc:  # fmt: skip
                log(f"  {name} failed: {exc}")
                results[name] = {"error": str(exc)[-1500:]}
    finally:
        overall = whole.window()
        METER.close()
        whole.close()
        shutil.rmtree(work, ignore_errors=True)
    results["settings"] = {
        "sections": sections,
        "repeats": args.repeats,
        "config": str(args.config),
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_start": load_start,
        "loadavg_end": report.loadavg(),
        "foreign_cpu_pct": overall["foreign_cpu_pct"],
        "dirty": _dirty(),
    }
    results["rows"] = rows(results)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"control-plane-{stamp}.json"
    md_path = args.out / f"control-plane-{stamp}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render(results))
    print(md_path.read_text())
    log(f"bench.control_plane: wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
