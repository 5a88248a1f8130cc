"""How a replica calls what serves a request: the kinds of callables and what their calls
may return, shared by the replica (``shoal._replica.replica``) and its HTTP and gRPC
servers (``web``, ``grpc``)."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from shoal._api.responses import DeploymentResponseGenerator

ASYNC, SYNC, ASYNC_GEN, SYNC_GEN = "async", "sync", "async generator", "generator"
ASGI = "asgi"  # the ingress ASGI app serves an HTTP request (``Replica.http_target``)
GENERATORS = (ASYNC_GEN, SYNC_GEN)
DONE = object()  # what an exhausted iterator gives (``next(it, DONE)``)


def kind_of(fn: Callable[..., Any]) -> str:
    """ASYNC, SYNC, ASYNC_GEN or SYNC_GEN: how ``fn`` is called (a callable object with
    an ``async def __call__`` is ASYNC)."""
    if inspect.isasyncgenfunction(fn):
        return ASYNC_GEN
    if inspect.isgeneratorfunction(fn):
        return SYNC_GEN
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    ):
        return ASYNC
    return SYNC


GENERATOR_TYPES = (types.GeneratorType, types.AsyncGeneratorType)
NEEDS_STREAM = (
    "Method '{}' returned a generator. You must use `handle.options(stream=True)` to call "
    "generators on a deployment."
)  # Ray Serve's text


def name_of(method: Callable[..., Any]) -> str:
    return getattr(method, "__name__", type(method).__name__)


def is_generator(value: Any) -> bool:
    """Whether a method returned something to iterate (``stream=True`` is needed)."""
    # type() rather than inspect.isgenerator/isasyncgen: neither type has subclasses.
    return type(value) in GENERATOR_TYPES or isinstance(value, DeploymentResponseGenerator)


async def refused(method: Callable[..., Any], generator: Any) -> TypeError:
    """The error for a call without ``stream=True`` whose ``method`` returned
    ``generator``, once that is released (its ``finally`` blocks run)."""
    if inspect.isgenerator(generator):
        generator.close()
    elif inspect.isasyncgen(generator):
        await generator.aclose()
    else:
        generator.cancel()
    return TypeError(NEEDS_STREAM.format(name_of(method)))


def is_public(name: str) -> bool:
    """Whether a handle may call the method ``name``."""
    return name == "__call__" or not name.startswith("_")


class FunctionDeployment:
    """Makes a function deployment look like a class with ``__call__``."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        self.__call__ = function
