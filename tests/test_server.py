"""A `shoal start` server: Ray's REST API and config files, and Python processes attaching.

Everything runs for real: the server is its own process (started by
``start_server`` as `shoal start` does), configs go over HTTP, attaching
drivers are separate processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.procs import is_alive
from shoal._config import AdminOptions, HTTPOptions
from shoal._instance.home import ServerInfo, log_directory, read_server_info, server_dir
from shoal._instance.server import start_server, wait_stopped
from tests.conftest import (
    app_details,
    app_running,
    free_port,
    run_driver,
    shoal_home,
    wait_until,
)

APP_SOURCE = """
from shoal import serve

@serve.deployment
class Greeter:
    def __init__(self, greeting: str = "hello"):
        self.greeting = greeting
        self.suffix = ""

    def reconfigure(self, config):
        self.suffix = config.get("suffix", "")

    async def __call__(self, request):
        return {"text": self.greeting + self.suffix, "version": VERSION}

VERSION = 1

def builder(args):
    return Greeter.bind(args.get("greeting", "hi"))

app = Greeter.bind()
"""


def _start(home: str, cwd: Path) -> ServerInfo:
    """Start a `shoal start` server keeping its state in ``home``, with free ports."""
    with shoal_home(home):
        previous = os.getcwd()
        os.chdir(cwd)  # the server resolves import paths from its working directory
        try:
            return start_server(
                HTTPOptions(port=free_port()), AdminOptions(port=free_port()), timeout_s=60
            )
        finally:
            os.chdir(previous)


def _stop(home: str, info: ServerInfo) -> None:
    """Stop ``info``'s server, and any a test started after it in ``home`` (a restart),
    even when the test failed half-way; then remove ``home``."""
    with shoal_home(home):
        for running in {info, read_server_info() or info}:
            if not wait_stopped(running, 0):
                os.kill(running.pid, signal.SIGTERM)
                if not wait_stopped(running, 40):
                    os.kill(running.pid, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)


def _new_home() -> str:
    return tempfile.mkdtemp(prefix="shoal-home-")  # short: socket paths must fit in 107 bytes


@pytest.fixture(scope="module")
def _shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Any]]:
    """[home, info]: the server the tests that leave it running share (replaced if one of
    them stopped it after all)."""
    home = _new_home()
    shared = [home, _start(home, tmp_path_factory.mktemp("server"))]
    try:
        yield shared
    finally:
        _stop(*shared)


@pytest.fixture
def shared_server(_shared_server: list[Any], tmp_path: Path) -> Iterator[list[Any]]:
    """[home, info] of the module's `shoal start` server (a new one if a test left it
    stopped), left as found: every application is deleted after the test. SHOAL_HOME
    names its state directory during the test. A test that stops the server starts the
    next one in the same home and puts it in ``[1]``: the tests after it share that one."""
    home, info = _shared_server
    with shoal_home(home):
        running = read_server_info() == info and _answers(info)
    if not running:  # a test stopped it and failed before it started the next one
        _stop(home, info)
        home = _new_home()
        _shared_server[:] = [home, _start(home, tmp_path)]
    with shoal_home(_shared_server[0]):
        try:
            yield _shared_server
        finally:
            current: ServerInfo = _shared_server[1]
            if _answers(current):  # else the next test's setup replaces it
                response = httpx.delete(f"{current.admin_url}/api/serve/applications/", timeout=30)
                assert response.status_code == 200, response.text
                wait_until(lambda: not app_details(current)["applications"], 30, "all deleted")


@pytest.fixture
def server(shared_server: list[Any]) -> ServerInfo:
    """The module's `shoal start` server (``shared_server``), for a test that leaves it
    running."""
    return shared_server[1]


def _answers(info: ServerInfo) -> bool:
    try:
        return httpx.get(f"{info.admin_url}/api/serve/applications/", timeout=30).is_success
    except httpx.HTTPError:
        return False


def _config(tmp_path: Path, **app: Any) -> dict[str, Any]:
    entry = {"name": "greet", "route_prefix": "/greet", "import_path": "greeter:builder",
             "args": {"greeting": "yo"}, "runtime_env": {"working_dir": str(tmp_path)}}  # fmt: skip
    entry.update(app)
    return {"applications": [entry]}


def _put(info: ServerInfo, config: dict[str, Any]) -> httpx.Response:
    return httpx.put(f"{info.admin_url}/api/serve/applications/", json=config, timeout=30)


def _replica_ids(details: dict[str, Any]) -> set[str]:
    return {r["replica_id"] for d in details["deployments"].values() for r in d["replicas"]}


def _get(info: ServerInfo, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{info.http_port}{path}", timeout=30)


GATED_SOURCE = """
import os, time
from shoal import serve

# The build of this module waits (at most 60 s) for the file "gate" beside it.
_deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(os.path.dirname(__file__), "gate")):
    assert time.monotonic() < _deadline, "no gate"
    time.sleep(0.02)

@serve.deployment
def gated(request):
    return "gated"

app = gated.bind()
"""


def test_an_application_deleted_while_its_config_builds_is_not_deployed_after(
    server: ServerInfo, tmp_path: Path
) -> None:
    """A config's apply builds its applications first (in a child process), then deploys
    them. One deleted meanwhile stays deleted: the apply does not bring it back."""
    (tmp_path / "gated.py").write_text(GATED_SOURCE)
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    config = _config(tmp_path)
    gated = {"name": "gated", "route_prefix": "/gated", "import_path": "gated:app",
             "runtime_env": {"working_dir": str(tmp_path)}}  # fmt: skip
    config["applications"].append(gated)
    assert _put(server, config).status_code == 200
    wait_until(lambda: "gated" in app_details(server)["applications"], 30, "gated building")
    response = httpx.delete(f"{server.admin_url}/api/serve/applications/gated", timeout=30)
    assert response.status_code == 200
    (tmp_path / "gate").touch()
    # Both were built together and deploy together: once greet runs, gated's turn is over.
    app_running(server, "greet")
    assert "gated" not in app_details(server)["applications"]
    assert _get(server, "/gated").status_code == 404
    httpx.delete(f"{server.admin_url}/api/serve/applications/", timeout=30)
    wait_until(lambda: not app_details(server)["applications"], 30, "all deleted")


def test_a_ray_config_deploys_updates_and_deletes_declaratively(
    server: ServerInfo, tmp_path: Path
) -> None:
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    config = _config(tmp_path, deployments=[{"name": "Greeter", "num_replicas": 2}])
    assert _put(server, config).status_code == 200
    details = app_running(server, "greet")
    assert details["source"] == "declarative"
    assert details["deployed_app_config"]["import_path"] == "greeter:builder"
    deployment = details["deployments"]["Greeter"]
    assert deployment["target_num_replicas"] == 2
    assert len(deployment["replicas"]) == 2
    assert _get(server, "/greet").json() == {"text": "yo", "version": 1}
    replicas = _replica_ids(details)

    # The same file again changes nothing: the replicas stay.
    assert _put(server, config).status_code == 200
    again = _applied_again(server, "greet", details["last_deployed_time_s"])
    assert _replica_ids(again) == replicas

    # A user_config-only change reconfigures the running replicas in place.
    config["applications"][0]["deployments"][0]["user_config"] = {"suffix": "!"}
    assert _put(server, config).status_code == 200
    wait_until(lambda: _get(server, "/greet").json()["text"] == "yo!", 30, "reconfigured")
    assert _replica_ids(app_running(server, "greet")) == replicas

    # An application missing from the file is deleted; DELETE removes the rest.
    other = _config(tmp_path, name="other", route_prefix="/other")["applications"][0]
    assert _put(server, {"applications": [config["applications"][0], other]}).status_code == 200
    app_running(server, "other")
    assert _put(server, {"applications": [other]}).status_code == 200
    wait_until(lambda: "greet" not in app_details(server)["applications"], 30, "greet deleted")
    assert _get(server, "/greet").status_code == 404
    # The log says why as it is: greet came from a config (it said "deployed with serve.run").
    controller_log = Path(log_directory(server_dir())) / "controller.log"
    assert "'greet' (deployed with serve.run)" not in controller_log.read_text()
    response = httpx.delete(f"{server.admin_url}/api/serve/applications/", timeout=30)
    assert response.status_code == 200
    wait_until(lambda: not app_details(server)["applications"], 30, "all deleted")


INGRESS_SOURCE = """
from fastapi import FastAPI
from pydantic import BaseModel
from shoal import serve

api = FastAPI()

class Item(BaseModel):
    name: str

class Order(BaseModel):
    item: Item
    quantity: int = 1

@serve.deployment
@serve.ingress(api)
class Shop:
    def __init__(self, currency: str = "EUR"):
        self.currency = currency

    @api.api_route("/orders", methods=["GET", "POST", "PUT", "DELETE"])
    def orders(self) -> str:
        return "orders in " + self.currency

    @api.post("/order")
    def order(self, order: Order) -> dict:
        return {"item": order.item.name, "currency": self.currency}

def builder(args):
    return Shop.bind(args.get("currency", "EUR"))
"""

FINGERPRINT_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import importlib
from shoal._api.graph import build_app
for module, currency in (arg.split(":") for arg in sys.argv[2:]):
    app = importlib.import_module(module).builder({"currency": currency})
    print(build_app(app, "shop", "/shop", None).deployments["Shop"].code.fingerprint())
"""


def _fingerprints(directory: Path, hash_seed: int, *apps: str) -> list[str]:
    """The fingerprints of Shop in each of ``apps`` (``module:currency``, the modules in
    ``directory``), computed in a new process with ``hash_seed``."""
    result = subprocess.run(
        [sys.executable, "-c", FINGERPRINT_DRIVER, str(directory), *apps],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_a_fastapi_ingress_has_the_same_fingerprint_in_every_process(tmp_path: Path) -> None:
    """Each config apply builds the application in a new process: its code version must
    not depend on the process (hash seed, memory addresses), or re-applying an unchanged
    file replaces the ingress replicas. A FastAPI app holds sets (of HTTP methods), names
    its routes after one of their elements, and pydantic names its models by address."""
    (tmp_path / "shop.py").write_text(INGRESS_SOURCE)
    (tmp_path / "new_route.py").write_text(INGRESS_SOURCE.replace('"/orders"', '"/all"'))
    (tmp_path / "new_body.py").write_text(INGRESS_SOURCE.replace('"orders in "', '"in "'))
    [fingerprint] = _fingerprints(tmp_path, 1, "shop:EUR")
    assert fingerprint != "None"
    again, *changed = _fingerprints(
        tmp_path, 2, "shop:EUR", "shop:USD", "new_route:EUR", "new_body:EUR"
    )
    assert again == fingerprint
    # Still sensitive to real changes: the init args, a route, a method's body.
    assert len({fingerprint, *changed}) == 4, changed


def test_reapplying_an_unchanged_config_keeps_the_fastapi_ingress_replicas(
    server: ServerInfo, tmp_path: Path
) -> None:
    (tmp_path / "shop.py").write_text(INGRESS_SOURCE)
    config = _config(tmp_path, name="shop", route_prefix="/shop", import_path="shop:builder")
    assert _put(server, config).status_code == 200
    details = app_running(server, "shop")
    replicas, deployed = _replica_ids(details), details["last_deployed_time_s"]
    assert _get(server, "/shop/orders").json() == "orders in EUR"

    assert _put(server, config).status_code == 200  # built again, in a new process
    assert _replica_ids(_applied_again(server, "shop", deployed)) == replicas


def _applied_again(server: ServerInfo, app: str, deployed: float) -> dict[str, Any]:
    """``app``'s details once an apply that began after ``deployed`` (its
    ``last_deployed_time_s`` before) has ended."""

    def redeployed() -> dict[str, Any] | None:
        again = app_running(server, app)
        return again if again["last_deployed_time_s"] > deployed else None

    return wait_until(redeployed, 60, f"{app} applied again")  # type: ignore[no-any-return]


def test_a_code_change_rolls_out_without_a_failed_request(
    server: ServerInfo, tmp_path: Path
) -> None:
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    config = _config(tmp_path)
    assert _put(server, config).status_code == 200
    app_running(server, "greet")
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.get(f"http://127.0.0.1:{server.http_port}/greet")
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    versions.add(response.json()["version"])

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        (tmp_path / "greeter.py").write_text(APP_SOURCE.replace("VERSION = 1", "VERSION = 2"))
        assert _put(server, config).status_code == 200
        wait_until(lambda: 2 in versions, 60, "version 2 served")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert _get(server, "/greet").json()["version"] == 2


BUILT_SOURCE = """
import os
from pathlib import Path
from shoal import serve
import built_helpers

@serve.deployment
class Built:
    def __init__(self, builder_parent: str, version: int):
        self.answer = {"builder_parent": builder_parent, "version": version}

    async def __call__(self, request):
        return built_helpers.reply(self.answer)

def builder(args):
    parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\\0", b" ").decode()
    return Built.bind(parent, built_helpers.VERSION)
"""

HELPERS_SOURCE = """
VERSION = %d

def reply(answer):
    return answer
"""


def test_a_server_builds_configs_in_a_fork_of_its_fork_server_from_edited_code(
    server: ServerInfo,
) -> None:
    # Forked, a build costs ~0.05 s instead of a new interpreter's ~0.7 s of imports. The
    # replicas use built_helpers by reference (importable from the server's directory), so
    # the fork server imports it for version 1's replicas and holds it when version 2 is
    # built: that build must import the edited file, not reuse the fork server's module.
    directory = Path(os.readlink(f"/proc/{server.pid}/cwd"))
    config = {"applications": [
        {"name": "built", "route_prefix": "/built", "import_path": "built_module:builder"}
    ]}  # fmt: skip
    (directory / "built_module.py").write_text(BUILT_SOURCE)
    try:
        for version in (1, 2):
            (directory / "built_helpers.py").write_text(HELPERS_SOURCE % version)
            assert _put(server, config).status_code == 200

            def built(version: int = version) -> dict[str, Any] | None:
                response = _get(server, "/built")
                answer = response.json() if response.status_code == 200 else None
                return answer if answer is not None and answer["version"] == version else None

            answer = wait_until(built, 60, f"version {version} built and served")
            assert "shoal._runtime.process.zygote" in answer["builder_parent"]
    finally:
        for name in ("built_module.py", "built_helpers.py"):
            (directory / name).unlink()


def test_errors_name_the_field_and_failed_builds_say_why(
    server: ServerInfo, tmp_path: Path
) -> None:
    bad = _config(tmp_path, deployments=[{"name": "Greeter", "num_replicas": -1}])
    response = _put(server, bad)
    assert response.status_code == 400
    assert "applications[0].deployments[0].num_replicas" in response.text
    assert "-1" in response.text

    missing = _config(tmp_path, import_path="no_such_module:app")
    assert _put(server, missing).status_code == 200  # accepted; the build fails later

    def failed() -> dict[str, Any] | None:
        app = app_details(server)["applications"].get("greet")
        return app if app is not None and app["status"] == "DEPLOY_FAILED" else None

    app = wait_until(failed, 60, "DEPLOY_FAILED")
    assert "no_such_module" in app["message"]


def test_a_redeploy_says_deploying_then_why_its_build_failed_while_the_old_version_serves(
    server: ServerInfo, tmp_path: Path
) -> None:
    # As Ray Serve reports it: DEPLOYING while the new config builds, DEPLOY_FAILED and why
    # once its build failed. It said RUNNING with no message both times, the version
    # deployed before still serving: an operator could not see the deploy had failed.
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    (tmp_path / "gated.py").write_text(GATED_SOURCE)
    assert _put(server, _config(tmp_path)).status_code == 200
    app_running(server, "greet")
    gated = _config(tmp_path, import_path="gated:app")
    del gated["applications"][0]["args"]  # an application, not a builder
    assert _put(server, gated).status_code == 200
    app = app_details(server)["applications"]["greet"]
    assert (app["status"], app["message"]) == ("DEPLOYING", "")
    assert _get(server, "/greet").json()["text"] == "yo"  # the old version, meanwhile
    (tmp_path / "gate").touch()
    app_running(server, "greet")
    assert _get(server, "/greet").text == "gated"

    assert _put(server, _config(tmp_path, import_path="no_such_module:app")).status_code == 200

    def failed() -> dict[str, Any] | None:
        app = app_details(server)["applications"]["greet"]
        return app if app["status"] == "DEPLOY_FAILED" else None

    app = wait_until(failed, 60, "the failed build reported")
    assert "no_such_module" in app["message"]
    assert app["deployments"]  # still listed: they still serve
    assert _get(server, "/greet").text == "gated"
    driver = (
        "from shoal import serve\n"
        "app = serve.status().applications['greet']\n"
        "print(app.status, repr(app.message))\n"
    )
    printed = run_driver(tmp_path, driver).stdout
    assert printed.startswith("DEPLOY_FAILED ") and "no_such_module" in printed

    assert _put(server, _config(tmp_path)).status_code == 200
    assert app_running(server, "greet")["message"] == ""
    assert _get(server, "/greet").json()["text"] == "yo"
    httpx.delete(f"{server.admin_url}/api/serve/applications/", timeout=30)
    wait_until(lambda: not app_details(server)["applications"], 30, "all deleted")


def test_a_second_python_process_attaches_and_deploys(server: ServerInfo, tmp_path: Path) -> None:
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    assert _put(server, _config(tmp_path)).status_code == 200
    app_running(server, "greet")
    driver = textwrap.dedent(
        """
        from shoal import serve

        # Attached: the server's options apply; each one given here is named as ignored.
        serve.start(http_options={"port": 1}, logging_config={"log_level": "DEBUG"},
                    metrics_options={"enabled": False})
        status = serve.status()
        assert status.applications["greet"].status == "RUNNING", status
        handle = serve.get_app_handle("greet")
        print("ingress", handle.deployment_name)

        @serve.deployment
        class Echo:
            def __call__(self, text):
                return "echo " + (text if isinstance(text, str) else "http")

        echo = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        print(echo.remote("hi").result())
        """
    )
    result = run_driver(tmp_path, driver)
    ignored = "ignoring http_options, logging_config, metrics_options ("
    assert result.stderr.count(ignored) == 1, result.stderr
    assert "ingress Greeter" in result.stdout
    assert "echo hi" in result.stdout
    # The driver has exited: its application keeps running in the server.
    echo = app_running(server, "echo")
    assert echo["source"] == "imperative"
    assert _get(server, "/echo").text == "echo http"
    remover = (
        "from shoal import serve\n"
        "serve.delete('echo')\n"
        "print(sorted(serve.status().applications))\n"
    )
    assert "['greet']" in run_driver(tmp_path, remover).stdout


def test_a_failed_first_serve_run_is_listed_until_deleted_or_left_out_of_a_config(
    server: ServerInfo, tmp_path: Path
) -> None:
    """As in Ray Serve: the application is DEPLOY_FAILED, with why, and nothing of it runs;
    a DELETE removes it, and so does applying a config that does not list it."""
    driver = textwrap.dedent(
        """
        import sys
        from shoal import serve

        @serve.deployment
        class Broken:
            def __init__(self):
                raise ValueError("no weights here")

        for name in sys.argv[2:]:
            try:
                serve.run(Broken.bind(), name=name, route_prefix=None)
            except serve.DeploymentError:
                print("failed", name)
        try:
            serve.get_app_handle("broken-1")
        except serve.NotFoundError as exc:
            print("handle", exc)
        """
    )
    printed = run_driver(tmp_path, driver, "broken-1", "broken-2").stdout
    assert "failed broken-1" in printed
    assert "handle application 'broken-1' failed to deploy" in printed and "no weights" in printed
    for name in ("broken-1", "broken-2"):
        app = app_details(server)["applications"][name]
        assert (app["status"], app["deployments"]) == ("DEPLOY_FAILED", {})
        assert "no weights here" in app["message"]
    deleted = httpx.delete(f"{server.admin_url}/api/serve/applications/broken-1", timeout=30)
    assert deleted.status_code == 200
    assert "broken-1" not in app_details(server)["applications"]
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    assert _put(server, _config(tmp_path)).status_code == 200
    app_running(server, "greet")
    assert "broken-2" not in app_details(server)["applications"]
    httpx.delete(f"{server.admin_url}/api/serve/applications/", timeout=30)
    wait_until(lambda: not app_details(server)["applications"], 30, "all deleted")


def test_sigterm_stops_the_server_in_order(shared_server: list[Any], tmp_path: Path) -> None:
    home, info = shared_server
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    assert _put(info, _config(tmp_path)).status_code == 200
    pids = [r["pid"] for r in app_running(info, "greet")["deployments"]["Greeter"]["replicas"]]
    os.kill(info.pid, signal.SIGTERM)
    assert wait_stopped(info, 40)
    assert read_server_info() is None
    assert not any(is_alive(pid) for pid in pids)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{info.admin_url}/api/serve/applications/", timeout=5)
    # A shutdown asked for deletes the applications (as Ray's does): a new start is empty.
    # It is the module's server from now on.
    shared_server[1] = again = _start(home, tmp_path)
    assert app_details(again)["applications"] == {}


def test_a_second_server_is_refused_with_what_to_do(server: ServerInfo) -> None:
    started = time.monotonic()
    with pytest.raises(Exception, match=r"already running.*shoal shutdown"):
        start_server(HTTPOptions(port=free_port()), AdminOptions(port=free_port()))
    assert time.monotonic() - started < 5


def _admin_port(info: ServerInfo) -> int:
    assert info.admin_url is not None
    return int(info.admin_url.rsplit(":", 1)[1])


def test_an_embedded_instance_serves_the_rest_api_and_refuses_a_busy_port(
    tmp_path: Path,
) -> None:
    admin, busy = free_port(), free_port()
    driver = textwrap.dedent(
        f"""
        import socket, sys, httpx
        from shoal import serve

        @serve.deployment
        def hello(request):
            return "hello"

        serve.start(http_options={{"port": int(sys.argv[1])}}, admin_options={{"port": {admin}}})
        serve.run(hello.bind(), name="hi", route_prefix="/hi")
        details = httpx.get("http://127.0.0.1:{admin}/api/serve/applications/").json()
        app = details["applications"]["hi"]
        print("status", app["status"], app["source"])
        serve.shutdown()

        holder = socket.socket()
        holder.bind(("127.0.0.1", {busy}))
        holder.listen()
        try:
            serve.start(http_options={{"port": int(sys.argv[1])}}, admin_options={{"port": {busy}}})
        except serve.ConfigError as exc:
            print("refused", exc)
        """
    )
    result = run_driver(tmp_path, driver)
    assert "status RUNNING imperative" in result.stdout
    assert f"refused admin address 127.0.0.1:{busy} is in use" in result.stdout


def test_shoal_run_serves_in_its_own_process_even_when_a_server_runs(
    server: ServerInfo, tmp_path: Path
) -> None:
    """`shoal run` never attaches: its Ctrl-C must not stop the operator's server."""
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", "greeter:app", "--port", str(port),
               "--admin-port", "0"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert f"http://127.0.0.1:{port}/" in process.stdout.readline()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).json()["version"] == 1
        assert app_details(server)["applications"] == {}  # not deployed to the server
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert read_server_info() == server


BROKEN_RUN = """
from shoal import serve

@serve.deployment
class Broken:
    def __init__(self):
        raise ValueError("no weights here")

try:
    serve.run(Broken.bind(), name="broken-run", route_prefix=None)
except serve.DeploymentError:
    print("failed")
"""


def test_a_restarted_server_still_lists_the_applications_that_have_nothing_running(
    shared_server: list[Any], tmp_path: Path
) -> None:
    """kill -9 of the server: after its restart a failed first serve.run and a config's
    failed build are still DEPLOY_FAILED with why; a build the kill cut short is
    DEPLOY_FAILED saying to apply the config again, rather than gone without a word."""
    home = shared_server[0]

    def killed_and_restarted(info: ServerInfo) -> dict[str, Any]:
        before = app_details(info)["applications"]
        os.kill(info.pid, signal.SIGKILL)
        assert wait_stopped(info, 10)
        shared_server[1] = _start(home, tmp_path)
        after: dict[str, Any] = app_details(shared_server[1])["applications"]
        assert after.keys() == before.keys()
        return after

    def status_of(info: ServerInfo, app: str) -> str | None:
        return app_details(info)["applications"].get(app, {}).get("status")

    workdir = {"runtime_env": {"working_dir": str(tmp_path)}}
    nobuild = {"name": "nobuild", "import_path": "no_such_module:app", **workdir}
    assert _put(shared_server[1], {"applications": [nobuild]}).status_code == 200
    wait_until(lambda: status_of(shared_server[1], "nobuild") == "DEPLOY_FAILED", 60, "failed")
    assert run_driver(tmp_path, BROKEN_RUN).stdout.strip() == "failed"
    after = killed_and_restarted(shared_server[1])
    assert after["nobuild"]["status"] == "DEPLOY_FAILED"
    assert "no_such_module" in after["nobuild"]["message"]
    assert after["broken-run"]["status"] == "DEPLOY_FAILED"
    assert "no weights here" in after["broken-run"]["message"]

    (tmp_path / "gated.py").write_text(GATED_SOURCE)
    gated = {"name": "gated", "import_path": "gated:app", **workdir}
    assert _put(shared_server[1], {"applications": [gated]}).status_code == 200
    wait_until(lambda: status_of(shared_server[1], "gated") == "DEPLOYING", 30, "building")
    try:
        after = killed_and_restarted(shared_server[1])
    finally:
        (tmp_path / "gate").touch()  # the build the kill orphaned ends
    assert after["gated"]["status"] == "DEPLOY_FAILED"
    assert "apply the config again" in after["gated"]["message"]
    deleted = httpx.delete(f"{shared_server[1].admin_url}/api/serve/applications/gated", timeout=30)
    assert deleted.status_code == 200
    assert "gated" not in app_details(shared_server[1])["applications"]


def test_a_killed_server_restarts_and_adopts_its_replicas_without_failing_requests(
    shared_server: list[Any], tmp_path: Path
) -> None:
    """kill -9 of the server under 16 concurrent clients: the proxy and replicas keep
    serving; a restarted `shoal start` adopts them (same replica ids) from its checkpoint.
    The module's last test of its server: it ends it, with a shutdown over REST."""
    own_server: ServerInfo = shared_server[1]
    (tmp_path / "greeter.py").write_text(APP_SOURCE)
    config = _config(tmp_path, deployments=[{"name": "Greeter", "num_replicas": 2}])
    assert _put(own_server, config).status_code == 200
    replicas = _replica_ids(app_running(own_server, "greet"))
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.get(f"http://127.0.0.1:{own_server.http_port}/greet")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    served[0] += 1
                else:
                    failures.append(f"{response.status_code} {response.text}")

    clients = [threading.Thread(target=client) for _ in range(16)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: served[0] > 50, 30, "traffic flowing")
        os.kill(own_server.pid, signal.SIGKILL)
        assert wait_stopped(own_server, 10)
        during = served[0]
        wait_until(lambda: served[0] > during + 50, 30, "served without a controller")
        cwd = os.getcwd()
        os.chdir(tmp_path)
        try:
            restarted = start_server(
                HTTPOptions(port=own_server.http_port), AdminOptions(port=_admin_port(own_server))
            )
        finally:
            os.chdir(cwd)
        shared_server[1] = restarted
        details = app_running(restarted, "greet")
        assert _replica_ids(details) == replicas
        assert details["source"] == "declarative"
        after = served[0]
        wait_until(lambda: served[0] > after + 50, 30, "served after the restart")
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    httpx.post(f"{restarted.admin_url}/api/shoal/shutdown", timeout=30)
    assert wait_stopped(restarted, 40)
