"""A replica: one instance of a user's deployment class (or function) serving requests.

Runtime-agnostic: a runtime feeds it :class:`Request` messages and sends back
the reply messages it produces. Guarantees:
- async methods run on the replica's event loop; sync methods and sync
  generators run in a thread pool sized by ``max_ongoing_requests``, so they
  never block the loop;
- every user call runs with the replica's context (``get_replica_context()``)
  and the request's context (request id, deadline);
- a request with ``remaining_s`` runs at most that long: then it is cancelled and
  fails with RequestTimeoutError (a sync method's thread cannot be stopped: it runs
  on, and its result is dropped);
- a user exception becomes a Failure reply; the replica keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal._api.context import (
    ReplicaContext,
    new_request_context,
    replica_context,
    request_context,
)
from shoal._api.ingress import asgi_app_of
from shoal._api.multiplex import close_replica, replica_models
from shoal._api.responses import DeploymentResponseGenerator
from shoal._errors import NotFoundError, RequestTimeoutError, ShoalError
from shoal._observe import tracing
from shoal._replica import kinds
from shoal._replica.asgi import Lifespan, request_scope, websocket_messages
from shoal._replica.details import DetailsReporter, hook_timeout_s
from shoal._replica.metrics import replica_metrics, route_of
from shoal._router.models import WATCH_METHOD
from shoal._router.queue import PRIORITIES
from shoal._seam.specs import ReplicaSpec
from shoal._seam.startup import (
    CONSTRUCTOR,
    INITIAL_HEALTH_CHECK,
    LIFESPAN_STARTUP,
    RECONFIGURE,
    mark_startup_step,
)
from shoal._transport.failures import failure_from
from shoal._transport.grpc import GrpcRequestData
from shoal._transport.http import WEBSOCKET, HttpRequestData
from shoal._transport.messages import Message, Request, Result, StreamEnd, StreamItem

logger = logging.getLogger("shoal.replica")

_ASYNC, _ASYNC_GEN, _SYNC_GEN, _DONE = kinds.ASYNC, kinds.ASYNC_GEN, kinds.SYNC_GEN, kinds.DONE
_kind = kinds.kind_of
_CALL_DATA = (HttpRequestData, GrpcRequestData)  # what the proxies send
_COROUTINE = types.CoroutineType
_RETURNED = (_COROUTINE, *kinds.GENERATOR_TYPES)  # what an async method's result may need done


class Replica:
    """Owns the user object; turns requests into reply messages."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.ongoing = 0
        self.instance: Any = None
        self._methods: dict[str, tuple[Callable[..., Any], str]] = {}
        # Resolved when the last ongoing request ends; made only while drain() waits.
        self._idle: asyncio.Future[None] | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=max(2, spec.config.max_ongoing_requests),
            thread_name_prefix=f"shoal-{spec.deployment}",
        )
        self._lifespan: Lifespan | None = None
        # The replica's context, this one object for the replica's life (a server keeps
        # it, and runs each request in a copy): set in it, never replaced.
        self.context = contextvars.copy_context()
        self.context.run(replica_context.set, self._replica_context(None))
        self._stopped = False
        # Set when drain() returns: requests that reach the replica from then on are
        # refused unrun (ReplicaStoppedError), never started against a closing replica.
        self.refusing = False
        self._details = DetailsReporter(self._call_user)
        self._metrics = replica_metrics(spec, lambda: self.ongoing)  # None: disabled

    def _replica_context(self, servable: Any) -> ReplicaContext:
        spec = self.spec
        return ReplicaContext(spec.app, spec.deployment, spec.replica_id, servable)

    async def initialize(self) -> None:
        """Start the replica as Ray Serve does, in order: the user's constructor (on the
        loop; an ``async def __init__`` is awaited), an ASGI ingress's lifespan startup,
        ``reconfigure(user_config)``, then a first health check.

        Raises what the failed step raised, marked with the step (``startup_step``).
        """
        spec = self.spec
        step = CONSTRUCTOR
        try:
            target, args, kwargs = spec.code.load()
            if inspect.isclass(target):
                self.instance = await self._construct(target, args, kwargs)
            else:
                self.instance = kinds.FunctionDeployment(target)
            self.context.run(replica_context.set, self._replica_context(self.instance))
            app = asgi_app_of(self.instance)
            if app is not None:
                step = LIFESPAN_STARTUP
                self._lifespan = Lifespan(app)
                await self.loop.create_task(self._lifespan.startup(), context=self.context.copy())
            if spec.config.user_config is not None:
                step = RECONFIGURE
                await self.reconfigure(spec.config.user_config)
            step = INITIAL_HEALTH_CHECK  # a replica is not ready until it passes one (Ray)
            await self._first_health_check(spec.config.health_check_timeout_s)
        except Exception as exc:
            mark_startup_step(exc, step)
            raise

    async def _construct(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not inspect.iscoroutinefunction(cls.__init__):
            return self.context.run(cls, *args, **kwargs)
        # cls(...) refuses the coroutine an async __init__ returns: as Ray Serve does,
        # create the object, then await its __init__ (in the replica's context).
        instance = cls.__new__(cls)
        init = instance.__init__(*args, **kwargs)
        await self.loop.create_task(init, context=self.context)
        return instance

    async def _first_health_check(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.check_health(), timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(
                f"check_health() did not return within {timeout_s:g} s (health_check_timeout_s)"
            ) from None

    # --- requests ------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Callable[..., Any], str]:
        """The public method ``name`` and its kind (``shoal._replica.kinds``); raises
        NotFoundError if there is none."""
        cached = self._methods.get(name)
        if cached is not None:
            return cached
        if isinstance(self.instance, kinds.FunctionDeployment):
            method: Any = self.instance.__call__  # as in Ray, any method name calls the function
        else:
            method = getattr(self.instance, name, None) if kinds.is_public(name) else None
        if method is None or not callable(method):
            # Ray Serve's type and text: programs match on "Available methods: [...]".
            raise NotFoundError(
                f"Tried to call a method '{name}' that does not exist. "
                f"Available methods: {self.method_names()}."
            )
        resolved = self._methods[name] = (method, _kind(method))
        return resolved

    def method_names(self) -> list[str]:
        """The methods a handle can call, listed as Ray Serve lists them (``__call__`` left out)."""
        names = [n for n in dir(self.instance) if not n.startswith("_")]
        return [n for n in names if callable(getattr(self.instance, n, None))]

    def _enter(self, request: Request) -> float:
        """Count the request in and set its context; returns when it started
        (``perf_counter``)."""
        self.ongoing += 1
        remaining = request.remaining_s
        deadline = None if remaining is None else time.monotonic() + remaining
        request_context.set(
            new_request_context(
                request.request_id, self.spec.app, request.multiplexed_model_id, deadline,
                PRIORITIES[request.priority],
            )
        )  # fmt: skip
        return 0.0 if self._metrics is None else time.perf_counter()

    def _leave(self, request: Request, started: float) -> None:
        self.ongoing -= 1
        if self.ongoing == 0 and self._idle is not None:
            if not self._idle.done():
                self._idle.set_result(None)
            self._idle = None
        if self._metrics is not None:
            self._metrics.done(request, started)

    def record_failure(self, route: str, exc: BaseException) -> None:
        """User code (or a call it made) failed a request: a metric and a recent error."""
        if self._metrics is not None:
            self._metrics.failed(route, request_context.get().request_id, exc)

    async def handle(self, request: Request) -> Message:
        """Run one request; returns Result or Failure. Run it in a task made by task_context()."""
        started = self._enter(request)
        span = self._traced(request) if tracing.on else None
        try:
            if request.remaining_s is not None:
                return Result(await self._invoke_within(request, request.remaining_s))
            args = request.args
            resolved = self._methods.get(request.method)
            if (
                resolved is None
                or resolved[1] is not _ASYNC
                or (args and type(args[0]) in _CALL_DATA)
            ):
                return Result(await self._invoke(request))
            # The common case, an async method already called once: _invoke's, without
            # its coroutine (one fewer for every step of the call).
            result = await resolved[0](*args, **request.kwargs)
            if type(result) in _RETURNED or isinstance(result, DeploymentResponseGenerator):
                result = await self._returned(resolved[0], result)
            return Result(result)
        except Exception as exc:
            if isinstance(exc, TypeError | KeyError | AttributeError):
                self._note_input_mismatch(request, exc)
            if span is not None:
                tracing.fail(span, exc)
            self.record_failure(route_of(request), exc)
            return failure_from(exc, f"in replica {self.spec.replica_id}:")
        finally:
            self._leave(request, started)
            if span is not None:
                span.end()

    def _traced(self, request: Request) -> Any:
        """The request's span, current in its task's context while the user's code runs."""
        spec = self.spec
        return tracing.start_replica(spec.app, spec.deployment, spec.replica_id, request)

    async def _invoke_within(self, request: Request, remaining_s: float) -> Any:
        """``_invoke``, cancelled when the request's deadline passes (RequestTimeoutError)."""
        timeout = asyncio.timeout(remaining_s)
        try:
            async with timeout:
                return await self._invoke(request)
        except TimeoutError:
            if not timeout.expired():
                raise  # the user's own TimeoutError
            raise self.timed_out(request) from None

    def timed_out(self, request: Request) -> RequestTimeoutError:
        """The error of a request whose deadline passed in this replica (counted)."""
        if self._metrics is not None:
            self._metrics.expired()
        return RequestTimeoutError(
            f"method '{request.method}' of deployment '{self.spec.deployment}' did not finish "
            f"by the request's deadline ({request.remaining_s:.3g} s were left when it was "
            f"sent); replica {self.spec.replica_id} cancelled it"
        )

    def _note_input_mismatch(self, request: Request, exc: Exception) -> None:
        """Explain a data-vs-Request mix-up in the error (only on the error path)."""
        from shoal._replica import http

        args, kwargs = request.args, request.kwargs
        argument = args[0] if args else next(iter(kwargs.values()), None)
        if type(argument) not in _CALL_DATA and (args or len(kwargs) == 1):
            method = self._methods.get(request.method, (None,))[0]
            http.note_input_mismatch(method, argument, exc)

    def task_context(self) -> contextvars.Context:
        """A fresh context for one request's task."""
        return self.context.copy()

    async def _invoke(self, request: Request) -> Any:
        args, kwargs = request.args, request.kwargs
        if args and type(args[0]) is HttpRequestData:
            return await self._invoke_http(request)
        if args and type(args[0]) is GrpcRequestData:
            from shoal._replica import grpc

            return await grpc.invoke(self, request.method, args[0])
        method, kind = self.resolve(request.method)
        if kind is _ASYNC_GEN or kind is _SYNC_GEN:
            raise TypeError(kinds.NEEDS_STREAM.format(kinds.name_of(method)))  # before it runs
        if kind is _ASYNC:  # without _call's frame
            return await self._returned(method, await method(*args, **kwargs))
        result = await self.call(method, kind, args, kwargs)
        if kinds.is_generator(result):
            raise await kinds.refused(method, result)
        return result

    async def _returned(self, method: Callable[..., Any], result: Any) -> Any:
        """What a method's call returns: a coroutine it returned awaited (as Ray Serve
        does); a generator refused (``stream=True`` is needed), after it is released."""
        if type(result) is _COROUTINE:  # inspect.iscoroutine: the type has no subclasses
            result = await result
        if kinds.is_generator(result):
            raise await kinds.refused(method, result)
        return result

    async def call(
        self, method: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Call a non-generator method; a coroutine it returns is awaited (as Ray Serve does)."""
        if kind is _ASYNC:
            result = await method(*args, **kwargs)
        else:
            result = await self.in_thread(method, *args, **kwargs)
        if type(result) is _COROUTINE:  # inspect.iscoroutine: the type has no subclasses
            result = await result
        return result

    async def _invoke_http(self, request: Request) -> Any:
        """A complete HTTP response (used when the caller did not ask for a stream)."""
        reply = await (_web or _import_web()).reply(self, request)
        if type(reply) is Result:
            return reply.value
        await reply.aclose()
        raise TypeError("this endpoint streams its response: send the request with stream=True")

    def in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the replica's thread pool, in a copy of the current
        context: a future of its result."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return self.loop.run_in_executor(self._pool, call)

    async def iterate(
        self, method: Callable[..., Any], kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """The items of a generator method, or of the generator a method returns (as in Ray
        Serve, what it returns decides: an async iterator such as another deployment's
        response generator works too); a sync generator advances in the thread pool."""
        if kind is _ASYNC_GEN:
            async for item in method(*args, **kwargs):
                yield item
            return
        if kind is _SYNC_GEN:
            generator = await self.in_thread(method, *args, **kwargs)
        else:
            generator = await self.call(method, kind, args, kwargs)
            if isinstance(generator, AsyncIterator):
                async for item in generator:
                    yield item
                return
            if not inspect.isgenerator(generator):
                raise TypeError(
                    f"Called method '{kinds.name_of(method)}' with `handle.options(stream=True)` "
                    "but it did not return a generator."
                )
        try:
            while (item := await self.in_thread(next, generator, _DONE)) is not _DONE:
                yield item
        finally:
            await self.in_thread(generator.close)  # runs the generator's finally blocks

    async def handle_stream(
        self, request: Request, inbox: asyncio.Queue[Any] | None = None
    ) -> AsyncGenerator[Message, None]:
        """Run a streaming request: StreamItem messages then StreamEnd, or a Failure.

        An HTTP request may instead produce one Result (a complete response).
        """
        if request.method == WATCH_METHOD:  # a router watches our multiplexed models
            async for held in replica_models(self.spec.replica_id).watch():
                yield StreamItem(held)
            yield StreamEnd()
            return
        started = self._enter(request)
        span = self._traced(request) if tracing.on else None
        try:
            args, kwargs = request.args, request.kwargs
            if args and type(args[0]) is HttpRequestData:
                if args[0].method == WEBSOCKET:
                    messages = self._websocket(args[0], inbox)
                else:
                    reply = await (_web or _import_web()).reply(self, request)
                    if type(reply) is Result:
                        yield reply
                        return
                    messages = reply
                async for message in messages:
                    yield message
                return
            if args and type(args[0]) is GrpcRequestData:
                from shoal._replica import grpc

                async for message in grpc.stream(self, request.method, args[0]):
                    yield message
                return
            method, kind = self.resolve(request.method)
            async for item in self.iterate(method, kind, args, kwargs):
                yield StreamItem(item)
            yield StreamEnd()
        except Exception as exc:
            yield self._stream_failed(request, span, exc)
        finally:
            self._leave(request, started)
            if span is not None:
                span.end()  # when the stream ends, however it ends

    def _stream_failed(self, request: Request, span: Any, exc: Exception) -> Message:
        """The Failure ending a stream (or an HTTP request nothing serves), counted."""
        if span is not None:
            tracing.fail(span, exc)
        self.record_failure(route_of(request), exc)
        return failure_from(exc, f"in replica {self.spec.replica_id}:")

    async def handle_http(self, request: Request) -> Message | AsyncGenerator[Message, None]:
        """Serve an HTTP request (not a websocket) as ``handle_stream`` does, without its
        generator when the response is complete: returns that Result (a 500, or 504, if the
        user's code failed; a Failure if no method serves the request), or, for a streamed
        response, a started generator of its messages (StreamItem start, chunks, then
        StreamEnd or a Failure). The request counts as ongoing (and its span stays open)
        until that generator ends or is closed: close it, however the relay ends.
        Run it in a task made by task_context()."""
        started = self._enter(request)
        span = self._traced(request) if tracing.on else None
        streamed: AsyncGenerator[Message, None] | None = None
        try:
            reply = await (_web or _import_web()).reply(self, request)
            if type(reply) is Result:
                return reply
            streamed = self._counted(request, started, span, reply)
            await streamed.asend(None)  # into its try: from now on, closing it ends the request
            return streamed
        except Exception as exc:
            return self._stream_failed(request, span, exc)
        finally:
            if streamed is None:
                self._leave(request, started)
                if span is not None:
                    span.end()

    async def _counted(
        self, request: Request, started: float, span: Any, messages: AsyncGenerator[Message, None]
    ) -> AsyncGenerator[Any, None]:
        """``messages`` after a first ``None`` (the priming step), ending the request when
        they end or this generator is closed."""
        try:
            yield None
            async for message in messages:
                yield message
        finally:
            await messages.aclose()
            self._leave(request, started)
            if span is not None:
                span.end()

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

    # --- for the HTTP and gRPC servers (shoal._replica.web, shoal._replica.grpc) -----

    def http_target(self, request: Request) -> tuple[Any, str]:
        """What serves an HTTP request: the ingress ASGI app (kind ``kinds.ASGI``), or the
        called method and its kind; raises NotFoundError if there is no such method."""
        if self._lifespan is not None:
            return self._lifespan.app, kinds.ASGI
        return self.resolve(request.method)

    def asgi_state(self) -> dict[str, Any]:
        """The ingress ASGI app's lifespan state (``scope["state"]``); empty without one."""
        return self._lifespan.state if self._lifespan is not None else {}

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

    async def health_report(self) -> dict[str, Any] | None:
        """A periodic health check: the user's ``check_health`` (raising what it raises),
        then the replica's status details (``shoal._replica.details``; never raises)."""
        await self.check_health()
        timeout_s = hook_timeout_s(self.spec.config.health_check_timeout_s)
        return await self._details.collect(self.instance, timeout_s)

    async def autoscaling_stats(self) -> dict[str, float] | None:
        """The user's ``record_autoscaling_stats()`` (Ray Serve's custom autoscaling
        metrics), checked: names to numbers. None when the class defines no such method."""
        method = getattr(self.instance, "record_autoscaling_stats", None)
        if method is None:
            return None
        stats = await self._call_user(method)
        if not isinstance(stats, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in stats.items()
        ):
            raise TypeError(
                "record_autoscaling_stats() must return a dict of metric names (str) to "
                f"numbers, got {stats!r}"
            )
        return {name: float(value) for name, value in stats.items()}

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
                self.refusing = True
                return False
            if wait_loop_s > 0:
                await asyncio.sleep(min(wait_loop_s, remaining))
            else:
                if self._idle is None:
                    self._idle = self.loop.create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._idle), remaining)
        self.refusing = True  # in the step that saw no request ongoing: none starts now
        return True

    async def close(self) -> None:
        """Run the user's ``__del__`` (as Ray Serve does) and release threads. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._details.close()  # a hook call still running
        if self._metrics is not None:
            self._metrics.close()
        if self._lifespan is not None:
            await self._lifespan.shutdown()
        await close_replica(self.spec.replica_id)  # multiplexed models released
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


# shoal._replica.web (it imports Starlette): loaded by the first HTTP request. Not an
# import statement in the methods: one costs a call into importlib each time.
_web: Any = None


def _import_web() -> Any:
    global _web
    from shoal._replica import web

    _web = web
    return web
