"""The runtime seam, as any runtime must provide it: runtimes by name, stream input, the
death notification of replica clients, and where a replica runs (``ReplicaInfo.node_id``)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from conftest import Deploy, wait_until
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from shoal import serve
from shoal._errors import ConfigError
from shoal._router.router import Router
from shoal._runtime.registry import create_runtime, register_runtime, runtime_names
from shoal._transport.http import WEBSOCKET, HttpRequestData
from shoal._transport.messages import Request, StreamItem


def test_unknown_runtime_names_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match="unknown runtime 'rey'; known runtimes: local, process, ray, simulated"
    ):
        create_runtime("rey")


def test_registered_runtime_gets_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal._runtime import registry

    monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    made: list[dict[str, Any]] = []

    def factory(**options: Any) -> Any:
        made.append(options)
        return "a runtime"

    register_runtime("fake", factory)
    register_runtime("fake", factory)  # the same factory again: a module imported twice
    assert "fake" in runtime_names()
    assert create_runtime("fake", directory="/somewhere") == "a runtime"
    assert made == [{"directory": "/somewhere"}]
    with pytest.raises(ConfigError, match="'fake' is already registered"):
        register_runtime("fake", lambda **options: None)


echo_api = FastAPI()


@serve.deployment
@serve.ingress(echo_api)
class Echo:
    @echo_api.websocket("/ws")
    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text("echo: " + await websocket.receive_text())
        except WebSocketDisconnect:
            pass


def _on_router_loop(router: Router, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, router.loop).result(30)


def _websocket_request(path: str) -> Request:
    data = HttpRequestData(
        WEBSOCKET, "ws", path, "", b"", [], b"", ("127.0.0.1", 1), ("127.0.0.1", 2)
    )
    return Request("__call__", (data,), {}, "ws-1", True)


def test_stream_input_reaches_a_websocket_on_every_runtime(deploy: Deploy) -> None:
    router = deploy(Echo.bind())._get_router()

    async def talk() -> list[Any]:
        stream = await router.open_stream(_websocket_request("/ws"))
        try:
            stream.send_input({"type": "websocket.connect"})
            accepted = await stream.next()
            stream.send_input({"type": "websocket.receive", "text": "hi"})
            echoed = await stream.next()
            stream.send_input({"type": "websocket.disconnect", "code": 1000})
            return [msg.value if type(msg) is StreamItem else msg for msg in (accepted, echoed)]
        finally:
            stream.close()

    accepted, echoed = _on_router_loop(router, talk())
    assert accepted["type"] == "websocket.accept"
    assert echoed == {"type": "websocket.send", "text": "echo: hi"}


@serve.deployment
class Noop:
    def __call__(self) -> str:
        return "ok"


def test_replica_clients_notify_their_death_once_or_at_once(deploy: Deploy) -> None:
    handle = deploy(Noop.bind())
    assert handle.remote().result(timeout_s=30) == "ok"
    router = handle._get_router()
    calls: list[str] = []

    async def connect_then_close() -> Any:
        info = next(iter(router._infos.values()))
        client = await router._connector.connect(info)
        client.on_close(lambda: calls.append("registered before"))
        client.close()
        while not client.closed:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a late second loss report must not call it again
        client.on_close(lambda: calls.append("registered after"))
        return client

    _on_router_loop(router, connect_then_close())
    assert calls == ["registered before", "registered after"]
    assert handle.remote().result(timeout_s=30) == "ok"  # the router's own client is unaffected


def test_replica_info_says_which_machine_runs_the_replica(deploy: Deploy) -> None:
    handle = deploy(Noop.bind())
    assert handle.remote().result(timeout_s=30) == "ok"
    router = handle._get_router()
    infos = wait_until(lambda: list(router._infos.values()), what="the replica set")
    assert {info.node_id for info in infos} == {socket.gethostname()}
