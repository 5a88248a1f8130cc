"""The REST side of an OIP model: its replica's ``__call__``.

``serve_async`` / ``serve_sync`` (chosen by ``@oip.model`` after the model's method)
parse the path below ``/v2/models/{name}``, then answer the model's metadata, its
readiness, or an inference request, decoded and encoded by ``shoal._oip.codec``. Errors
are the protocol's: a status and ``{"error": "..."}``. Exceptions other than
``InferenceError`` propagate: the replica logs them and answers 500, as for any ingress.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from shoal._api.context import request_context
from shoal._errors import InferenceError, MethodNotAllowedError, ModelNotFoundError
from shoal._oip import codec
from shoal._oip.model import MODELS_PREFIX, ModelSpec, spec_of

_JSON = b"application/json"
_BINARY = b"application/octet-stream"
_HEADER_LENGTH = codec.HEADER_LENGTH.encode()
_ACTIONS = {"": "GET", "ready": "GET", "infer": "POST"}


async def serve_async(self: Any, request: Request) -> Response:
    """An OIP model's ``__call__`` when its method is async."""
    spec = spec_of(self)
    try:
        action, version = route(spec, request.scope)
        if action != "infer":
            return _describe(spec, action, version)
        body = _body_now(request)
        if body is None:
            body = await request.body()
        call = codec.decode(spec, version, request.scope["headers"], body)
        method = getattr(self, spec.method)
        outputs = await method(call.inputs, **extras(spec, call))
        return _encoded(spec, call, outputs)
    except InferenceError as exc:
        return error_response(exc)


def serve_sync(self: Any, request: Request) -> Response:
    """An OIP model's ``__call__`` when its method is sync (run in the replica's threads)."""
    spec = spec_of(self)
    try:
        action, version = route(spec, request.scope)
        if action != "infer":
            return _describe(spec, action, version)
        body = _body_now(request)
        if body is None:
            raise RuntimeError("the request body is not in memory: make the model async")
        call = codec.decode(spec, version, request.scope["headers"], body)
        outputs = getattr(self, spec.method)(call.inputs, **extras(spec, call))
        return _encoded(spec, call, outputs)
    except InferenceError as exc:
        return error_response(exc)


def route(spec: ModelSpec, scope: Mapping[str, Any]) -> tuple[str, str]:
    """``(action, version)`` of a request's path: action "" (metadata), "ready" or "infer".

    The path is read below ``/v2/models/{name}`` (or below the application's route
    prefix, when the model is served elsewhere).
    """
    path: str = scope["path"]
    if path.startswith(MODELS_PREFIX):
        name, _, tail = path[len(MODELS_PREFIX) :].partition("/")
        if name != spec.name:
            raise ModelNotFoundError(f"Request for unknown model: '{name}' is not found")
    else:
        tail = path[len(scope.get("root_path", "")) :].strip("/")
    parts = tail.split("/") if tail else []
    version = ""
    if parts and parts[0] == "versions":
        if len(parts) < 2 or not parts[1]:
            raise ModelNotFoundError(f"a path under /versions needs a version: {path}")
        version = parts[1]
        parts = parts[2:]
    if len(parts) > 1 or (parts and parts[0] not in _ACTIONS):
        raise ModelNotFoundError(
            f"no such path: {path}. A model serves GET {MODELS_PREFIX}{{name}}[/versions/{{v}}]"
            " (metadata), GET .../ready and POST .../infer"
        )
    action = parts[0] if parts else ""
    if scope["method"] != _ACTIONS[action] and not (
        scope["method"] == "HEAD" and _ACTIONS[action] == "GET"
    ):
        allow = _ACTIONS[action]
        raise MethodNotAllowedError(f"{scope['method']} {path} is not allowed; use {allow}", allow)
    return action, check_version(spec, version)


def check_version(spec: ModelSpec, version: str) -> str:
    if not version:
        return spec.default_version
    if version in spec.versions or spec.multiplexed:
        return version
    served = ", ".join(spec.versions) or "none"
    raise ModelNotFoundError(
        f"Request for unknown model: '{spec.name}' version {version} is not found "
        f"(versions served: {served})"
    )


def _describe(spec: ModelSpec, action: str, version: str) -> Response:
    if action == "ready":
        return _json({"name": spec.name, "ready": True})
    metadata = spec.metadata()
    if version and version not in spec.versions:
        metadata["versions"] = [*spec.versions, version]  # multiplexed: served on demand
    return _json(metadata)


def extras(spec: ModelSpec, call: codec.Call) -> dict[str, Any]:
    """The keyword arguments the model's method takes, and the request context's model id."""
    if spec.multiplexed and call.version:
        context = request_context.get()
        if context.multiplexed_model_id != call.version:
            request_context.set(dataclasses.replace(context, multiplexed_model_id=call.version))
    if not spec.extras:
        return {}
    given: dict[str, Any] = {}
    if "parameters" in spec.extras:
        given["parameters"] = call.parameters
    if "version" in spec.extras:
        given["version"] = call.version
    return given


class Reply(Response):
    """A complete response built without Starlette's header processing (the replica reads
    ``status_code``, ``raw_headers`` and ``body``)."""

    def __init__(
        self, body: bytes, status: int = 200, content_type: bytes = _JSON,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        self.status_code = status
        self.body = body
        self.background = None
        self.raw_headers = [
            (b"content-type", content_type), (b"content-length", b"%d" % len(body)), *extra
        ]  # fmt: skip


def _encoded(spec: ModelSpec, call: codec.Call, outputs: Any) -> Response:
    header, binary = codec.encode(spec, call, outputs)
    if not binary:
        return Reply(header)
    length = ((_HEADER_LENGTH, b"%d" % len(header)),)
    return Reply(b"".join([header, *binary]), 200, _BINARY, length)


def _json(value: Any, status: int = 200) -> Response:
    return Reply(codec.dump_json(value), status)


def error_response(exc: InferenceError) -> Response:
    """The protocol's error answer: the error's status and ``{"error": message}``."""
    allow = exc.allow.encode() if isinstance(exc, MethodNotAllowedError) else b""
    extra = ((b"allow", allow),) if allow else ()
    return Reply(codec.dump_json({"error": str(exc)}), exc.status, _JSON, extra)


def _body_now(request: Request) -> bytes | None:
    """The body of a replica's request, whose body is already in memory: shoal's ``receive``
    never suspends, so it completes at once (also from a sync method). None otherwise."""
    coroutine: Any = request.receive()
    if not inspect.iscoroutine(coroutine):
        return None
    try:
        coroutine.send(None)
    except StopIteration as done:
        message = done.value
        if message.get("more_body", False):
            return None
        body: bytes = message.get("body", b"")
        return body
    coroutine.close()
    return None
