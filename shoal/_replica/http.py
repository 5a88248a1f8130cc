"""Turning HTTP payloads into a Starlette ``Request`` and return values into responses.

Return values map to responses as in Ray Serve: a Starlette ``Response`` is
sent as is; ``str`` becomes text/plain; ``bytes`` application/octet-stream;
anything else JSON (numpy arrays and scalars, pydantic models and dataclasses
included).
"""

from __future__ import annotations

import json
import logging
from collections.abc import MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from shoal._transport.http import HttpRequestData, HttpResponseData

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
    if isinstance(result, Response):
        if isinstance(result, StreamingResponse) or not hasattr(result, "body"):
            return await _run_asgi_response(result)
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


async def _run_asgi_response(response: Response) -> HttpResponseData:
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    await response(scope, receive, send)
    return HttpResponseData(status, headers, b"".join(chunks))


def error_response(status: int, message: str) -> HttpResponseData:
    body = message.encode()
    return HttpResponseData(status, _with_length(_TEXT, body), body)
