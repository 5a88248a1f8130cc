"""Serving one HTTP request (not a websocket) in a replica: the user's method, or the
ingress ASGI app, and what its response becomes.

Imported by the replica with its first HTTP request (it imports Starlette). Guarantees:
- a complete response is one Result, made without a stream (and the ASGI app's
  response generator is closed at once, not by a task once it is collected);
- a streamed response (StreamingResponse, a generator method, an ASGI app sending its
  body in parts) is its start, then its chunks as they come, then StreamEnd;
- a failure before anything was sent becomes a 500 response (504 for a
  RequestTimeoutError: a handle call it made reached its deadline); after the start, a
  Failure (the proxy then closes the connection: the response is incomplete). Either
  way it is logged and counted as the replica's failure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from shoal._api.context import request_context
from shoal._errors import RequestTimeoutError
from shoal._observe import tracing
from shoal._replica import http
from shoal._replica.asgi import asgi_parts, request_scope
from shoal._replica.kinds import ASGI, ASYNC, DONE, GENERATORS
from shoal._replica.replica import Replica
from shoal._transport.failures import failure_from
from shoal._transport.http import HttpRequestData, HttpResponseData
from shoal._transport.messages import Message, Request, Result, StreamEnd, StreamItem

logger = logging.getLogger("shoal.replica")


async def reply(replica: Replica, request: Request) -> Result | AsyncGenerator[Message, None]:
    """Serve ``request``: a Result (a complete response), or the messages of a streamed
    one. Raises NotFoundError if no method serves it. Runs in the request's task."""
    data: HttpRequestData = request.args[0]
    method, kind = replica.http_target(request)
    argument: Any = None
    try:
        parts: AsyncGenerator[Any, None]
        if kind is ASGI:
            parts = asgi_parts(method, request_scope(data, replica.asgi_state()), data.body)
        elif kind in GENERATORS:
            argument = http.build_request(data)
            args = http.request_arguments(method, argument)
            parts = http.chunks_from_items(replica.iterate(method, kind, args, {}))
        else:
            argument = http.build_request(data)
            args = http.request_arguments(method, argument)
            result = await (method(*args) if kind is ASYNC else replica.in_thread(method, *args))
            if not http.is_streaming(result):
                return Result(await http.to_response(result))
            parts = asgi_parts(result, data.scope(), b"")
        first = await anext(parts, DONE)
        if type(first) is HttpResponseData:
            await parts.aclose()  # now, rather than by a task once it is collected
            return Result(first)
    except Exception as exc:
        return Result(_failed(replica, method, kind, argument, data, exc))
    return _streamed(replica, method, kind, argument, data, first, parts)


async def _streamed(
    replica: Replica, method: Any, kind: str, argument: Any, data: HttpRequestData, first: Any,
    parts: AsyncGenerator[Any, None],
) -> AsyncGenerator[Message, None]:  # fmt: skip
    """A streamed response's messages, from its ``first`` part (``DONE``: none)."""
    try:
        if first is not DONE:
            yield StreamItem(first)
        async for part in parts:
            yield StreamItem(part)
        yield StreamEnd()
    except Exception as exc:
        yield _failed(replica, method, kind, argument, data, exc, started=True)
    finally:
        await parts.aclose()


def _failed(
    replica: Replica, method: Any, kind: str, argument: Any, data: HttpRequestData,
    exc: Exception, started: bool = False,
) -> Any:  # fmt: skip
    """Log and count the failure of an HTTP request; returns what the caller gets: a
    Failure once the response started, else a 500 (504) response."""
    http.note_input_mismatch(method if kind is not ASGI else None, argument, exc)
    if tracing.on:
        tracing.fail_current(exc)  # the request's span: a 500 is a failure
    replica.record_failure(data.root_path or "/", exc)
    logger.exception(
        "request %s to deployment '%s' failed",
        request_context.get().request_id,
        replica.spec.deployment,
    )
    if started:
        return failure_from(exc)
    if isinstance(exc, RequestTimeoutError):  # a call it made reached its deadline
        return http.error_response(504, "Gateway Timeout")
    return http.error_response(500, "Internal Server Error")
