"""``@serve.ingress``: FastAPI (and any ASGI app) served by a deployment, over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import (
    BackgroundTasks,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Request,
    Response,
    WebSocket,
    WebSocketDisconnect,
)
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from shoal import serve

events: list[str] = []


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"started_by": "lifespan"}


api = FastAPI(lifespan=lifespan)
api.mount("/static", Starlette(routes=[Route("/hello", lambda r: PlainTextResponse("mounted"))]))


class Item(BaseModel):
    name: str
    price: float


class PublicItem(BaseModel):
    name: str


class Banned(Exception):
    pass


@api.exception_handler(Banned)
async def banned_handler(request: Request, exc: Banned) -> JSONResponse:
    return JSONResponse({"error": "banned"}, status_code=403)


def caller(x_user: str = Header("anonymous")) -> str:
    return x_user


@serve.deployment
class Tagger:
    def __call__(self, text: str) -> dict[str, str]:
        return {"text": text, "request_id": serve.get_request_context().request_id}


@serve.deployment(num_replicas=2)
@serve.ingress(api)
class Shop:
    def __init__(self, tagger: Any, currency: str) -> None:
        self.tagger = tagger
        self.currency = currency
        self.log: list[str] = []

    @api.get("/items/{item_id}")
    def get_item(self, item_id: int, q: str | None = None, user: str = Depends(caller)) -> dict:
        return {"item_id": item_id, "q": q, "user": user, "currency": self.currency}

    @api.post("/items", response_model=PublicItem)
    async def create(self, item: Item) -> Item:
        return item

    @api.get("/banned")
    def banned(self) -> None:
        raise Banned()

    @api.get("/teapot")
    def teapot(self) -> None:
        raise HTTPException(status_code=418, detail="short and stout")

    @api.post("/later")
    def later(self, tasks: BackgroundTasks) -> str:
        tasks.add_task(self.log.append, "ran after the response")
        return "queued"

    @api.get("/log")
    def read_log(self) -> list[str]:
        return self.log

    @api.get("/cookies")
    def cookies(self, request: Request, response: Response) -> dict:
        response.set_cookie("a", "1")
        response.set_cookie("b", "2")
        response.headers.append("x-multi", "one")
        response.headers.append("x-multi", "two")
        return {"got": request.cookies.get("session")}

    @api.get("/stream")
    def stream(self) -> StreamingResponse:
        return StreamingResponse((f"part {i}\n" for i in range(3)), media_type="text/plain")

    @api.get("/state")
    def state(self, request: Request) -> dict:
        return {"started_by": request.state.started_by}

    @api.get("/whoami")
    def whoami(self) -> str:
        return serve.get_replica_context().replica_id

    @api.get("/tag/{text}")
    async def tag(self, text: str) -> dict:
        return await self.tagger.remote(text)

    def plain_method(self, x: int) -> int:
        return x * 2


@pytest.fixture(scope="module")
def shop(http_port: int) -> Iterator[str]:
    serve.run(Shop.bind(Tagger.bind(), "EUR"), name="shop", route_prefix="/shop")
    yield f"http://127.0.0.1:{http_port}/shop"
    serve.delete("shop")


def test_path_query_and_dependencies(shop: str) -> None:
    reply = httpx.get(f"{shop}/items/7?q=red", headers={"x-user": "ana"}, timeout=30)
    assert reply.json() == {"item_id": 7, "q": "red", "user": "ana", "currency": "EUR"}
    assert httpx.get(f"{shop}/items/seven", timeout=30).status_code == 422


def test_pydantic_bodies_and_response_model(shop: str) -> None:
    reply = httpx.post(f"{shop}/items", json={"name": "pen", "price": 2}, timeout=30)
    assert reply.json() == {"name": "pen"}  # response_model dropped the price
    invalid = httpx.post(f"{shop}/items", json={"name": "pen"}, timeout=30)
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "price"]
    malformed = httpx.post(f"{shop}/items", content=b"{not json", timeout=30,
                           headers={"content-type": "application/json"})  # fmt: skip
    assert malformed.status_code == 422


def test_errors_from_handlers(shop: str) -> None:
    assert httpx.get(f"{shop}/banned", timeout=30).json() == {"error": "banned"}
    teapot = httpx.get(f"{shop}/teapot", timeout=30)
    assert (teapot.status_code, teapot.json()) == (418, {"detail": "short and stout"})
    assert httpx.get(f"{shop}/missing", timeout=30).status_code == 404
    assert httpx.delete(f"{shop}/items/1", timeout=30).status_code == 405


def test_background_tasks_run_after_the_response(shop: str) -> None:
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{shop}/later").json() == "queued"
        deadline = time.monotonic() + 10  # two replicas: poll until we reach the one that ran it
        while "ran after the response" not in client.get(f"{shop}/log").json():
            assert time.monotonic() < deadline, "the background task never ran"


def test_headers_and_cookies(shop: str) -> None:
    reply = httpx.get(f"{shop}/cookies", cookies={"session": "s1"}, timeout=30)
    assert reply.json() == {"got": "s1"}
    assert reply.headers.get_list("x-multi") == ["one", "two"]
    assert {c.name for c in reply.cookies.jar} == {"a", "b"}


def test_streaming_response_and_mounted_app(shop: str) -> None:
    assert httpx.get(f"{shop}/stream", timeout=30).text == "part 0\npart 1\npart 2\n"
    assert httpx.get(f"{shop}/static/hello", timeout=30).text == "mounted"


def test_lifespan_state_reaches_requests(shop: str) -> None:
    assert httpx.get(f"{shop}/state", timeout=30).json() == {"started_by": "lifespan"}


def test_openapi_and_docs_under_the_route_prefix(shop: str) -> None:
    schema = httpx.get(f"{shop}/openapi.json", timeout=30).json()
    assert "/items/{item_id}" in schema["paths"]
    parameters = [p["name"] for p in schema["paths"]["/items/{item_id}"]["get"]["parameters"]]
    assert "self" not in parameters
    docs = httpx.get(f"{shop}/docs", timeout=30)
    assert docs.status_code == 200 and "/shop/openapi.json" in docs.text


def test_replicas_share_the_load(shop: str) -> None:
    with httpx.Client(timeout=30) as client:
        seen = {client.get(f"{shop}/whoami").json() for _ in range(40)}
    assert len(seen) == 2


def test_request_id_propagates_to_downstream_deployments(shop: str) -> None:
    reply = httpx.get(f"{shop}/tag/hi", headers={"x-request-id": "req-42"}, timeout=30)
    assert reply.json() == {"text": "hi", "request_id": "req-42"}
    assert reply.headers["x-request-id"] == "req-42"


def test_ingress_methods_remain_callable_through_handles(shop: str) -> None:
    assert serve.get_app_handle("shop").plain_method.remote(21).result(timeout_s=30) == 42


starlette_app = Starlette(routes=[Route("/ping", lambda r: PlainTextResponse("pong"))])


@serve.deployment
@serve.ingress(starlette_app)
class StarletteIngress:
    pass


async def raw_asgi(scope: dict, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
    await send({"type": "http.response.body", "body": scope["path"].encode()})


@serve.deployment
@serve.ingress(raw_asgi)
class RawIngress:
    pass


def test_any_asgi_app_can_be_the_ingress(http_port: int) -> None:
    base = f"http://127.0.0.1:{http_port}"
    serve.run(StarletteIngress.bind(), name="star", route_prefix="/star")
    serve.run(RawIngress.bind(), name="raw", route_prefix="/raw")
    assert httpx.get(f"{base}/star/ping", timeout=30).text == "pong"
    assert httpx.get(f"{base}/raw/any/path", timeout=30).text == "/raw/any/path"
    serve.delete("star")
    serve.delete("raw")


@asynccontextmanager
async def failing_lifespan(app: FastAPI) -> AsyncIterator[None]:
    raise RuntimeError("database unreachable")
    yield


broken_api = FastAPI(lifespan=failing_lifespan)


@serve.deployment
@serve.ingress(broken_api)
class BrokenStartup:
    pass


def test_lifespan_startup_failure_fails_the_deployment(http_port: int) -> None:
    with pytest.raises(serve.DeploymentError, match="database unreachable"):
        serve.run(BrokenStartup.bind(), name="broken-startup", route_prefix="/broken")
    # Listed as failed, with why, and nothing of it running, until deleted (as in Ray Serve).
    failed = serve.status().applications["broken-startup"]
    assert (failed.status, failed.deployments) == ("DEPLOY_FAILED", {})
    assert "database unreachable" in failed.message
    serve.delete("broken-startup")
    assert "broken-startup" not in serve.status().applications


def test_ingress_needs_a_class_and_an_app() -> None:
    with pytest.raises(serve.ConfigError, match="ASGI app"):
        serve.ingress("not an app")
    with pytest.raises(serve.ConfigError, match="decorates a class"):
        serve.ingress(api)(lambda: None)  # type: ignore[arg-type]


chat_api = FastAPI()


@serve.deployment
@serve.ingress(chat_api)
class Chat:
    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir

    @chat_api.websocket("/ws/{room}")
    async def talk(self, websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"[{room}] {text}")
        except WebSocketDisconnect:
            Path(self.marker_dir, room).write_text("closed")


def test_websockets(http_port: int, tmp_path: Path) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    serve.run(Chat.bind(str(tmp_path)), name="chat", route_prefix="/chat")
    base = f"ws://127.0.0.1:{http_port}"
    with connect(f"{base}/chat/ws/lobby", open_timeout=30) as websocket:
        for text in ("hello", "again"):
            websocket.send(text)
            assert websocket.recv(timeout=30) == f"[lobby] {text}"
    deadline = time.monotonic() + 5
    while not (tmp_path / "lobby").exists():  # the app saw the disconnect
        assert time.monotonic() < deadline, "the websocket handler never saw the disconnect"
        time.sleep(0.01)
    with pytest.raises(InvalidStatus, match="403"):
        connect(f"{base}/nowhere/ws", open_timeout=30)
    serve.delete("chat")
