"""The HTTP proxy: uvicorn (uvloop + httptools) in its own process.

It matches the request path against route prefixes (longest first), reads the
body, and forwards one message to the application's ingress deployment via
this process's router; the ingress replica builds the response. Errors:
404 when no route matches, 503 when the deployment is unavailable, 500 when
the ingress failed (details are logged, not sent to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from typing import Any

from shoal._config import HTTPOptions
from shoal._errors import RequestCancelledError, ShoalError, UnavailableError
from shoal._router.router import RouterRegistry
from shoal._transport.http import HttpRequestData, HttpResponseData, HttpResponseStart
from shoal._transport.messages import Request, Result, StreamEnd, StreamItem

logger = logging.getLogger("shoal.proxy")

_TEXT = (b"content-type", b"text/plain; charset=utf-8")
_JSON = (b"content-type", b"application/json")
Scope = dict[str, Any]


class Proxy:
    """An ASGI application that routes HTTP requests to ingress deployments."""

    def __init__(self, registry: RouterRegistry, options: HTTPOptions) -> None:
        self.registry = registry
        self.options = options
        self._routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first
        self._server: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    def set_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        table = [(prefix, app, ingress) for prefix, (app, ingress) in routes.items()]
        table.sort(key=lambda route: len(route[0]), reverse=True)
        self._routes = table
        for _prefix, app, ingress in table:
            self.registry.get(app, ingress).activate()  # connect before the first request

    def match(self, path: str) -> tuple[str, str, str] | None:
        for route in self._routes:
            prefix = route[0]
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/-/"):
            await self._builtin(path, send)
            return
        route = self.match(path)
        if route is None:
            await _reply(send, 404, f"Path '{path}' not found. Routes are listed at /-/routes.")
            return
        prefix, app, ingress = route
        body = await _read_body(receive)
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        data = HttpRequestData(
            scope["method"], scope.get("scheme", "http"), path,
            "" if prefix == "/" else prefix, scope.get("query_string", b""),
            scope["headers"], body, scope.get("client"), scope.get("server"),
            scope.get("http_version", "1.1"),
        )  # fmt: skip
        request = Request("__call__", (data,), {}, request_id, True)
        await self._forward(app, ingress, request, receive, send)

    async def _forward(
        self, app: str, ingress: str, request: Request, receive: Any, send: Any
    ) -> None:
        """Send the request to the ingress; relay its complete or streamed response."""
        request_id = request.request_id.encode()
        try:
            stream = await self.registry.get(app, ingress).open_stream(request)
        except UnavailableError as exc:
            logger.warning("request %s: %s", request.request_id, exc)
            await _reply(send, 503, f"Service unavailable: application '{app}' has no replica.")
            return
        try:
            first = await stream.next()
            if type(first) is Result and type(first.value) is HttpResponseData:
                response = first.value
                response.headers.append((b"x-request-id", request_id))
                await send({"type": "http.response.start", "status": response.status,
                            "headers": response.headers})  # fmt: skip
                await send({"type": "http.response.body", "body": response.body})
            elif type(first) is StreamItem and type(first.value) is HttpResponseStart:
                await self._relay(first.value, stream, request_id, receive, send)
            else:
                logger.error("request %s to '%s' failed: %s", request.request_id, app, first)
                await _reply(send, 500, "Internal Server Error")
        except RequestCancelledError:
            pass  # the client disconnected
        except ShoalError as exc:
            logger.error("request %s to '%s' failed: %s", request.request_id, app, exc)
            await _reply(send, 500, "Internal Server Error")
        finally:
            stream.close()

    async def _relay(
        self, start: HttpResponseStart, stream: Any, request_id: bytes, receive: Any, send: Any
    ) -> None:
        # A client that goes away closes the stream, which cancels the generator in the replica.
        disconnected = asyncio.ensure_future(receive())
        disconnected.add_done_callback(lambda _: stream.close())
        try:
            await self._relay_chunks(start, stream, request_id, send)
        finally:
            disconnected.cancel()

    async def _relay_chunks(
        self, start: HttpResponseStart, stream: Any, request_id: bytes, send: Any
    ) -> None:
        headers = [*start.headers, (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": start.status, "headers": headers})
        while True:
            message = await stream.next()
            if type(message) is StreamItem:
                await send({"type": "http.response.body", "body": message.value, "more_body": True})
            elif type(message) is StreamEnd:
                await send({"type": "http.response.body", "body": b""})
                return
            else:  # the replica failed mid-stream: end the connection so the client sees it
                logger.error("streamed response %s failed: %s", request_id.decode(), message)
                raise RuntimeError("the streamed response failed in the replica")

    async def _builtin(self, path: str, send: Any) -> None:
        if path == "/-/routes":
            table = {prefix: app for prefix, app, _ in sorted(self._routes)}
            await _reply(send, 200, json.dumps(table), _JSON)
        elif path == "/-/healthz":
            await _reply(send, 200, "success")
        else:
            await _reply(send, 404, f"Path '{path}' not found.")

    # --- serving -------------------------------------------------------------------

    async def serve(self) -> tuple[str, int]:
        """Bind and start serving; returns (host, port). Raises ShoalError if binding fails."""
        import uvicorn

        options = self.options
        sock = _bind(options.host, options.port)
        config = uvicorn.Config(
            self, loop="none", http="httptools", ws="none", lifespan="off",
            access_log=False, log_level="warning", root_path=options.root_path,
            timeout_keep_alive=int(options.keep_alive_timeout_s), server_header=False,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        config.load()
        self._server.lifespan = config.lifespan_class(config)  # what Server.serve() would set
        await self._server.startup(sockets=[sock])
        self._tasks.append(asyncio.get_running_loop().create_task(self._server.main_loop()))
        host, port = sock.getsockname()[:2]
        return host, port

    async def stop(self, timeout_s: float) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._server.shutdown(), timeout_s)
        except TimeoutError:
            logger.warning("HTTP connections did not close within %.1f s", timeout_s)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ShoalError(
            f"the HTTP proxy cannot listen on {host}:{port} ({exc.strerror}); "
            "pass another port with serve.start(http_options={'port': ...})"
        ) from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def _read_body(receive: Any) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    while message.get("more_body", False):
        message = await receive()
        chunks.append(message.get("body", b""))
    return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


async def _reply(
    send: Any, status: int, text: str, content_type: tuple[bytes, bytes] = _TEXT
) -> None:
    body = text.encode()
    headers = [content_type, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
