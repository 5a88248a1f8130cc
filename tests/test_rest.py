"""The admin REST API over real HTTP: Ray's paths and shapes, errors, and who may call it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import async_wait_until

from shoal._config import AdminOptions, HTTPOptions
from shoal._config.support import NEEDS_RAY
from shoal._errors import ConfigError
from shoal._instance import peer
from shoal._instance.instance import warn_if_exposed
from shoal._instance.peer import refusal, serve_admin, socket_owner_uid
from shoal._instance.rest import admin_app
from shoal._transport.tcp import is_loopback

CONFIG = {
    "applications": [
        {"name": "hello", "route_prefix": "/hello", "import_path": "hello_app:app"},
    ]
}

DETAILS = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "proxies": {"node": {"status": "HEALTHY"}},
    "applications": {
        "hello": {
            "name": "hello",
            "status": "RUNNING",
            "message": "",
            "route_prefix": "/hello",
            "deployed_app_config": CONFIG["applications"][0],
            "deployments": {"Hello": {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]}},
        }
    },
    "target_capacity": None,
}


class FakeControl:
    """A control plane that records calls; ``fail`` makes the next call raise or hang."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: BaseException | str | None = None

    async def _maybe_fail(self) -> None:
        if self.fail == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.fail, BaseException):
            raise self.fail

    async def apply_config(self, config: Any) -> None:
        await self._maybe_fail()
        self.calls.append(("apply", config))

    async def delete_app(self, name: str) -> None:
        await self._maybe_fail()
        self.calls.append(("delete_app", name))

    async def delete_all(self) -> None:
        await self._maybe_fail()
        self.calls.append(("delete_all", None))

    def log_directory(self) -> str | None:
        return None  # (writes no log files)

    def details(self) -> dict[str, Any]:
        return DETAILS

    async def shutdown(self) -> None:
        self.calls.append(("shutdown", None))


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
async def base(control: FakeControl) -> AsyncIterator[str]:
    app = admin_app(control, token="s3cret", timeout_s=0.5)
    server, host, port = await serve_admin(app, AdminOptions(port=0), "s3cret")
    try:
        yield f"http://{host}:{port}"
    finally:
        await server.stop()


@pytest.fixture
async def client(base: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield http


async def test_get_applications_answers_the_instance_details(client: httpx.AsyncClient) -> None:
    for path in ("/api/serve/applications/", "/api/serve/applications"):
        reply = await client.get(path)
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == DETAILS


async def test_put_deploys_a_valid_config(client: httpx.AsyncClient, control: FakeControl) -> None:
    reply = await client.put("/api/serve/applications/", json=CONFIG)
    assert reply.status_code == 200, reply.text
    (call, config), *_ = control.calls
    assert call == "apply"
    assert [app.name for app in config.applications] == ["hello"]


async def test_put_refuses_a_body_that_is_not_json(
    client: httpx.AsyncClient, control: FakeControl
) -> None:
    reply = await client.put("/api/serve/applications/", content=b"applications: [")
    assert reply.status_code == 400
    assert "not JSON" in reply.text and "send the config as JSON" in reply.text
    assert control.calls == []


async def test_put_names_the_field_path_of_a_bad_config(
    client: httpx.AsyncClient, control: FakeControl
) -> None:
    bad = {
        "applications": [{"import_path": "a:b", "deployments": [{"name": "D", "num_replicas": -1}]}]
    }
    reply = await client.put("/api/serve/applications/", json=bad)
    assert reply.status_code == 400
    assert "applications[0].deployments[0].num_replicas" in reply.text and "-1" in reply.text
    assert control.calls == []


async def test_control_plane_errors_are_400_500_or_a_bounded_500(
    client: httpx.AsyncClient, control: FakeControl
) -> None:
    control.fail = ConfigError("route_prefix '/hello' is taken by application 'other'")
    reply = await client.put("/api/serve/applications/", json=CONFIG)
    assert (reply.status_code, reply.text.strip()) == (400, str(control.fail))
    control.fail = RuntimeError("controller exploded")
    reply = await client.delete("/api/serve/applications/")
    assert reply.status_code == 500 and "RuntimeError: controller exploded" in reply.text
    control.fail = "hang"
    reply = await client.delete("/api/serve/applications/hello")
    assert reply.status_code == 500 and "did not finish within 0.5 s" in reply.text


async def test_delete_all_and_delete_one(client: httpx.AsyncClient, control: FakeControl) -> None:
    assert (await client.delete("/api/serve/applications/hello")).status_code == 200
    assert (await client.delete("/api/serve/applications/")).status_code == 200
    # Any name serve.run or a config accepts, quoted as `shoal delete` sends it: a "/" in
    # it found no route (404) before.
    odd = "team/a b#1"
    assert (await client.delete("/api/serve/applications/" + quote(odd, safe=""))).is_success
    assert control.calls == [("delete_app", "hello"), ("delete_all", None), ("delete_app", odd)]


async def test_unknown_path_is_404_and_wrong_method_405(client: httpx.AsyncClient) -> None:
    reply = await client.get("/api/serve/nothing")
    assert reply.status_code == 404 and "/api/serve/applications/" in reply.text
    reply = await client.post("/api/serve/applications/", json=CONFIG)
    assert reply.status_code == 405
    assert set(reply.headers["allow"].replace(" ", "").split(",")) >= {"GET", "PUT", "DELETE"}


async def test_version_satisfies_rays_cli_check(client: httpx.AsyncClient) -> None:
    version = (await client.get("/api/ray/version")).json()
    major, minor = (int(part) for part in version["ray_version"].split(".")[:2])
    assert (major, minor) >= (1, 12)  # what Ray's `serve deploy` checks first


async def test_shutdown_answers_then_shuts_down(
    client: httpx.AsyncClient, control: FakeControl
) -> None:
    reply = await client.post("/api/shoal/shutdown")
    assert reply.status_code == 200

    async def shut() -> bool:
        return ("shutdown", None) in control.calls

    await async_wait_until(shut, 5, "the control plane's shutdown")


# --- who may call -------------------------------------------------------------


def test_socket_owner_uid_finds_the_client_socket_of_a_loopback_connection() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.getsockname()) as client,
    ):
        accepted, _ = listener.accept()
        with accepted:
            local, remote = client.getsockname(), client.getpeername()
            assert socket_owner_uid(local, remote) == os.getuid()
    free = ("127.0.0.1", 1)  # no connection from port 1
    assert socket_owner_uid(free, remote) is None


def test_socket_owner_uid_parses_ipv4_mapped_ipv6_entries(tmp_path: Path) -> None:
    # ::ffff:127.0.0.1 port 0xA000 -> 127.0.0.1 port 0x1F90, owned by uid 4242.
    mapped = "0000000000000000FFFF00000100007F"
    table = tmp_path / "tcp6"
    table.write_text(
        "  sl  local_address                         remote_address                        "
        "st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        f"   0: {mapped}:A000 {mapped}:1F90 01 00000000:00000000 00:00000000 00000000  4242 0 1\n"
    )
    uid = socket_owner_uid(("127.0.0.1", 0xA000), ("127.0.0.1", 0x1F90), (str(table),))
    assert uid == 4242


async def test_a_loopback_caller_of_another_user_is_refused(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer, "socket_owner_uid", lambda *_: os.getuid() + 1)
    reply = await client.get("/api/serve/applications/")
    assert reply.status_code == 403
    assert f"only from user {os.geteuid()}" in reply.text and "Bearer" in reply.text
    reply = await client.get("/api/serve/applications/", headers={"Authorization": "Bearer s3cret"})
    assert reply.status_code == 200


async def test_a_remote_caller_needs_the_bearer_token() -> None:
    def scope(authorization: str | None) -> dict[str, Any]:
        headers = [(b"authorization", authorization.encode())] if authorization else []
        return {"client": ("10.1.2.3", 5555), "server": ("0.0.0.0", 8265), "headers": headers}

    assert "Bearer" in (await refusal(scope(None), "s3cret") or "")
    assert await refusal(scope("Bearer wrong"), "s3cret") is not None
    assert await refusal(scope("Bearer s3cret"), None) is not None  # no token: nobody remote
    assert await refusal(scope("Bearer s3cret"), "s3cret") is None
    assert await refusal(scope("bearer  s3cret "), "s3cret") is None


async def test_serve_admin_explains_a_busy_port_and_refuses_exposure_without_token() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"admin address 127.0.0.1:{port} is in use"):
            await serve_admin(admin_app(FakeControl()), AdminOptions(port=port), None)
    with pytest.raises(ConfigError, match="needs a token"):
        await serve_admin(admin_app(FakeControl()), AdminOptions(host="0.0.0.0", port=0), None)


# --- through the real control plane ------------------------------------------------------

HELLO = """
from shoal import serve

@serve.deployment
class Hello:
    def __call__(self, name: str) -> str:
        return f"hello {name}"

app = Hello.bind()
"""


def test_the_api_deploys_inspects_and_deletes_through_the_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import wait_until

    from shoal._instance.instance import Instance

    (tmp_path / "rest_hello.py").write_text(HELLO)
    monkeypatch.chdir(tmp_path)  # the build child imports from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    instance = Instance("local", None, admin=AdminOptions(port=0))
    try:
        with httpx.Client(base_url=instance.services.admin_url, timeout=30) as http:
            config = {"applications": [{"name": "hi", "import_path": "rest_hello:app"}]}
            assert http.put("/api/serve/applications/", json=config).status_code == 200

            def app() -> Any:
                return http.get("/api/serve/applications/").json()["applications"].get("hi")

            wait_until(lambda: (app() or {}).get("status") == "RUNNING", 30, "app 'hi' to run")
            assert app()["deployed_app_config"]["import_path"] == "rest_hello:app"
            assert list(app()["deployments"]) == ["Hello"]
            refused = http.post("/api/shoal/shutdown")  # embedded: stop it in its process
            assert refused.status_code == 400 and "serve.shutdown()" in refused.text
            # A file written for a Ray instance is refused, naming the field and values.
            for_ray = http.put("/api/serve/applications/", json={**config, "runtime": "ray"})
            assert for_ray.status_code == 400
            assert "runtime='ray'" in for_ray.text and "'process'" in for_ray.text
            assert http.get("/api/serve/applications/").json()["applications"].get("hi")
            # Options only Ray implements: refused by a local instance, each by its path.
            ray_only = {"applications": [{
                **config["applications"][0], "runtime_env": {"pip": ["torch"]},
                "deployments": [{"name": "Hello", "ray_actor_options": {"memory": 1e9}}],
            }]}  # fmt: skip
            refused_ray_only = http.put("/api/serve/applications/", json=ray_only)
            assert refused_ray_only.status_code == 400
            assert refused_ray_only.text.splitlines()[:2] == [
                "applications[0].deployments[0].ray_actor_options.memory=1000000000.0 (memory "
                f"reservations): {NEEDS_RAY}",
                f"applications[0].runtime_env.pip=['torch']: {NEEDS_RAY}; every runtime "
                "supports env_vars, working_dir, py_modules (local paths)",
            ]
            assert http.delete("/api/serve/applications/hi").status_code == 200
            assert app() is None
    finally:
        instance.stop()


def test_an_http_proxy_bound_beyond_loopback_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Decided without binding (tests bind only 127.0.0.1): the admin API and the gRPC
    # proxy use the same test of the address.
    local = ("127.0.0.1", "127.8.9.1", "localhost", "::1", "::ffff:127.0.0.1")
    assert all(is_loopback(host) for host in local)
    beyond = ("0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5", "example.com")
    assert not any(is_loopback(host) for host in beyond)
    with caplog.at_level(logging.WARNING, "shoal"):
        warn_if_exposed(HTTPOptions(host="127.0.0.1", port=8000))
        warn_if_exposed(None)  # proxy_location="Disabled"
        assert not caplog.records
        warn_if_exposed(HTTPOptions(host="0.0.0.0", port=8000))
    assert "the HTTP proxy listens on 0.0.0.0:8000, beyond this machine" in caplog.text
