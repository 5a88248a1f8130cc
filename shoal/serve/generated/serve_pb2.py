"""``from shoal.serve.generated.serve_pb2 import HealthzRequest``: Ray's messages."""

from shoal._proxy.protos.serve_pb2 import (
    HealthzRequest,
    HealthzResponse,
    ListApplicationsRequest,
    ListApplicationsResponse,
)

__all__ = [
    "HealthzRequest",
    "HealthzResponse",
    "ListApplicationsRequest",
    "ListApplicationsResponse",
]
