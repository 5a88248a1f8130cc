"""The HTTP proxy over real sockets, with the multi-process runtime."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Driver, start_early, started_drivers
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from shoal import serve


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> object:
        kind = request.query_params.get("kind", "json")
        if kind == "json":
            return {"path": request.url.path, "body": await request.json(),
                    "root_path": request.scope["root_path"]}  # fmt: skip
        if kind == "text":
            return "hello"
        if kind == "bytes":
            return b"\x00\x01"
        if kind == "response":
            return PlainTextResponse("teapot", status_code=418, headers={"x-custom": "1"})
        if kind == "numpy":
            import numpy

            return {"array": numpy.arange(3), "scalar": numpy.float64(1.5)}
        if kind == "request_id":
            return serve.get_request_context().request_id
        raise RuntimeError("secret internal detail")


@serve.deployment
def sync_text(request: Request) -> JSONResponse:
    return JSONResponse({"sync": True, "method": request.method})


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Driver]]:
    """The module's driver scripts (below), started before its first test: they run while
    the tests before theirs do."""
    marker = tmp_path_factory.mktemp("marker") / "marker"
    yield from started_drivers(
        tmp_path_factory, limits=(LIMITS_DRIVER, str(marker)), logging=(LOGGING_DRIVER,)
    )


@pytest.fixture(scope="module", autouse=True)
def _start_early(request: pytest.FixtureRequest) -> None:
    start_early(request, "drivers")


@pytest.fixture(scope="module")
def apps(http_port: int) -> Iterator[str]:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    serve.run(sync_text.bind(), name="sync", route_prefix="/echo/sync")
    yield f"http://127.0.0.1:{http_port}"
    serve.delete("echo")
    serve.delete("sync")


def test_return_values_become_responses(apps: str) -> None:
    with httpx.Client(base_url=apps, timeout=30) as client:
        reply = client.post("/echo/a/b?kind=json", json={"x": 1})
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == {"path": "/echo/a/b", "body": {"x": 1}, "root_path": "/echo"}
        reply = client.get("/echo?kind=text")
        assert (reply.text, reply.headers["content-type"]) == ("hello", "text/plain; charset=utf-8")
        reply = client.get("/echo?kind=bytes")
        assert reply.content == b"\x00\x01"
        assert reply.headers["content-type"] == "application/octet-stream"
        reply = client.get("/echo?kind=response")
        assert (reply.status_code, reply.text, reply.headers["x-custom"]) == (418, "teapot", "1")
        assert client.get("/echo?kind=numpy").json() == {"array": [0, 1, 2], "scalar": 1.5}


def test_longest_prefix_wins_and_sync_ingress_works(apps: str) -> None:
    reply = httpx.put(f"{apps}/echo/sync/x", timeout=30)
    assert reply.json() == {"sync": True, "method": "PUT"}


def test_unknown_path_is_404_with_message(apps: str) -> None:
    reply = httpx.get(f"{apps}/nowhere", timeout=30)
    assert reply.status_code == 404
    assert "Path '/nowhere' not found" in reply.text
    assert httpx.get(f"{apps}/echoes", timeout=30).status_code == 404  # prefix, not substring


def test_user_exception_is_500_without_details(apps: str) -> None:
    reply = httpx.get(f"{apps}/echo?kind=raise", timeout=30)
    assert reply.status_code == 500
    assert "secret" not in reply.text
    assert httpx.get(f"{apps}/echo?kind=text", timeout=30).text == "hello"  # still serving


def test_request_id_is_generated_or_propagated(apps: str) -> None:
    reply = httpx.get(
        f"{apps}/echo?kind=request_id", headers={"x-request-id": "abc-123"}, timeout=30
    )
    assert reply.text == "abc-123"
    assert reply.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{apps}/echo?kind=request_id", timeout=30)
    assert generated.text == generated.headers["x-request-id"] != ""


def test_answers_the_proxy_makes_itself_carry_the_request_id(apps: str) -> None:
    """404 and 400 come from the proxy, not an ingress: the id is still echoed (or made)."""
    with httpx.Client(base_url=apps, timeout=30) as client:
        given = client.get("/nowhere", headers={"x-request-id": "lost-1"})
        assert (given.status_code, given.headers["x-request-id"]) == (404, "lost-1")
        made = client.get("/nowhere")
        assert made.status_code == 404 and len(made.headers["x-request-id"]) == 32
        bad = client.get("/echo", headers={"x-request-priority": "urgent", "x-request-id": "p-2"})
        assert (bad.status_code, bad.headers["x-request-id"]) == (400, "p-2")


def test_builtin_routes(apps: str) -> None:
    routes = httpx.get(f"{apps}/-/routes", timeout=30).json()
    assert routes["/echo"] == "echo" and routes["/echo/sync"] == "sync"
    assert httpx.get(f"{apps}/-/healthz", timeout=30).text == "success"


def test_route_answers_as_soon_as_run_returns(http_port: int) -> None:
    base = f"http://127.0.0.1:{http_port}"
    for attempt in range(3):
        serve.run(Echo.bind(), name="fresh", route_prefix="/fresh")
        reply = httpx.get(f"{base}/fresh?kind=text", timeout=30)
        assert reply.status_code == 200, f"attempt {attempt}: {reply.status_code}"
        serve.delete("fresh")
        assert httpx.get(f"{base}/fresh?kind=text", timeout=30).status_code == 404


def test_route_conflict_leaves_first_app_untouched(apps: str) -> None:
    with pytest.raises(
        serve.RouteConflictError, match="'/echo' is already used by application 'echo'"
    ):
        serve.run(sync_text.bind(), name="intruder", route_prefix="/echo")
    assert "intruder" not in serve.status().applications
    assert httpx.get(f"{apps}/echo?kind=text", timeout=30).text == "hello"


def test_status_lists_proxy(apps: str, http_port: int) -> None:
    status = serve.status()
    # Ray Serve's shape: node -> the proxy's status string; shoal's value also has its address.
    # Keyed by node, as in Ray Serve: this machine's host name.
    assert status.proxies == {socket.gethostname(): "HEALTHY"}
    assert status.proxies[socket.gethostname()].port == http_port
    assert status.applications["echo"].route_prefix == "/echo"


@serve.deployment
class Slow:
    async def __call__(self, request: Request) -> str:
        marker = request.query_params.get("marker")
        try:
            await asyncio.sleep(float(request.query_params.get("seconds", "30")))
            return "done"
        finally:
            if marker:
                Path(marker).write_text("cancelled")


def test_client_disconnect_cancels_the_work_in_the_replica(apps: str, tmp_path: Path) -> None:
    serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    marker = tmp_path / "marker"
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{apps}/slow?marker={marker}", timeout=0.3)
    gone_at = time.monotonic()
    while not marker.exists():
        assert time.monotonic() - gone_at < 2.0, "the replica kept working for a gone client"
        time.sleep(0.01)
    serve.delete("slow")


def test_request_timeout_and_body_limit(drivers: dict[str, Driver]) -> None:
    """A second proxy with tight limits, in a child process so the session's stays as is."""
    result = drivers["limits"].result()
    assert result.stdout.split() == ["504", "413", "413", "200", "cancelled"]


LIMITS_DRIVER = """
import sys, time, httpx
from pathlib import Path
from conftest import free_port
from shoal import serve
from test_http import Slow

port, marker = free_port(), sys.argv[1]
serve.start(http_options={"port": port, "request_timeout_s": 0.5, "max_request_body_bytes": 1000})
serve.run(Slow.bind(), route_prefix="/slow")
base = f"http://127.0.0.1:{port}/slow"
print(httpx.get(f"{base}?marker={marker}", timeout=30).status_code)
print(httpx.post(base, content=b"x" * 1001, timeout=30).status_code)
def chunks():
    yield b"x" * 600
    yield b"x" * 600
print(httpx.post(base, content=chunks(), timeout=30).status_code)
print(httpx.post(f"{base}?seconds=0", content=b"x" * 1000, timeout=30).status_code)
deadline = time.monotonic() + 5
while not Path(marker).exists() and time.monotonic() < deadline:
    time.sleep(0.01)
print(Path(marker).read_text() if Path(marker).exists() else "still running")
serve.shutdown()
"""


LOGGING_DRIVER = """
import logging, httpx
from conftest import free_port
from shoal import serve

@serve.deployment
def noisy(request):
    logging.getLogger("my.model").warning("scoring with the new weights")
    return "ok"

port = free_port()
serve.start(http_options={"port": port})
serve.run(noisy.bind(), route_prefix="/noisy")
httpx.get(f"http://127.0.0.1:{port}/noisy", headers={"x-request-id": "rid-7"}, timeout=30)
serve.shutdown()
"""


def test_replica_log_lines_carry_the_request_id(drivers: dict[str, Driver]) -> None:
    result = drivers["logging"].result()
    line = next(li for li in result.stderr.splitlines() if "scoring with the new weights" in li)
    assert line.startswith("WARNING ") and " [rid-7] " in line, line  # docs/logging.md
