"""Server processes for the bench: start, wait for HTTP, measure memory, stop for sure.

Every server runs in its own session (process group). ``ServerProcess.stop`` asks it to
shut down with SIGINT, then SIGTERM/SIGKILL the group, then SIGKILLs any descendant seen
while it ran (shoal's replicas may start their own sessions). ``stop_all`` does that for
every server still registered; the bench driver calls it in ``finally``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
#: What every ServerProcess's environment adds before its own (see :func:`compile_ahead`).
SERVER_ENV: dict[str, str] = {}


def compile_ahead(work: Path) -> bool:
    """Let servers read shoal's, the bench's and the examples' modules compiled, as an
    installed package's are, when the environment sets ``PYTHONDONTWRITEBYTECODE``
    (otherwise Python keeps their ``__pycache__`` itself). Without it each launch
    compiles them again, which a user's launch never does: the full bench's W1 cold start
    measured 1.18 s so, 0.59 s compiled (and after one launch not measured). Compiled
    into ``work``, not into the checkout. Returns whether it did."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return False
    SERVER_ENV.update(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(work / "pycache"))
    env = {**os.environ, **SERVER_ENV}
    dirs = [str(REPO_ROOT / name) for name in ("shoal", "bench", "examples")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], env=env, check=True)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 5.0,
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection; returns (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        sent.update(headers)
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- /proc ------------------------------------------------------------------------------
def stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data.rsplit(")", 1)[1].split()


def is_alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (children, grandchildren, ...), from /proc ppids."""
    return descendants_of([root])


def descendants_of(roots: Iterable[int]) -> list[int]:
    """The live descendants of every root, in one scan of /proc (a scan costs ~15 ms)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                children[int(fields[1])].append(int(entry))
    found: list[int] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
                stack.append(child)
    return found


def _status_kb(pid: int, path: str, key: str) -> int | None:
    try:
        text = Path(f"/proc/{pid}/{path}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def tree_memory(root: int) -> dict[str, Any]:
    """Summed VmRSS (and Pss where readable) of ``root`` and all its descendants, in MB."""
    detail: list[dict[str, Any]] = []
    for pid in [root, *descendants(root)]:
        rss = _status_kb(pid, "status", "VmRSS")
        if rss is None:
            continue
        pss = _status_kb(pid, "smaps_rollup", "Pss")
        detail.append({"pid": pid, "cmd": _cmdline(pid), "rss_mb": rss / 1024, "pss_mb": _mb(pss)})
    pss_values = [d["pss_mb"] for d in detail]
    return {
        "processes": len(detail),
        "rss_mb": sum(d["rss_mb"] for d in detail),
        "pss_mb": (sum(pss_values) if all(v is not None for v in pss_values) else None),
        "detail": detail,
    }


def _system_busy_jiffies() -> int:
    """Busy CPU time of the whole machine (steal counts: it is someone else's work too)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_jiffies() -> int:
    """CPU time of this process and its descendants, including reaped children's."""
    total = 0
    for pid in [os.getpid(), *descendants(os.getpid())]:
        fields = stat_fields(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total


class BackgroundCpu:
    """Share of the machine's CPU used by processes outside the bench during an interval.

    Other work on the machine skews every figure; this says how much there was.
    """

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy = _system_busy_jiffies()
        self.own = _own_jiffies()

    def percent(self) -> float:
        seconds = time.monotonic() - self.wall
        foreign = (_system_busy_jiffies() - self.busy) - (_own_jiffies() - self.own)
        capacity = seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        if capacity <= 0:
            return 0.0
        # Jiffies tick at 100 Hz: over short windows the count can overshoot the wall clock.
        return min(100.0, max(0.0, 100.0 * foreign / capacity))


# A measurement with more foreign CPU than this (% of one core) is not valid.
INVALID_CORE_PCT = 15.0


def _uptime_jiffies() -> float:
    """Now, in clock ticks since boot (the clock of /proc/<pid>/stat's starttime)."""
    return float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """CPU used by processes that are neither this script (with the commands it ran and
    reaped: load generators) nor a server it started (``roots`` and their descendants).

    ``window()`` returns the figures since its last call and starts a new window. With
    ``interval_s`` a thread samples the servers' processes (so that one that dies within a
    window still counts: its last ``interval_s`` is missed, and ``foreign`` errs high by a
    little); with ``None`` they are read only by ``window()`` (no thread, no CPU taken
    from the servers meanwhile: right for windows in which no server process comes or
    goes; one born within the window counts from its start). ``processes`` holds the CPU
    seconds of every server process in the last window, by pid.
    """

    def __init__(self, interval_s: float | None = 0.2) -> None:
        self.roots: set[int] = set()  # server pids; their descendants are found by scanning
        self.seen: dict[int, tuple[int, int]] = {}  # pid -> (first, last) utime+stime
        self.processes: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.wall, self.busy, self.own = time.monotonic(), _system_busy_jiffies(), self._self()
        self.since = _uptime_jiffies()
        self._thread: threading.Thread | None = None
        if interval_s is not None:
            self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
            self._thread.start()

    @staticmethod
    def _self() -> int:
        fields = stat_fields(os.getpid())
        return sum(int(x) for x in fields[11:15]) if fields else 0  # + reaped children

    def _sample(self) -> None:
        with self._lock:
            roots = list(self.roots)  # other threads may add roots meanwhile
            pids = set(roots) | set(descendants_of(roots))
            pids.update(p for p in self.seen if is_alive(p))
            for pid in pids:
                fields = stat_fields(pid)
                if fields is None:
                    continue
                jiffies = int(fields[11]) + int(fields[12])
                born_within = int(fields[19]) >= self.since  # starttime
                start = 0 if born_within else jiffies
                first, _ = self.seen.get(pid, (start, jiffies))
                self.seen[pid] = (first, jiffies)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            with contextlib.suppress(Exception):
                self._sample()

    def window(self) -> dict[str, float]:
        """Foreign CPU (% of the machine, and of one core), this script's and its servers'
        (% of the machine) and the load average since the last call, then reset."""
        with contextlib.suppress(Exception):
            self._sample()
        seconds = time.monotonic() - self.wall
        busy, own = _system_busy_jiffies(), self._self()
        tick = os.sysconf("SC_CLK_TCK")
        with self._lock:
            self.processes = {
                pid: (last - first) / tick for pid, (first, last) in self.seen.items()
            }
            self.seen = {pid: (last, last) for pid, (_first, last) in self.seen.items()
                         if is_alive(pid)}  # fmt: skip
        servers = sum(self.processes.values()) * tick
        foreign = (busy - self.busy) - (own - self.own) - servers
        capacity = seconds * tick * (os.cpu_count() or 1)
        pct = min(100.0, max(0.0, 100.0 * foreign / capacity)) if capacity > 0 else 0.0
        ours = 100.0 * ((own - self.own) + servers) / capacity if capacity > 0 else 0.0
        self.wall, self.busy, self.own = time.monotonic(), busy, own
        self.since = _uptime_jiffies()
        return {
            "foreign_cpu_pct": round(pct, 1),
            "foreign_core_pct": round(pct * (os.cpu_count() or 1), 1),
            "own_cpu_pct": round(ours, 1),
            "seconds": round(seconds, 3),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }

    def close(self) -> None:
        self._stop.set()


def process_roles(root: int, pids: Iterable[int]) -> dict[int, str]:
    """A label per process of a server's tree, from its command line: ``server`` (the root),
    ``proxy``, ``replica``, ``fork-server`` (shoal), ``worker`` and ``resource-tracker``
    (uvicorn --workers), else ``other``; numbered (``replica-1``, ``replica-2``, by pid)
    when a role has several."""
    by_role: dict[str, list[int]] = defaultdict(list)
    for pid in sorted(set(pids) - {root}):
        cmd = _full_cmdline(pid)
        if "shoal._runtime.process.proxy_worker" in cmd:
            role = "proxy"
        elif "shoal._runtime.process.worker" in cmd:
            role = "replica"
        elif "shoal._runtime.process.zygote" in cmd:
            role = "fork-server"
        elif "multiprocessing.spawn" in cmd or "spawn_main" in cmd:
            role = "worker"
        elif "multiprocessing.resource_tracker" in cmd:
            role = "resource-tracker"
        else:
            role = "other"
        by_role[role].append(pid)
    labels = {root: "server"}
    for role, members in by_role.items():
        for i, pid in enumerate(members, 1):
            labels[pid] = role if len(members) == 1 else f"{role}-{i}"
    return labels


def git_dirty(repo: Path = REPO_ROOT) -> bool | None:
    """Whether the checkout has uncommitted changes (None: not a git checkout / no git).
    Results under ``bench/results/`` do not count: an earlier bench of the same session
    writes them before they are committed, and they change nothing that is measured."""
    with contextlib.suppress(Exception):
        done = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-uall"],
                              capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        changed = [line[3:] for line in done.stdout.splitlines() if line.strip()]
        return any(not path.strip('"').startswith("bench/results/") for path in changed)
    return None


def _full_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _cmdline(pid: int) -> str:
    return _full_cmdline(pid)[-160:]


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


# --- server processes -------------------------------------------------------------------
#: A server is quiet when its processes use less than this share of one core (``wait_quiet``).
QUIET_CORE_PCT = 5.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server started in its own process group, logging to ``log_dir/<name>.log``."""

    _live: ClassVar[list[ServerProcess]] = []

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        root: Path = REPO_ROOT,
    ) -> None:
        """``root``: the checkout the server runs from (its working directory, first on
        ``PYTHONPATH``): this one, or another commit's worktree."""
        self.name = name
        self.argv = argv
        self.root = root
        self.extra_env = dict(env or {})
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._seen: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.root), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(SERVER_ENV)
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        ServerProcess._live.append(self)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remember_tree(self) -> None:
        """Record the current descendants so that ``stop`` can reap orphans later."""
        if self.running():
            self._seen.update(descendants(self.pid))

    def wait_quiet(self, deadline_s: float = 20.0, window_s: float = 1.0) -> bool:
        """Wait until the server's processes use under :data:`QUIET_CORE_PCT` of a core over
        ``window_s``: once ready, a server still works a while (a fork server imports what
        replicas may need, ~0.5 s of CPU), and its work is not counted as foreign. False
        (measure anyway) if it is still busy after ``deadline_s``."""
        deadline = time.perf_counter() + deadline_s
        before = self._tree_jiffies()
        while time.perf_counter() < deadline:
            time.sleep(window_s)
            after = self._tree_jiffies()
            if (after - before) / _CLOCK_TICKS / window_s * 100.0 < QUIET_CORE_PCT:
                return True
            before = after
        return False

    def _tree_jiffies(self) -> int:
        total = 0
        for pid in [self.pid, *descendants(self.pid)]:
            fields = stat_fields(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total

    def wait_http_ok(
        self,
        port: int,
        method: str,
        path: str,
        body: bytes | None,
        deadline_s: float,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> float:
        """Poll until the route answers 200; returns the perf_counter() of that answer."""
        deadline = time.perf_counter() + deadline_s
        last = "no answer"
        while time.perf_counter() < deadline:
            if not self.running():
                tail = self.log_tail()
                last_line = tail.splitlines()[-1] if tail else "(no output)"
                raise RuntimeError(
                    f"{self.name} exited early (code {self._returncode()}): {last_line}\n{tail}"
                )
            try:
                status, payload = http_request(port, method, path, body, 2.0, headers)
                if status == 200:
                    return time.perf_counter()
                last = f"HTTP {status}: {payload[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.01)
        self.remember_tree()
        raise TimeoutError(
            f"{self.name} not ready after {deadline_s}s ({last}):\n{self.log_tail()}"
        )

    def _returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 8.0) -> None:
        """Stop the server and everything it started; safe to call more than once."""
        if self.proc is None:
            return
        self.remember_tree()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            self._wait(grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            if self._wait(2.0):
                break
        for pid in sorted(self._seen):
            if is_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while any(is_alive(pid) for pid in self._seen) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._seen.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self in ServerProcess._live:
            ServerProcess._live.remove(self)

    def _wait(self, timeout: float) -> bool:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return not any(is_alive(pid) for pid in self._seen)

    @classmethod
    def stop_all(cls) -> None:
        for server in list(cls._live):
            server.stop(grace_s=3.0)
