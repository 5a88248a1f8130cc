"""A replica: one instance of a user's deployment class (or function) serving requests.

Runtime-agnostic: a runtime feeds it :class:`Request` messages and sends back
the reply messages it produces. Guarantees:
- async methods run on the replica's event loop; sync methods and sync
  generators run in a thread pool sized by ``max_ongoing_requests``, so they
  never block the loop;
- every user call runs with the replica's context (``get_replica_context()``)
  and the request's context (request id);
- a user exception becomes a Failure reply; the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal._api.context import ReplicaContext, RequestContext, replica_context, request_context
from shoal._api.ingress import asgi_app_of
from shoal._errors import NotFoundError, ShoalError
from shoal._replica.asgi import Lifespan, asgi_parts, request_scope, websocket_messages
from shoal._runtime.base import ReplicaSpec
from shoal._transport.failures import failure_from
from shoal._transport.http import WEBSOCKET, HttpRequestData, HttpResponseData
from shoal._transport.messages import Message, Request, Result, StreamEnd, StreamItem

logger = logging.getLogger("shoal.replica")

_ASYNC, _SYNC, _ASYNC_GEN, _SYNC_GEN = "async", "sync", "async generator", "generator"
_DONE = object()


def _kind(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return _ASYNC_GEN
    if inspect.isgeneratorfunction(fn):
        return _SYNC_GEN
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    ):
        return _ASYNC
    return _SYNC


class Replica:
    """Owns the user object; turns requests into reply messages."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.ongoing = 0
        self.instance: Any = None
        self._methods: dict[str, tuple[Callable[..., Any], str]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, spec.config.max_ongoing_requests),
            thread_name_prefix=f"shoal-{spec.deployment}",
        )
        self._lifespan: Lifespan | None = None
        self.context = contextvars.copy_context()
        self.context.run(replica_context.set, self._replica_context(None))
        self._stopped = False

    def _replica_context(self, servable: Any) -> ReplicaContext:
        spec = self.spec
        return ReplicaContext(spec.app, spec.deployment, spec.replica_id, servable)

    async def initialize(self) -> None:
        """Run the user's constructor (on the loop, like Ray Serve) and apply ``user_config``."""
        spec = self.spec
        if inspect.isclass(spec.target):
            self.instance = self.context.run(spec.target, *spec.init_args, **spec.init_kwargs)
        else:
            self.instance = _FunctionDeployment(spec.target)
        self.context.run(replica_context.set, self._replica_context(self.instance))
        app = asgi_app_of(self.instance)
        if app is not None:
            self._lifespan = Lifespan(app)
            await self.loop.create_task(self._lifespan.startup(), context=self.context.copy())
        if spec.config.user_config is not None:
            await self.reconfigure(spec.config.user_config)

    # --- requests ------------------------------------------------------------------

    def _resolve(self, name: str) -> tuple[Callable[..., Any], str]:
        cached = self._methods.get(name)
        if cached is not None:
            return cached
        method = getattr(self.instance, name, None) if _is_public(name) else None
        if method is None or not callable(method):
            raise NotFoundError(
                f"deployment '{self.spec.deployment}' has no method '{name}'; "
                f"available methods: {', '.join(self.method_names()) or 'none'}"
            )
        resolved = self._methods[name] = (method, _kind(method))
        return resolved

    def method_names(self) -> list[str]:
        names = [n for n in dir(self.instance) if _is_public(n) and n != "reconfigure"]
        return sorted(n for n in names if callable(getattr(self.instance, n, None)))

    def _enter(self, request: Request) -> None:
        self.ongoing += 1
        self._idle.clear()
        request_context.set(
            RequestContext(request.request_id, self.spec.app, request.multiplexed_model_id)
        )

    def _leave(self) -> None:
        self.ongoing -= 1
        if self.ongoing == 0:
            self._idle.set()

    async def handle(self, request: Request) -> Message:
        """Run one request; returns Result or Failure. Run it in a task made by task_context()."""
        self._enter(request)
        try:
            return Result(await self._invoke(request))
        except Exception as exc:
            if isinstance(exc, TypeError | KeyError | AttributeError):
                self._note_input_mismatch(request, exc)
            return failure_from(exc, f"in replica {self.spec.replica_id}:")
        finally:
            self._leave()

    def _note_input_mismatch(self, request: Request, exc: Exception) -> None:
        """Explain a data-vs-Request mix-up in the error (only on the error path)."""
        from shoal._replica import http

        args, kwargs = request.args, request.kwargs
        argument = args[0] if args else next(iter(kwargs.values()), None)
        if type(argument) is not HttpRequestData and (args or len(kwargs) == 1):
            method = self._methods.get(request.method, (None,))[0]
            http.note_input_mismatch(method, argument, exc)

    def task_context(self) -> contextvars.Context:
        """A fresh context for one request's task."""
        return self.context.copy()

    async def _invoke(self, request: Request) -> Any:
        args, kwargs = request.args, request.kwargs
        if args and type(args[0]) is HttpRequestData:
            return await self._invoke_http(*self._http_target(request), args[0])
        method, kind = self._resolve(request.method)
        if kind is _ASYNC:
            return await method(*args, **kwargs)
        if kind is _SYNC:
            result = await self._in_thread(method, *args, **kwargs)
            if inspect.isgenerator(result) or inspect.isasyncgen(result):
                raise TypeError(
                    f"method '{request.method}' returned a generator: call it with "
                    "handle.options(stream=True)"
                )
            return result
        raise TypeError(
            f"method '{request.method}' is a {kind}: call it with handle.options(stream=True)"
        )

    async def _invoke_http(
        self, method: Callable[..., Any], kind: str, data: HttpRequestData
    ) -> Any:
        """A complete HTTP response (used when the caller did not ask for a stream)."""
        async for message in self._http_stream(method, kind, data):
            if type(message) is Result:
                return message.value
            break
        raise TypeError("this endpoint streams its response: send the request with stream=True")

    def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return self.loop.run_in_executor(self._pool, call)

    async def _iterate(
        self, method: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """The items of a generator method; a sync generator advances in the thread pool."""
        if kind is _ASYNC_GEN:
            async for item in method(*args, **kwargs):
                yield item
            return
        generator = await self._in_thread(method, *args, **kwargs)
        try:
            while (item := await self._in_thread(next, generator, _DONE)) is not _DONE:
                yield item
        finally:
            await self._in_thread(generator.close)  # runs the generator's finally blocks

    async def handle_stream(
        self, request: Request, inbox: asyncio.Queue[Any] | None = None
    ) -> AsyncIterator[Message]:
        """Run a streaming request: StreamItem messages then StreamEnd, or a Failure.

        An HTTP request may instead produce one Result (a complete response).
        """
        self._enter(request)
        try:
            args, kwargs = request.args, request.kwargs
            if args and type(args[0]) is HttpRequestData:
                messages = (
                    self._websocket(args[0], inbox)
                    if args[0].method == WEBSOCKET
                    else self._http_stream(*self._http_target(request), args[0])
                )
                async for message in messages:
                    yield message
                return
            method, kind = self._resolve(request.method)
            if kind is not _ASYNC_GEN and kind is not _SYNC_GEN:
                raise TypeError(
                    f"method '{request.method}' is not a generator: call it without stream=True"
                )
            async for item in self._iterate(method, kind, args, kwargs):
                yield StreamItem(item)
            yield StreamEnd()
        except Exception as exc:
            yield failure_from(exc, f"in replica {self.spec.replica_id}:")
        finally:
            self._leave()

    async def _websocket(
        self, data: HttpRequestData, inbox: asyncio.Queue[Any] | None
    ) -> AsyncIterator[Message]:
        """Relay a websocket between the client (via ``inbox``) and the ingress ASGI app."""
        if self._lifespan is None or inbox is None:
            logger.warning(
                "websocket to deployment '%s' refused: serve it with @serve.ingress(app)",
                self.spec.deployment,
            )
            yield StreamItem({"type": "websocket.close", "code": 1008})
        else:
            scope = request_scope(data, self._lifespan.state)
            async for message in websocket_messages(self._lifespan.app, scope, inbox):
                yield StreamItem(dict(message))
        yield StreamEnd()

    def _http_target(self, request: Request) -> tuple[Any, str]:
        """What serves an HTTP request: the ingress ASGI app, or the called method."""
        if self._lifespan is not None:
            return self._lifespan.app, "asgi"
        return self._resolve(request.method)

    async def _http_stream(
        self, method: Callable[..., Any], kind: str, data: HttpRequestData
    ) -> AsyncIterator[Message]:
        """Serve one HTTP request: a Result, or a response start, body chunks and StreamEnd.

        A failure before anything was sent becomes a 500 response; after the start, a
        Failure (the proxy then closes the connection: the response is incomplete).
        """
        from shoal._replica import http

        started = False
        request: Any = None
        try:
            parts: AsyncIterator[Any]
            if kind == "asgi":
                state = self._lifespan.state if self._lifespan is not None else {}
                parts = asgi_parts(method, request_scope(data, state), data.body)
            elif kind is _ASYNC_GEN or kind is _SYNC_GEN:
                request = http.build_request(data)
                parts = http.chunks_from_items(self._iterate(method, kind, (request,), {}))
            else:
                request = http.build_request(data)
                result = await (
                    method(request) if kind is _ASYNC else self._in_thread(method, request)
                )
                if not http.is_streaming(result):
                    yield Result(await http.to_response(result))
                    return
                parts = asgi_parts(result, data.scope(), b"")
            async for part in parts:
                if type(part) is HttpResponseData:
                    yield Result(part)
                    return
                started = True
                yield StreamItem(part)
            yield StreamEnd()
        except Exception as exc:
            http.note_input_mismatch(method if kind != "asgi" else None, request, exc)
            logger.exception(
                "request %s to deployment '%s' failed",
                request_context.get().request_id,
                self.spec.deployment,
            )
            if started:
                yield failure_from(exc)
            else:
                yield Result(http.error_response(500, "Internal Server Error"))

    # --- control -------------------------------------------------------------------

    async def reconfigure(self, user_config: Any) -> None:
        method = getattr(self.instance, "reconfigure", None)
        if method is None:
            raise ShoalError(
                f"deployment '{self.spec.deployment}' has a user_config but no "
                "reconfigure(self, config) method to receive it"
            )
        await self._call_user(method, user_config)

    async def check_health(self) -> None:
        method = getattr(self.instance, "check_health", None)
        if method is not None:
            await self._call_user(method)

    async def _call_user(self, method: Callable[..., Any], *args: Any) -> Any:
        if _kind(method) is _ASYNC:
            return await self.context.copy().run(method, *args)
        return await self.loop.run_in_executor(
            self._pool, functools.partial(self.context.copy().run, method, *args)
        )

    async def drain(self, wait_loop_s: float, timeout_s: float) -> bool:
        """Wait until no request is ongoing (at most ``timeout_s``); True if drained.

        As in Ray Serve (``graceful_shutdown_wait_loop_s``), a busy replica checks
        again every ``wait_loop_s``; an idle one stops at once, and with
        ``wait_loop_s=0`` it stops as soon as its last request ends.
        """
        deadline = self.loop.time() + timeout_s
        while self.ongoing:
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                logger.warning(
                    "replica %s still had %d requests after %.1f s; stopping anyway",
                    self.spec.replica_id,
                    self.ongoing,
                    timeout_s,
                )
                return False
            if wait_loop_s > 0:
                await asyncio.sleep(min(wait_loop_s, remaining))
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), remaining)
        return True

    async def close(self) -> None:
        """Run the user's ``__del__`` (as Ray Serve does) and release threads. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._lifespan is not None:
            await self._lifespan.shutdown()
        destructor = getattr(type(self.instance), "__del__", None)
        if destructor is not None:
            try:
                if _kind(destructor) is _ASYNC:
                    await self._call_user(functools.partial(destructor, self.instance))
                else:  # on the loop: at interpreter exit the thread pools are already closed
                    self.context.copy().run(destructor, self.instance)
            except Exception:
                logger.exception("__del__ of replica %s raised", self.spec.replica_id)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_public(name: str) -> bool:
    return name == "__call__" or not name.startswith("_")


class _FunctionDeployment:
    """Makes a function deployment look like a class with ``__call__``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        self.__call__ = function
