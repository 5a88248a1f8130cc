"""The HTTP proxy: uvicorn (uvloop + httptools) in its own process.

It matches the request path against route prefixes (longest first), reads the
body, and forwards one message to the application's ingress deployment via
this process's router; the ingress replica builds the response. Errors:
404 when no route matches, 503 when the deployment is unavailable, 500 when
the ingress failed (details are logged, not sent to the client).

Load shedding: beyond ``http_options.max_ongoing_requests`` held requests, and
beyond the ingress's ``max_queued_requests`` waiting in this proxy's router, a
request gets 503 with ``Retry-After`` at once, before anything is sent to a
replica. A request waiting for a replica whose client disconnects leaves the
queue at once and is never sent (one already sent is cancelled in its replica),
also while the proxy still waits for its first route table.

Deadlines: ``http_options.request_timeout_s`` is the request's deadline. It
travels with the request (the ingress and every handle call it makes inherit
what is left), a request still waiting for a replica leaves the queue when it
passes, and the client gets 504 then, whichever process noticed first.

Priorities: the ``x-request-priority`` header (``high``, ``normal`` or ``low``; none:
normal) is the request's class in the proxy's queue, and travels with it (the
ingress's handle calls inherit it); any other value gets 400 and is never sent.

Draining (shoal is shutting down): every request that arrives from then on gets
503 with ``Retry-After``; requests accepted before are served to the end
(:meth:`Proxy.wait_idle` tells when they are done). The listening socket may be
inherited from the controller (``LISTEN_FD_ENV``), so a replacement proxy serves
on the same port and connections made while none runs wait in its backlog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from shoal._config import TIMEOUTS, HTTPOptions
from shoal._errors import (
    BackPressureError,
    ReplicaDiedError,
    RequestCancelledError,
    ShoalError,
    UnavailableError,
)
from shoal._json import dumps as json_dumps
from shoal._observe import tracing
from shoal._observe.logs import access_log_enabled
from shoal._oip import server as oip_server
from shoal._proxy.access import AccessLines, ProxyAccessLines
from shoal._proxy.exchange import (
    TEXT,
    DisconnectWatches,
    Scope,
    StartTracker,
    client_to_replica,
    header,
    read_body,
    reply,
)
from shoal._proxy.listener import LISTEN_FD_ENV, bind_listener
from shoal._proxy.metrics import proxy_metrics
from shoal._proxy.observe import observed
from shoal._router.queue import CHOICES, NORMAL, rank_of
from shoal._router.router import Router, RouterRegistry, stopped_unrun
from shoal._seam.protocols import Stream
from shoal._transport.http import (
    WEBSOCKET,
    HttpRequestData,
    HttpResponseData,
    HttpResponseStart,
)
from shoal._transport.ids import new_request_id
from shoal._transport.messages import Failure, Request, Result, StreamEnd, StreamItem

logger = logging.getLogger("shoal.proxy")

_JSON = (b"content-type", b"application/json")
_RETRY_AFTER = (b"retry-after", b"1")
_CLOSE = (b"connection", b"close")
_QUEUE_FULL = (
    "Service unavailable: too many requests are queued for application '{app}'; retry later."
)
_NO_REPLICA = "Service unavailable: application '{app}' has no replica able to serve; retry later."
_PROXY_FULL = (
    "Service unavailable: the proxy holds too many requests "
    "(http_options.max_ongoing_requests); retry later."
)
_UNREAD = object()  # the request's body, before it is read
#: The request header naming an HTTP request's priority class (docs/priorities.md).
PRIORITY_HEADER = b"x-request-priority"
#: The request header naming its multiplexed model (Ray Serve's; docs/multiplexing.md).
MODEL_ID_HEADER = b"serve_multiplexed_model_id"
_FIRST = asyncio.FIRST_COMPLETED


# A 502, as a gateway answers when its upstream closes without a response; not a 503,
# which says the request was not processed and invites blind retries.
_REPLICA_DIED = (
    "Bad Gateway: the replica handling this request died before answering; the request "
    "may have run in part. Retry it if it is safe to repeat (the server log names the "
    "replica under this x-request-id)."
)


def _timed_out(timeout: float) -> str:
    return f"Request timed out after {timeout:g} s (http_options.request_timeout_s)."


def _is_timeout(message: Any) -> bool:
    return type(message) is Failure and message.kind == "RequestTimeoutError"


_REQUEST_ID = b"x-request-id"


def _ids(request_id: str) -> list[tuple[bytes, bytes]]:
    """The headers of an answer the proxy makes itself: the request's id, as on every
    response (last: where its access line reads it). A header's value round-trips as
    latin-1, as :func:`header` reads it."""
    return [(_REQUEST_ID, request_id.encode("latin-1"))]


def _id_header(scope: Scope) -> tuple[bytes, bytes]:
    """The ``x-request-id`` header of an answer made before the request got its id: the
    client's, or a new one."""
    return (_REQUEST_ID, (header(scope, _REQUEST_ID) or new_request_id()).encode("latin-1"))


#: How long a request that arrives before the first route table waits for it (a
#: replacement proxy accepts connections queued meanwhile, then gets its routes at once).


class Proxy:
    """An ASGI application that routes HTTP requests to ingress deployments."""

    def __init__(
        self,
        registry: RouterRegistry,
        options: HTTPOptions,
        access_lines: Callable[[], AccessLines] = ProxyAccessLines,
    ) -> None:
        """``access_lines``: what each request's access line says and where it goes, if
        access lines are on (the proxy's own, by default)."""
        self.registry = registry
        self.options = options
        self._routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first
        self._oip = False  # an app is routed under /v2/models/: the proxy answers /v2 paths
        self._server: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        # Ray Serve's readiness states for /-/healthz and /-/routes (see _unready_reason).
        self._routes_populated = False
        self._routes_received = asyncio.Event()  # set by the first route table
        self._draining = False
        # Accepted HTTP requests not answered yet (not websockets: a session has no end
        # to wait for; it ends when its replica drains).
        self._in_flight = 0
        self._max_in_flight = options.max_ongoing_requests
        self._idle: asyncio.Event | None = None  # set when draining and nothing is in flight
        # None: disabled. Reads _in_flight when collected (Ray's ongoing HTTP requests).
        self._metrics = proxy_metrics(socket.gethostname(), options.host, lambda: self._in_flight)
        # Chosen once: a process is configured (metrics, access lines, tracing) before it
        # hosts a proxy. With none of them on, this is _http itself.
        access = access_lines() if access_log_enabled() else None
        self._serve_http = observed(self._http, self.match, self._metrics, access)
        self._grpc: Any = None  # the gRPC server (grpc_proxy.GrpcServer), if gRPC is served
        self._watches = DisconnectWatches()  # one timer for every request's disconnect watch

    def set_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        table = [(prefix, app, ingress) for prefix, (app, ingress) in routes.items()]
        table.sort(key=lambda route: len(route[0]), reverse=True)
        self._routes = table
        self._routes_populated = self._routes_populated or bool(table)
        self._oip = any(oip_server.is_oip_route(prefix) for prefix, _, _ in table)
        self._routes_received.set()
        for _prefix, app, ingress in table:
            self.registry.get(app, ingress).activate()  # connect before the first request

    def match(self, path: str) -> tuple[str, str, str] | None:
        for route in self._routes:
            prefix = route[0]
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"].startswith("/-/"):
            await self._builtin(scope["path"], send)
            return
        if kind not in ("http", "websocket"):
            return
        if self._draining:  # accepted before the drain: served; arriving now: told to come back
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1013})  # try again later
                return
            await reply(send, 503, "Service unavailable: shoal is shutting down.",
                         extra_headers=[_RETRY_AFTER, _CLOSE, _id_header(scope)])  # fmt: skip
            return
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        if self._in_flight >= self._max_in_flight:
            if self._metrics is not None:
                self._metrics.proxy_full(scope, self.match)
            await reply(send, 503, _PROXY_FULL, extra_headers=[_RETRY_AFTER, _id_header(scope)])
            return
        self._in_flight += 1
        try:
            await self._serve_http(scope, receive, send)
        finally:
            self._in_flight -= 1
            if self._idle is not None and self._in_flight == 0:
                self._idle.set()

    async def _routes_known(self, receive: Any = None) -> bool:
        """Wait (briefly) for the first route table, rather than answer 404 without one.

        With ``receive`` (the request's body was read: its next message is the client
        leaving), a client that disconnects ends the wait at once: returns True.
        """
        routes = asyncio.ensure_future(self._routes_received.wait())
        left = asyncio.ensure_future(receive()) if receive is not None else routes
        try:
            await asyncio.wait(
                {routes, left}, timeout=TIMEOUTS.proxy_routes_wait_s, return_when=_FIRST
            )
        finally:
            routes.cancel()
            left.cancel()
        if left is not routes and left.done() and not left.cancelled():
            return True
        if not self._routes_received.is_set():
            logger.warning(
                "no route table after %.0f s; answering without one", TIMEOUTS.proxy_routes_wait_s
            )
            self._routes_received.set()
        return False

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        limit = self.options.max_request_body_bytes
        body: bytes | object | None = _UNREAD
        if not self._routes_received.is_set():  # (rare: a proxy's first moments)
            body = await read_body(scope, receive, limit)  # then a disconnect can be seen
            if await self._routes_known(receive if body is not None else None):
                return  # the client left: nobody to answer
        request_id = header(scope, _REQUEST_ID) or new_request_id()
        path: str = scope["path"]
        route = self.match(path)
        oip = self._oip and path.startswith("/v2")
        if oip and await self._oip_server(scope, route, send, request_id):
            return
        if route is None:
            await reply(send, 404, f"Path '{path}' not found. Routes are listed at /-/routes.",
                        extra_headers=_ids(request_id))  # fmt: skip
            return
        prefix, app, ingress = route
        priority = _priority(scope)
        if priority is None:
            named = header(scope, PRIORITY_HEADER)
            await reply(send, 400, f"Invalid {PRIORITY_HEADER.decode()} header {named!r}: "
                                    f"use one of {CHOICES}.", TEXT, _ids(request_id))  # fmt: skip
            return
        if body is _UNREAD:
            body = await read_body(scope, receive, limit)
        if not isinstance(body, bytes):
            await reply(send, 413, f"Request body is larger than {limit} bytes "
                                    "(http_options.max_request_body_bytes).",
                         extra_headers=_ids(request_id))  # fmt: skip
            return
        data = HttpRequestData(
            scope["method"], scope.get("scheme", "http"), path,
            "" if prefix == "/" else prefix, scope.get("query_string", b""),
            scope["headers"], body, scope.get("client"), scope.get("server"),
            scope.get("http_version", "1.1"),
        )  # fmt: skip
        model_id = header(scope, MODEL_ID_HEADER)  # "" when absent: nothing allocated
        request = Request("__call__", (data,), {}, request_id, True, model_id, None, priority)
        if tracing.on:
            tracing.bind_http(request)
        timeout = self.options.request_timeout_s
        if timeout is None:
            await self._forward(app, ingress, request, receive, send)
            return
        deadline = time.monotonic() + timeout  # travels with the request (remaining_s)
        started = StartTracker(send)
        try:
            await asyncio.wait_for(
                self._forward(app, ingress, request, receive, started, deadline), timeout
            )
        except TimeoutError:
            if started.sent:
                raise  # mid-stream: abort the connection; the client sees a truncated body
            logger.warning("request %s timed out after %.3g s", request_id, timeout)
            await reply(send, 504, _timed_out(timeout), extra_headers=_ids(request_id))

    async def _forward(
        self, app: str, ingress: str, request: Request, receive: Any, send: Any,
        deadline: float | None = None,
    ) -> None:  # fmt: skip
        """Send the request to the ingress; relay its complete or streamed response."""
        request_id = request.request_id.encode("latin-1")
        router = self.registry.get(app, ingress)
        stream = router.try_open_stream(request, deadline)  # the fast path: no task, no wait
        if stream is None:
            stream = await self._open_queued(router, request, receive, send, deadline)
            if stream is None:
                return  # refused (answered) or the client left
        watch = self._watches.watch(receive, stream)
        try:
            first = await stream.next()
            if type(first) is Result and type(first.value) is HttpResponseData:
                response = first.value
                response.headers.append((_REQUEST_ID, request_id))
                await send({"type": "http.response.start", "status": response.status,
                            "headers": response.headers})  # fmt: skip
                await send({"type": "http.response.body", "body": response.body})
            elif type(first) is StreamItem and type(first.value) is HttpResponseStart:
                await self._relay(first.value, stream, request_id, watch, send)
            elif stopped_unrun(first):
                # Sent as that replica stopped (a redeploy, a scale-down): it did not run
                # there, and the router dropped it. Another replica takes the request.
                watch.stop()
                stream.close()
                await self._forward(app, ingress, request, receive, send, deadline)
            elif deadline is not None and _is_timeout(first):
                # The replica's deadline ran out a moment before ours: the same 504.
                await reply(send, 504, _timed_out(self.options.request_timeout_s or 0.0),
                            extra_headers=[(_REQUEST_ID, request_id)])  # fmt: skip
            else:
                logger.error("request %s to '%s' failed: %s", request.request_id, app, first)
                await reply(send, 500, "Internal Server Error",
                            extra_headers=[(_REQUEST_ID, request_id)])  # fmt: skip
        except RequestCancelledError:
            pass  # the client disconnected
        except ReplicaDiedError as exc:  # before its response started (_relay aborts after)
            logger.error("request %s to '%s' failed: %s", request.request_id, app, exc)
            await reply(send, 502, _REPLICA_DIED, TEXT, [(_REQUEST_ID, request_id)])
        except ShoalError as exc:
            logger.error("request %s to '%s' failed: %s", request.request_id, app, exc)
            await reply(send, 500, "Internal Server Error", TEXT, [(_REQUEST_ID, request_id)])
        finally:
            watch.stop()
            stream.close()

    async def _open_queued(
        self, router: Router, request: Request, receive: Any, send: Any, deadline: float | None
    ) -> Stream | None:
        """Wait in the router's queue for a replica while watching the client: one that
        disconnects takes its request out of the queue at once (it is never sent). None
        if the request was refused (503 sent) or its client left. No task of its own:
        the router sends the request when a replica frees (its direct hand-off)."""
        try:
            queued = router.queue_stream(request, deadline)
            watch = self._watches.watch(receive, queued)
            if not queued.future.done():
                watch.start()  # (the body was read: the next message is a disconnect)
            try:
                return await router.opened(queued)
            finally:
                watch.stop()
        except RequestCancelledError:
            return None  # the client left
        except BackPressureError:
            text = _QUEUE_FULL.format(app=router.app)
        except UnavailableError as error:
            logger.warning("request %s: %s", request.request_id, error)
            text = _NO_REPLICA.format(app=router.app)
        await reply(send, 503, text, extra_headers=[_RETRY_AFTER, *_ids(request.request_id)])
        return None

    async def _relay(
        self, start: HttpResponseStart, stream: Any, request_id: bytes, watch: Any, send: Any
    ) -> None:
        watch.start()  # streams can run for long: watch for the client leaving from now on
        headers = [*start.headers, (_REQUEST_ID, request_id)]
        await send({"type": "http.response.start", "status": start.status, "headers": headers})
        while True:
            try:
                message = await stream.next()
            except ReplicaDiedError as exc:  # the client sees the connection end, as below
                logger.error("streamed response %s failed: %s", request_id.decode(), exc)
                raise RuntimeError("the replica died mid-stream") from None
            if type(message) is StreamItem:
                await send({"type": "http.response.body", "body": message.value, "more_body": True})
            elif type(message) is StreamEnd:
                await send({"type": "http.response.body", "body": b""})
                return
            else:  # the replica failed mid-stream: end the connection so the client sees it
                logger.error("streamed response %s failed: %s", request_id.decode(), message)
                raise RuntimeError("the streamed response failed in the replica")

    async def _websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        """Relay a websocket: client messages go in as stream inputs, the app's come back."""
        if not self._routes_received.is_set():
            await self._routes_known()
        path: str = scope["path"]
        route = self.match(path)
        if route is None:
            await send({"type": "websocket.close", "code": 1008})  # uvicorn answers 403
            return
        prefix, app, ingress = route
        request_id = header(scope, _REQUEST_ID) or new_request_id()
        data = HttpRequestData(
            WEBSOCKET, scope.get("scheme", "ws"), path, "" if prefix == "/" else prefix,
            scope.get("query_string", b""), scope["headers"], b"", scope.get("client"),
            scope.get("server"), scope.get("http_version", "1.1"),
        )  # fmt: skip
        try:
            stream = await self.registry.get(app, ingress).open_stream(
                Request("__call__", (data,), {}, request_id, True)
            )
        except (UnavailableError, BackPressureError):
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        pump = asyncio.ensure_future(client_to_replica(receive, stream))
        try:
            while type(message := await stream.next()) is StreamItem:
                await send(message.value)
        except (ShoalError, OSError, RuntimeError) as exc:
            logger.debug("websocket %s ended: %r", request_id, exc)
        finally:
            pump.cancel()
            stream.close()

    async def _builtin(self, path: str, send: Any) -> None:
        if path not in ("/-/routes", "/-/healthz"):
            await reply(send, 404, f"Path '{path}' not found.")
            return
        unready = self._unready_reason()
        if unready is not None:
            await reply(send, 503, unready)
        elif path == "/-/routes":
            table = {prefix: app for prefix, app, _ in sorted(self._routes)}
            await reply(send, 200, json_dumps(table).decode(), _JSON)
        else:
            await reply(send, 200, "success")

    async def _oip_server(self, scope: Scope, route: Any, send: Any, request_id: str) -> bool:
        """Answer the Open Inference Protocol's server-level paths (docs/oip.md); True if
        answered."""
        answer = oip_server.server_answer(
            scope["path"], scope["method"], None if route is None else route[0], self._oip_ready
        )
        if answer is None:
            return False
        await reply(send, answer[0], answer[1].decode(), _JSON, _ids(request_id))
        return True

    def _oip_ready(self) -> bool:
        if self._draining:
            return False
        routers = {prefix: self.registry.get(app, ingress) for prefix, app, ingress in self._routes}
        return oip_server.all_ready(routers, lambda prefix: bool(routers[prefix]._slots))

    def _unready_reason(self) -> str | None:
        """Why /-/healthz and /-/routes answer 503 (Ray Serve's states and texts), or None.

        Draining (shoal is shutting down), or no route was ever installed (Ray's proxy
        is not ready for traffic until its route table has been populated once).
        """
        if self._draining:
            return "This node is being drained."
        if not self._routes_populated:
            return "Route table is not populated yet."
        return None

    def drain(self) -> None:
        """Enter the draining state: health checks and new requests get 503 (with
        ``Retry-After``), while the requests already accepted still run."""
        self._draining = True
        if self._grpc is not None:
            self._grpc.drain()  # new gRPC calls get UNAVAILABLE
        if self._idle is None:
            self._idle = asyncio.Event()
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> int:
        """Drain, then wait (at most ``timeout_s``) until every accepted request has been
        answered; returns how many are still in flight."""
        self.drain()
        assert self._idle is not None
        grpc_left = 0
        if self._grpc is not None:  # gRPC calls in flight (docs/grpc.md), then HTTP's
            started = time.monotonic()
            grpc_left = await self._grpc.wait_idle(timeout_s)
            timeout_s = max(0.0, timeout_s - (time.monotonic() - started))
        if self._in_flight == 0:
            return grpc_left
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            logger.warning(
                "%d request(s) still in flight after %.1f s of draining", self._in_flight, timeout_s
            )
        return self._in_flight + grpc_left

    # --- serving -------------------------------------------------------------------

    async def serve(self, reuse_port: bool = False, what: str = "") -> tuple[str, int]:
        """Bind and start serving; returns (host, port). Raises ShoalError if binding fails.
        ``reuse_port``: a socket bound here shares its port (see :func:`bind_listener`);
        ``what``: the server's name in that error (default: the HTTP proxy)."""
        import uvicorn

        options = self.options
        inherited = os.environ.pop(LISTEN_FD_ENV, None)
        if inherited is not None:  # bound by the controller, which keeps it across proxy restarts
            sock = socket.socket(fileno=int(inherited))
            sock.setblocking(False)
        else:
            sock = bind_listener(options.host, options.port, reuse_port, what)
        config = _uvicorn_config(self, options)
        self._server = uvicorn.Server(config)
        config.load()
        self._server.lifespan = config.lifespan_class(config)  # what Server.serve() would set
        await self._server.startup(sockets=[sock])
        self._tasks.append(asyncio.get_running_loop().create_task(self._server.main_loop()))
        grpc_options = getattr(options, "grpc_options", None)  # a ProxyOptions' (docs/grpc.md)
        if grpc_options is not None:
            from shoal._proxy.grpc_proxy import GrpcServer

            self._grpc = GrpcServer(self.registry, grpc_options, self)
            await self._grpc.start(options.host, options.max_request_body_bytes)
        host, port = sock.getsockname()[:2]
        return host, port

    async def stop(self, timeout_s: float) -> None:
        self.drain()  # a health check racing the shutdown sees 503, not "success"
        if self._grpc is not None:
            await self._grpc.stop(timeout_s)
        if self._server is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._server.shutdown(), timeout_s)
        except TimeoutError:
            logger.warning("HTTP connections did not close within %.1f s", timeout_s)


def _uvicorn_config(app: Any, options: HTTPOptions) -> Any:
    import uvicorn

    from shoal._proxy.http_protocol import http_protocol

    return uvicorn.Config(
        app, loop="none", http=http_protocol(), ws=_websocket_implementation(), lifespan="off",
        access_log=False, log_level="warning", root_path=options.root_path,
        timeout_keep_alive=int(options.keep_alive_timeout_s), server_header=False,
    )  # fmt: skip


def preload() -> None:
    """Import everything :meth:`Proxy.serve` needs (uvicorn and the protocols it loads),
    so that a standby proxy process starts serving in milliseconds."""
    _uvicorn_config(Proxy, HTTPOptions()).load()


def _websocket_implementation() -> str:
    try:
        import websockets  # noqa: F401
    except ImportError:
        return "none"
    return "websockets-sansio"


def _priority(scope: Scope) -> int | None:
    """The rank named by the request's priority header (in any case; normal without
    one), or None if it names no class."""
    named = header(scope, PRIORITY_HEADER)
    return rank_of(named.lower()) if named else NORMAL
