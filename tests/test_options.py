"""Every option has its effect or is refused by name (issue 9, part 2).

Unknown keyword arguments name their close matches; options shoal does not
implement yet are refused when declared; ``graceful_shutdown_wait_loop_s``,
``runtime_env`` and resource accounting work on the local runtimes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Deploy, free_port, wait_until

from shoal import serve
from shoal._controller.resources import Capacity, Demand, Ledger


def _app() -> Any:
    @serve.deployment
    def hello() -> str:
        return "hi"

    return hello.bind()


# --- (a) unknown keyword arguments ------------------------------------------------------


def test_run_refuses_a_misspelt_keyword_and_deploys_nothing() -> None:
    name = f"typo-{uuid.uuid4().hex[:6]}"
    with pytest.raises(serve.ConfigError, match=r"'route_prefx'.*did you mean 'route_prefix'"):
        serve.run(_app(), name=name, route_prefx="/typo", _local_testing_mode=True)
    assert name not in serve.status().applications


def test_start_refuses_a_misspelt_keyword() -> None:
    with pytest.raises(serve.ConfigError, match=r"'proxy_locaton'.*did you mean 'proxy_location'"):
        serve.start(http_options={"port": free_port()}, proxy_locaton="EveryNode")


@pytest.mark.parametrize(
    ("declare", "fragment"),
    [
        (lambda: serve.deployment(num_replica=2)(lambda: None), "did you mean 'num_replicas'"),
        (
            lambda: serve.deployment(lambda: None).options(max_ongoing_request=2),
            "did you mean 'max_ongoing_requests'",
        ),
        (
            lambda: serve.deployment(ray_actor_options={"num_gpu": 1})(lambda: None),
            "did you mean 'num_gpus'",
        ),
    ],
)
def test_unknown_deployment_options_name_close_matches(declare: Any, fragment: str) -> None:
    with pytest.raises(serve.ConfigError, match=fragment):
        declare()


def test_a_name_with_a_hash_is_refused_as_ray_refuses_it() -> None:
    """'#' joins application, deployment and replica in a replica id (and a log file's
    name): Ray refuses it in both names, and so does shoal, before anything deploys."""

    @serve.deployment
    def model(request: Any) -> str:
        return "ok"

    def plain(request: Any) -> str:
        return "ok"

    refused = "name='a#b' for deployment 'model': must not contain '#'"
    with pytest.raises(serve.ConfigError, match=refused):
        model.options(name="a#b")
    with pytest.raises(serve.ConfigError, match="name='x#y' for deployment 'plain'"):
        serve.deployment(name="x#y")(plain)
    refused = r"serve.run\(name='p#q'\): an application name must"
    with pytest.raises(serve.ConfigError, match=refused):
        serve.run(model.bind(), name="p#q", _local_testing_mode=True)
    assert "p#q" not in serve.status().applications


def test_run_accepts_rays_positional_order() -> None:
    # Ray's signature: run(target, blocking, name, route_prefix, logging_config, ...).
    handle = serve.run(_app(), False, "positional", None, None, True)
    try:
        assert handle.remote().result(timeout_s=10) == "hi"
    finally:
        serve.delete("positional")


def test_external_scaling_is_refused_by_name_and_rays_default_accepted(tmp_path: Path) -> None:
    # Ray's serve.run(..., external_scaler_enabled=False) and the config field of the same
    # name: False (Ray's default) is what shoal does; True is refused with what to do. Both
    # were refused as unknown before, which broke Ray programs that spell the default out.
    handle = serve.run(_app(), False, "external", None, None, True, False)
    try:
        assert handle.remote().result(timeout_s=10) == "hi"
    finally:
        serve.delete("external")
    with pytest.raises(serve.ConfigError, match=r"external_scaler_enabled=True is not supported"):
        serve.run(_app(), name="external", external_scaler_enabled=True, _local_testing_mode=True)
    with pytest.raises(serve.ConfigError, match=r"must be a bool, got str 'no'"):
        serve.run(_app(), name="external", external_scaler_enabled="no", _local_testing_mode=True)
    assert "external" not in serve.status().applications
    from shoal._deploy_config import load_config_file

    entry = "applications:\n- {name: e, import_path: m:app, external_scaler_enabled: %s}\n"
    (tmp_path / "ok.yaml").write_text(entry % "false")
    (tmp_path / "no.yaml").write_text(entry % "true")
    assert not load_config_file(str(tmp_path / "ok.yaml")).applications[0].external_scaler_enabled
    with pytest.raises(serve.ConfigError) as refused:
        load_config_file(str(tmp_path / "no.yaml"))
    assert "applications[0].external_scaler_enabled" in str(refused.value)
    assert "not supported yet" in str(refused.value) and "num_replicas" in str(refused.value)


@pytest.mark.parametrize("option", ["max_constructor_retry_count", "request_router_config"])
def test_rays_deployment_options_shoal_lacks_are_refused_as_such(option: str) -> None:
    # Not "unknown option": a Ray user did not misspell them, and is told what to do.
    value = 3 if option == "max_constructor_retry_count" else {}
    with pytest.raises(
        serve.ConfigError, match=rf"'{option}'.*is Ray Serve's and not supported yet: .*remove it"
    ):
        serve.deployment(**{option: value})(lambda request: "x")
    from shoal._deploy_config import parse_config

    app = {"name": "a", "import_path": "m:app", "deployments": [{"name": "D", option: value}]}
    with pytest.raises(
        serve.ConfigError,
        match=rf"deployments\[0\]\.{option}: is Ray Serve's and not supported yet",
    ):
        parse_config({"applications": [app]}, "serve.yaml")


# --- (b) options only Ray implements: refused by name by the local runtimes -----------


RAY_ONLY = [
    ({"placement_group_bundles": [{"CPU": 1}]}, "placement_group_bundles"),
    ({"placement_group_bundles": [{"CPU": 1}], "placement_group_strategy": "SPREAD"},
     "placement_group_strategy"),
    ({"max_replicas_per_node": 1}, "max_replicas_per_node=1"),
    ({"ray_actor_options": {"memory": 2**30}}, "ray_actor_options.memory"),
    ({"ray_actor_options": {"accelerator_type": "A100"}}, "ray_actor_options.accelerator_type"),
    ({"ray_actor_options": {"object_store_memory": 1}}, "ray_actor_options.object_store_memory"),
    ({"ray_actor_options": {"runtime_env": {"pip": ["torch"]}}}, "runtime_env.pip"),
    ({"ray_actor_options": {"runtime_env": {"conda": "env"}}}, "runtime_env.conda"),
    ({"ray_actor_options": {"runtime_env": {"uv": ["x"]}}}, "runtime_env.uv"),
    ({"ray_actor_options": {"runtime_env": {"envvars": {}}}}, "did you mean 'env_vars'"),
    (
        {"ray_actor_options": {"runtime_env": {"working_dir": "s3://bucket/app.zip"}}},
        "runtime_env.working_dir='s3://bucket/app.zip': remote URIs",
    ),
    (
        {"ray_actor_options": {"runtime_env": {"py_modules": ["https://x/m.whl"]}}},
        "runtime_env.py_modules",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("options", "option"), RAY_ONLY)
def test_ray_only_options_are_accepted_in_code_and_refused_by_a_local_runtime(
    deploy: Deploy, options: dict[str, Any], option: str
) -> None:
    """Code that sets them may be deployed on Ray (docs/ray.md); the local runtimes
    refuse them when they deploy it, naming the option and what to do."""
    app = serve.deployment(**options)(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match="needs the Ray runtime") as refused:
        deploy(app)
    assert option in str(refused.value)


def test_a_placement_group_must_hold_what_the_replica_reserves() -> None:
    with pytest.raises(serve.ConfigError, match="first placement group bundle"):
        serve.deployment(ray_actor_options={"num_cpus": 2}, placement_group_bundles=[{"CPU": 1}])(
            lambda: None
        )
    with pytest.raises(serve.ConfigError, match="needs placement_group_bundles"):
        serve.deployment(placement_group_strategy="PACK")(lambda: None)


def test_ray_only_options_at_their_defaults_deploy_on_a_local_runtime(deploy: Deploy) -> None:
    @serve.deployment(
        max_replicas_per_node=None, placement_group_bundles=None,
        ray_actor_options={"num_cpus": 0.5, "memory": None, "accelerator_type": None},
    )  # fmt: skip
    def hello() -> str:
        return "hi"

    assert deploy(hello.bind()).remote().result(timeout_s=30) == "hi"


def test_grpc_options_are_validated_by_field() -> None:
    """grpc_options work (docs/grpc.md, tests/test_grpc.py); a bad value names its field."""
    with pytest.raises(serve.ConfigError, match=r"invalid port=70000 for grpc_options"):
        serve.start(http_options={"port": free_port()}, grpc_options={"port": 70000})
    with pytest.raises(serve.ConfigError, match=r"grpc_servicer_functions='f' for grpc_options"):
        serve.start(grpc_options={"grpc_servicer_functions": "f"})
    with pytest.raises(serve.ConfigError, match=r"'prot' for grpc_options \(did you mean 'port'"):
        serve.start(grpc_options={"prot": 9000})


def test_logging_config_is_accepted_and_validated_by_field() -> None:
    """logging_config works (docs/logging.md); a bad value names its field and value."""
    config = serve.deployment(logging_config={"log_level": "debug", "encoding": "json"})(
        lambda: None
    ).config.logging_config
    assert config is not None and (config.log_level, config.encoding) == ("DEBUG", "JSON")
    with pytest.raises(serve.ConfigError, match=r"logging_config\.log_level='LOUD'.*DEBUG"):
        serve.deployment(lambda: None).options(logging_config={"log_level": "LOUD"})
    with pytest.raises(serve.ConfigError, match=r"encoding='XML'.*'TEXT' or 'JSON'"):
        serve.run(_app(), logging_config={"encoding": "XML"})


# --- (c) graceful_shutdown_wait_loop_s ------------------------------------------------------


class _Slow:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    async def __call__(self) -> str:
        Path(self.marker).write_text("started")
        await asyncio.sleep(0.3)
        return "finished"


Slow = serve.deployment(graceful_shutdown_wait_loop_s=1.0)(_Slow)


def _delete_while_busy(deploy: Deploy, tmp_path: Path, app: Any) -> float:
    name = f"drain-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "started"
    handle = deploy(app.bind(str(marker)), name=name)
    response = handle.remote()
    wait_until(marker.exists, what="the request to start")
    started = time.monotonic()
    serve.delete(name)
    elapsed = time.monotonic() - started
    assert response.result(timeout_s=10) == "finished"  # not cut off by the stop
    return elapsed


def test_stop_polls_ongoing_requests_every_wait_loop(deploy: Deploy, tmp_path: Path) -> None:
    # The request ends after 0.3 s; the replica only looks again after wait_loop_s = 1 s.
    assert _delete_while_busy(deploy, tmp_path, Slow) >= 0.95


def test_zero_wait_loop_stops_when_the_last_request_ends(deploy: Deploy, tmp_path: Path) -> None:
    elapsed = _delete_while_busy(deploy, tmp_path, Slow.options(graceful_shutdown_wait_loop_s=0.0))
    assert elapsed < 0.95


# --- (d) runtime_env ------------------------------------------------------------------------

_READER = """
import os

AT_IMPORT = os.environ.get("SHOAL_OPTIONS_VAR")


class Reader:
    def __init__(self):
        self.at_init = os.environ.get("SHOAL_OPTIONS_VAR")

    def __call__(self):
        import helper  # only in working_dir
        import mypkg  # a py_modules package
        import solo  # a py_modules single file
        import zipped  # a py_modules zip archive

        with open("data.txt") as f:  # relative to working_dir
            data = f.read()
        modules = [helper.VALUE, mypkg.VALUE, solo.VALUE, zipped.VALUE]
        return [AT_IMPORT, self.at_init, os.getcwd(), *modules, data]
"""


@pytest.fixture
def reader_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "src").mkdir()
    module = f"reader_{uuid.uuid4().hex[:8]}"
    (tmp_path / "src" / f"{module}.py").write_text(_READER)
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "helper.py").write_text("VALUE = 'helper'\n")
    (tmp_path / "wd" / "data.txt").write_text("data")
    (tmp_path / "libs" / "mypkg").mkdir(parents=True)
    (tmp_path / "libs" / "mypkg" / "__init__.py").write_text("VALUE = 'pkg'\n")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "solo.py").write_text("VALUE = 'solo'\n")
    with zipfile.ZipFile(tmp_path / "single" / "archive.zip", "w") as archive:
        archive.writestr("zipped.py", "VALUE = 'zip'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delenv("SHOAL_OPTIONS_VAR", raising=False)
    return __import__(module)


def test_runtime_env_on_the_process_runtime(
    http_port: int, tmp_path: Path, reader_module: Any
) -> None:
    env = {
        "env_vars": {"SHOAL_OPTIONS_VAR": "set"},
        "working_dir": str(tmp_path / "wd"),
        "py_modules": [
            str(tmp_path / "libs" / "mypkg"),
            str(tmp_path / "single" / "solo.py"),
            str(tmp_path / "single" / "archive.zip"),
        ],
    }
    app = serve.deployment(ray_actor_options={"runtime_env": env})(reader_module.Reader).bind()
    handle = serve.run(app, name="runtime-env", route_prefix=None)
    try:
        at_import, at_init, cwd, *imported = handle.remote().result(timeout_s=30)
    finally:
        serve.delete("runtime-env")
    assert (at_import, at_init) == ("set", "set")  # set before the module was imported
    assert cwd == str(tmp_path / "wd")
    assert imported == ["helper", "pkg", "solo", "zip", "data"]
    assert reader_module.AT_IMPORT is None and "SHOAL_OPTIONS_VAR" not in os.environ


def test_missing_working_dir_is_refused_at_run(http_port: int, tmp_path: Path) -> None:
    env = {"working_dir": str(tmp_path / "missing")}
    app = serve.deployment(ray_actor_options={"runtime_env": env})(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match="does not exist"):
        serve.run(app, name="missing-wd", route_prefix=None)
    assert "missing-wd" not in serve.status().applications


@pytest.mark.parametrize(
    "runtime_env",
    [{"env_vars": {"A": "1"}}, {"working_dir": "."}, {"py_modules": ["."]}],
)
def test_runtime_env_is_refused_in_local_testing_mode(runtime_env: dict[str, Any]) -> None:
    app = serve.deployment(ray_actor_options={"runtime_env": runtime_env})(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match="not supported in local testing mode"):
        serve.run(app, name="local-env", _local_testing_mode=True)


@pytest.mark.parametrize(
    ("actor", "option"), [({"num_gpus": 1}, "num_gpus"), ({"resources": {"slot": 1}}, "resources")]
)
def test_gpus_and_custom_resources_are_refused_in_local_testing_mode(
    actor: dict[str, Any], option: str
) -> None:
    app = serve.deployment(ray_actor_options=actor)(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match=f"{option} is not supported in local testing"):
        serve.run(app, name="local-resources", _local_testing_mode=True)


# --- (e) resources --------------------------------------------------------------------------


def test_ledger_assigns_whole_and_shared_gpus_by_id() -> None:
    ledger = Ledger(Capacity(4.0, ("3", "5"), {}))
    one = ledger.try_acquire(Demand(gpus=1))
    half = ledger.try_acquire(Demand(gpus=0.5))
    other_half = ledger.try_acquire(Demand(gpus=0.5))
    assert one is not None and half is not None and other_half is not None
    assert one.gpu_ids == ("3",)
    assert half.gpu_ids == other_half.gpu_ids == ("5",)  # fractions share one GPU
    assert ledger.try_acquire(Demand(gpus=0.1)) is None
    assert ledger.shortage(Demand(gpus=1)) == "replica needs num_gpus=1 but 0 of 2 GPUs are free"
    ledger.release(one)
    two = ledger.try_acquire(Demand(gpus=1))
    assert two is not None and two.gpu_ids == ("3",)


def test_ledger_names_the_short_resource() -> None:
    ledger = Ledger(Capacity(2.0, (), {"slot": 1.0}))
    assert ledger.try_acquire(Demand(cpus=0.5)) is not None
    assert (
        ledger.shortage(Demand(cpus=64)) == "replica needs num_cpus=64 but 1.5 of 2 CPUs are free"
    )
    assert ledger.never_fits(Demand(cpus=64)) == "num_cpus=64 but this machine has 2 CPUs"
    assert "declares no 'gpu_slot'" in str(ledger.never_fits(Demand(custom={"gpu_slot": 1})))
    assert ledger.try_acquire(Demand(custom={"slot": 1})) is not None
    assert "0 of 1 'slot' are free" in str(ledger.shortage(Demand(custom={"slot": 1})))


def test_capacity_reads_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert Capacity.detect({}, 5.0).gpu_ids == ("3", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Capacity.detect({}, 5.0).gpu_ids == ()


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def test_a_replica_that_can_never_fit_fails_run_at_once(deploy: Deploy) -> None:
    app = serve.deployment(ray_actor_options={"num_cpus": _cpus() + 62})(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match=rf"num_cpus={_cpus() + 62} but this machine"):
        deploy(app)
    many = serve.deployment(num_replicas=_cpus() + 1, ray_actor_options={"num_cpus": 1})
    with pytest.raises(serve.ConfigError, match="replicas together need num_cpus"):
        deploy(many(lambda: None).bind())


def test_num_gpus_without_gpus_is_refused(deploy: Deploy) -> None:
    app = serve.deployment(ray_actor_options={"num_gpus": 4})(lambda: None).bind()
    with pytest.raises(serve.ConfigError, match="num_gpus"):
        deploy(app)


class _Holder:
    def __call__(self) -> str:
        return "running"


Holder = serve.deployment(name="Holder")(_Holder)


def test_pending_replica_starts_when_resources_free_up(deploy: Deploy) -> None:
    suffix = uuid.uuid4().hex[:6]
    deploy(Holder.options(ray_actor_options={"num_cpus": _cpus()}).bind(), name=f"big-{suffix}")
    waiting = Holder.options(ray_actor_options={"num_cpus": 1}).bind()
    handles: list[Any] = []
    runner = threading.Thread(
        target=lambda: handles.append(deploy(waiting, name=f"small-{suffix}")), daemon=True
    )
    runner.start()

    def pending() -> Any:
        app = serve.status().applications.get(f"small-{suffix}")
        deployment = app and app.deployments.get("Holder")
        return deployment and [r for r in deployment.replicas if r.state == "PENDING"]

    [replica] = wait_until(pending, what="a PENDING replica")
    expected = f"replica needs num_cpus=1 but 0 of {_cpus()} CPUs are free"
    assert replica.message == expected
    status = serve.status().applications[f"small-{suffix}"]
    assert status.status == "DEPLOYING" and expected in status.deployments["Holder"].message
    serve.delete(f"big-{suffix}")
    runner.join(30)
    assert handles and handles[0].remote().result(timeout_s=10) == "running"
    assert serve.status().applications[f"small-{suffix}"].status == "RUNNING"


_GPU_DRIVER = textwrap.dedent(
    """
    import os, threading
    from shoal import serve
    from conftest import wait_until

    serve.start(proxy_location="Disabled", resources={"slot": 1})
    assert serve.status().proxies == {}, serve.status().proxies

    @serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 1})
    class Gpu:
        def __call__(self):
            return os.environ["CUDA_VISIBLE_DEVICES"]

    handle = serve.run(Gpu.bind(), name="gpu", route_prefix=None)
    seen = set()
    wait_until(lambda: seen.add(handle.remote().result(timeout_s=10)) or len(seen) == 2)
    print("gpus", sorted(seen))

    slot = serve.deployment(ray_actor_options={"resources": {"slot": 1}})(lambda: "slot")
    serve.run(slot.bind(), name="a", route_prefix=None)
    threading.Thread(target=lambda: serve.run(slot.bind(), name="b", route_prefix=None),
                     daemon=True).start()
    def pending():
        app = serve.status().applications.get("b")
        return app and app.deployments["<lambda>"].message
    print("pending", wait_until(pending))
    for resources in ({"slot": 2}, {"other": 1}):
        try:
            serve.run(serve.deployment(ray_actor_options={"resources": resources})(
                lambda: None).bind(), name="never", route_prefix=None)
        except serve.ConfigError as exc:
            print("never", exc)
    try:
        serve.start(resources={"slot": 2})
    except serve.ConfigError as exc:
        print("restart", exc)
    serve.shutdown()
    """
)


def test_gpus_are_assigned_by_id_and_custom_resources_are_declared(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(_GPU_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "CUDA_VISIBLE_DEVICES": "3,5"}
    result = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "gpus ['3', '5']" in lines  # each replica sees only its own GPU
    short = "replica needs resources={'slot': 1} but 0 of 1 'slot' are free"
    assert f"pending 1 replica(s) pending: {short}" in lines
    never = [line for line in lines if line.startswith("never")]
    assert "resources={'slot': 2} but this machine has 1 'slot'" in never[0]
    assert "declares no 'other'" in never[1]
    assert any(line.startswith("restart shoal is already running with resources") for line in lines)


def test_deleting_a_pending_application_ends_its_wait(deploy: Deploy) -> None:
    suffix = uuid.uuid4().hex[:6]
    deploy(Holder.options(ray_actor_options={"num_cpus": _cpus()}).bind(), name=f"full-{suffix}")
    errors: list[BaseException] = []

    def run_pending() -> None:
        try:
            deploy(Holder.options(ray_actor_options={"num_cpus": 1}).bind(), name=f"gone-{suffix}")
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    runner = threading.Thread(target=run_pending, daemon=True)
    runner.start()
    wait_until(
        lambda: "pending" in _message(f"gone-{suffix}"), what="the application to be pending"
    )
    serve.delete(f"gone-{suffix}")
    runner.join(30)
    assert len(errors) == 1 and isinstance(errors[0], serve.DeploymentError)
    assert "deleted while its replicas waited" in str(errors[0])
    assert f"gone-{suffix}" not in serve.status().applications


def _message(app: str) -> str:
    status = serve.status().applications.get(app)
    return status.deployments["Holder"].message if status and status.deployments else ""


def test_updating_a_deployment_that_holds_every_cpu_does_not_wait_for_itself(
    deploy: Deploy,
) -> None:
    name = f"update-{uuid.uuid4().hex[:6]}"
    every_cpu = Holder.options(ray_actor_options={"num_cpus": _cpus()})
    deploy(every_cpu.options(version="1").bind(), name=name)
    handle = deploy(every_cpu.options(version="2").bind(), name=name)
    assert handle.remote().result(timeout_s=10) == "running"
    [replica] = serve.status().applications[name].deployments["Holder"].replicas
    assert replica.state == "RUNNING"


_START_AGAIN_DRIVER = textwrap.dedent(
    """
    import logging, sys
    from shoal import serve

    port = int(sys.argv[1])
    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("serve.start()"):
                said.append(record.getMessage())

    logging.getLogger("shoal").addHandler(Keep())
    serve.start(http_options={"host": "127.0.0.1", "port": port}, admin_options={"enabled": False},
                logging_config={"log_level": "DEBUG"}, metrics_options={"enabled": False})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, admin_options={"enabled": False},
                logging_config={"log_level": "DEBUG"}, metrics_options={"enabled": False})
    print("same", said)
    said.clear()
    serve.start()
    print("none", said)
    said.clear()
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"},
                metrics_options={"enabled": True}, tracing_options={"enabled": False})
    print("differ", said)
    serve.shutdown()
    """
)


def test_starting_again_names_each_option_it_cannot_apply(tmp_path: Path) -> None:
    """serve.start() while shoal runs applies nothing new: each option given that differs
    from the running instance's is named in one warning (tracing off is what runs);
    the same options, or none, say nothing."""
    script = tmp_path / "driver.py"
    script.write_text(_START_AGAIN_DRIVER)
    result = subprocess.run(
        [sys.executable, str(script), str(free_port())], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "same []" in lines and "none []" in lines, lines
    [differ] = [line for line in lines if line.startswith("differ")]
    assert "ignoring proxy_location, logging_config, metrics_options (" in differ, differ
    assert differ.count("serve.start()") == 1 and "serve.shutdown() first" in differ
