"""The gRPC proxy: a ``grpc.aio`` server in the HTTP proxy's process (docs/grpc.md).

It starts with the proxy when ``grpc_options.grpc_servicer_functions`` lists a function
(Ray's rule), on ``http_options.host`` and ``grpc_options.port``. A call to a user's
service goes to the application named by the ``application`` metadata (none: the only
application, if there is exactly one), to its ingress deployment's method named like
the RPC. The request's bytes travel to the replica unparsed, with the request class's
deserializer; the replica returns the response serialized (``shoal/_replica/grpc.py``),
so the proxy never parses nor pickles a user's message. Metadata ``request_id``
(returned as trailing metadata), ``multiplexed_model_id`` and ``x-request-priority``
work as the HTTP headers do; the call's deadline (and ``grpc_options.request_timeout_s``)
becomes the request's deadline. Errors map to status codes (:func:`status_of`).
``/ray.serve.RayServeAPIService/ListApplications`` and ``/Healthz`` answer as Ray's do.

Draining: from then on every new call gets UNAVAILABLE and Healthz fails; calls already
accepted are served (:meth:`GrpcServer.wait_idle`); :meth:`GrpcServer.stop` ends the rest.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from shoal._config import gRPCOptions
from shoal._errors import (
    BackPressureError,
    ConfigError,
    NotFoundError,
    ReplicaDiedError,
    RequestTimeoutError,
    ShoalError,
    UnavailableError,
)
from shoal._proxy.grpc_servicers import is_builtin, load_function, user_methods
from shoal._router.queue import CHOICES, NORMAL, rank_of
from shoal._router.router import Router, RouterRegistry
from shoal._transport.grpc import GrpcReply, GrpcRequestData, reference
from shoal._transport.ids import new_request_id
from shoal._transport.messages import Failure, Message, Request, Result, StreamEnd, StreamItem
from shoal._transport.tcp import is_loopback

if TYPE_CHECKING:
    import grpc

    from shoal._proxy.grpc_servicers import UserMethod

logger = logging.getLogger("shoal.proxy")

DRAINING = "This node is being drained."  # Ray's text
NOT_READY = "Route table is not populated yet."
_SHUTTING_DOWN = "Service unavailable: shoal is shutting down; retry on another node or later."
_API_SERVICE = "ray.serve.RayServeAPIService"


def _grpc() -> Any:
    try:
        import grpc
    except ImportError:
        raise ConfigError(
            "grpc_options needs the grpcio package: pip install 'shoal[grpc]'"
        ) from None
    return grpc


def check_port(options: gRPCOptions, host: str) -> gRPCOptions:
    """``options`` with a free port chosen for port 0, once (a replacement proxy serves the
    same one); ConfigError naming the address if it cannot be bound. Warns when ``host``
    is reachable from other machines (the server has no TLS and no authentication)."""
    _grpc()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
        try:
            probe.bind((host, options.port))
        except OSError as exc:
            raise ConfigError(
                f"the gRPC proxy cannot listen on {host}:{options.port} ({exc.strerror}); "
                "pass another port with grpc_options={'port': ...}"
            ) from None
        port = probe.getsockname()[1]
    if not is_loopback(host):
        logger.warning(
            "the gRPC proxy listens on %s:%d without TLS or authentication: any host that can "
            "reach it can call the applications", host, port,
        )  # fmt: skip
    return options.model_copy(update={"port": port})


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def status_of(error: BaseException | Message) -> tuple[str, str]:
    """The status code name and details a failed call answers with (docs/grpc.md)."""
    if isinstance(error, Failure):
        kind, text = error.kind, error.message
        if kind == "user":
            return "INTERNAL", f"{error.type_name.rsplit('.', 1)[-1]}: {text}"
    elif isinstance(error, BaseException):
        kind, text = type(error).__name__, str(error)
    else:  # a reply a call does not expect
        return "INTERNAL", f"unexpected reply {type(error).__name__}"
    if kind == "RequestTimeoutError":
        return "DEADLINE_EXCEEDED", text
    if kind == "ReplicaDiedError":
        return "INTERNAL", text  # it may have had side effects: not safe to retry blindly
    if kind in ("BackPressureError", "UnavailableError", "DeploymentUnavailableError"):
        return "UNAVAILABLE", text
    if kind == "NotFoundError" and text.startswith("Tried to call a method"):
        return "UNIMPLEMENTED", text
    return "INTERNAL", f"{kind}: {text}" if kind not in text else text


class _Aborted(Exception):
    """A call ended with a status (raised inside the proxy, turned into ``abort``)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class GrpcIngress:
    """How a call reaches an application's ingress replica; what built-in services use
    (contract: docs/grpc.md, "Built-in services")."""

    def __init__(self, registry: RouterRegistry, options: gRPCOptions, proxy: Any) -> None:
        self.registry = registry
        self.options = options
        self._proxy = proxy  # the HTTP Proxy: its draining state and first route table
        self.draining = False
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    def applications(self) -> dict[str, str]:
        """Application name -> ingress deployment, for every application this proxy knows."""
        return self.registry.applications()

    def routes(self) -> dict[str, tuple[str, str]]:
        """The proxy's route table: route prefix -> (application, ingress deployment)."""
        return {prefix: (app, ingress) for prefix, app, ingress in self._proxy._routes}

    def unready_reason(self) -> str | None:
        """None when serving; else why not (Ray's texts)."""
        if self.draining:
            return DRAINING
        if not self._proxy._routes_received.is_set():
            return NOT_READY
        return None

    def app_from_metadata(self, context: Any) -> str | None:
        """The ``application`` metadata's value; with none, the only application (if
        exactly one runs), else None."""
        for key, value in context.invocation_metadata() or ():
            if key == "application":
                return str(value)
        apps = self.registry.applications()
        return next(iter(apps)) if len(apps) == 1 else None

    # --- one call ------------------------------------------------------------------

    def _request(
        self, app: str, method: str, data: GrpcRequestData, context: Any, stream: bool,
        model_id: str | None,
    ) -> tuple[Router, Request, float | None, str]:  # fmt: skip
        ingress = self.registry.ingress_of(app)
        if ingress is None:
            raise _Aborted("NOT_FOUND", _not_found(app))
        metadata = {key: value for key, value in data.metadata}
        request_id = str(metadata.get("request_id") or new_request_id())
        named = str(metadata.get("x-request-priority", ""))
        priority = rank_of(named.lower()) if named else NORMAL
        if priority is None:
            raise _Aborted(
                "INVALID_ARGUMENT", f"Invalid x-request-priority {named!r}: use one of {CHOICES}."
            )
        if model_id is None:
            model_id = str(metadata.get("multiplexed_model_id", ""))
        request = Request(
            method, (data,), {}, request_id, stream, model_id, None, priority
        )  # fmt: skip
        deadline = self._deadline(context)
        return self.registry.get(app, ingress), request, deadline, request_id

    def _deadline(self, context: Any) -> float | None:
        limits = [self.options.request_timeout_s, context.time_remaining()]
        left = [limit for limit in limits if limit is not None]
        return time.monotonic() + min(left) if left else None

    def _enter(self) -> None:
        if self.draining:
            raise _Aborted("UNAVAILABLE", _SHUTTING_DOWN)
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if self._idle is not None and self.in_flight == 0:
            self._idle.set()

    async def unary(
        self, app: str | None, method: str, payload: Any, context: Any, *,
        deserializer: Callable[[Any], Any] | None = None, multiplexed_model_id: str | None = None,
    ) -> Any:  # fmt: skip
        """Call ``method`` of ``app``'s ingress with ``payload``; its (serialized) result.
        On failure the call is aborted with its status (this never returns then)."""
        request_id = ""
        try:
            self._enter()
        except _Aborted as aborted:
            await _abort(context, aborted, request_id)
        try:
            data = GrpcRequestData(payload, reference(deserializer), _metadata(context))
            router, request, deadline, request_id = self._request(
                app or "", method, data, context, False, multiplexed_model_id
            )
            reply = await router.assign(request, deadline)
            if type(reply) is not Result:
                raise _Aborted(*status_of(reply))
            value = reply.value
            if type(value) is GrpcReply:
                value = _apply(context, value)
            context.set_trailing_metadata(_trailing(context, request_id))
            return value
        except _Aborted as aborted:
            await _abort(context, aborted, request_id)
        except ShoalError as exc:
            await _abort(context, _Aborted(*_router_status(exc)), request_id)
        finally:
            self._leave()

    async def stream(
        self, app: str | None, method: str, payload: Any, context: Any, *,
        deserializer: Callable[[Any], Any] | None = None, multiplexed_model_id: str | None = None,
    ) -> AsyncIterator[Any]:  # fmt: skip
        """The items of ``method`` (a generator) of ``app``'s ingress, one by one."""
        request_id = ""
        try:
            self._enter()
        except _Aborted as aborted:
            await _abort(context, aborted, request_id)
        stream = None
        try:
            data = GrpcRequestData(payload, reference(deserializer), _metadata(context))
            router, request, deadline, request_id = self._request(
                app or "", method, data, context, True, multiplexed_model_id
            )
            stream = router.try_open_stream(request, deadline)
            if stream is None:
                stream = await router.open_stream(request, deadline)
            while True:
                if deadline is None:
                    message = await stream.next()
                else:  # the whole stream is bounded (the client's deadline, request_timeout_s)
                    message = await _next_by(stream, deadline, router)
                if type(message) is StreamItem:
                    if type(message.value) is GrpcReply:
                        _apply(context, message.value)
                        continue
                    yield message.value
                elif type(message) is StreamEnd:
                    context.set_trailing_metadata(_trailing(context, request_id))
                    return
                else:
                    raise _Aborted(*status_of(message))
        except _Aborted as aborted:
            await _abort(context, aborted, request_id)
        except ShoalError as exc:
            await _abort(context, _Aborted(*_router_status(exc)), request_id)
        finally:
            if stream is not None:
                stream.close()  # a client that left cancels the replica's generator
            self._leave()

    # --- draining ------------------------------------------------------------------

    def drain(self) -> None:
        self.draining = True
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> int:
        """Drain, then wait (at most ``timeout_s``) for the calls in flight; how many are left."""
        self.drain()
        assert self._idle is not None
        if self.in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                logger.warning("%d gRPC call(s) still in flight after %.1f s of draining",
                               self.in_flight, timeout_s)  # fmt: skip
        return self.in_flight


async def _next_by(stream: Any, deadline: float, router: Router) -> Any:
    try:
        return await asyncio.wait_for(stream.next(), deadline - time.monotonic())
    except TimeoutError:
        raise router.timed_out("before the stream ended", "reply") from None


def _not_found(app: str) -> str:
    what = f"Application '{app}' not found." if app else "Application metadata not set."
    return f"{what} Ping /ray.serve.RayServeAPIService/ListApplications for available applications."


def _router_status(exc: ShoalError) -> tuple[str, str]:
    if isinstance(exc, RequestTimeoutError):
        return "DEADLINE_EXCEEDED", str(exc)
    if isinstance(exc, ReplicaDiedError):
        return "INTERNAL", str(exc)
    if isinstance(exc, BackPressureError | UnavailableError):
        return "UNAVAILABLE", str(exc)
    if isinstance(exc, NotFoundError):
        return "NOT_FOUND", str(exc)
    return "INTERNAL", f"{type(exc).__name__}: {exc}"


def _metadata(context: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((key, value) for key, value in context.invocation_metadata() or ())


def _trailing(context: Any, request_id: str) -> tuple[tuple[str, Any], ...]:
    set_by_user = tuple(context.trailing_metadata() or ())
    return (*set_by_user, ("request_id", request_id)) if request_id else set_by_user


def _apply(context: Any, reply: GrpcReply) -> Any:
    """Answer with what the method set on its ``grpc_context``; returns its value."""
    grpc = _grpc()
    if reply.code is not None:
        context.set_code(_codes(grpc)[reply.code])
    if reply.details:
        context.set_details(reply.details)
    if reply.trailing_metadata:
        context.set_trailing_metadata(reply.trailing_metadata)
    return reply.value


def _codes(grpc: Any) -> dict[int, Any]:
    return {code.value[0]: code for code in grpc.StatusCode}


async def _abort(context: Any, aborted: _Aborted, request_id: str) -> None:
    grpc = _grpc()
    trailing = (("request_id", request_id),) if request_id else ()
    await context.abort(getattr(grpc.StatusCode, aborted.code), aborted.details, trailing)


class GrpcServer:
    """The ``grpc.aio`` server of one proxy process: users' services, built-in services
    and Ray's RayServeAPIService."""

    def __init__(self, registry: RouterRegistry, options: gRPCOptions, proxy: Any) -> None:
        self.options = options
        self.ingress = GrpcIngress(registry, options, proxy)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    def _handlers(self, server: Any) -> dict[str, Any]:
        """Import the servicer functions; built-in ones add their handlers to ``server``
        now; returns the handlers of users' methods (and Ray's API) by method path."""
        grpc = _grpc()
        handlers: dict[str, Any] = {}
        for path in self.options.grpc_servicer_functions:
            function = load_function(path)
            if is_builtin(function):
                function(self.ingress, server)
                continue
            for method in user_methods(path, function):
                handlers[method.path] = self._user_handler(grpc, method)
        handlers.update(self._api_handlers(grpc))
        return handlers

    def _user_handler(self, grpc: Any, method: UserMethod) -> Any:
        name, deserializer, ingress = method.name, method.deserializer, self.ingress
        if method.request_streaming:
            reason = (
                f"{method.path} streams its requests: shoal's gRPC proxy serves unary and "
                "server-streaming methods"
            )

            async def refuse(_requests: Any, context: Any) -> None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, reason)

            if method.response_streaming:
                return grpc.stream_stream_rpc_method_handler(refuse)
            return grpc.stream_unary_rpc_method_handler(refuse)
        if method.response_streaming:

            async def stream(payload: bytes, context: Any) -> AsyncIterator[Any]:
                app = ingress.app_from_metadata(context)
                items = ingress.stream(app, name, payload, context, deserializer=deserializer)
                async for item in items:  # grpc wants an async generator function
                    yield item if type(item) is bytes else bytes(item)  # a large one: a view

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(payload: bytes, context: Any) -> Any:
            app = ingress.app_from_metadata(context)
            reply = await ingress.unary(app, name, payload, context, deserializer=deserializer)
            return reply if type(reply) is bytes else bytes(reply)  # a large one: a view

        return grpc.unary_unary_rpc_method_handler(unary)

    def _api_handlers(self, grpc: Any) -> dict[str, Any]:
        """Ray's ``/ray.serve.RayServeAPIService/ListApplications`` and ``/Healthz``."""
        from shoal._proxy.protos import serve_pb2

        ingress = self.ingress

        async def list_applications(_request: Any, context: Any) -> Any:
            unready = ingress.unready_reason()
            if unready is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, unready)
            names = sorted(ingress.applications())
            return serve_pb2.ListApplicationsResponse(application_names=names)

        async def healthz(_request: Any, context: Any) -> Any:
            unready = ingress.unready_reason()
            if unready is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, unready)
            return serve_pb2.HealthzResponse(message="success")

        def handler(function: Any, request: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                function, request.FromString, lambda reply: reply.SerializeToString()
            )

        return {
            f"/{_API_SERVICE}/ListApplications": handler(
                list_applications, serve_pb2.ListApplicationsRequest
            ),
            f"/{_API_SERVICE}/Healthz": handler(healthz, serve_pb2.HealthzRequest),
        }

    async def start(self, host: str, max_message_bytes: int) -> int:
        """Build the server, bind ``host`` and the configured port, serve; returns the port.
        ConfigError naming a servicer function that cannot be used, or the address."""
        grpc = _grpc()
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # a port in use is an error, not shared silently
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
        ])  # fmt: skip
        handlers = self._handlers(server)
        server.add_generic_rpc_handlers((_Methods(handlers),))
        target = _target(host, self.options.port)
        try:
            port = server.add_insecure_port(target)
        except RuntimeError as exc:
            raise ConfigError(
                f"the gRPC proxy cannot listen on {target} ({exc}); pass another port with "
                "grpc_options={'port': ...}"
            ) from None
        await server.start()
        self._server, self.port = server, port
        logger.info("gRPC proxy serving on %s", _target(host, port))
        return int(port)

    def drain(self) -> None:
        self.ingress.drain()

    async def wait_idle(self, timeout_s: float) -> int:
        return await self.ingress.wait_idle(timeout_s)

    async def stop(self, timeout_s: float) -> None:
        """Stop serving; calls still running get ``timeout_s`` to end, then are cancelled."""
        self.drain()
        if self._server is not None:
            await self._server.stop(timeout_s)


class _Methods:
    """One generic handler serving every method path the proxy knows (grpc only needs
    its ``service`` method)."""

    def __init__(self, handlers: dict[str, Any]) -> None:
        self._handlers = handlers

    def service(self, details: Any) -> Any:
        return self._handlers.get(details.method)
