"""Turning HTTP payloads into a Starlette ``Request`` and return values into responses.

Return values map to responses as in Ray Serve: a Starlette ``Response`` is
sent as is; ``str`` becomes text/plain; ``bytes`` application/octet-stream;
anything else strict JSON through :mod:`shoal._json` (the table in docs/http.md),
or an error naming the field that cannot be sent (the replica answers 500).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import typing
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shoal._json import dumps as dump_json
from shoal._transport.http import HttpRequestData, HttpResponseData, HttpResponseStart

logger = logging.getLogger("shoal.replica")

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_BYTES = [(b"content-type", b"application/octet-stream")]


def build_request(data: HttpRequestData) -> Request:
    """A Starlette request whose body is already in memory."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": data.body, "more_body": False}

    return Request(data.scope(), receive)


def request_arguments(method: Any, request: Request) -> tuple[Any, ...]:
    """What an HTTP call passes ``method``: nothing if it takes no parameters (as Ray
    Serve, which inspects the signature), else the Starlette ``Request``."""
    function = getattr(method, "__func__", None)
    if function is not None:  # a bound method: its signature minus ``self``
        return (request,) if _parameter_count(function) > 1 else ()
    try:
        takes_none = _parameter_count(method) == 0
    except TypeError:  # unhashable callable object: not cached
        takes_none = _parameter_count.__wrapped__(method) == 0
    return () if takes_none else (request,)


@functools.lru_cache(maxsize=1024)
def _parameter_count(function: Any) -> int:
    try:
        return len(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # no signature (some builtins): pass the request
        return 1


async def to_response(result: Any) -> HttpResponseData:
    """Convert what an ingress returned into a complete HTTP response."""
    if isinstance(result, Response):  # streaming responses never get here: see is_streaming
        return HttpResponseData(result.status_code, result.raw_headers, bytes(result.body))
    if isinstance(result, str):
        return HttpResponseData(200, _with_length(_TEXT, result.encode()), result.encode())
    if isinstance(result, bytes | bytearray | memoryview):
        body = bytes(result)
        return HttpResponseData(200, _with_length(_BYTES, body), body)
    try:
        body = dump_json(result)
    except (TypeError, ValueError) as exc:
        if not hasattr(exc, "json_path"):
            raise  # not a refusal (a pydantic serializer raised...): logged with its traceback
        from shoal._api.context import replica_context, request_context

        # One line, no traceback: it would only show shoal's encoder.
        replica = replica_context.get()
        logger.error(
            "request %s to deployment '%s' failed: %s",
            request_context.get().request_id,
            replica.deployment if replica is not None else "?",
            exc,
        )
        return error_response(500, "Internal Server Error")
    return HttpResponseData(200, _with_length(_JSON, body), body)


def _with_length(headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"content-length", str(len(body)).encode())]


def is_streaming(result: Any) -> bool:
    """True for responses whose body is produced over time (StreamingResponse, FileResponse)."""
    return isinstance(result, Response) and (
        isinstance(result, StreamingResponse) or not hasattr(result, "body")
    )


async def chunks_from_items(items: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """A generator endpoint's items as a response: str and bytes as is, others as JSON lines.

    The content type follows the first item, so headers are sent with it.
    """
    started = False
    async for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            body, content_type = bytes(item), _BYTES
        elif isinstance(item, str):
            body, content_type = item.encode(), _TEXT
        else:
            body, content_type = (
                dump_json(item) + b"\n",
                [(b"content-type", b"application/x-ndjson")],
            )
        if not started:
            started = True
            yield HttpResponseStart(200, list(content_type))
        yield body
    if not started:
        yield HttpResponseStart(200, list(_TEXT))


def error_response(status: int, message: str) -> HttpResponseData:
    body = message.encode()
    return HttpResponseData(status, _with_length(_TEXT, body), body)


_MISMATCH = (TypeError, KeyError, AttributeError)


def note_input_mismatch(method: Any, argument: Any, exc: BaseException) -> None:
    """Add a note to ``exc`` when it shows ``method`` got a Request where it expected data
    (called over HTTP) or data where it expected a Request (called through a handle).

    Only called on the error path; the note is shown in the replica's log and travels
    with the exception to a handle's caller.
    """
    if not isinstance(exc, _MISMATCH) or method is None or _raised_by_shoal(exc):
        return
    expects = _expects_request(method)
    name = getattr(method, "__name__", "this method")
    if isinstance(argument, Request):
        if expects is False or (expects is None and _raised_by(argument, exc)):
            exc.add_note(
                f"'{name}' was called over HTTP, so it received a starlette Request, not the "
                "request's data: read the body with `await request.json()`, or call it "
                "through a handle with a dict"
            )
    elif expects or (
        isinstance(exc, AttributeError) and exc.obj is argument and hasattr(Request, exc.name or "")
    ):
        exc.add_note(
            f"'{name}' reads a starlette Request, but it was called through a handle with "
            f"a {type(argument).__name__}: give it the data itself (for example a dict "
            "parameter), or call it over HTTP"
        )


def _expects_request(method: Any) -> bool | None:
    """What the first parameter's annotation says: a Request (True), other data (False), or
    nothing (None: unannotated, ``Any`` or ``object``)."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        return None
    annotation = parameters[0].annotation if parameters else inspect.Parameter.empty
    if isinstance(annotation, str):  # from __future__ import annotations
        if annotation in ("Any", "typing.Any", "object"):
            return None
        return re.search(r"\bRequest\b", annotation) is not None
    if annotation in (inspect.Parameter.empty, Any, object):
        return None
    candidates = typing.get_args(annotation) or (annotation,)  # Request | None
    return any(isinstance(each, type) and issubclass(each, Request) for each in candidates)


def _innermost_frame(exc: BaseException) -> Any:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return None if tb is None else tb.tb_frame


def _raised_by(argument: Any, exc: BaseException) -> bool:
    """The argument raised it itself: ``request["x"]`` (Starlette's Request is a Mapping
    over the ASGI scope) or a missing attribute."""
    if isinstance(exc, AttributeError) and exc.obj is argument:
        return True
    frame = _innermost_frame(exc)
    return frame is not None and frame.f_locals.get("self") is argument


def _raised_by_shoal(exc: BaseException) -> bool:
    """Shoal's own errors (a return value JSON cannot hold, a wrong call mode) are not hints."""
    frame = _innermost_frame(exc)
    module = "" if frame is None else str(frame.f_globals.get("__name__", ""))
    return module == "shoal" or module.startswith("shoal.")
