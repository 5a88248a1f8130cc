"""``from shoal.serve.generated.serve_pb2_grpc import RayServeAPIServiceStub``: Ray's stub."""

from shoal._proxy.protos.serve_pb2_grpc import RayServeAPIServiceStub

__all__ = ["RayServeAPIServiceStub"]
