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
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1


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
def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return data.rsplit(")", 1)[1].split()


def is_alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(root: int) -> list[int]:
    """All live descendants of ``root`` (children, grandchildren, ...), from /proc ppids."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children[int(fields[1])].append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
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
        fields = _stat_fields(pid)
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


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[-160:]


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


# --- server processes -------------------------------------------------------------------
class ServerProcess:
    """A server started in its own process group, logging to ``log_dir/<name>.log``."""

    _live: ClassVar[list[ServerProcess]] = []

    def __init__(
        self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
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
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        ServerProcess._live.append(self)
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
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
