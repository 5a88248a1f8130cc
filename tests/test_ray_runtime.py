"""The Ray runtime on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``).

One cluster for the module: a head and two worker nodes, each declaring a custom
resource ("head", "node_a", "node_b") so that placement is observable. One
``shoal start --ray`` server on it, deployed to with Ray Serve config files, as an
operator would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, wait_until

from shoal._config import AdminOptions, HTTPOptions
from shoal._instance.home import ServerInfo, read_server_info
from shoal._instance.server import start_server, wait_stopped

ray = pytest.importorskip("ray", reason="the Ray runtime's tests need ray (the test extra)")

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """(address, {resource name: Ray node id}) of a head and two worker nodes."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False}
    nodes = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes.add_node(num_cpus=1, resources={"node_a": 1})
        nodes.add_node(num_cpus=1, resources={"node_b": 1})
        nodes.wait_for_nodes()
        ray.init(address=nodes.address, namespace="shoal-tests", log_to_driver=False)
        by_resource = {
            name: node["NodeID"]
            for node in ray.nodes()
            for name in ("head", "node_a", "node_b")
            if node["Alive"] and name in node["Resources"]
        }
        yield nodes.address, by_resource
    finally:
        ray.shutdown()
        nodes.shutdown()


@contextlib.contextmanager
def _shoal_home(home: str) -> Iterator[None]:
    previous = os.environ.get("SHOAL_HOME")
    os.environ["SHOAL_HOME"] = home
    try:
        yield
    finally:
        os.environ["SHOAL_HOME"] = previous or ""


@pytest.fixture(scope="module")
def server(cluster: tuple[str, dict[str, str]]) -> Iterator[tuple[str, ServerInfo]]:
    """(SHOAL_HOME, info) of a ``shoal start --ray`` server on the cluster."""
    home = tempfile.mkdtemp(prefix="shoal-ray-")
    previous = os.getcwd()
    with _shoal_home(home):
        os.chdir(TESTS)  # the server resolves import paths from its working directory
        try:
            info = start_server(
                HTTPOptions(port=free_port()), AdminOptions(port=free_port()),
                timeout_s=90, runtime="ray", address=cluster[0],
            )  # fmt: skip
        finally:
            os.chdir(previous)
    try:
        yield home, info
    finally:
        with _shoal_home(home):
            if not wait_stopped(read_server_info() or info, 0):
                os.kill(info.pid, signal.SIGTERM)
                if not wait_stopped(info, 40):
                    os.kill(info.pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def _deploy(info: ServerInfo, *apps: dict[str, Any]) -> None:
    response = httpx.put(
        f"{info.admin_url}/api/serve/applications/", json={"applications": list(apps)}, timeout=30
    )
    assert response.status_code == 200, response.text


def _details(info: ServerInfo) -> dict[str, Any]:
    response = httpx.get(f"{info.admin_url}/api/serve/applications/", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _running(info: ServerInfo, app: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        details = _details(info)["applications"].get(app)
        if details is not None and details["status"] == "DEPLOY_FAILED":
            raise AssertionError(details["message"])
        return details if details is not None and details["status"] == "RUNNING" else None

    return wait_until(ready, 90, f"application {app} RUNNING")  # type: ignore[no-any-return]


PATTERNS = {"name": "patterns", "route_prefix": "/", "import_path": "ray_runtime_apps:app"}


@pytest.fixture(scope="module")
def patterns(server: tuple[str, ServerInfo]) -> dict[str, Any]:
    """The patterns application deployed from a Ray Serve config, once it runs."""
    _, info = server
    _deploy(info, PATTERNS)
    return _running(info, "patterns")


def _predict(info: ServerInfo, size: int = 1000) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{info.http_port}/predict", params={"size": size},
                     timeout=30)  # fmt: skip


def test_seed_patterns_run_across_nodes_placed_by_resources(
    cluster: tuple[str, dict[str, str]], server: tuple[str, ServerInfo], patterns: dict[str, Any]
) -> None:
    _, nodes = cluster
    response = _predict(server[1], 1000)
    assert response.status_code == 200, response.text
    body = response.json()
    # Business logic on the head, the pipeline stage and one model on node_a, the other
    # model on node_b: each where its resource is.
    assert body["gateway"] == nodes["head"]
    assert body["scale"]["node"] == nodes["node_a"]
    assert body["sum"]["node"] == nodes["node_a"]
    assert body["max"]["node"] == nodes["node_b"]
    # numpy arrays crossed nodes both ways, intact.
    assert body["scale"]["dtype"] == "float64" and body["scale"]["shape"] == [1000]
    assert body["sum"]["score"] == 2 * sum(range(1000))
    assert body["max"]["score"] == 2 * 999
    # Bad input is refused by the business logic with a message naming the value.
    refused = _predict(server[1], 0)
    assert refused.status_code == 422 and "got 0" in refused.text


def test_details_name_the_ray_node_of_every_replica(
    cluster: tuple[str, dict[str, str]], patterns: dict[str, Any]
) -> None:
    _, nodes = cluster
    expected = {"Gateway": "head", "Scale": "node_a", "SumModel": "node_a", "MaxModel": "node_b"}
    for deployment, resource in expected.items():
        replicas = patterns["deployments"][deployment]["replicas"]
        assert [r["node_id"] for r in replicas] == [nodes[resource]], deployment


def test_a_killed_replica_actor_is_replaced(
    server: tuple[str, ServerInfo], patterns: dict[str, Any]
) -> None:
    _, info = server
    (victim,) = _details(info)["applications"]["patterns"]["deployments"]["Scale"]["replicas"]
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> bool:
        replicas = _details(info)["applications"]["patterns"]["deployments"]["Scale"]["replicas"]
        return any(
            r["replica_id"] != victim["replica_id"] and r["state"] == "RUNNING" for r in replicas
        )

    wait_until(replaced, 60, "a new Scale replica")
    wait_until(lambda: _predict(info).status_code == 200, 30, "answers again")
    assert _predict(info).json()["scale"]["pid"] != victim["pid"]


DRIVER = """
from shoal import serve
from ray_runtime_apps import echo
serve.run(echo, name="attached", route_prefix="/attached")
"""


def test_a_second_driver_attaches_and_its_app_outlives_it(
    server: tuple[str, ServerInfo], tmp_path: Path
) -> None:
    home, info = server
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    subprocess.run(
        [sys.executable, str(script)], check=True, timeout=120, cwd=TESTS,
        env={**os.environ, "SHOAL_HOME": home, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip
    response = httpx.get(f"http://127.0.0.1:{info.http_port}/attached", timeout=30)
    assert response.status_code == 200 and response.text == "echo"
    assert "attached" in _details(info)["applications"]


def test_shoal_start_refuses_ray_options_without_ray(tmp_path: Path) -> None:
    env = {**os.environ, "SHOAL_HOME": str(tmp_path)}
    address = subprocess.run(
        [sys.executable, "-m", "shoal", "start", "--address", "auto"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert address.returncode != 0
    assert "address='auto'" in address.stderr and "runtime='ray'" in address.stderr
    resources = subprocess.run(
        [sys.executable, "-m", "shoal", "start", "--ray", "--resources", '{"x": 1}'],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert resources.returncode != 0 and "ray start --resources" in resources.stderr


def test_the_config_file_format_is_ray_serves(tmp_path: Path) -> None:
    """The patterns config above is a valid Ray Serve config file too."""
    from shoal._deploy_config import ServeDeploySchema

    text = yaml.safe_dump({"applications": [PATTERNS]})
    assert ServeDeploySchema.model_validate(yaml.safe_load(text)).applications[0].name == "patterns"


def test_a_replica_ray_cannot_place_is_pending_with_the_reason(
    server: tuple[str, ServerInfo], patterns: dict[str, Any]
) -> None:
    _, info = server
    stuck = {
        "name": "stuck",
        "route_prefix": "/stuck",
        "import_path": "ray_runtime_apps:unplaceable",
    }
    _deploy(info, PATTERNS, stuck)

    def pending() -> dict[str, Any] | None:
        app = _details(info)["applications"].get("stuck")
        if app is None:
            return None
        replicas = app["deployments"].get("Unplaceable", {}).get("replicas", [])
        return next((r for r in replicas if r["state"] == "PENDING"), None)

    replica = wait_until(pending, 30, "a PENDING replica")
    assert "Ray has not placed" in replica["message"]
    assert "'nowhere': 1" in replica["message"]
    # The stuck application goes (a config applied replaces the whole set, as in Ray:
    # this test runs last, after the attached driver's application); the other serves.
    _deploy(info, PATTERNS)
    wait_until(lambda: "stuck" not in _details(info)["applications"], 30, "stuck deleted")
    assert _predict(info).status_code == 200
