"""``shoal run module:app`` serves until SIGINT, stops cleanly, and explains a failed start once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_until

import shoal
from bench.procs import descendants

APP = """
from shoal import serve

@serve.deployment(num_replicas=2)
class Hello:
    async def __call__(self, request):
        return {"hello": (await request.json())["name"]}

app = Hello.bind()
"""


def _wait_until_gone(pids: set[int], timeout_s: float = 10) -> None:
    wait_until(
        lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids),
        timeout_s,
        "the workers to exit after shoal run",
    )


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
        # two replicas, the proxy and the standby process of its replacement
        workers = wait_until(lambda: _four(set(descendants(server.pid))))
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        _wait_until_gone(workers)
    finally:
        server.kill()
        server.wait(timeout=10)


SLOW_APP = """
import asyncio, os, uuid
from pathlib import Path
from shoal import serve

STARTED = Path(__file__).parent / "started"

@serve.deployment(num_replicas=2)
class Slow:
    async def __call__(self, request):
        (STARTED / uuid.uuid4().hex).touch()  # the test sends its signal once all are here
        await asyncio.sleep(1.5)
        return {"pid": os.getpid()}

app = Slow.bind()
"""


def test_a_sigterm_to_the_whole_group_stops_shoal_run_gracefully(tmp_path: Path) -> None:
    # systemd (KillMode=control-group), `timeout` and `kill -- -PGID` send SIGTERM to every
    # process at once. The replicas and the proxy answer the requests they hold, nothing
    # is replaced while shoal stops, and every process exits.
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    (tmp_path / "started").mkdir()
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", "slow_app:app", "--port", str(port),
               "--admin-port", "0"]  # fmt: skip
    server = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        server.stdout.readline()  # printed once the route answers
        with ThreadPoolExecutor(3) as pool:
            url = f"http://127.0.0.1:{port}/"
            replies = [pool.submit(httpx.get, url, timeout=30) for _ in range(3)]
            wait_until(lambda: len(list((tmp_path / "started").iterdir())) == 3, 30,
                       "three requests in the replicas")  # fmt: skip
            workers = set(descendants(server.pid))
            os.killpg(server.pid, signal.SIGTERM)
            answered = [reply.result() for reply in replies]
        assert [r.status_code for r in answered] == [200, 200, 200]
        assert server.wait(timeout=30) == 0
        _wait_until_gone(workers)
        _, errors = server.communicate(timeout=10)
        for unexpected in ("replacement", "replacing", "not usable", "Traceback"):
            assert unexpected not in errors, errors
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)


SHOAL_DIR = Path(shoal.__file__).parent

BROKEN_MODULES = {
    "needs_dep.py": "import math\nimport shoal_test_no_such_dependency\n",
    "bad_syntax.py": "from shoal import serve\n\ndef f(:\n    pass\n",
    "failing_ctor.py": (
        "from shoal import serve\n\n\n@serve.deployment\nclass Model:\n"
        "    def __init__(self):\n        raise RuntimeError('weights not found')\n\n\n"
        "app = Model.bind()\n"
    ),
}


BAD_TARGETS = [
    ("missing_module:app", ["no module named 'missing_module'", "from the directory"]),
    ("hello_app", ["expected MODULE:ATTRIBUTE", "got 'hello_app'"]),
    ("hello_app.py:app", ["name the module, not its file: hello_app:app"]),
    ("hello_app:ap", ["module 'hello_app' has no attribute 'ap'", "its applications: app"]),
    (
        "needs_dep:app",
        ["needs_dep.py, line 2", "No module named 'shoal_test_no_such_dependency'",
         "import shoal_test_no_such_dependency"],
    ),
    ("bad_syntax:app", ["syntax error in", "bad_syntax.py, line 3", "def f(:"]),
]  # fmt: skip


@dataclass
class FailingRuns:
    """``shoal run``s meant to fail, run side by side."""

    directory: Path  # where they ran, holding the modules
    busy_port: int  # a port in use while they ran
    results: dict[str, tuple[int, str]]  # (exit code, stderr): by bad target,
    # "failing_ctor:app" and "busy port"

    def stderr(self, run: str) -> str:
        """The stderr of ``run``, once checked that it failed cleanly."""
        code, stderr = self.results[run]
        assert code == 1, stderr
        assert "never retrieved" not in stderr
        assert f'File "{SHOAL_DIR}' not in stderr  # no frame of shoal's own code
        return stderr


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory: pytest.TempPathFactory) -> FailingRuns:
    """``shoal run`` of each bad target, of a constructor that raises and on a busy port:
    each its own process, all started at once."""
    directory = tmp_path_factory.mktemp("failing")
    (directory / "hello_app.py").write_text(APP)
    for name, source in BROKEN_MODULES.items():
        (directory / name).write_text(source)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        runs = {target: [target, "--port", str(free_port())] for target, _ in BAD_TARGETS}
        runs["failing_ctor:app"] = ["failing_ctor:app", "--port", str(free_port())]
        runs["busy port"] = ["hello_app:app", "--port", str(port)]
        processes = {name: _start_run(directory, args) for name, args in runs.items()}
        try:
            results = {name: _outcome(process) for name, process in processes.items()}
        finally:
            for process in processes.values():
                process.kill()
                process.wait(timeout=10)
    return FailingRuns(directory, port, results)


def _start_run(directory: Path, args: list[str]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "shoal", "run", *args]
    return subprocess.Popen(
        command, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _outcome(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.parametrize(("target", "expected"), BAD_TARGETS)
def test_shoal_run_explains_a_bad_target_in_one_message(
    failing_runs: FailingRuns, target: str, expected: list[str]
) -> None:
    stderr = failing_runs.stderr(target)
    assert stderr.startswith("shoal run: ") and stderr.count("shoal run: ") == 1, stderr
    assert "Traceback" not in stderr
    for fragment in expected:
        assert fragment in stderr, stderr


def test_shoal_run_names_port_option_when_port_is_busy(failing_runs: FailingRuns) -> None:
    stderr, port = failing_runs.stderr("busy port"), failing_runs.busy_port
    assert f"port {port} on 127.0.0.1 is already in use" in stderr and "--port" in stderr
    assert "Traceback" not in stderr


def test_shoal_run_reports_a_failing_constructor_with_its_line(failing_runs: FailingRuns) -> None:
    stderr = failing_runs.stderr("failing_ctor:app")
    assert "deployment 'Model' raised RuntimeError: weights not found" in stderr
    path = failing_runs.directory / "failing_ctor.py"
    assert f'File "{path}", line 7, in __init__' in stderr
    assert stderr.count("raise RuntimeError('weights not found')") == 1, stderr


def test_sigint_during_startup_still_stops_shoal_run(tmp_path: Path) -> None:
    (tmp_path / "hello_app.py").write_text(APP)
    command = [sys.executable, "-m", "shoal", "run", "hello_app:app", "--port", str(free_port())]
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        # Workers are starting: shoal is mid-startup.
        workers = wait_until(
            lambda: set(descendants(server.pid)), 30, "shoal run to start a worker"
        )
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        _wait_until_gone(workers)
    finally:
        server.kill()
        server.wait(timeout=10)


def _four(processes: set[int]) -> set[int] | None:
    return processes if len(processes) == 4 else None
