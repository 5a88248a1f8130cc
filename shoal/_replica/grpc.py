"""gRPC calls in an ingress replica: build the request message, call the method named
like the RPC, serialize what it returns (docs/grpc.md).

The proxy sends the request's bytes and its deserializer (``GrpcRequestData``); the
method receives the protobuf message (and, if it has a ``grpc_context`` parameter, a
:class:`GrpcContext`, as Ray Serve's ``RayServegRPCContext``) and returns the response
message (unary) or yields them (server streaming). Responses go back serialized.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from shoal._api.context import request_context
from shoal._replica.kinds import GENERATORS
from shoal._seam.imports import import_attribute
from shoal._transport.grpc import GrpcReply, GrpcRequestData, out_of_band
from shoal._transport.messages import Message, StreamEnd, StreamItem

if TYPE_CHECKING:
    from shoal._replica.replica import Replica

logger = logging.getLogger("shoal.replica")

_NOT_A_MESSAGE = (
    "method '{method}' returned a {kind}, not a protobuf message: a gRPC method returns "
    "(or yields) its response message, or its serialized bytes"
)


class GrpcContext:
    """What a method with a ``grpc_context`` parameter gets (Ray Serve's
    ``RayServegRPCContext``): the call's metadata, and the status code, details and
    trailing metadata to answer with (an exception still answers INTERNAL)."""

    def __init__(self, metadata: tuple[tuple[str, Any], ...]) -> None:
        self._metadata = metadata
        self._code: Any = None
        self._details = ""
        self._trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def code(self) -> Any:
        return self._code

    def set_code(self, code: Any) -> None:
        """``code``: a ``grpc.StatusCode`` (or its number)."""
        self._code = code

    def details(self) -> str:
        return self._details

    def set_details(self, details: str) -> None:
        self._details = details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailing = tuple((str(k), v) for k, v in metadata)

    def status(self, value: Any) -> Any:
        """``value``, or a GrpcReply carrying it when the method set a status or metadata."""
        if self._code is None and not self._details and not self._trailing:
            return value
        code = self._code
        number = code.value[0] if hasattr(code, "value") else code
        return GrpcReply(value, number, self._details, self._trailing)


@functools.cache
def _takes_context(method: Callable[..., Any]) -> bool:
    try:
        return "grpc_context" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def _deserializer(reference: str) -> Callable[[Any], Any]:
    """``FromString`` of the message class named ``"module:Qualname"`` (once per class)."""
    module, _, name = reference.partition(":")
    return import_attribute(module, name).FromString


def _arguments(
    method: Callable[..., Any], data: GrpcRequestData
) -> tuple[tuple[Any, ...], dict[str, Any], GrpcContext | None]:
    payload, deserializer = data.payload, data.deserializer
    if isinstance(deserializer, str):
        deserializer = _deserializer(deserializer)
    message = payload if deserializer is None else deserializer(payload)
    if _takes_context(method):
        context = GrpcContext(data.metadata)
        return (message,), {"grpc_context": context}, context
    return (message,), {}, None


def serialized(value: Any) -> Any:
    """A protobuf message as its bytes; bytes as they are; anything else unchanged
    (a built-in service's method may return plain values)."""
    serialize = getattr(value, "SerializeToString", None)
    if serialize is not None:
        return serialize()
    return value


def check_message(value: Any, method: str, from_user_service: bool) -> Any:
    if from_user_service and not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(_NOT_A_MESSAGE.format(method=method, kind=type(value).__name__))
    return value


def _log_failure(replica: Replica, name: str) -> None:
    """The traceback stays here: the client gets only ``Type: message`` (as over HTTP)."""
    logger.exception(
        "gRPC call %s of deployment '%s' failed (request %s)",
        name, replica.spec.deployment, request_context.get().request_id,
    )  # fmt: skip


async def invoke(replica: Replica, name: str, data: GrpcRequestData) -> Any:
    """A unary call: the method's response, serialized (a GrpcReply if it set a status)."""
    try:
        return await _invoke(replica, name, data)
    except Exception:
        _log_failure(replica, name)
        raise


async def _invoke(replica: Replica, name: str, data: GrpcRequestData) -> Any:
    method, kind = replica.resolve(name)
    if kind in GENERATORS:
        raise TypeError(
            f"method '{name}' is a generator: declare the RPC as server-streaming "
            "(`returns (stream ...)`) in the service's .proto"
        )
    args, kwargs, context = _arguments(method, data)
    result = await replica.call(method, kind, args, kwargs)
    value = check_message(serialized(result), name, data.deserializer is not None)
    return out_of_band(value) if context is None else context.status(value)


async def stream(replica: Replica, name: str, data: GrpcRequestData) -> AsyncIterator[Message]:
    """A server-streaming call: each item serialized, then (if the method set a status
    or trailing metadata) a GrpcReply with no value, then StreamEnd. Raises on failure."""
    method, kind = replica.resolve(name)
    args, kwargs, context = _arguments(method, data)
    user_service = data.deserializer is not None
    try:
        async for item in replica.iterate(method, kind, args, kwargs):
            yield StreamItem(out_of_band(check_message(serialized(item), name, user_service)))
    except Exception:
        _log_failure(replica, name)
        raise
    if context is not None:
        status = context.status(None)
        if status is not None:
            yield StreamItem(status)
    yield StreamEnd()
