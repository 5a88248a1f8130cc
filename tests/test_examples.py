"""The examples users copy from: in-process through handles, and over real HTTP.

Local tests use ``_local_testing_mode=True`` (no processes, no HTTP). The HTTP
tests deploy the composed, pipeline and ensemble apps of ``examples.demo.APPS``, once
for the module, on the session's multi-process shoal (conftest's ``http_port``,
which owns ``serve.start``/``serve.shutdown``), and delete them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, in_background

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

#: What the pipeline must answer, worked out by hand from examples/pipeline.py's
#: word lists, WEIGHTS = (1.5, -1.8, 0.25, -0.1) and BIAS = 0.1 (not with its code):
#: features are (positive words, negative words, "!" count, ln(1 + word count)),
#: score = WEIGHTS . features + BIAS, probability = 1 / (1 + e^-score).
EXPECTED_PIPELINE: dict[str, dict[str, Any]] = {
    # i love it great and fast: 6 words, 3 positive (love, great, fast), one "!"
    # score = 1.5*3 + 0.25*1 - 0.1*ln 7 + 0.1 = 4.85 - 0.19459101 = 4.65540899
    POSITIVE_TEXT: {
        "features": [3.0, 0.0, 1.0, 1.9459101490553132],  # ln 7
        "score": 4.655408985094469,
        "probability": 0.9905795655592567,
    },
    # slow broken and useless i hate it: 7 words, 4 negative (slow, broken, useless, hate)
    # score = -1.8*4 - 0.1*ln 8 + 0.1 = -7.1 - 0.20794415 = -7.30794415
    NEGATIVE_TEXT: {
        "features": [0.0, 4.0, 0.0, 2.0794415416798357],  # ln 8
        "score": -7.307944154167984,
        "probability": 0.0006697445927280566,
    },
}

#: The ensemble's members are y = 2x + 1, y = 1.5x + 3 and y = -0.5x + 4
#: (examples/ensemble.py MEMBERS); predictions and mean worked out by hand per x.
EXPECTED_ENSEMBLE: dict[float, tuple[list[float], float]] = {
    -4.0: ([-7.0, -3.0, 6.0], -4.0 / 3),
    -1.0: ([-1.0, 1.5, 4.5], 5.0 / 3),
    0.0: ([1.0, 3.0, 4.0], 8.0 / 3),
    1.0: ([3.0, 4.5, 3.5], 11.0 / 3),
    2.0: ([5.0, 6.0, 3.0], 14.0 / 3),
    2.5: ([6.0, 6.75, 2.75], 15.5 / 3),
}

#: examples/composed.py: model_two joins in only for scores above 0.5.
COMPOSED_THRESHOLD = 0.5


def check_composed(result: dict[str, Any]) -> None:
    """model_used must follow the score: both models only above the threshold."""
    assert set(result) == {"model_used", "score"}
    assert 0.0 <= result["score"] < 1.0
    assert result["model_used"] == ("1 & 2" if result["score"] > COMPOSED_THRESHOLD else "1")


def check_pipeline(result: dict[str, Any], text: str, label: str) -> None:
    expected = EXPECTED_PIPELINE[text]
    assert result["features"] == pytest.approx(expected["features"])
    assert result["score"] == pytest.approx(expected["score"])
    assert result["probability"] == pytest.approx(expected["probability"])
    assert result["label"] == label


def check_ensemble(result: dict[str, Any], x: float) -> None:
    predictions, mean = EXPECTED_ENSEMBLE[x]
    assert result["x"] == x
    assert result["predictions"] == pytest.approx(predictions)
    assert result["mean"] == pytest.approx(mean)


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
    ("score", "model_used"), [(0.2, "1"), (COMPOSED_THRESHOLD, "1"), (0.9, "1 & 2")]
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
    check_pipeline(result, text, label)


def test_pipeline_local_user_config_sets_threshold() -> None:
    # A stricter threshold from user_config reaches Predictor.reconfigure and
    # flips a confidently positive text to "negative".
    strict = pipeline.Predictor.options(user_config={"threshold": 0.999})
    app = pipeline.Orchestrator.bind(
        pipeline.Featurizer.bind(), strict.bind(weights=pipeline.WEIGHTS, bias=pipeline.BIAS)
    )
    handle = run_local(app, "pipeline")
    result = handle.classify.remote(POSITIVE_TEXT).result(timeout_s=TIMEOUT_S)
    assert result["probability"] == pytest.approx(EXPECTED_PIPELINE[POSITIVE_TEXT]["probability"])
    assert result["label"] == "negative"  # 0.9906 < 0.999


def test_ensemble_local_mean_and_concurrency() -> None:
    handle = run_local(ensemble.app, "ensemble")
    start = time.perf_counter()
    result = handle.predict.remote(2.0).result(timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    check_ensemble(result, 2.0)
    # Called one after another the three members would take at least the sum of
    # their 0.2 s delays (0.6 s); gather() overlaps them.
    assert elapsed < 0.6


async def test_ensemble_local_awaitable_handle() -> None:
    # In async code a DeploymentResponse is awaited instead of .result().
    handle = run_local(ensemble.app, "ensemble")
    check_ensemble(await handle.predict.remote(-1.0), -1.0)


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


def test_demo_yaml_lists_the_demo_apps() -> None:
    """examples/demo.yaml (`shoal deploy examples/demo.yaml`) holds exactly demo.APPS: the same
    names and route prefixes in the same order, each import path naming that very application
    (apps left out of APPS here, e.g. without scikit-learn, are the only extra entries)."""
    import importlib

    from shoal._deploy_config import load_config_file

    config = load_config_file(str(ROOT / "examples" / "demo.yaml"))
    listed = [(app.name, app.route_prefix) for app in config.applications]
    assert [entry for entry in listed if entry[0] not in demo.SKIPPED] == [
        (name, prefix) for name, prefix, _ in demo.APPS
    ]
    assert {name for name, _ in listed} - {name for name, _, _ in demo.APPS} == set(demo.SKIPPED)
    apps = {name: app for name, _, app in demo.APPS}
    for app in config.applications:
        if app.name in apps:
            module, _, attribute = app.import_path.partition(":")
            assert getattr(importlib.import_module(module), attribute) is apps[app.name], app.name


def _example_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run_example(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m examples.<module> --port <a free port> *args``, run to its end."""
    return subprocess.run(
        [sys.executable, "-m", f"examples.{module}", "--port", str(free_port()), *args],
        cwd=ROOT, env=_example_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def _examples(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """The examples whose output has no timing in it, started together with the first
    test that reads one (after the timing-sensitive examples ran alone): by test name."""
    spans = tmp_path_factory.mktemp("tracing") / "spans.jsonl"
    jobs = {
        "test_grpc_ingress_example_calls_both_applications_over_grpc": lambda: _run_example(
            "grpc_ingress", "--grpc-port", str(free_port())
        ),
        "test_multiplexing_example_loads_each_model_once_where_it_is_used": partial(
            _run_example, "multiplexing"
        ),
        "test_tracing_example_assembles_the_tree_of_every_process": partial(
            _run_example, "tracing", "--spans", str(spans)
        ),
        "test_oip_example_serves_the_classifier_to_the_triton_clients": lambda: _run_example(
            "oip", "--grpc-port", str(free_port())
        ),
        "test_direct_ingress_example_serves_the_ingress_on_its_own_port": lambda: _run_example(
            "direct_ingress", "--direct-port", str(free_port())
        ),
    }
    yield from in_background(request, jobs)


@pytest.fixture
def example(
    request: pytest.FixtureRequest,
    _examples: dict[str, Future[subprocess.CompletedProcess[str]]],
) -> subprocess.CompletedProcess[str]:
    """The test's example (``_examples``), once it ended; fails the test if it failed."""
    proc = _examples[request.node.originalname].result()
    assert proc.returncode == 0, proc.stderr
    return proc


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


def test_load_shedding_example_refuses_the_burst_beyond_the_queue() -> None:
    proc = _run_example("load_shedding")  # alone: its output depends on timing
    assert proc.returncode == 0, proc.stderr
    counts = re.match(r"burst of 40: (\d+) served, (\d+) refused with 503", proc.stdout)
    assert counts is not None, proc.stdout
    served, refused = map(int, counts.groups())
    # 2 running + 4 queued are served; a slow machine may let a few more in (requests
    # arriving after the first ones finished), never fewer.
    assert served + refused == 40 and 6 <= served <= 12, proc.stdout


def test_deadlines_example_times_out_and_cancels_the_slow_calls() -> None:
    proc = _run_example("deadlines")  # alone: its output depends on timing
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fast request: 200 {'frontend_remaining_s': "), proc.stdout
    assert lines[1].startswith("slow request: 504 after "), proc.stdout
    assert lines[1].endswith(": Request timed out after 0.5 s (http_options.request_timeout_s).")
    assert lines[2].startswith("handle call with timeout_s=0.2: RequestTimeoutError"), proc.stdout
    assert lines[3] == "model calls cancelled at their deadline: 2", proc.stdout


def test_autoscaling_example_scales_up_under_load_and_back_to_zero() -> None:
    proc = _run_example("autoscaling")  # alone: its output depends on timing
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "idle: 0 replicas", proc.stdout
    # 10 clients, 2 requests per replica: 4 replicas (3 if the machine is so slow that
    # the clients' own turnaround leaves fewer than 7 requests in the server on average).
    under_load = re.match(r"under load: (\d) replicas running after .* s; \d+ answered, 0 failed",
                          lines[1])  # fmt: skip
    assert under_load is not None and int(under_load.group(1)) >= 3, proc.stdout
    assert "idle again: 0 replicas" in lines, proc.stdout
    steps = [tuple(map(int, m.groups())) for m in re.finditer(r"(\d+) -> (\d+):", proc.stdout)]
    assert steps[0] == (0, 1) and max(to for _, to in steps) >= 3 and steps[-1] == (1, 0), steps


def test_priorities_example_serves_the_high_priority_requests_first() -> None:
    proc = _run_example("priorities")  # alone: its output depends on timing
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    high = re.fullmatch(r"high-priority requests served at positions (\d+), (\d+) of 10", lines[1])
    assert high is not None, proc.stdout
    # Right after the low request running when they arrived (before it, if a slow machine
    # let them arrive before any low one reached the replica): never behind the backlog.
    assert max(map(int, high.groups())) <= 3, proc.stdout


def test_observability_example_shows_metrics_status_logs_and_the_failed_request(
    tmp_path: Path,
) -> None:
    # Alone: the scorer's details in its status may lag its answers on a busy machine.
    proc = _run_example(
        "observability", "--admin-port", str(free_port()), "--logs-dir", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    failed = re.search(r"HTTP 500, request id (\w+)", out)
    assert failed is not None, out
    # The metrics: HTTP counts by status, each deployment's calls, the custom counter.
    assert 'route="/score",status_code="200"} 3.0' in out
    assert 'route="/score",status_code="500"} 1.0' in out
    assert re.search(r'ray_scorer_positive_answers_total\{.*deployment="Scorer".*\} 2\.0', out)
    # The readable status with the scorer's own details.
    assert "Scorer: HEALTHY, 1 RUNNING (target 1)" in out
    assert re.search(r"scoring#Scorer#\w+: \{threshold: 0.5, answered: 3\}", out)
    # The log file: the user's lines tagged with the replica id and the request id.
    assert re.search(
        r"INFO \S+ \S+ scoring Scorer scoring#Scorer#\w+ \[\w+\] .* - scoring 0.90", out
    )
    # The dashboard lists the failed request by its id.
    assert f"recent error: {failed.group(1)} ValueError: score must be within [0, 1]" in out


def test_grpc_ingress_example_calls_both_applications_over_grpc(
    example: subprocess.CompletedProcess[str],
) -> None:
    proc = example
    assert proc.stdout.splitlines() == [
        "english: Hello, Ada! (request_id english)",
        "french: Bonjour, Ada ! (request_id french)",
        "stream: Hello #1, Ada! / Hello #2, Ada! / Hello #3, Ada!",
        "error: INTERNAL: ValueError: a name is required",
        "applications: ['english', 'french']; healthz: success",
    ], proc.stdout


def test_multiplexing_example_loads_each_model_once_where_it_is_used(
    example: subprocess.CompletedProcess[str],
) -> None:
    proc = example
    assert proc.stdout.splitlines() == [
        "alice(3) = 7.0",
        "alice, 4 more requests: served by 1 replica",
        "bob(3) = 1.0",
        "carol(3) = 1.5 (through a handle)",
        "loads per model: {'alice': 1, 'bob': 1, 'carol': 1}",
    ], proc.stdout


def test_tracing_example_assembles_the_tree_of_every_process(
    request: pytest.FixtureRequest,
) -> None:
    """Also test_tracing's multi-process case: the proxy's and three replicas' spans,
    each process appending its own to one JSON-lines file, make one tree."""
    pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'shoal[tracing]'")
    from examples.tracing import CLIENT_SPAN_ID, TRACE_ID

    proc: subprocess.CompletedProcess[str] = request.getfixturevalue("example")
    path = Path(proc.args[proc.args.index("--spans") + 1])
    assert proc.stdout.splitlines()[2:] == [
        "SERVER POST /embed [proxy]",
        "  SERVER Ingress/__call__ [replica]",
        "    CLIENT Tokenize/__call__ [replica]",
        "      SERVER Tokenize/__call__ [replica]",
        "        CLIENT Embed/__call__ [replica]",
        "          SERVER Embed/__call__ [replica]",
        "            INTERNAL embed-tokens [replica]",
    ], proc.stdout
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    assert {span["trace_id"] for span in spans} == {TRACE_ID}
    ids = {span["span_id"]: span for span in spans}
    (root,) = [span for span in spans if span["parent_span_id"] not in ids]
    assert root["name"] == "POST /embed" and root["parent_span_id"] == CLIENT_SPAN_ID
    for span in spans:  # a CLIENT span and its SERVER child run in different processes
        parent = ids.get(span["parent_span_id"])
        if parent is not None and parent["kind"] == "CLIENT":
            assert span["resource"]["shoal.process"] != parent["resource"]["shoal.process"]
    assert len({span["resource"]["shoal.process"] for span in spans}) == 4  # proxy, 3 replicas
    request_id = re.search(r"request (\w+):", proc.stdout)
    assert request_id is not None, proc.stdout
    servers = [span for span in spans if span["kind"] == "SERVER"]
    assert {s["attributes"]["shoal.request_id"] for s in servers} == {request_id.group(1)}


def test_direct_ingress_example_serves_the_ingress_on_its_own_port(
    example: subprocess.CompletedProcess[str],
) -> None:
    lines = example.stdout.splitlines()
    # The direct port keeps the proxy's rules (404 outside the prefix, x-request-id). A
    # keep-alive connection stays with one replica there, while the proxy spreads even
    # one connection's requests; new direct connections reach both replicas (the kernel
    # hashes each one: 20 on one replica by chance is a 2**-19 event).
    assert lines[:8] == [
        "proxy: 200 echo='hello', x-request-id: True",
        "proxy: GET /elsewhere -> 404",
        "direct: 200 echo='hello', x-request-id: True",
        "direct: GET /elsewhere -> 404",
        "proxy, 20 requests on one connection: answered by 2 replica(s)",
        "proxy, 20 new connections: answered by 2 replica(s)",
        "direct, 20 requests on one connection: answered by 1 replica(s)",
        "direct, 20 new connections: answered by 2 replica(s)",
    ], example.stdout
    timed = r"latency {}: p50 \d+ us, p99 \d+ us \(100 requests, one connection\)"
    assert len(lines) == 10, example.stdout
    assert re.fullmatch(timed.format("proxy"), lines[8]), example.stdout
    assert re.fullmatch(timed.format("direct"), lines[9]), example.stdout


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
    # Started as a shell without job control starts a background command: SIGINT ignored
    # (inherited through exec), as CI may run the suite. Ctrl-C must still stop it.
    ignoring_sigint = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignoring_sigint, "-m", "examples.demo", "--port", str(port)],
        cwd=ROOT,
        # faulthandler: SIGABRT prints every thread's stack (a shutdown that hangs, below)
        env={**_example_env(), "PYTHONFAULTHANDLER": "1"},
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
            check_ensemble(client.post("/ensemble", json={"x": 0.0}).json(), 0.0)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # where it hangs, on its stderr
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
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
    check_pipeline(response.json(), text, label)


@pytest.mark.parametrize("body", [b"not json", b'{"txt": "typo"}', b'{"text": 3}', b"[1, 2]"])
def test_http_pipeline_rejects_bad_input(client: httpx.Client, body: bytes) -> None:
    response = client.post("/pipeline", content=body)
    assert response.status_code == 400
    assert "error" in response.json()


def test_http_ensemble(client: httpx.Client) -> None:
    for x in (0.0, 2.5, -4.0):
        response = client.post("/ensemble", json={"x": x})
        assert response.status_code == 200
        check_ensemble(response.json(), x)


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
    check_ensemble(served.handles["ensemble"].predict.remote(1.0).result(timeout_s=TIMEOUT_S), 1.0)
    check_composed(served.handles["composed"].predict.remote(b"x").result(timeout_s=TIMEOUT_S))


def test_status_shows_apps_and_replicas(served: Served) -> None:
    status = serve.status()
    for name, _, _ in OUR_APPS:
        assert status.applications[name].status == "RUNNING"
    deployments = status.applications["pipeline"].deployments
    # The predictor was declared with num_replicas=2, the featurizer with one.
    assert deployments["Predictor"].replica_states.get("RUNNING") == 2
    assert deployments["Featurizer"].replica_states.get("RUNNING") == 1


def test_oip_example_serves_the_classifier_to_the_triton_clients(
    example: subprocess.CompletedProcess[str],
) -> None:
    proc = example
    assert proc.stdout.splitlines() == [
        "server ready: True, model ready: True",
        "metadata: [{'name': 'features', 'datatype': 'FP64', 'shape': [-1, 2]}]",
        "REST (binary data False): labels [0, 1], id binary-False",
        "REST (binary data True): labels [0, 1], id binary-True",
        "gRPC: labels [0, 1], rows of proba sum to [1.0, 1.0]",
        "wrong shape: 400 {'error': \"input 'features' has shape [1, 3]; model 'classifier' "
        'expects [-1, 2] (-1: any size)"}',
    ], proc.stdout
