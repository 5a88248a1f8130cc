"""The gRPC proxy (docs/grpc.md), called with a real ``grpcio`` client.

One multi-process instance serves the module (the user's service of
``tests/protos/shoal_test.proto`` and Ray's RayServeAPIService); a ``shoal run`` of a
config file with ``grpc_options`` starts alongside the module's first tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import free_port, start_early, wait_until

from shoal import serve
from shoal._config import AdminOptions, HTTPOptions, gRPCOptions
from shoal._errors import ConfigError
from shoal._instance.instance import Instance
from shoal.serve.generated import serve_pb2, serve_pb2_grpc
from tests.protos import shoal_test_pb2 as pb
from tests.protos import shoal_test_pb2_grpc as pb_grpc

SERVICER = "tests.protos.shoal_test_pb2_grpc.add_GreeterServicer_to_server"
REQUEST_TIMEOUT_S = 2.5  # the module instance's grpc_options.request_timeout_s
ROOT = Path(__file__).resolve().parent.parent


@serve.deployment
class Alpha:
    """Every kind of method the service declares."""

    def __call__(self, request: pb.GreetRequest) -> pb.GreetReply:
        return pb.GreetReply(greeting=f"alpha call {request.name}")

    async def Greet(self, request: pb.GreetRequest) -> pb.GreetReply:
        context = serve.get_request_context()
        remaining = context.remaining_s
        facts = f"{context.request_id}|{context.multiplexed_model_id}|{context.priority}"
        if remaining is not None:
            facts += f"|{remaining:.1f}"
        return pb.GreetReply(greeting=f"alpha {request.name} {facts}", index=request.count)

    def GreetMany(self, request: pb.GreetRequest) -> Iterator[pb.GreetReply]:
        for index in range(request.count):
            yield pb.GreetReply(greeting=f"{request.name} #{index}", index=index)

    def Fail(self, request: pb.GreetRequest, grpc_context: Any) -> pb.GreetReply:
        if request.name == "status":  # a status of the user's choice, as Ray's grpc_context
            grpc_context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            grpc_context.set_details("not you")
            grpc_context.set_trailing_metadata([("reason", "test")])
            return pb.GreetReply()
        if request.name == "wrong type":
            return {"not": "a message"}  # type: ignore[return-value]
        raise ValueError(f"cannot greet {request.name}")

    async def Slow(self, request: pb.GreetRequest) -> pb.GreetReply:
        if request.name:  # a file to create once the call runs
            Path(request.name).touch()
        await asyncio.sleep(request.count / 1000)
        return pb.GreetReply(greeting="slow", index=request.count)


@serve.deployment
class Beta:
    async def Greet(self, request: pb.GreetRequest) -> pb.GreetReply:
        return pb.GreetReply(greeting=f"beta {request.name}")


class Served:
    """A multi-process instance serving gRPC, its applications deployed through its
    controller (next to the session's instance, which serves no gRPC)."""

    def __init__(self) -> None:
        options = gRPCOptions(
            port=0, grpc_servicer_functions=[SERVICER], request_timeout_s=REQUEST_TIMEOUT_S
        )
        self.instance = Instance(
            "process", HTTPOptions(host="127.0.0.1", port=free_port()),
            admin=AdminOptions(enabled=False), grpc=options,
        )  # fmt: skip
        assert self.instance.grpc is not None and self.instance.grpc.port != 0
        self.port = self.instance.grpc.port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.GreeterStub(self.channel)
        self.api = serve_pb2_grpc.RayServeAPIServiceStub(self.channel)
        self.stopped = False

    def run(self, *apps: tuple[Any, str, str | None]) -> None:
        from shoal._api.graph import build_app

        registry, controller = self.instance.registry, self.instance.controller
        specs = [build_app(app, name, prefix, registry) for app, name, prefix in apps]

        async def deploy() -> None:
            await asyncio.gather(*(controller.deploy(spec) for spec in specs))

        self.instance.run(deploy())

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.instance.stop()

    def close(self) -> None:
        self.channel.close()
        self.stop()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    try:
        served.run((Alpha.bind(), "alpha", "/alpha"), (Beta.bind(), "beta", None))
        yield served
    finally:
        served.close()


def to(app: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return (("application", app), *extra.items())


def failure(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# --- a config file served by `shoal run` (started early, checked last) ---------------------

CONFIG = """
grpc_options:
  port: {port}
  grpc_servicer_functions:
    - {servicer}
applications:
  - name: only
    route_prefix: null
    import_path: test_grpc:beta_app
"""

beta_app = Beta.bind()


@pytest.fixture(scope="module")
def shoal_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    port = free_port()
    config = tmp_path_factory.mktemp("grpc") / "config.yaml"
    config.write_text(CONFIG.format(port=port, servicer=SERVICER))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal", "run", str(config), "--port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    yield process, port
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module", autouse=True)
def _shoal_run_first(request: pytest.FixtureRequest) -> None:
    start_early(request, "shoal_run")


# --- calls -----------------------------------------------------------------------------


def test_unary_calls_reach_the_application_named_by_the_metadata(served: Served) -> None:
    request = pb.GreetRequest(name="ann", count=7)
    reply, call = served.stub.Greet.with_call(
        request, metadata=to("alpha", request_id="rid-1", multiplexed_model_id="m-3")
    )
    assert reply.greeting.startswith("alpha ann rid-1|m-3|normal|") and reply.index == 7
    assert ("request_id", "rid-1") in tuple(call.trailing_metadata())
    # The call's deadline (the client's, or request_timeout_s if earlier) is the
    # request's: the replica sees what is left of it.
    reply = served.stub.Greet(request, metadata=to("alpha"), timeout=2)
    assert 1.0 <= float(reply.greeting.rsplit("|", 1)[1]) <= 2.0
    reply = served.stub.Greet(request, metadata=to("alpha"), timeout=60)
    assert 1.5 <= float(reply.greeting.rsplit("|", 1)[1]) <= REQUEST_TIMEOUT_S
    assert served.stub.Greet(request, metadata=to("beta")).greeting == "beta ann"
    # The method called is the RPC's name, __call__ included; no route prefix is needed.
    assert served.stub.__call__(request, metadata=to("alpha")).greeting == "alpha call ann"
    high = served.stub.Greet(request, metadata=to("alpha", **{"x-request-priority": "high"}))
    assert "|high|" in high.greeting


def test_the_application_must_be_named_when_several_run(served: Served) -> None:
    error = failure(lambda: served.stub.Greet(pb.GreetRequest(name="x")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details().startswith("Application metadata not set.")
    error = failure(lambda: served.stub.Greet(pb.GreetRequest(), metadata=to("gamma")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "Application 'gamma' not found" in error.details()
    assert "ListApplications" in error.details()


def test_server_streaming(served: Served) -> None:
    replies = list(served.stub.GreetMany(pb.GreetRequest(name="s", count=4), metadata=to("alpha")))
    assert [(r.greeting, r.index) for r in replies] == [(f"s #{i}", i) for i in range(4)]
    assert list(served.stub.GreetMany(pb.GreetRequest(count=0), metadata=to("alpha"))) == []


def test_errors_map_to_status_codes(served: Served) -> None:
    error = failure(lambda: served.stub.Fail(pb.GreetRequest(name="bob"), metadata=to("alpha")))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INTERNAL, "ValueError: cannot greet bob"
    )  # fmt: skip
    error = failure(lambda: served.stub.Greet(pb.GreetRequest(), metadata=to("beta", **{
        "x-request-priority": "urgent"})))  # fmt: skip
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = failure(lambda: served.stub.Missing(pb.GreetRequest(), metadata=to("alpha")))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Tried to call a method 'Missing' that does not exist" in error.details()
    error = failure(lambda: served.stub.Fail(pb.GreetRequest(name="wrong type"),
                                             metadata=to("alpha")))  # fmt: skip
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "returned a dict, not a protobuf message" in error.details()
    error = failure(lambda: served.stub.Collect(iter([pb.GreetRequest()]), metadata=to("alpha")))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "streams its requests" in error.details()


def test_a_method_sets_its_status_with_grpc_context(served: Served) -> None:
    call = served.stub.Fail.future(pb.GreetRequest(name="status"), metadata=to("alpha"))
    error = failure(call.result)
    assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, "not you")
    assert ("reason", "test") in tuple(call.trailing_metadata())


def test_a_call_past_its_deadline_is_deadline_exceeded(served: Served) -> None:
    started = time.monotonic()
    error = failure(lambda: served.stub.Slow(pb.GreetRequest(count=3000), metadata=to("alpha"),
                                             timeout=0.3))  # fmt: skip
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0
    # The replica was not left busy: the next call is answered at once.
    reply = served.stub.Slow(pb.GreetRequest(count=1), metadata=to("alpha"), timeout=5)
    assert reply.greeting == "slow"
    # Without a client deadline, grpc_options.request_timeout_s is the call's.
    started = time.monotonic()
    error = failure(lambda: served.stub.Slow(pb.GreetRequest(count=10_000), metadata=to("alpha")))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not finish by the request's deadline" in error.details()
    assert REQUEST_TIMEOUT_S <= time.monotonic() - started < REQUEST_TIMEOUT_S + 2


def test_large_messages_travel_both_ways(served: Served) -> None:
    """Past 64 KiB a request and a response travel out-of-band between the processes."""
    name = "n" * 300_000
    reply = served.stub.Greet(pb.GreetRequest(name=name, count=5), metadata=to("beta"))
    assert reply.greeting == f"beta {name}"
    replies = served.stub.GreetMany(pb.GreetRequest(name=name, count=2), metadata=to("alpha"))
    assert [r.greeting for r in replies] == [f"{name} #0", f"{name} #1"]


def test_list_applications_and_healthz(served: Served) -> None:
    listed = served.api.ListApplications(serve_pb2.ListApplicationsRequest())
    assert sorted(listed.application_names) == ["alpha", "beta"]
    assert served.api.Healthz(serve_pb2.HealthzRequest()).message == "success"


def test_the_proxy_is_replaced_and_serves_grpc_on_the_same_port(served: Served) -> None:
    controller = served.instance.controller
    old = controller.runtime.proxy_pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: controller.runtime.proxy_pid not in (None, old), 20, "a new proxy")

    def answered() -> bool:
        try:
            reply = served.stub.Greet(pb.GreetRequest(name="x"), metadata=to("beta"), timeout=5)
        except grpc.RpcError:
            return False
        return reply.greeting == "beta x"

    wait_until(answered, 20, "a gRPC answer from the new proxy")


# --- options ---------------------------------------------------------------------------


def test_a_bad_servicer_function_is_refused_naming_it() -> None:
    bad = "tests.protos.shoal_test_pb2_grpc.add_NoSuchServicer_to_server"
    with pytest.raises(ConfigError, match=r"add_NoSuchServicer_to_server.*has no attribute"):
        Instance(
            "process", HTTPOptions(port=free_port()), admin=AdminOptions(enabled=False),
            grpc=gRPCOptions(port=0, grpc_servicer_functions=[bad]),
        )  # fmt: skip
    with pytest.raises(serve.ConfigError, match=r"'nodots' is not an import path"):
        serve.start(grpc_options={"grpc_servicer_functions": ["nodots"]})


def test_a_port_in_use_is_refused_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            Instance(
                "process", HTTPOptions(port=free_port()), admin=AdminOptions(enabled=False),
                grpc=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
            )  # fmt: skip


def test_a_config_files_grpc_options_serve_with_shoal_run(shoal_run: tuple[Any, int]) -> None:
    process, port = shoal_run
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GreeterStub(channel)

        def answered() -> str:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:  # the only application: no `application` metadata needed
                return str(stub.Greet(pb.GreetRequest(name="cfg"), timeout=5).greeting)
            except grpc.RpcError:
                return ""

        assert wait_until(answered, 60, "shoal run to serve gRPC") == "beta cfg"


# --- draining (last: it stops the module's instance) -------------------------------------


def test_draining_serves_accepted_calls_and_refuses_new_ones(
    served: Served, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    slow = served.stub.Slow.future(
        pb.GreetRequest(name=str(started), count=1000), metadata=to("alpha"), timeout=20
    )
    wait_until(started.exists, 10, "the slow call to reach its replica")
    stopping = threading.Thread(target=served.stop)
    stopping.start()

    def refused() -> bool:
        try:
            served.api.Healthz(serve_pb2.HealthzRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAVAILABLE
        return False

    wait_until(refused, 10, "Healthz to fail while draining")
    error = failure(lambda: served.stub.Greet(pb.GreetRequest(), metadata=to("beta"), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in error.details()
    assert slow.result(timeout=20).greeting == "slow"  # accepted before: answered
    stopping.join(60)
