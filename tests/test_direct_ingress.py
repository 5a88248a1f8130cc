"""Direct ingress (``serve.run(..., direct_ingress_port=PORT)``), with real processes and
real HTTP: every ingress replica also accepts HTTP itself on PORT (shared with
``SO_REUSEPORT``), with the proxy's rules, and stops accepting before it drains.

Tests use the session's multi-process shoal (``http_port``); the proxy-wide request
timeout runs in a driver of its own. Every application a test deploys is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, run_driver, wait_until
from starlette.responses import StreamingResponse

from shoal import serve
from shoal._errors import ConfigError, ConfigTypeError, ShoalError

_names = itertools.count()
#: Generous bound for what the test expects to happen (slow shared machines).
DONE_S = 15.0


@serve.deployment
class Who:
    """Answers which replica (and process) served the request, and its version."""

    def __init__(self, version: str = "v1") -> None:
        self.version = version

    def __call__(self, request: Any) -> dict[str, Any]:
        replica = serve.get_replica_context().replica_id
        return {"version": self.version, "replica": replica, "pid": os.getpid()}


@serve.deployment
class Gated:
    """Answers its version, "gated", once its constructor saw the file ``gate`` (it waits
    at most DONE_S)."""

    def __init__(self, gate: str) -> None:
        wait_until(lambda: os.path.exists(gate), DONE_S, "the gate")

    def __call__(self, request: Any) -> dict[str, Any]:
        return {"version": "gated"}


@serve.deployment
class Slow:
    """Touches ``started`` once a request is in the handler, then answers a large body
    after ``delay_s`` (so a cut response shows)."""

    def __init__(self, started: str, delay_s: float = 1.0) -> None:
        self.started = started
        self.delay_s = delay_s

    async def __call__(self, request: Any) -> str:
        Path(self.started).touch()
        await asyncio.sleep(self.delay_s)
        return "x" * 200_000


@serve.deployment(max_ongoing_requests=1)
class OneAtATime:
    """Records the most calls it ever ran at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def __call__(self, request: Any) -> str:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(0.2)
        finally:
            self.running -= 1
        return "done"

    def most(self) -> int:
        return self.peak


CHUNKS = [f"chunk-{i};" for i in range(5)]


@serve.deployment
def streamed(request: Any) -> StreamingResponse:
    async def chunks() -> Any:
        for chunk in CHUNKS:
            yield chunk
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


@serve.deployment
class Abandoned:
    """Touches ``ended`` when a request's work ends early (cancelled, or its stream closed)."""

    def __init__(self, ended: str) -> None:
        self.ended = ended

    async def __call__(self, request: Any) -> Any:
        if request.url.path.endswith("/stream"):
            return StreamingResponse(self._endless(), media_type="text/plain")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            Path(self.ended).touch()
            raise
        return "late"

    async def _endless(self) -> Any:
        try:
            while True:
                yield "tick;"
                await asyncio.sleep(0.05)
        finally:
            Path(self.ended).touch()


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def app_name(http_port: int) -> Iterator[str]:
    """A fresh application name on the session's shoal; the app is deleted afterwards."""
    name = f"direct{os.getpid()}-{next(_names)}"
    yield name
    with contextlib.suppress(serve.NotFoundError):
        serve.delete(name)


def _get(url: str, timeout_s: float = 10.0) -> httpx.Response:
    """One request on a new connection (a fresh client): the kernel picks the replica."""
    return httpx.get(url, timeout=timeout_s)


def _refused(url: str) -> bool:
    try:
        _get(url, timeout_s=2.0)
    except httpx.ConnectError:
        return True
    return False


def _replicas_seen(url: str, count: int) -> dict[str, int]:
    """Replica id -> pid of the replicas answering on ``url``, once ``count`` of them did
    (each request on a new connection)."""
    seen: dict[str, int] = {}

    def all_seen() -> bool:
        body = _get(url).json()
        seen[body["replica"]] = body["pid"]
        return len(seen) >= count

    wait_until(all_seen, DONE_S, f"{count} replicas answering on {url}")
    return seen


def _in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[Any]]:
    """``call`` run in a started thread; its result (or exception) lands in the list."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:  # reported by the test's assertion
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _pids(app: str, deployment: str) -> list[int | None]:
    replicas = serve.status().applications[app].deployments[deployment].replicas
    return [replica.pid for replica in replicas]


def _apps() -> set[str]:
    return set(serve.status().applications)


def _status(app: str) -> str:
    return str(serve.status().applications[app].status)


# --- serving ------------------------------------------------------------------------------


def test_the_app_answers_on_its_direct_port_as_through_the_proxy(
    app_name: str, base_url: str
) -> None:
    port = free_port()
    serve.run(Who.bind(), name=app_name, route_prefix=f"/{app_name}", direct_ingress_port=port)
    direct = _get(f"http://127.0.0.1:{port}/{app_name}")
    proxied = _get(f"{base_url}/{app_name}")
    assert direct.status_code == proxied.status_code == 200, (direct.text, proxied.text)
    assert direct.json() == proxied.json()  # one replica: the same one served both
    assert direct.json()["version"] == "v1"
    assert direct.headers.get("x-request-id")
    # Only the application's route is served on its port.
    assert _get(f"http://127.0.0.1:{port}/elsewhere").status_code == 404


def test_status_the_rest_api_and_shoal_status_show_the_direct_port(app_name: str) -> None:
    from shoal._instance import api

    port = free_port()
    serve.run(Who.bind(), name=app_name, route_prefix=f"/{app_name}", direct_ingress_port=port)
    overview = serve.status().applications[app_name]
    assert overview.direct_ingress_port == port
    assert f"route /{app_name}, direct ingress port {port}," in str(overview)
    admin = api._instances["process"].services.admin_url
    rest = httpx.get(f"{admin}/api/serve/applications/", timeout=30).json()["applications"]
    assert rest[app_name]["direct_ingress_port"] == port
    shown = subprocess.run(
        [sys.executable, "-m", "shoal", "status", "-a", admin],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["applications"][app_name]["direct_ingress_port"] == port

    serve.run(Who.bind(), name=app_name, route_prefix=f"/{app_name}")  # the port removed
    overview = serve.status().applications[app_name]
    assert overview.direct_ingress_port is None and "direct ingress" not in str(overview)
    rest = httpx.get(f"{admin}/api/serve/applications/", timeout=30).json()["applications"]
    assert rest[app_name]["direct_ingress_port"] is None


def test_new_connections_reach_every_replica(app_name: str) -> None:
    port = free_port()
    app = Who.options(num_replicas=2).bind()
    serve.run(app, name=app_name, route_prefix="/who", direct_ingress_port=port)
    seen = _replicas_seen(f"http://127.0.0.1:{port}/who", 2)
    assert len(set(seen.values())) == 2  # two processes, each with its own listener


def test_a_redeploy_serves_the_new_version_and_moves_the_port(app_name: str) -> None:
    port, new_port = free_port(), free_port()
    serve.run(Who.bind("v1"), name=app_name, route_prefix="/who", direct_ingress_port=port)
    url = f"http://127.0.0.1:{port}/who"
    assert _get(url).json()["version"] == "v1"

    serve.run(Who.bind("v2"), name=app_name, route_prefix="/who", direct_ingress_port=port)
    wait_until(lambda: _get(url).json()["version"] == "v2", DONE_S, "v2 on the direct port")

    serve.run(Who.bind("v2"), name=app_name, route_prefix="/who", direct_ingress_port=new_port)
    assert _get(f"http://127.0.0.1:{new_port}/who").json()["version"] == "v2"
    wait_until(lambda: _refused(url), DONE_S, "the old port refused")


def test_a_port_being_left_is_not_given_to_another_app_until_it_is_free(
    app_name: str, tmp_path: Path
) -> None:
    """While a redeploy moves an app off a port, its old replicas still serve that port:
    another app may not take it (sharing it, each would get some of its connections)."""
    other, gate = f"{app_name}-other", tmp_path / "gate"
    port, new_port = free_port(), free_port()
    serve.run(Who.bind("v1"), name=app_name, route_prefix="/who", direct_ingress_port=port)
    moved: list[object] = []

    def move() -> None:
        gated = Gated.bind(str(gate))
        moved.append(
            serve.run(gated, name=app_name, route_prefix="/who", direct_ingress_port=new_port)
        )

    mover = threading.Thread(target=move)
    mover.start()
    try:
        wait_until(lambda: _status(app_name) == "DEPLOYING", DONE_S, "the move begun")
        with pytest.raises(ConfigError, match=f"'{app_name}' is moving off that port"):
            serve.run(
                Who.bind("other"), name=other, route_prefix="/other", direct_ingress_port=port
            )
        assert _get(f"http://127.0.0.1:{port}/who").json()["version"] == "v1"  # still served
    finally:
        gate.touch()
        mover.join(DONE_S)
    assert moved, "the move did not finish"
    serve.run(Who.bind("other"), name=other, route_prefix="/other", direct_ingress_port=port)
    try:
        answers = {_get(f"http://127.0.0.1:{port}/other").json()["version"] for _ in range(10)}
        assert answers == {"other"}
        assert _get(f"http://127.0.0.1:{new_port}/who").json()["version"] == "gated"
    finally:
        serve.delete(other)


def test_a_killed_replica_leaves_the_port_served_and_is_replaced(app_name: str) -> None:
    port = free_port()
    app = Who.options(num_replicas=2).bind()
    serve.run(app, name=app_name, route_prefix="/who", direct_ingress_port=port)
    url = f"http://127.0.0.1:{port}/who"
    before = _replicas_seen(url, 2)
    victim = next(iter(before.values()))
    os.kill(victim, signal.SIGKILL)

    def twenty_in_a_row() -> bool:
        # A connection queued in the dead listener's backlog may be reset once; after
        # that, every new connection is accepted by a living replica.
        try:
            return all(_get(url).json()["pid"] != victim for _ in range(20))
        except httpx.HTTPError:
            return False

    wait_until(twenty_in_a_row, DONE_S, "20 requests in a row answered after the kill")

    def replaced() -> bool:
        return _get(url).json()["pid"] not in before.values()

    wait_until(replaced, DONE_S, "the replacement replica answering on the port")


@pytest.mark.parametrize("stop", ["redeploy", "delete"])
def test_a_request_in_flight_finishes_when_the_replica_stops(
    app_name: str, tmp_path: Path, stop: str
) -> None:
    port = free_port()
    started = tmp_path / "started"
    serve.run(
        Slow.bind(str(started)), name=app_name, route_prefix="/slow", direct_ingress_port=port
    )
    url = f"http://127.0.0.1:{port}/slow"
    (old,) = _pids(app_name, "Slow")
    thread, outcome = _in_thread(lambda: _get(url))
    try:
        wait_until(started.exists, DONE_S, "the slow request in its handler")
        if stop == "redeploy":  # new arguments: the replica is replaced
            app = Slow.bind(str(tmp_path / "other"), 0.0)
            serve.run(app, name=app_name, route_prefix="/slow", direct_ingress_port=port)
        else:
            serve.delete(app_name)
    finally:
        thread.join(timeout=DONE_S)
    (response,) = outcome
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200
    assert response.text == "x" * 200_000
    if stop == "redeploy":  # the request did outlive its replica's stop
        wait_until(lambda: old not in _pids(app_name, "Slow"), DONE_S, "the old replica gone")
        assert _get(url).status_code == 200
    else:  # nothing of the app is left serving
        wait_until(lambda: _refused(url), DONE_S, "the port refused after the delete")


def test_max_ongoing_requests_holds_on_the_direct_port(app_name: str) -> None:
    port = free_port()
    handle = serve.run(
        OneAtATime.bind(), name=app_name, route_prefix="/one", direct_ingress_port=port
    )
    url = f"http://127.0.0.1:{port}/one"
    calls = [_in_thread(lambda: _get(url)) for _ in range(4)]
    for thread, _ in calls:
        thread.join(timeout=DONE_S)
    responses = [outcome[0] for _, outcome in calls]
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert handle.most.remote().result(timeout_s=DONE_S) == 1


def test_a_streamed_response_arrives_whole(app_name: str) -> None:
    port = free_port()
    serve.run(streamed.bind(), name=app_name, route_prefix="/stream", direct_ingress_port=port)
    url = f"http://127.0.0.1:{port}/stream"
    with httpx.Client(timeout=10) as client, client.stream("GET", url) as response:
        assert response.status_code == 200
        body = "".join(response.iter_text())
    assert body == "".join(CHUNKS)


@pytest.mark.parametrize("kind", ["stream", "call"])
def test_a_client_gone_ends_its_request_in_the_replica(
    app_name: str, tmp_path: Path, kind: str
) -> None:
    """A streamed response's generator is closed, a running call cancelled, when its
    client disconnects from the direct port (no work left running for nobody)."""
    port, ended = free_port(), tmp_path / "ended"
    serve.run(
        Abandoned.bind(str(ended)), name=app_name, route_prefix="/a", direct_ingress_port=port
    )
    url = f"http://127.0.0.1:{port}/a/{kind}"
    if kind == "stream":
        with httpx.Client(timeout=10) as client, client.stream("GET", url) as response:
            assert next(response.iter_text()).startswith("tick;")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(url, timeout=0.5)  # the client gives up and closes its connection
    wait_until(ended.exists, DONE_S, f"the {kind} ended in the replica")


# --- refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "error"),
    [(0, ConfigError), (70000, ConfigError), ("8100", ConfigTypeError), (True, ConfigTypeError)],
)
def test_a_bad_port_value_is_refused(app_name: str, port: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="direct_ingress_port"):
        serve.run(Who.bind(), name=app_name, route_prefix="/x", direct_ingress_port=port)
    assert app_name not in _apps()


def test_conflicting_settings_are_refused_by_name(app_name: str, http_port: int) -> None:
    other = f"{app_name}-other"
    with pytest.raises(ConfigError, match=r"direct_ingress_port=.*proxy's port"):
        serve.run(Who.bind(), name=app_name, route_prefix="/x", direct_ingress_port=http_port)
    with pytest.raises(ConfigError, match=r"direct_ingress_port=.*route_prefix"):
        serve.run(Who.bind(), name=app_name, route_prefix=None, direct_ingress_port=free_port())
    assert app_name not in _apps()

    port = free_port()
    serve.run(Who.bind(), name=other, route_prefix="/other", direct_ingress_port=port)
    try:
        with pytest.raises(ConfigError, match=f"direct_ingress_port.*'{other}' uses that port"):
            serve.run(Who.bind(), name=app_name, route_prefix="/x", direct_ingress_port=port)
        assert app_name not in _apps()
        # The refused app took nothing: the other still answers on its port.
        assert _get(f"http://127.0.0.1:{port}/other").status_code == 200
    finally:
        serve.delete(other)


def test_local_testing_mode_refuses_a_direct_port(http_port: int) -> None:
    name = f"direct{os.getpid()}-local"
    with pytest.raises(ConfigError, match="direct_ingress_port"):
        serve.run(
            Who.bind(),
            name=name,
            route_prefix="/x",
            direct_ingress_port=free_port(),
            _local_testing_mode=True,
        )
    assert name not in _apps()


@contextlib.contextmanager
def _taken_port() -> Iterator[int]:
    """A port held by a listening socket of this process without SO_REUSEPORT: nobody
    may share it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_taken_by_another_socket_fails_the_deploy_naming_it(app_name: str) -> None:
    """The error names the port and the setting to change (not the proxy's port)."""
    with _taken_port() as port, pytest.raises(ShoalError, match=str(port)) as refused:
        serve.run(Who.bind(), name=app_name, route_prefix="/x", direct_ingress_port=port)
    message = str(refused.value)
    assert "direct_ingress_port" in message
    assert "the direct ingress listener of deployment 'Who' failed" in message
    assert "http_options" not in message and "constructor" not in message
    failed = serve.status().applications[app_name]  # listed with why; nothing of it runs
    assert (failed.status, failed.deployments) == ("DEPLOY_FAILED", {})
    assert str(port) in failed.message


def test_a_failed_redeploy_to_a_taken_port_keeps_the_old_port_serving(app_name: str) -> None:
    port = free_port()
    serve.run(Who.bind("v1"), name=app_name, route_prefix="/who", direct_ingress_port=port)
    with _taken_port() as taken, pytest.raises(ShoalError, match=str(taken)):
        serve.run(Who.bind("v2"), name=app_name, route_prefix="/who", direct_ingress_port=taken)
    # Rolled back (the app reads DEPLOY_FAILED, as in Ray): v1 still serves on its port.
    assert _get(f"http://127.0.0.1:{port}/who").json()["version"] == "v1"


def test_a_new_route_prefix_is_served_on_the_same_port(app_name: str) -> None:
    port = free_port()
    serve.run(Who.bind(), name=app_name, route_prefix="/old", direct_ingress_port=port)
    serve.run(Who.bind(), name=app_name, route_prefix="/new", direct_ingress_port=port)

    def moved() -> bool:
        old = _get(f"http://127.0.0.1:{port}/old").status_code
        return old == 404 and _get(f"http://127.0.0.1:{port}/new").status_code == 200

    wait_until(moved, DONE_S, "the new route served, the old one 404, on the direct port")


def test_the_cli_refuses_a_direct_port_for_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: a\n    import_path: nowhere:app\n")
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "run", str(config), "--direct-ingress-port", "1234"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--direct-ingress-port" in result.stderr


HELLO_APP = """
from shoal import serve

@serve.deployment
async def hello(request):
    return "hello"

app = hello.bind()
"""


def test_shoal_run_serves_the_direct_port_of_a_module_and_of_a_config_file(
    tmp_path: Path,
) -> None:
    """``--direct-ingress-port`` (MODULE:APP) and a config file's ``direct_ingress_port``
    each take effect: the app answers on that port, and ``shoal run`` stops cleanly."""
    (tmp_path / "hello_app.py").write_text(HELLO_APP)
    direct = {"module": free_port(), "config": free_port()}
    config = tmp_path / "serve.yaml"
    config.write_text(
        "applications:\n  - name: hello\n    route_prefix: /hi\n"
        f"    import_path: hello_app:app\n    direct_ingress_port: {direct['config']}\n"
    )
    commands = {
        "module": ["hello_app:app", "--route-prefix", "/hi",
                   "--direct-ingress-port", str(direct["module"])],
        "config": [str(config)],
    }  # fmt: skip

    def shoal_run(args: list[str]) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "shoal", "run", *args, "--port", str(free_port())]
        return subprocess.Popen(
            [*command, "--admin-port", "0"], cwd=tmp_path, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    servers = {kind: shoal_run(args) for kind, args in commands.items()}
    try:
        for kind, server in servers.items():
            assert server.stdout is not None
            assert server.stdout.readline(), server.communicate()[1]  # the banner: serving
            reply = httpx.get(f"http://127.0.0.1:{direct[kind]}/hi", timeout=DONE_S)
            assert (reply.status_code, reply.text) == (200, "hello"), kind
        for server in servers.values():
            server.send_signal(signal.SIGINT)
        for server in servers.values():
            assert server.wait(timeout=60) == 0
    finally:
        for server in servers.values():
            if server.poll() is None:
                server.kill()
                server.wait(timeout=10)


# --- the proxy-wide request timeout, in a shoal of its own -------------------------------

TIMEOUT_DRIVER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx
    from conftest import free_port
    from shoal import serve

    @serve.deployment
    async def slow(request):
        if request.query_params.get("fast"):
            return "soon"
        await asyncio.sleep(5)
        return "late"

    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1]),
                              "request_timeout_s": 0.5})
    port = free_port()
    serve.run(slow.bind(), name="slow", route_prefix="/slow", direct_ingress_port=port)
    fast = httpx.get(f"http://127.0.0.1:{port}/slow?fast=1", headers={"x-request-id": "rid-fast"})
    print(fast.status_code)
    late = httpx.get(f"http://127.0.0.1:{port}/slow", headers={"x-request-id": "rid-late"},
                     timeout=10)
    print(late.headers["x-request-id"])
    print(late.status_code)
    serve.shutdown()
    """
)


def test_the_request_timeout_and_access_lines_on_the_direct_port(tmp_path: Path) -> None:
    """504 at http_options.request_timeout_s; each request's access line is the replica's
    own (on the terminal, with its id and the path), as for a request the proxy sent."""
    result = run_driver(tmp_path, TIMEOUT_DRIVER)
    assert result.stdout.strip().splitlines()[-3:] == ["200", "rid-late", "504"], result.stdout
    lines = result.stderr.splitlines()
    replica = r"INFO \S+ \S+ slow slow slow#slow#\w+ "
    ok = rf"{replica}\[rid-fast\] direct\.py:\d+ - GET /slow 200 "
    assert [x for x in lines if re.match(ok, x)], result.stderr
    late = rf"{replica}\[rid-late\] direct\.py:\d+ - GET /slow 504 "
    assert [x for x in lines if re.match(late, x)], result.stderr
    assert not [x for x in lines if " proxy proxy-" in x], result.stderr
