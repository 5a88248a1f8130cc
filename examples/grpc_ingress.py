"""gRPC ingress: a user's protobuf service served by two applications, as in Ray Serve.

The service is ``examples/protos/greeter.proto`` (``SayHello``, unary, and
``SayHelloMany``, server streaming); its generated modules sit next to it
(``python scripts/protos.py`` regenerates them). ``serve.start(grpc_options=...)``
lists the generated ``add_GreeterServicer_to_server`` function; each application's
ingress has methods named like the RPCs, receives the request message and returns (or
yields) reply messages. A client picks the application with the ``application``
metadata. Guide: docs/grpc.md. Run it (HTTP on 127.0.0.1:8000, gRPC on 9000; calls
both applications, streams, lists the applications, shows an error's status code,
shuts down)::

    python -m examples.grpc_ingress [--port 8000] [--grpc-port 9000]
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from examples.protos.greeter_pb2 import HelloReply, HelloRequest
from examples.protos.greeter_pb2_grpc import GreeterStub
from shoal import serve
from shoal.serve.generated.serve_pb2 import HealthzRequest, ListApplicationsRequest
from shoal.serve.generated.serve_pb2_grpc import RayServeAPIServiceStub

SERVICER = "examples.protos.greeter_pb2_grpc.add_GreeterServicer_to_server"


@serve.deployment
class English:
    def SayHello(self, request: HelloRequest) -> HelloReply:  # the RPC's name
        if not request.name:
            raise ValueError("a name is required")
        return HelloReply(message=f"Hello, {request.name}!")

    def SayHelloMany(self, request: HelloRequest) -> Iterator[HelloReply]:  # streaming
        for index in range(request.times):
            yield HelloReply(message=f"Hello #{index + 1}, {request.name}!")


@serve.deployment
class French:
    async def SayHello(self, request: HelloRequest) -> HelloReply:
        return HelloReply(message=f"Bonjour, {request.name} !")


english = English.bind()
french = French.bind()


def call(port: int) -> None:
    """What a client does: a channel, a stub, and the ``application`` metadata."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = GreeterStub(channel)
        for app in ("english", "french"):
            reply, call = stub.SayHello.with_call(
                HelloRequest(name="Ada"), metadata=(("application", app), ("request_id", app))
            )
            trailing = dict(call.trailing_metadata())
            print(f"{app}: {reply.message} (request_id {trailing['request_id']})")
        stream = stub.SayHelloMany(HelloRequest(name="Ada", times=3), metadata=(
            ("application", "english"),))  # fmt: skip
        print("stream:", " / ".join(reply.message for reply in stream))
        try:
            stub.SayHello(HelloRequest(), metadata=(("application", "english"),))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}")
        api = RayServeAPIServiceStub(channel)
        names = api.ListApplications(ListApplicationsRequest()).application_names
        print(f"applications: {sorted(names)}; healthz: {api.Healthz(HealthzRequest()).message}")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A gRPC service served by shoal.")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--grpc-port", type=int, default=9000)
    args = parser.parse_args()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port},
            grpc_options={"port": args.grpc_port, "grpc_servicer_functions": [SERVICER]},
        )
        serve.run(english, name="english", route_prefix=None)  # gRPC needs no route
        serve.run(french, name="french", route_prefix=None)
        call(args.grpc_port)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
