"""``inference.GRPCInferenceService`` on the proxy's gRPC server (a built-in service).

Listed in ``grpc_options.grpc_servicer_functions`` as
``"shoal.oip:add_inference_service"``; the gRPC ingress
(``shoal/_proxy``'s gRPC server, docs/grpc.md) calls it with its ``ingress`` and the
``grpc.aio`` server. The server-level RPCs (ServerLive, ServerReady, ServerMetadata) are
answered here; the model RPCs are routed by the request's model name (and version) to the
application served at ``/v2/models/{name}[/versions/{v}]``, whose replica answers with
the methods of ``grpc_methods.py``. Requests and responses travel serialized: the proxy
reads only the model name, never the tensors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from shoal._oip import grpc_codec
from shoal._oip.protos import grpc_predict_v2_pb2 as pb
from shoal._oip.server import EXTENSIONS, MODELS_PREFIX, REPOSITORY_REFUSED, SERVER_NAME

SERVICE = "inference.GRPCInferenceService"
REPOSITORY_METHODS = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")


def add_inference_service(ingress: Any, server: Any) -> None:
    """Register the service on ``server``; calls are forwarded through ``ingress``."""
    import grpc

    def unary(handler: Callable[[bytes, Any], Awaitable[bytes]]) -> Any:
        return grpc.unary_unary_rpc_method_handler(handler)  # bytes in, bytes out

    service = _Service(ingress)
    handlers = {
        "ServerLive": unary(service.server_live),
        "ServerReady": unary(service.server_ready),
        "ServerMetadata": unary(service.server_metadata),
        "ModelReady": unary(service.model_ready),
        "ModelMetadata": unary(service.model_metadata),
        "ModelInfer": unary(service.model_infer),
        # Triton's model repository extension: refused with a message naming it.
        **{name: unary(service.repository) for name in REPOSITORY_METHODS},
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


add_inference_service.__shoal_grpc_builtin__ = True  # type: ignore[attr-defined]


class _Service:
    def __init__(self, ingress: Any) -> None:
        self.ingress = ingress

    async def server_live(self, payload: bytes, context: Any) -> bytes:
        return bytes(pb.ServerLiveResponse(live=True).SerializeToString())

    async def server_ready(self, payload: bytes, context: Any) -> bytes:
        ready = self.ingress.unready_reason() is None
        return bytes(pb.ServerReadyResponse(ready=ready).SerializeToString())

    async def server_metadata(self, payload: bytes, context: Any) -> bytes:
        from shoal import __version__

        response = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )
        return bytes(response.SerializeToString())

    async def model_ready(self, payload: bytes, context: Any) -> bytes:
        request = pb.ModelReadyRequest.FromString(payload)
        return await self._forward("ModelReady", request.name, request.version, payload, context)

    async def model_metadata(self, payload: bytes, context: Any) -> bytes:
        request = pb.ModelMetadataRequest.FromString(payload)
        return await self._forward("ModelMetadata", request.name, request.version, payload, context)

    async def model_infer(self, payload: bytes, context: Any) -> bytes:
        name, version = grpc_codec.peek_model(payload)
        return await self._forward("ModelInfer", name, version, payload, context)

    async def repository(self, payload: bytes, context: Any) -> bytes:
        import grpc

        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_REFUSED)
        return b""  # not reached: abort raises

    async def _forward(
        self, method: str, name: str, version: str, payload: bytes, context: Any
    ) -> bytes:
        app = model_application(self.ingress.routes(), name, version)
        if app is None:
            import grpc

            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
            )
        reply = await self.ingress.unary(app, method, payload, context)
        return reply if isinstance(reply, bytes) else bytes(reply)


def model_application(routes: dict[str, tuple[str, str]], name: str, version: str) -> str | None:
    """The application serving model ``name`` (its version ``version``, if one serves it
    alone), from the proxy's route table (prefix -> (application, ingress))."""
    if version:
        route = routes.get(f"{MODELS_PREFIX}{name}/versions/{version}")
        if route is not None:
            return route[0]
    route = routes.get(MODELS_PREFIX + name)
    return None if route is None else route[0]
