"""Turning HTTP payloads into a Starlette ``Request`` and return values into responses.

Return values map to responses as in Ray Serve: a Starlette ``Response`` is
sent as is; ``str`` becomes text/plain; ``bytes`` application/octet-stream;
anything else JSON (numpy arrays and scalars, pydantic models and dataclasses
included).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

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


async def to_response(result: Any) -> HttpResponseData:
    """Convert what an ingress returned into a complete HTTP response."""
    if isinstance(result, Response):  # streaming responses never get here: see is_streaming
        return HttpResponseData(result.status_code, result.raw_headers, bytes(result.body))
    if isinstance(result, str):
        return HttpResponseData(200, _with_length(_TEXT, result.encode()), result.encode())
    if isinstance(result, bytes | bytearray | memoryview):
        body = bytes(result)
        return HttpResponseData(200, _with_length(_BYTES, body), body)
    body = dump_json(result)
    return HttpResponseData(200, _with_length(_JSON, body), body)


def _with_length(headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
    return [*headers, (b"content-length", str(len(body)).encode())]


def dump_json(value: Any) -> bytes:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))
    return text.encode()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy array or scalar
        return value.tolist()
    from fastapi.encoders import jsonable_encoder  # lazily: only for unusual return types

    custom: dict[Any, Any] = {type(None): lambda _: None}
    try:
        import numpy

        custom.update({numpy.ndarray: lambda a: a.tolist(), numpy.generic: lambda a: a.item()})
    except ImportError:
        pass
    return jsonable_encoder(value, custom_encoder=custom)


def is_streaming(result: Any) -> bool:
    """True for responses whose body is produced over time (StreamingResponse, FileResponse)."""
    return isinstance(result, Response) and (
        isinstance(result, StreamingResponse) or not hasattr(result, "body")
    )


async def chunks_from_items(items: AsyncIterator[Any]) -> AsyncIterator[Any]:
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
