"""The methods an OIP model's replica serves gRPC with: ``ModelInfer``, ``ModelMetadata``,
``ModelReady`` (named like the RPCs, as a gRPC ingress's methods are).

``@oip.model`` adds them to the class. The proxy's ``GRPCInferenceService``
(``grpc_service.py``) forwards each call's serialized request as it came (bytes, or a
view of the replica's receive buffer for a large one) and relays the serialized response
these return; an ``InferenceError`` becomes the call's status (INVALID_ARGUMENT, NOT_FOUND,
UNIMPLEMENTED) with its message as details.
"""

from __future__ import annotations

from typing import Any

from shoal._errors import InferenceError, ModelNotFoundError
from shoal._oip import grpc_codec, rest
from shoal._oip.model import ModelSpec, spec_of
from shoal._oip.protos import grpc_predict_v2_pb2 as pb

#: gRPC status codes (grpc.StatusCode's numbers) of the protocol's HTTP statuses.
STATUS_CODES = {400: 3, 404: 5, 405: 12, 501: 12}
_INTERNAL = 13


def status_code(exc: InferenceError) -> int:
    return STATUS_CODES.get(exc.status, _INTERNAL)


def _failed(grpc_context: Any, exc: InferenceError) -> bytes:
    if grpc_context is None:
        raise exc
    grpc_context.set_code(status_code(exc))
    grpc_context.set_details(str(exc))
    return b""


def _version(spec: ModelSpec, name: str, version: str) -> str:
    if name != spec.name:
        raise ModelNotFoundError(f"Request for unknown model: '{name}' is not found")
    return rest.check_version(spec, version)


async def model_infer_async(self: Any, payload: Any, grpc_context: Any = None) -> bytes:
    """``ModelInfer`` of a model whose method is async."""
    spec = spec_of(self)
    try:
        request, raws = grpc_codec.parse_request(payload)
        version = _version(spec, request.model_name, request.model_version)
        call = grpc_codec.decode(spec, version, request, raws)
        outputs = await getattr(self, spec.method)(call.inputs, **rest.extras(spec, call))
        return grpc_codec.encode(spec, call, outputs)
    except InferenceError as exc:
        return _failed(grpc_context, exc)


def model_infer_sync(self: Any, payload: Any, grpc_context: Any = None) -> bytes:
    """``ModelInfer`` of a model whose method is sync (run in the replica's threads)."""
    spec = spec_of(self)
    try:
        request, raws = grpc_codec.parse_request(payload)
        version = _version(spec, request.model_name, request.model_version)
        call = grpc_codec.decode(spec, version, request, raws)
        outputs = getattr(self, spec.method)(call.inputs, **rest.extras(spec, call))
        return grpc_codec.encode(spec, call, outputs)
    except InferenceError as exc:
        return _failed(grpc_context, exc)


async def model_metadata(self: Any, payload: Any, grpc_context: Any = None) -> bytes:
    """``ModelMetadata``: the model's name, versions, platform and tensors."""
    spec = spec_of(self)
    try:
        request = pb.ModelMetadataRequest.FromString(bytes(payload))
        version = _version(spec, request.name, request.version)
    except InferenceError as exc:
        return _failed(grpc_context, exc)
    versions = list(spec.versions)
    if version and version not in versions:
        versions.append(version)  # multiplexed: served on demand
    response = pb.ModelMetadataResponse(name=spec.name, versions=versions, platform=spec.platform)
    for tensor in spec.inputs:
        response.inputs.add(**tensor.metadata())
    for tensor in spec.outputs:
        response.outputs.add(**tensor.metadata())
    return bytes(response.SerializeToString())


async def model_ready(self: Any, payload: Any, grpc_context: Any = None) -> bytes:
    """``ModelReady``: true (a replica that answers is ready)."""
    spec = spec_of(self)
    try:
        request = pb.ModelReadyRequest.FromString(bytes(payload))
        _version(spec, request.name, request.version)
    except InferenceError as exc:
        return _failed(grpc_context, exc)
    return bytes(pb.ModelReadyResponse(ready=True).SerializeToString())
