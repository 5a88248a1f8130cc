"""Deployment handles (Ray Serve's handle API); their calls' responses are in
:mod:`.responses`."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any

from shoal._api.context import default_registry, request_context
from shoal._api.responses import DeploymentResponse, DeploymentResponseGenerator
from shoal._errors import (
    ConfigError,
    DeploymentUnavailableError,
)
from shoal._observe import tracing
from shoal._router.queue import CHOICES, PRIORITIES, RANKS, rank_of
from shoal._router.router import Router, RouterRegistry
from shoal._seam.loops import on_loop
from shoal._transport.failures import exception_from
from shoal._transport.messages import Failure, Message, Request, Result

_UNSET: Any = object()
_DERIVED_MAX = 64  # method handles kept per handle (names are a class's methods: few)


class DeploymentHandle:
    """Calls a deployment from anywhere: the driver, another replica, a test.

    ``handle.remote(...)`` calls ``__call__``; ``handle.name.remote(...)`` calls
    method ``name``. Handles can be passed to other deployments and pickled.

    A call has a deadline when the handle has ``timeout_s`` (counted from the call)
    or when it is made while serving a request that has one (the earlier of the two):
    see docs/deadlines.md. Without either, a call costs nothing more.

    A call's priority is the handle's ``priority``, else that of the request it is
    made while serving, else "normal": see docs/priorities.md.
    """

    # Every ``self._x`` read costs ~300 instructions more than a plain slot's (3.11 does
    # not specialize attribute reads on a class with ``__getattr__``): ``remote()`` reads
    # its options as one tuple (``_call``). ``handle.method`` is kept in ``__dict__``.
    __slots__ = (
        "__dict__", "_app", "_call", "_deployment", "_derived", "_method", "_mux",
        "_priority", "_registry", "_router", "_stream", "_timeout_s",
    )  # fmt: skip

    def __init__(
        self,
        deployment_name: str,
        app_name: str,
        *,
        method_name: str = "__call__",
        stream: bool = False,
        multiplexed_model_id: str = "",
        registry: RouterRegistry | None = None,
        timeout_s: float | None = None,
        priority: str | None = None,
    ) -> None:
        self._deployment = deployment_name
        self._app = app_name
        self._method = method_name
        self._stream = stream
        self._mux = multiplexed_model_id
        self._registry = registry
        self._router: Router | None = None
        self._timeout_s = timeout_s
        self._priority = None if priority is None else _checked_priority(priority)
        # What remote() reads, in one read: (method, stream, model id, timeout_s, priority).
        self._call = (method_name, stream, multiplexed_model_id, timeout_s, self._priority)
        self._derived = False  # made by another handle's __getattr__ (handle.method)

    @property
    def deployment_name(self) -> str:
        return self._deployment

    @property
    def app_name(self) -> str:
        return self._app

    def options(
        self,
        *,
        method_name: str = _UNSET,
        stream: bool = _UNSET,
        multiplexed_model_id: str = _UNSET,
        use_new_handle_api: bool = True,
        timeout_s: float | None = _UNSET,
        priority: str | None = _UNSET,
    ) -> DeploymentHandle:
        """A copy of this handle with some call options changed.

        ``timeout_s`` (a shoal extension): the deadline of every call made through the
        copy, in seconds from the call; None removes it. A call past its deadline fails
        with RequestTimeoutError and is cancelled in the replica (docs/deadlines.md).

        ``priority`` (a shoal extension): "high", "normal" or "low", the class of every
        call made through the copy; None (the default): the priority of the request the
        call is made while serving, else "normal". Waiting calls of a higher class are
        sent first (docs/priorities.md); anything else raises ConfigError.

        ``use_new_handle_api``: True, Ray Serve's handle API and shoal's only one; False
        (Ray's old handles, whose calls return ObjectRefs) raises ConfigError.
        """
        if use_new_handle_api is not True:
            raise ConfigError(
                f"handle.options(use_new_handle_api={use_new_handle_api!r}): shoal has only "
                "the DeploymentHandle API (calls return DeploymentResponse; `await` it or "
                "call .result()), not Ray's old handles; pass True or leave it out"
            )
        return DeploymentHandle(
            self._deployment,
            self._app,
            method_name=self._method if method_name is _UNSET else _checked_method(method_name),
            stream=self._stream if stream is _UNSET else _checked_stream(stream),
            multiplexed_model_id=self._mux
            if multiplexed_model_id is _UNSET
            else _checked_model_id(multiplexed_model_id),
            registry=self._registry,
            timeout_s=self._timeout_s if timeout_s is _UNSET else _checked_timeout(timeout_s),
            priority=self._priority_name() if priority is _UNSET else priority,
        )

    def _priority_name(self) -> str | None:
        # Not a public property: ``handle.priority`` must stay the method of that name.
        return None if self._priority is None else PRIORITIES[self._priority]

    def __getattr__(self, name: str) -> DeploymentHandle:
        """``handle.name``: this handle calling method ``name``. Made once per name (an
        ``options()`` costs ~17,000 instructions), then found as a plain attribute; it
        finds its router again once the shoal instance it routed to was shut down, as
        the new handle every ``handle.name`` used to make would (``_get_router``)."""
        if name.startswith("_"):
            raise AttributeError(name)
        handle = self.options(method_name=name)
        handle._derived = True
        attributes = self.__dict__
        if len(attributes) < _DERIVED_MAX:
            attributes[name] = handle
        return handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handle,
            (self._deployment, self._app, self._method, self._stream, self._mux, self._timeout_s,
             self._priority_name()),
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment={self._deployment!r}, app={self._app!r})"

    def _key(self) -> tuple[Any, ...]:
        return (
            self._app, self._deployment, self._method, self._stream, self._mux, self._timeout_s,
            self._priority,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        """Handles are equal when they target the same deployment with the same options."""
        if not isinstance(other, DeploymentHandle):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def shutdown(self) -> None:
        """Ray Serve's ``DeploymentHandle.shutdown()``: detach this handle from its router.

        Routers belong to the process (every handle to a deployment shares one) and
        shoal stops them itself, so nothing else needs stopping: as on Ray Serve, where
        it only stops the router's metrics, later calls through the handle still work.
        """
        self._router = None

    async def shutdown_async(self) -> None:
        """``shutdown()`` for async code (Ray Serve's name)."""
        self.shutdown()

    def _get_router(self) -> Router:
        router = self._router
        if router is None or (self._derived and router.loop.is_closed()):
            registry = self._registry or default_registry()
            router = self._router = registry.get(self._app, self._deployment)
        if router.loop.is_closed():  # its shoal instance was shut down
            raise DeploymentUnavailableError(
                f"deployment '{self._deployment}' of application '{self._app}' is unavailable: "
                "shoal was shut down (serve.shutdown()); after serve.run(), get a new handle"
            )
        return router

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Send a request; returns a DeploymentResponse (or a generator with ``stream=True``)."""
        router = self._router
        if router is None or router.loop.is_closed():  # _get_router's checks, inline
            router = self._get_router()
        method, stream, mux, timeout_s, priority = self._call
        context = request_context.get()
        if priority is None:  # inherited from the request being served (or "normal")
            priority = RANKS[context.priority]
        request = Request(method, args, kwargs, context.request_id, stream, mux, None, priority)
        if tracing.on:
            return self._traced(router, request, context.deadline)
        if timeout_s is not None or context.deadline is not None:
            return self._remote_by(router, request, context.deadline)
        return _send(router, request, stream)

    def _traced(self, router: Router, request: Request, inherited: float | None) -> Any:
        """``_send`` within the call's CLIENT span (docs/tracing.md), which ends with the
        reply, or when the stream ends."""
        span = tracing.start_call(self._app, self._deployment, self._method, request)
        try:
            if self._timeout_s is not None or inherited is not None:
                response = self._remote_by(router, request, inherited)
            else:
                response = _send(router, request, self._stream)
        except BaseException as exc:
            tracing.fail(span, exc)
            span.end()
            raise
        if type(response) is DeploymentResponse:
            response._inner.add_done_callback(functools.partial(tracing.end_call, span))
        else:
            response._span = span
        return response

    def _remote_by(self, router: Router, request: Request, inherited: float | None) -> Any:
        """``remote()`` of a call with a deadline: the earlier of the inherited one and
        ``timeout_s`` from now. Always through a task, which enforces the deadline."""
        deadline = inherited
        if self._timeout_s is not None:
            own = time.monotonic() + self._timeout_s
            if deadline is None or own < deadline:
                deadline = own
        assert deadline is not None
        loop = router.loop
        on_router_loop = on_loop(loop)
        if self._stream:
            return DeploymentResponseGenerator(router, request, on_router_loop, deadline)
        assigning = _assign(router, request, deadline)
        if on_router_loop:
            return DeploymentResponse(loop.create_task(assigning), loop)
        return DeploymentResponse(asyncio.run_coroutine_threadsafe(assigning, loop), loop)

    def broadcast(self, *args: Any, **kwargs: Any) -> DeploymentResponse:
        """Call the method on every replica of the deployment (a shoal extension).

        Resolves to ``{replica_id: result}`` once every replica answered; raises the
        first replica's exception if any failed. Use it for state that every replica
        must share, e.g. ``await handle.reload_weights.broadcast(generation)``.
        """
        router = self._get_router()
        context = request_context.get()
        request = Request(self._method, args, kwargs, context.request_id, False, self._mux)
        if tracing.on:  # every replica's span is a child of the caller's current span
            request.traceparent = tracing.current_traceparent()
        loop = router.loop
        on_router_loop = on_loop(loop)
        coroutine = _broadcast(router, request)
        if on_router_loop:
            return DeploymentResponse(loop.create_task(coroutine), loop)
        return DeploymentResponse(asyncio.run_coroutine_threadsafe(coroutine, loop), loop)


def _send(router: Router, request: Request, stream: bool) -> Any:
    """Send a call without a deadline: now if a replica has room, else through a task
    (or as a stream)."""
    loop = router.loop
    on_router_loop = on_loop(loop)
    if stream:
        return DeploymentResponseGenerator(router, request, on_router_loop)
    if not on_router_loop:
        return DeploymentResponse(
            asyncio.run_coroutine_threadsafe(_assign(router, request), loop), loop
        )
    args, kwargs = request.args, request.kwargs
    if not router.waiting and not ((args or kwargs) and _has_responses(args, kwargs)):
        slot = router.choose(request.multiplexed_model_id)
        if slot is not None:  # fast path: a replica has room, send now without a task
            future = router.send(slot, request)
            if not future.done():
                return DeploymentResponse(future, loop)
    return DeploymentResponse(loop.create_task(_assign(router, request)), loop)


async def _broadcast(router: Router, request: Request) -> Message:
    replies = await router.broadcast(request)
    values = {}
    for replica_id, reply in replies.items():
        if isinstance(reply, Failure):
            error = exception_from(reply)
            error.add_note(f"raised by replica {replica_id} during a broadcast")
            raise error
        values[replica_id] = reply.value  # type: ignore[attr-defined]
    return Result(values)


def _rebuild_handle(
    deployment: str,
    app: str,
    method: str,
    stream: bool,
    mux: str,
    timeout_s: float | None = None,
    priority: str | None = None,
) -> DeploymentHandle:
    return DeploymentHandle(
        deployment, app, method_name=method, stream=stream, multiplexed_model_id=mux,
        timeout_s=timeout_s, priority=priority,
    )  # fmt: skip


def _checked_priority(priority: Any) -> int:
    rank = rank_of(priority)
    if rank is None:
        raise ConfigError(
            f"handle.options(priority=...) takes one of {CHOICES} (or None: the priority of "
            f"the request being served, else 'normal'), got {priority!r}"
        )
    return rank


def _checked_method(name: Any) -> str:
    if type(name) is not str or not name:
        raise ConfigError(f"handle.options(method_name=...) takes a method's name, got {name!r}")
    return name


def _checked_stream(stream: Any) -> bool:
    if type(stream) is not bool:
        raise ConfigError(f"handle.options(stream=...) takes True or False, got {stream!r}")
    return stream


def _checked_model_id(model_id: Any) -> str:
    if type(model_id) is not str:
        raise ConfigError(
            "handle.options(multiplexed_model_id=...) takes a str (an empty one: no "
            f"model), got {model_id!r}"
        )
    return model_id


def _checked_timeout(timeout_s: Any) -> float | None:
    if timeout_s is None:
        return None
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not timeout_s > 0
        or math.isinf(timeout_s)
    ):
        raise ConfigError(
            f"handle.options(timeout_s=...) takes a positive, finite number of seconds "
            f"or None (no deadline), got {timeout_s!r}"
        )
    return float(timeout_s)


def _has_responses(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    for arg in args:
        if isinstance(arg, DeploymentResponse):
            return True
    return (
        any(isinstance(value, DeploymentResponse) for value in kwargs.values()) if kwargs else False
    )


async def _assign(router: Router, request: Request, deadline: float | None = None) -> Message:
    if _has_responses(request.args, request.kwargs):
        if deadline is None:
            await _resolve_arguments(request)
        else:  # waiting for the arguments counts against the deadline too
            timeout = asyncio.timeout(deadline - time.monotonic())
            try:
                async with timeout:
                    await _resolve_arguments(request)
            except TimeoutError:
                if not timeout.expired():
                    raise  # an argument's own RequestTimeoutError
                raise router.timed_out("while it waited for its arguments") from None
    return await router.assign(request, deadline)


async def _resolve_arguments(request: Request) -> None:
    request.args = tuple(
        [await arg if isinstance(arg, DeploymentResponse) else arg for arg in request.args]
    )
    request.kwargs = {
        key: await value if isinstance(value, DeploymentResponse) else value
        for key, value in request.kwargs.items()
    }
