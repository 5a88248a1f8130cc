"""The examples users copy from: in-process through handles, and over real HTTP.

Local tests use ``_local_testing_mode=True`` (no processes, no HTTP). The HTTP
tests deploy the composed, pipeline and ensemble apps of ``examples.demo.APPS``, once
for the module, on the session's multi-process shoal (conftest's ``http_port``,
which owns ``serve.start``/``serve.shutdown``), and delete them afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import free_port

from shoal import serve
from shoal.serve import Application, DeploymentHandle

ROOT = Path(__file__).resolve().parents[1]
# The examples live at the repo root, not in the installed package: make them
# importable however pytest was launched (``pytest`` does not add the cwd).

from examples import composed, demo, ensemble, pipeline  # noqa: E402

TIMEOUT_S = 30.0

#: The demo apps this module tests (demo.APPS may hold more, tested elsewhere).
OUR_APPS = [entry for entry in demo.APPS if entry[0] in {"composed", "pipeline", "ensemble"}]

POSITIVE_TEXT = "I love it, great and fast!"
NEGATIVE_TEXT = "slow, broken and useless. I hate it"
LABELLED_TEXTS = [(POSITIVE_TEXT, "positive"), (NEGATIVE_TEXT, "negative")]


def expected_prediction(features: list[float]) -> tuple[float, float]:
    """The pipeline's linear model, recomputed here: (score, probability)."""
    score = float(np.dot(pipeline.WEIGHTS, features) + pipeline.BIAS)
    return score, 1.0 / (1.0 + math.exp(-score))


def expected_ensemble(x: float) -> list[float]:
    """What each ensemble member should answer for ``x``, in member order."""
    return [slope * x + intercept for slope, intercept in ensemble.MEMBERS.values()]


def check_composed(result: dict[str, Any]) -> None:
    """model_used must follow the score: both models only above the threshold."""
    assert set(result) == {"model_used", "score"}
    assert 0.0 <= result["score"] < 1.0
    assert result["model_used"] == ("1 & 2" if result["score"] > composed.THRESHOLD else "1")


def run_local(app: Application, name: str) -> DeploymentHandle:
    """Run ``app`` in this process (no replica processes, no HTTP); return its ingress handle."""
    # route_prefix=None: local testing mode has no HTTP, and several apps may
    # be deployed at once, so none of them should claim "/". The "local-"
    # prefix keeps names apart from the multi-process apps: serve.status() and
    # serve.delete() see both instances.
    return serve.run(app, name=f"local-{name}", route_prefix=None, _local_testing_mode=True)


@pytest.fixture(scope="module", autouse=True)
def _delete_local_apps() -> Iterator[None]:
    yield
    for name, _, _ in OUR_APPS:
        with contextlib.suppress(serve.NotFoundError):
            serve.delete(f"local-{name}")


# --------------------------------------------------------------- local mode


def test_composed_local_follows_threshold() -> None:
    handle = run_local(composed.app, "composed")
    for _ in range(20):
        check_composed(handle.predict.remote(b"Hey!").result(timeout_s=TIMEOUT_S))


@pytest.mark.parametrize(
    ("score", "model_used"), [(0.2, "1"), (composed.THRESHOLD, "1"), (0.9, "1 & 2")]
)
def test_composed_local_both_branches(
    monkeypatch: pytest.MonkeyPatch, score: float, model_used: str
) -> None:
    # Local testing mode runs model_one in this process, so pinning
    # random.random() pins the score and exercises each branch for certain.
    monkeypatch.setattr(composed.random, "random", lambda: score)
    handle = run_local(composed.app, "composed")
    result = handle.predict.remote(b"Hey!").result(timeout_s=TIMEOUT_S)
    assert result == {"model_used": model_used, "score": score}


@pytest.mark.parametrize(("text", "label"), LABELLED_TEXTS)
def test_pipeline_local(text: str, label: str) -> None:
    handle = run_local(pipeline.app, "pipeline")
    result = handle.classify.remote(text).result(timeout_s=TIMEOUT_S)
    assert result["text"] == text
    assert result["features"] == pytest.approx(pipeline.featurize(text))
    assert len(result["features"]) == len(pipeline.FEATURE_NAMES)
    score, probability = expected_prediction(result["features"])
    assert result["score"] == pytest.approx(score)
    assert result["probability"] == pytest.approx(probability)
    assert result["label"] == label


def test_pipeline_local_user_config_sets_threshold() -> None:
    # A stricter threshold from user_config reaches Predictor.reconfigure and
    # flips a confidently positive text to "negative".
    strict = pipeline.Predictor.options(user_config={"threshold": 0.999})
    app = pipeline.Orchestrator.bind(
        pipeline.Featurizer.bind(), strict.bind(weights=pipeline.WEIGHTS, bias=pipeline.BIAS)
    )
    handle = run_local(app, "pipeline")
    result = handle.classify.remote(POSITIVE_TEXT).result(timeout_s=TIMEOUT_S)
    assert 0.5 < result["probability"] < 0.999
    assert result["label"] == "negative"


def test_ensemble_local_mean_and_concurrency() -> None:
    handle = run_local(ensemble.app, "ensemble")
    start = time.perf_counter()
    result = handle.predict.remote(2.0).result(timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    expected = expected_ensemble(2.0)
    assert result["x"] == 2.0
    assert result["predictions"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(statistics.fmean(expected))
    # Called one after another the members would take at least the sum of
    # their delays; gather() overlaps them.
    assert elapsed < len(ensemble.MEMBERS) * ensemble.MODEL_DELAY_S


async def test_ensemble_local_awaitable_handle() -> None:
    # In async code a DeploymentResponse is awaited instead of .result().
    handle = run_local(ensemble.app, "ensemble")
    result = await handle.predict.remote(-1.0)
    assert result["predictions"] == pytest.approx(expected_ensemble(-1.0))


# ----------------------------------------------------------------- the demo


def test_demo_apps_are_distinct() -> None:
    names = [name for name, _, _ in demo.APPS]
    prefixes = [prefix for _, prefix, _ in demo.APPS]
    assert len(set(names)) == len(names)
    assert len(set(prefixes)) == len(prefixes)
    assert [(name, prefix) for name, prefix, _ in OUR_APPS] == [
        ("composed", "/composed"),
        ("pipeline", "/pipeline"),
        ("ensemble", "/ensemble"),
    ]


def _example_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_demo_import_has_no_side_effects() -> None:
    # Importing must neither serve nor block: the process exits on its own.
    proc = subprocess.run(
        [sys.executable, "-c", "import examples.demo as d; print(*(n for n, _, _ in d.APPS))"],
        cwd=ROOT,
        env=_example_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["composed", "pipeline", "ensemble"]


def drain(lines: queue.Queue[str | None], output: list[str]) -> str:
    """Everything the demo printed so far, for failure messages."""
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return "".join(output)
        if line is not None:
            output.append(line)


def test_demo_main_serves_until_ctrl_c() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.demo", "--port", str(port)],
        cwd=ROOT,
        env=_example_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a failed test can clean up the whole group
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not any("Press Ctrl-C" in line for line in output):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("demo not serving within 90 s:\n" + "".join(output))
            assert line is not None, "demo exited early:\n" + "".join(output)
            output.append(line)
        base_url = f"http://127.0.0.1:{port}"
        text = "".join(output)
        for name, prefix, _ in OUR_APPS:
            assert f"{base_url}{prefix}" in text
            assert demo.curl_command(base_url, name, prefix) in text
        with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
            check_composed(client.post("/composed", content=b"Hey!").json())
            assert client.post("/pipeline", json={"text": "great"}).json()["label"] == "positive"
            assert client.post("/ensemble", json={"x": 0}).json()["mean"] == pytest.approx(
                statistics.fmean(expected_ensemble(0.0))
            )
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("demo still running 60 s after Ctrl-C:\n" + drain(lines, output))
        assert code == 0, drain(lines, output)
        # serve.shutdown() ran: the HTTP port is released.
        with socket.socket() as sock:
            # SO_REUSEADDR as servers set it: bind then fails only if something still listens.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------- real HTTP mode


@dataclass
class Served:
    """Where the example apps are served: the proxy's base URL and each app's ingress handle."""

    base_url: str
    handles: dict[str, Any]


@pytest.fixture(scope="module")
def served(http_port: int) -> Iterator[Served]:
    """The three example apps, under their route prefixes, on the session's multi-process shoal."""
    handles: dict[str, Any] = {}
    try:
        for name, prefix, app in OUR_APPS:
            # Returns once the app's replicas are ready and its route answers.
            handles[name] = serve.run(app, name=name, route_prefix=prefix)
        yield Served(f"http://127.0.0.1:{http_port}", handles)
    finally:
        for name in handles:
            serve.delete(name)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=TIMEOUT_S) as http:
        yield http


def test_http_composed(client: httpx.Client) -> None:
    for _ in range(8):
        response = client.post("/composed", content=b"Hey!")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        check_composed(response.json())


@pytest.mark.parametrize(("text", "label"), LABELLED_TEXTS)
def test_http_pipeline(client: httpx.Client, text: str, label: str) -> None:
    response = client.post("/pipeline", json={"text": text})
    assert response.status_code == 200
    result = response.json()
    assert result["features"] == pytest.approx(pipeline.featurize(text))
    score, probability = expected_prediction(result["features"])
    assert result["score"] == pytest.approx(score)
    assert result["probability"] == pytest.approx(probability)
    assert result["label"] == label


@pytest.mark.parametrize("body", [b"not json", b'{"txt": "typo"}', b'{"text": 3}', b"[1, 2]"])
def test_http_pipeline_rejects_bad_input(client: httpx.Client, body: bytes) -> None:
    response = client.post("/pipeline", content=body)
    assert response.status_code == 400
    assert "error" in response.json()


def test_http_ensemble(client: httpx.Client) -> None:
    for x in (0.0, 2.5, -4.0):
        response = client.post("/ensemble", json={"x": x})
        assert response.status_code == 200
        result = response.json()
        assert result["x"] == x
        assert result["predictions"] == pytest.approx(expected_ensemble(x))
        assert result["mean"] == pytest.approx(statistics.fmean(result["predictions"]))


@pytest.mark.parametrize("body", [b"", b'{"y": 1}', b'{"x": "abc"}'])
def test_http_ensemble_rejects_bad_input(client: httpx.Client, body: bytes) -> None:
    response = client.post("/ensemble", content=body)
    assert response.status_code == 400


def test_http_unknown_route_is_404(client: httpx.Client) -> None:
    assert client.get("/no-such-app").status_code == 404


def test_handles_from_serve_run(served: Served) -> None:
    # serve.run returned each ingress handle; it reaches the replicas in
    # their own processes, with no HTTP involved.
    result = served.handles["pipeline"].classify.remote(POSITIVE_TEXT).result(timeout_s=TIMEOUT_S)
    assert result["label"] == "positive"
    result = served.handles["ensemble"].predict.remote(1.0).result(timeout_s=TIMEOUT_S)
    assert result["predictions"] == pytest.approx(expected_ensemble(1.0))
    check_composed(served.handles["composed"].predict.remote(b"x").result(timeout_s=TIMEOUT_S))


def test_status_shows_apps_and_replicas(served: Served) -> None:
    status = serve.status()
    for name, _, _ in OUR_APPS:
        assert status.applications[name].status == "RUNNING"
    deployments = status.applications["pipeline"].deployments
    # The predictor was declared with num_replicas=2, the featurizer with one.
    assert deployments["Predictor"].replica_states.get("RUNNING") == 2
    assert deployments["Featurizer"].replica_states.get("RUNNING") == 1
