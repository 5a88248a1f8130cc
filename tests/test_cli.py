"""``shoal run module:app`` serves until SIGINT, then shuts down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port

APP = """
from shoal import serve

@serve.deployment(num_replicas=2)
class Hello:
    async def __call__(self, request):
        return {"hello": (await request.json())["name"]}

app = Hello.bind()
"""


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().split(") ")[1].split()[1]
                )
            except (FileNotFoundError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _wait_until_gone(pids: set[int], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        assert time.monotonic() < deadline, "workers outlived shoal run"
        time.sleep(0.02)


def test_shoal_run_serves_a_module_and_stops_on_sigint(tmp_path: Path) -> None:
    (tmp_path / "hello_app.py").write_text(APP)
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", "hello_app:app", "--port", str(port)]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()  # printed once the route answers
        assert f"http://127.0.0.1:{port}/" in banner
        reply = httpx.post(f"http://127.0.0.1:{port}/", json={"name": "shoal"}, timeout=30)
        assert reply.json() == {"hello": "shoal"}
        workers = _descendants(server.pid)
        assert len(workers) == 3  # two replicas and the proxy
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        _wait_until_gone(workers)
    finally:
        server.kill()
        server.wait(timeout=10)


def test_shoal_run_reports_a_bad_target(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "run", "missing_module:app"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "cannot import module 'missing_module'" in result.stderr


def test_sigint_during_startup_still_stops_shoal_run(tmp_path: Path) -> None:
    (tmp_path / "hello_app.py").write_text(APP)
    command = [sys.executable, "-m", "shoal", "run", "hello_app:app", "--port", str(free_port())]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 30
        while not _descendants(server.pid):  # workers are starting: shoal is mid-startup
            assert time.monotonic() < deadline, "shoal run started no worker"
            time.sleep(0.01)
        workers = _descendants(server.pid)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        _wait_until_gone(workers)
    finally:
        server.kill()
        server.wait(timeout=10)
