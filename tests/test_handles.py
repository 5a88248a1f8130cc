"""Deployments, composition and handles, on both runtimes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import pytest
from conftest import Deploy, wait_until

from shoal import serve


@serve.deployment
def double(x: int) -> int:
    return 2 * x


@serve.deployment
class Adder:
    def __init__(self, increment: int = 1) -> None:
        self.increment = increment

    def __call__(self, x: int) -> int:
        return x + self.increment

    async def add_async(self, x: int, *, times: int = 1) -> int:
        return x + self.increment * times

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def _private(self) -> None:
        pass

    def whoami(self) -> tuple[str, str, str]:
        context = serve.get_replica_context()
        return context.app_name, context.deployment, context.replica_id

    async def count(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i

    def count_sync(self, n: int):  # type: ignore[no-untyped-def]
        yield from range(n)


@dataclasses.dataclass
class Models:
    first: object
    others: dict[str, object]


class PlainHolder:
    def __init__(self, model: object) -> None:
        self.model = model


@serve.deployment
class Composer:
    def __init__(self, models: Models, in_list: list[object], holder: PlainHolder) -> None:
        self.models = models
        self.in_list = in_list
        self.holder = holder

    async def __call__(self, x: int) -> list[int]:
        calls = [
            self.models.first.remote(x),  # type: ignore[attr-defined]
            self.models.others["second"].remote(x),  # type: ignore[attr-defined]
            self.in_list[0].remote(x),  # type: ignore[attr-defined]
            self.holder.model.remote(x),  # type: ignore[attr-defined]
        ]
        return list(await asyncio.gather(*calls))

    async def chained(self, x: int) -> int:
        # A response passed as an argument is resolved before the second call runs.
        return await self.models.first.remote(self.models.others["second"].remote(x))  # type: ignore[attr-defined]


def test_class_and_function_deployments(deploy: Deploy) -> None:
    handle = deploy(Adder.bind(10))
    assert handle.remote(5).result(timeout_s=30) == 15
    assert handle.add_async.remote(1, times=3).result(timeout_s=30) == 31
    assert handle.options(method_name="add_async").remote(2).result(timeout_s=30) == 12
    assert deploy(double.bind()).remote(21).result(timeout_s=30) == 42


def test_bound_deployments_nested_anywhere_arrive_as_handles(deploy: Deploy) -> None:
    models = Models(double.bind(), {"second": Adder.bind(1)})
    app = Composer.bind(
        models, [Adder.options(name="Plus100").bind(100)], PlainHolder(double.bind())
    )
    handle = deploy(app)
    assert handle.remote(3).result(timeout_s=30) == [6, 4, 103, 6]
    assert handle.chained.remote(3).result(timeout_s=30) == 8


@serve.deployment
class ModuleHolder:
    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, _: object) -> str:
        return str(self.module.__name__)


def test_a_module_passed_as_an_argument_is_not_searched_for_applications(
    deploy: Deploy,
) -> None:
    # examples.pipeline binds an application at module level: searching the module (its
    # globals reach sys.modules and every application bound anywhere) once failed with
    # "cannot pickle 'module' object".
    import examples.pipeline

    handle = deploy(ModuleHolder.bind(examples.pipeline))
    assert handle.remote(None).result(timeout_s=30) == "examples.pipeline"


async def test_await_responses_from_async_code(deploy: Deploy) -> None:
    handle = deploy(Adder.bind(1))
    results = await asyncio.gather(*(handle.remote(i) for i in range(20)))
    assert results == [i + 1 for i in range(20)]


async def test_result_inside_event_loop_is_refused(deploy: Deploy) -> None:
    response = deploy(Adder.bind(1)).remote(1)
    with pytest.raises(serve.ShoalError, match="await response"):
        response.result()
    assert await response == 2


def test_user_exception_reraises_with_remote_traceback(deploy: Deploy) -> None:
    handle = deploy(Adder.bind())
    with pytest.raises(ValueError, match="broken input") as info:
        handle.fail.remote("broken input").result(timeout_s=30)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes and "in fail" in notes
    assert handle.remote(1).result(timeout_s=30) == 2  # the replica keeps serving


def test_unknown_method_lists_available_methods(deploy: Deploy) -> None:
    handle = deploy(Adder.bind())
    with pytest.raises(serve.NotFoundError) as info:
        handle.nope.remote().result(timeout_s=30)
    message = str(info.value)
    assert "'nope'" in message and "add_async" in message and "fail" in message
    assert "_private" not in message
    with pytest.raises(serve.NotFoundError):
        handle.options(method_name="_private").remote().result(timeout_s=30)


def test_streaming_generators(deploy: Deploy) -> None:
    handle = deploy(Adder.bind()).options(stream=True)
    assert list(handle.count.remote(5)) == [0, 1, 2, 3, 4]
    assert list(handle.count_sync.remote(3)) == [0, 1, 2]


async def test_streaming_async_iteration(deploy: Deploy) -> None:
    handle = deploy(Adder.bind()).options(stream=True)
    assert [item async for item in handle.count.remote(4)] == [0, 1, 2, 3]


def test_generator_without_stream_option_is_a_clear_error(deploy: Deploy) -> None:
    handle = deploy(Adder.bind())
    with pytest.raises(TypeError, match="stream=True"):
        handle.count_sync.remote(3).result(timeout_s=30)


def test_replica_context(deploy: Deploy) -> None:
    handle = deploy(Adder.bind(), name="ctx-app")
    app, deployment, replica_id = handle.whoami.remote().result(timeout_s=30)
    assert (app, deployment) == ("ctx-app", "Adder")
    assert replica_id.startswith("ctx-app#Adder#")
    with pytest.raises(serve.ShoalError, match="replica"):
        serve.get_replica_context()


@serve.deployment(max_ongoing_requests=2)
class Gate:
    """Records how many requests run at once. Sync methods run in the replica's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def work(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.05)  # the workload itself, long enough for requests to overlap
        with self.lock:
            self.running -= 1

    def peak_seen(self) -> int:
        return self.peak


def test_max_ongoing_requests_is_enforced_and_sync_methods_run_in_threads(
    deploy: Deploy,
) -> None:
    handle = deploy(Gate.bind())
    responses = [handle.work.remote() for _ in range(8)]
    for response in responses:
        response.result(timeout_s=30)
    # 2, not 1: two sync calls ran at once in threads; not more: the router held the rest.
    assert handle.peak_seen.remote().result(timeout_s=30) == 2


@serve.deployment(user_config={"factor": 2})
class Scaled:
    def __init__(self) -> None:
        self.instance_token = object().__repr__()
        self.factor = 0

    def reconfigure(self, config: dict[str, int]) -> None:
        self.factor = config["factor"]

    def __call__(self, x: int) -> tuple[int, str]:
        return x * self.factor, self.instance_token


def test_user_config_update_applies_without_restart(deploy: Deploy) -> None:
    handle = deploy(Scaled.bind(), name="reconf")
    value, token = handle.remote(3).result(timeout_s=30)
    assert value == 6
    handle = deploy(Scaled.options(user_config={"factor": 5}).bind(), name="reconf")
    value, token_after = handle.remote(3).result(timeout_s=30)
    assert value == 15
    assert token_after == token  # same replica object: reconfigured, not restarted


def test_changed_arguments_replace_replicas(deploy: Deploy) -> None:
    handle = deploy(Adder.bind(1), name="replace")
    assert handle.remote(1).result(timeout_s=30) == 2
    handle = deploy(Adder.bind(50), name="replace")
    assert handle.remote(1).result(timeout_s=30) == 51
    replicas = serve.status().applications["replace"].deployments["Adder"].replicas
    assert len(replicas) == 1


def test_num_replicas_and_status(deploy: Deploy) -> None:
    deploy(Adder.options(num_replicas=3).bind(), name="three")
    app = serve.status().applications["three"]
    assert app.status == "RUNNING"
    deployment = app.deployments["Adder"]
    assert deployment.status == "HEALTHY"
    assert deployment.replica_states == {"RUNNING": 3}
    assert len({r.replica_id for r in deployment.replicas}) == 3


def test_app_and_deployment_handles(deploy: Deploy) -> None:
    deploy(Composer.bind(Models(double.bind(), {"second": Adder.bind()}), [], PlainHolder(None)),
           name="lookup")  # fmt: skip
    assert serve.get_app_handle("lookup").chained.remote(1).result(timeout_s=30) == 4
    assert serve.get_deployment_handle("double", "lookup").remote(4).result(timeout_s=30) == 8
    with pytest.raises(serve.NotFoundError, match="missing"):
        serve.get_app_handle("missing")


def test_deleted_app_gives_clear_error(deploy: Deploy) -> None:
    handle = deploy(Adder.bind(), name="doomed")
    assert handle.remote(1).result(timeout_s=30) == 2
    serve.delete("doomed")
    with pytest.raises(serve.UnavailableError, match="deleted"):
        handle.remote(1).result(timeout_s=30)
    serve.delete("doomed")  # as on Ray Serve, deleting a missing application does nothing


@serve.deployment
class BrokenConstructor:
    def __init__(self) -> None:
        raise RuntimeError("cannot load weights")


def test_failing_constructor_fails_the_deploy_and_leaves_nothing(
    deploy: Deploy, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(RuntimeError, match="cannot load weights") as info:
        deploy(Composer.bind(Models(BrokenConstructor.bind(), {}), [], PlainHolder(None)),
               name="broken")  # fmt: skip
    if request.node.callspec.params["deploy"] == "inprocess":
        # Local testing mode raises the constructor's own exception, as Ray's does.
        assert type(info.value) is RuntimeError
    else:
        assert isinstance(info.value, serve.DeploymentError)
        assert "Traceback" in str(info.value)
    # Nothing of it runs; it is listed as failed, with why, until deleted (as in Ray Serve).
    failed = serve.status().applications["broken"]
    assert (failed.status, failed.deployments) == ("DEPLOY_FAILED", {})
    assert "cannot load weights" in failed.message
    with pytest.raises(serve.NotFoundError, match=r"'broken' failed to deploy.*cannot load"):
        serve.get_app_handle("broken")
    serve.delete("broken")
    assert "broken" not in serve.status().applications


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # cannot cross a process boundary


@serve.deployment
class RaisesUnpicklable:
    def __call__(self) -> None:
        raise Unpicklable("held a lock")


def test_exception_that_cannot_travel_becomes_replica_error(deploy: Deploy) -> None:
    # Both runtimes: the in-process one sends exceptions through the same
    # pickling as the multi-process one, so unit tests see what production sees.
    handle = deploy(RaisesUnpicklable.bind())
    with pytest.raises(serve.ReplicaError) as info:
        handle.remote().result(timeout_s=30)
    assert not isinstance(info.value, Unpicklable)  # carried as text
    assert info.value.remote_type == "test_handles.Unpicklable"
    assert "held a lock" in str(info.value)
    assert "in __call__" in info.value.remote_traceback  # down to the frame that raised


@serve.deployment(health_check_period_s=0.05, health_check_timeout_s=5)
class Fragile:
    def __init__(self) -> None:
        self.broken = False

    def break_it(self) -> None:
        self.broken = True

    def check_health(self) -> None:
        if self.broken:
            raise RuntimeError("unhealthy on purpose")

    def ident(self) -> str:
        return serve.get_replica_context().replica_id


def test_failed_health_check_replaces_the_replica(deploy: Deploy) -> None:
    handle = deploy(Fragile.bind(), name="fragile")
    first = handle.ident.remote().result(timeout_s=30)
    handle.break_it.remote().result(timeout_s=30)
    deadline = time.monotonic() + 30
    while (current := handle.ident.remote().result(timeout_s=30)) == first:
        assert time.monotonic() < deadline, "the unhealthy replica was not replaced"
        time.sleep(0.05)
    assert current.startswith("fragile#Fragile#")

    def only_the_replacement() -> bool:  # the old one may still be draining meanwhile
        replicas = serve.status().applications["fragile"].deployments["Fragile"].replicas
        return [r.replica_id for r in replicas] == [current]

    wait_until(only_the_replacement, 30, "only the replacement listed")


def test_local_testing_mode_ignores_route_prefixes() -> None:
    first = serve.run(Adder.bind(1), name="local-a", _local_testing_mode=True)
    second = serve.run(Adder.bind(2), name="local-b", _local_testing_mode=True)  # both at "/"
    assert (first.remote(0).result(), second.remote(0).result()) == (1, 2)
    serve.delete("local-a")
    serve.delete("local-b")


@serve.deployment(num_replicas=3, user_config={"v": 1})
class Shared:
    def __init__(self) -> None:
        self.value = 0
        self.config = 0

    def reconfigure(self, config: dict[str, int]) -> None:
        self.config = config["v"]

    def put(self, value: int) -> str:
        self.value = value
        return serve.get_replica_context().replica_id

    def get(self) -> int:
        return self.value


def test_broadcast_reaches_every_replica(deploy: Deploy) -> None:
    handle = deploy(Shared.bind(), name="shared")
    replies = handle.put.broadcast(7).result(timeout_s=30)
    assert len(replies) == 3 and all(key == value for key, value in replies.items())
    assert {handle.get.remote().result(timeout_s=30) for _ in range(30)} == {7}


def test_status_shows_each_replicas_config_version(deploy: Deploy) -> None:
    deploy(Shared.bind(), name="versions")
    first = serve.status().applications["versions"].deployments["Shared"]
    assert first.config_version == 0 and {r.config_version for r in first.replicas} == {0}
    for version, value in enumerate((2, 3), start=1):
        deploy(Shared.options(user_config={"v": value}).bind(), name="versions")
        current = serve.status().applications["versions"].deployments["Shared"]
        assert current.config_version == version
        assert {r.config_version for r in current.replicas} == {version}
        assert [r.replica_id for r in current.replicas] == [r.replica_id for r in first.replicas]
