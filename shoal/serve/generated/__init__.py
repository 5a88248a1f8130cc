"""Ray Serve's ``ray.serve.generated``: the protobuf modules of its gRPC API service
(``RayServeAPIService``: ``ListApplications``, ``Healthz``; docs/grpc.md)."""
