"""The operator CLI as real subprocesses: deploy/status/config/delete/shutdown over the admin
REST API, build, and ``shoal run`` with builder arguments and ``--reload``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, wait_until

from shoal._config import AdminOptions
from shoal._deploy_config import parse_config
from shoal._instance.peer import serve_admin
from shoal._instance.rest import admin_app

APP = """
from shoal import serve

@serve.deployment
class Hello:
    def __init__(self, greeting: str = "hello"):
        self.greeting = greeting

    async def __call__(self, request):
        return {self.greeting: (await request.json())["name"]}

app = Hello.bind()

def builder(args):
    return Hello.bind(args.get("greeting", "hi"))
"""

CONFIG = """\
applications:
- name: hello
  route_prefix: /hello
  import_path: hello_app:app
  deployments:
  - name: Hello
    num_replicas: 1
"""


class _Instance:
    """A REST admin server on its own loop thread, over a control plane that records calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.apps: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = admin_app(self)
        future = asyncio.run_coroutine_threadsafe(
            serve_admin(app, AdminOptions(port=0), None), self.loop
        )
        self.server, host, port = future.result(10)
        self.address = f"http://{host}:{port}"

    async def apply_config(self, config: Any) -> None:
        self.calls.append(("apply", config))
        self.apps = {app.name: app for app in config.applications}

    async def delete_app(self, name: str) -> None:
        self.calls.append(("delete_app", name))
        self.apps.pop(name, None)

    async def delete_all(self) -> None:
        self.calls.append(("delete_all", None))
        self.apps = {}

    def log_directory(self) -> str | None:
        return None  # (writes no log files)

    def details(self) -> dict[str, Any]:
        replicas = [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]
        return {
            "proxies": {"node-1": {"status": "HEALTHY"}},
            "target_capacity": None,
            "applications": {
                name: {
                    "status": "DEPLOYING",
                    "message": "",
                    "last_deployed_time_s": 1700000000.5,
                    "deployed_app_config": app.model_dump(mode="json", exclude_unset=True),
                    "deployments": {
                        "Hello": {
                            "status": "UPDATING",
                            "status_trigger": "CONFIG_UPDATE_STARTED",
                            "message": "1 of 3 replicas starting\nwaiting",
                            "replicas": replicas,
                        }
                    },
                }
                for name, app in self.apps.items()
            },
        }

    async def shutdown(self) -> None:
        self.calls.append(("shutdown", None))
        self.server.should_exit = True

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def instance() -> Iterator[_Instance]:
    running = _Instance()
    try:
        yield running
    finally:
        running.close()


def shoal(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return finish(start_shoal(cwd, *args, env=env))


def start_shoal(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``shoal ARGS`` started in the background (``finish`` waits for it), so that
    independent commands run side by side."""
    environment = {
        k: v for k, v in os.environ.items() if k not in ("SHOAL_ADDRESS", "RAY_DASHBOARD_ADDRESS")
    }
    return subprocess.Popen(
        [sys.executable, "-m", "shoal", *args], cwd=cwd, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**environment, **(env or {})},
    )  # fmt: skip


def finish(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait(timeout=10)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _failed(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "hello_app.py").write_text(APP)
    (tmp_path / "serve.yaml").write_text(CONFIG)
    return tmp_path


def test_deploy_status_config_delete_over_rest(project: Path, instance: _Instance) -> None:
    result = shoal(project, "deploy", "serve.yaml", "--address", instance.address)
    assert result.returncode == 0, result.stderr
    assert "accepted" in result.stdout and "shoal status" in result.stdout
    [(call, config)] = instance.calls
    assert call == "apply" and config == parse_config(yaml.safe_load(CONFIG), "x")

    # The commands that only read run side by side.
    reading = [
        start_shoal(project, "status", "-a", instance.address),
        start_shoal(project, "config", "--name", "hello", env={"SHOAL_ADDRESS": instance.address}),
        start_shoal(project, "config", "--name", "nope", "-a", instance.address),
        start_shoal(project, "delete", "nope", "-a", instance.address),
    ]
    status_run, shown, config_nope, delete_nope = map(finish, reading)
    status = yaml.safe_load(status_run.stdout)
    assert status == {
        "proxies": {"node-1": "HEALTHY"},
        "applications": {"hello": {
            "status": "DEPLOYING", "message": "", "last_deployed_time_s": 1700000000.5,
            "deployments": {"Hello": {
                "status": "UPDATING", "status_trigger": "CONFIG_UPDATE_STARTED",
                "replica_states": {"RUNNING": 2, "STARTING": 1},
                "message": "1 of 3 replicas starting\nwaiting",
            }},
        }},
        "target_capacity": None,
    }  # fmt: skip

    assert yaml.safe_load(shown.stdout)["import_path"] == "hello_app:app"
    _failed(config_nope, "no application named 'nope' (deployed: hello)")

    _failed(delete_nope, "deployed: hello")
    assert shoal(project, "delete", "hello", "-a", instance.address).returncode == 0
    assert instance.calls[-1] == ("delete_app", "hello")


def test_deploy_reports_bad_config_locally_and_server_refusals(
    project: Path, instance: _Instance
) -> None:
    (project / "bad.yaml").write_text(CONFIG.replace("num_replicas: 1", "num_replicas: -1"))
    running = [
        start_shoal(project, "deploy", "bad.yaml", "-a", instance.address),
        start_shoal(project, "deploy", "missing.yaml", "-a", instance.address),
    ]
    bad, missing = map(finish, running)
    _failed(bad, "shoal deploy: bad.yaml: applications[0].deployments[0].num_replicas: -1")
    assert instance.calls == []  # refused before sending
    _failed(missing, "missing.yaml")


def test_a_400_from_the_server_is_printed(project: Path, instance: _Instance) -> None:
    async def refuse(config: Any) -> None:
        from shoal._errors import ConfigError

        raise ConfigError("applications[0].route_prefix: '/hello' is taken; pick another")

    instance.apply_config = refuse  # type: ignore[method-assign]
    result = shoal(project, "deploy", "serve.yaml", "-a", instance.address)
    _failed(result, "shoal deploy: applications[0].route_prefix: '/hello' is taken; pick another")


def test_nothing_listening_is_a_clear_message(project: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    env = {"SHOAL_ADDRESS": address}
    commands = (["deploy", "serve.yaml"], ["shutdown", "-y"])
    for result in map(finish, [start_shoal(project, *command, env=env) for command in commands]):
        _failed(result, f"no shoal instance answers at {address}; start one with `shoal start`")


def test_start_explains_a_bad_resources_argument(project: Path) -> None:
    """Refused before anything starts, naming the flag, the value and an example."""
    bad = {"GPU=1": "--resources is not JSON", '{"GPU": "one"}': "must map names to numbers"}
    started = {value: start_shoal(project, "start", "--resources", value) for value in bad}
    for value, process in started.items():
        result = finish(process)
        _failed(result, bad[value], "e.g. --resources '{\"GPU\": 1}'")
        assert "numbers" not in bad[value] or value in result.stderr, result.stderr


def test_shutdown_waits_until_the_instance_stops(project: Path, instance: _Instance) -> None:
    _failed(shoal(project, "shutdown", "-a", instance.address), "pass -y to confirm")
    result = shoal(project, "shutdown", "-y", "-a", instance.address)
    assert result.returncode == 0, result.stderr
    assert "has stopped" in result.stdout
    assert ("shutdown", None) in instance.calls
    with pytest.raises(httpx.ConnectError):
        httpx.get(instance.address + "/api/ray/version")


def test_build_writes_a_config_that_parses_back(project: Path) -> None:
    running = [
        start_shoal(project, "build", "hello_app:app"),
        start_shoal(project, "build", "hello_app:app", "-o", "out.yaml"),
        start_shoal(project, "build", "hello_app:nope"),
    ]
    printed, written, nope = map(finish, running)
    assert printed.returncode == 0, printed.stderr
    config = parse_config(yaml.safe_load(printed.stdout), "stdout")
    assert [app.import_path for app in config.applications] == ["hello_app:app"]
    assert written.returncode == 0, written.stderr
    assert (project / "out.yaml").read_text() == printed.stdout
    _failed(nope, "shoal build: module 'hello_app' has no")


def _serve(cwd: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", *args, "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    banner = server.stdout.readline()  # printed once the route answers
    assert f"http://127.0.0.1:{port}" in banner, (banner, server.stderr and server.stderr.read())
    return server, f"http://127.0.0.1:{port}"


def _stop(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGINT)
    try:
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait(timeout=10)


def test_run_passes_builder_arguments(project: Path) -> None:
    refused = start_shoal(project, "run", "hello_app:app", "greeting=hey")  # meanwhile
    server, base = _serve(project, "hello_app:builder", "greeting=hey")
    try:
        assert httpx.post(base + "/", json={"name": "a"}, timeout=30).json() == {"hey": "a"}
    finally:
        _stop(server)
    _failed(finish(refused), "takes no args")


def test_run_config_file_with_reload_redeploys_on_change(project: Path) -> None:
    server, base = _serve(project, "serve.yaml", "--reload")
    try:
        reply = httpx.post(base + "/hello", json={"name": "a"}, timeout=30)
        assert reply.json() == {"hello": "a"}
        (project / "hello_app.py").write_text(
            APP.replace('greeting: str = "hello"', 'greeting: str = "bonjour"')
        )

        def updated() -> bool:
            return httpx.post(base + "/hello", json={"name": "a"}, timeout=30).json() == {
                "bonjour": "a"
            }

        wait_until(updated, 30, "the app to be redeployed after the change")
        # An instance-wide option changed in the file: redeployed, and a warning says it
        # applies only when shoal run starts (never silently ignored).
        (project / "serve.yaml").write_text(
            "proxy_location: HeadOnly\n" + CONFIG.replace("/hello", "/hi")
        )
        wait_until(
            lambda: httpx.post(base + "/hi", json={"name": "a"}, timeout=30).is_success,
            30, "the config file's change redeployed",
        )  # fmt: skip
    finally:
        _stop(server)
    assert server.stderr is not None
    stderr = server.stderr.read()
    assert "hello_app.py changed; redeploying" in stderr
    assert "proxy_location changed in serve.yaml: instance-wide options apply when" in stderr


def test_run_applies_the_config_file_s_proxy_location(project: Path) -> None:
    """proxy_location: Disabled in the file: no HTTP proxy (handles only), as in Ray."""
    (project / "serve.yaml").write_text("proxy_location: Disabled\n" + CONFIG)
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", "serve.yaml", "--port", str(port),
               "--admin-port", str(free_port())]  # fmt: skip
    server = subprocess.Popen(
        command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()
        assert "application 'hello' serving on handles only" in banner, banner
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"http://127.0.0.1:{port}/hello", json={"name": "a"}, timeout=5)
    finally:
        _stop(server)


def test_start_deploy_status_delete_shutdown_on_a_real_server(
    project: Path, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against `shoal start`: no --address needed, the local server is found (and its token)."""
    from shoal._instance.home import read_server_info

    env = {"SHOAL_HOME": str(short_tmp)}
    monkeypatch.setenv("SHOAL_HOME", env["SHOAL_HOME"])  # for read_server_info() here
    http_port, admin_port = free_port(), free_port()
    (project / "serve.yaml").write_text(CONFIG + f"http_options:\n  port: {http_port}\n")
    admin = f"http://127.0.0.1:{admin_port}"
    started = shoal(project, "start", "--http-port", str(http_port), "--admin-port",
                    str(admin_port), env=env)  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr
        assert f"admin API {admin}" in started.stdout
        again = start_shoal(project, "start", env=env)  # meanwhile
        assert shoal(project, "deploy", "serve.yaml", env=env).returncode == 0
        _failed(finish(again), "already running", "shoal shutdown")

        def running() -> bool:
            apps = httpx.get(f"{admin}/api/serve/applications/").json()["applications"]
            return apps.get("hello", {}).get("status") == "RUNNING"

        wait_until(running, 30, "the deployed application to be RUNNING")
        reply = httpx.post(f"http://127.0.0.1:{http_port}/hello", json={"name": "a"}, timeout=30)
        assert reply.json() == {"hello": "a"}
        reading = [start_shoal(project, "status", env=env), start_shoal(project, "config", env=env)]
        status_run, config_run = map(finish, reading)
        status = yaml.safe_load(status_run.stdout)
        assert status["applications"]["hello"]["deployments"]["Hello"]["replica_states"] == {
            "RUNNING": 1
        }
        assert yaml.safe_load(config_run.stdout)["name"] == "hello"
        assert shoal(project, "delete", "hello", env=env).returncode == 0
        stopped = shoal(project, "shutdown", "-y", env=env)
        assert stopped.returncode == 0 and "has stopped" in stopped.stdout, stopped.stderr
        assert read_server_info() is None
    finally:
        leftover = read_server_info()
        if leftover is not None:
            os.kill(leftover.pid, signal.SIGTERM)


def test_address_order_and_the_local_token_stays_local(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal._cli.client import is_local_server, resolve_address
    from shoal._instance.home import ServerInfo

    monkeypatch.delenv("SHOAL_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://ray-head:8265")
    assert resolve_address(None) == "http://ray-head:8265"
    monkeypatch.setenv("SHOAL_ADDRESS", "127.0.0.1:9999")
    assert resolve_address(None) == "http://127.0.0.1:9999"
    assert resolve_address("http://box:1/") == "http://box:1"

    info = ServerInfo(pid=1, directory="/nowhere", admin_url="http://127.0.0.1:8265",
                      http_host=None, http_port=None)  # fmt: skip
    assert is_local_server(info, "http://127.0.0.1:8265")
    assert is_local_server(info, "http://localhost:8265")
    assert not is_local_server(info, "http://10.0.0.7:8265")  # never send our token away
    assert not is_local_server(info, "http://127.0.0.1:9000")


def test_status_shows_an_autoscaled_deployments_target_and_last_decisions() -> None:
    from shoal._cli.ops import status_of

    decisions = [
        {"time": 1700000000.0 + i, "from_replicas": i, "to_replicas": i + 1, "reason": f"r{i}"}
        for i in range(7)
    ]
    details = {
        "applications": {
            "app": {
                "status": "RUNNING",
                "deployments": {
                    "Scaled": {"status": "HEALTHY", "replicas": [], "target_num_replicas": 7,
                               "scaling_decisions": decisions},
                    "Fixed": {"status": "HEALTHY", "replicas": [], "target_num_replicas": 1,
                              "scaling_decisions": []},
                },
            }
        }
    }  # fmt: skip
    deployments = status_of(details)["applications"]["app"]["deployments"]
    scaled = deployments["Scaled"]
    assert scaled["target_num_replicas"] == 7
    assert [line.split(" ", 1)[1] for line in scaled["scaling_decisions"]] == [
        f"{i} -> {i + 1}: r{i}" for i in range(2, 7)
    ]  # the last five, each "HH:MM:SS from -> to: reason"
    assert "scaling_decisions" not in deployments["Fixed"]  # a fixed count says nothing more
