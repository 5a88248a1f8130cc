"""The business-logic example over real HTTP (multi-process runtime), and a fuzz test.

One module-scoped deployment of ``examples.business_logic`` under its own name
and route prefix, with its own SQLite file and API keys, on the session's
shoal; the HTTP tests talk to it, and the fuzz test drives it with schemathesis
from its live OpenAPI schema, asserting that nothing it sends produces a 5xx.
The feature stores are also tested directly (Redis only where redis-server and
the redis package are installed).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from shoal import serve

pytest.importorskip("sklearn", reason="the example's model needs scikit-learn (the test extra)")

ROOT = Path(__file__).resolve().parents[1]

from examples import business_logic  # noqa: E402
from examples.feature_store import RedisFeatureStore, SQLiteFeatureStore  # noqa: E402

APP = "business-logic-test"
PREFIX = "/business-test"
API_KEY = "test-key-1"
OTHER_KEY = "test-key-2"
TIMEOUT_S = 30.0

# Rows 0 and 149 of the iris data set: what users 1 and 150 have stored.
USER_1 = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
          "petal_width_cm": 0.2}  # fmt: skip
USER_150 = {"sepal_length_cm": 5.9, "sepal_width_cm": 3.0, "petal_length_cm": 5.1,
            "petal_width_cm": 1.8}  # fmt: skip


@pytest.fixture(scope="module")
def base_url(http_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db_path = tmp_path_factory.mktemp("feature-store") / "features.sqlite3"
    app = business_logic.build_app(
        db_path=db_path, api_keys=[API_KEY, OTHER_KEY], model_version="test-1"
    )
    serve.run(app, name=APP, route_prefix=PREFIX)
    yield f"http://127.0.0.1:{http_port}{PREFIX}"
    serve.delete(APP)


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"x-api-key": API_KEY}, timeout=TIMEOUT_S) as c:
        yield c


def predict(client: httpx.Client, body: Any, **headers: str) -> httpx.Response:
    return client.post("/predict", json=body, headers=headers)


# ------------------------------------------------------------------ success


def test_prediction_for_a_stored_user(client: httpx.Client) -> None:
    response = predict(client, {"user_id": 1})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["user_id"] == 1
    assert result["features"] == pytest.approx(USER_1)
    assert result["label"] == "setosa"
    assert set(result["probabilities"]) == {"setosa", "versicolor", "virginica"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert result["model"]["name"] == "iris-logistic-regression"
    assert result["model"]["version"] == "test-1"
    # No x-request-id was sent: the proxy made one, and the body carries the same.
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    assert result["request_id"] == request_id


def test_client_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.post(
        "/predict", json={"user_id": 150}, headers={"x-request-id": "trace-abc-123"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc-123"
    assert response.json()["request_id"] == "trace-abc-123"


def test_context_overrides_stored_features(client: httpx.Client) -> None:
    context = {"petal_length_cm": 5.5, "petal_width_cm": 2.1}
    result = predict(client, {"user_id": 1, "context": context}).json()
    assert result["features"] == pytest.approx({**USER_1, **context})
    assert result["label"] == "virginica"  # long, wide petals


def test_every_configured_key_is_accepted(client: httpx.Client) -> None:
    response = predict(client, {"user_id": 2}, **{"x-api-key": OTHER_KEY})
    assert response.status_code == 200


def test_feature_lookup_route(client: httpx.Client) -> None:
    response = client.get("/users/150/features")
    assert response.status_code == 200
    assert response.json() == pytest.approx(USER_150)


def test_model_info_needs_no_key(base_url: str) -> None:
    response = httpx.get(f"{base_url}/model", timeout=TIMEOUT_S)
    assert response.status_code == 200
    info = response.json()
    assert info["classes"] == ["setosa", "versicolor", "virginica"]
    assert info["training_accuracy"] > 0.9


# ------------------------------------------------------------------ 401


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing API key: send it in the x-api-key header"),
        ({"x-api-key": ""}, "missing API key: send it in the x-api-key header"),
        ({"x-api-key": "wrong"}, "invalid API key"),
        ({"x-api-key": API_KEY + "x"}, "invalid API key"),
        ({"x-api-key": API_KEY.upper()}, "invalid API key"),
    ],
    ids=["missing", "empty", "wrong", "longer", "case"],
)
@pytest.mark.parametrize("route", ["predict", "features"])
def test_bad_api_key_is_401(
    base_url: str, headers: dict[str, str], detail: str, route: str
) -> None:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as anonymous:
        if route == "predict":
            # A body that would fail validation: the key is checked first.
            response = anonymous.post("/predict", json={"user_id": "x"}, headers=headers)
        else:
            response = anonymous.get("/users/1/features", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": detail}
    assert response.headers["www-authenticate"] == "ApiKey"
    assert "x-request-id" in response.headers


# ------------------------------------------------------------------ 422 and 400

BAD_BODIES = {
    "malformed json": b'{"user_id": 1',
    "not an object": b"[1, 2, 3]",
    "empty body": b"",
    "missing user_id": b'{"context": {}}',
    "string user_id": b'{"user_id": "1"}',
    "float user_id": b'{"user_id": 1.5}',
    "bool user_id": b'{"user_id": true}',
    "null user_id": b'{"user_id": null}',
    "zero user_id": b'{"user_id": 0}',
    "negative user_id": b'{"user_id": -5}',
    "extra field": b'{"user_id": 1, "admin": true}',
    "unknown context key": b'{"user_id": 1, "context": {"colour": 1.0}}',
    "context not an object": b'{"user_id": 1, "context": [1]}',
    "string measurement": b'{"user_id": 1, "context": {"petal_length_cm": "5"}}',
    "negative measurement": b'{"user_id": 1, "context": {"petal_length_cm": -1}}',
    "NaN measurement": b'{"user_id": 1, "context": {"petal_length_cm": NaN}}',
    "Infinity measurement": b'{"user_id": 1, "context": {"petal_width_cm": Infinity}}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_invalid_body_is_422(client: httpx.Client, body: bytes) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert errors and all({"loc", "msg", "type"} <= set(error) for error in errors)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
def test_wrong_content_type_is_422(client: httpx.Client, content_type: str) -> None:
    response = client.post(
        "/predict", content=b'{"user_id": 1}', headers={"content-type": content_type}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.parametrize("user_id", ["abc", "1.5", "0", str(2**63)])
def test_invalid_path_parameter_is_422(client: httpx.Client, user_id: str) -> None:
    assert client.get(f"/users/{user_id}/features").status_code == 422


# ------------------------------------------------------------------ 404 and 405


@pytest.mark.parametrize("user_id", [151, 10**6, business_logic.MAX_USER_ID])
def test_unknown_user_is_404(client: httpx.Client, user_id: int) -> None:
    response = predict(client, {"user_id": user_id})
    assert response.status_code == 404
    assert response.json() == {"detail": f"no features stored for user {user_id}"}
    assert client.get(f"/users/{user_id}/features").status_code == 404


def test_unknown_route_is_404(client: httpx.Client, http_port: int) -> None:
    # Inside the prefix: FastAPI answers, in JSON.
    response = client.get("/no-such-route")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    # A path that only starts with the prefix's text is not under it: the proxy answers.
    response = httpx.get(f"http://127.0.0.1:{http_port}{PREFIX}ing/predict", timeout=TIMEOUT_S)
    assert response.status_code == 404
    assert "/-/routes" in response.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/predict", "POST"), ("PUT", "/predict", "POST"), ("DELETE", "/model", "GET"),
     ("POST", "/users/1/features", "GET")],
)  # fmt: skip
def test_wrong_method_is_405(client: httpx.Client, method: str, path: str, allowed: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed


# ------------------------------------------------------------------ large and odd inputs


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (json.dumps({"user_id": 10**30}).encode(), 422),  # beyond SQLite's 64-bit integers
        (b'{"user_id": ' + b"9" * 5000 + b"}", 400),  # beyond Python's int-parsing limit
        (b'{"user_id": 1, "context": {"petal_length_cm": 1e400}}', 422),  # parses as inf
        (json.dumps({"user_id": 1, "context": {"x" * 100_000: 1.0}}).encode(), 422),
        (json.dumps({"user_id": 1, "pad": "x" * 1_000_000}).encode(), 422),  # 1 MB
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nesting deeper than the JSON parser allows
    ],
    ids=["huge int", "5000 digits", "float overflow", "long key", "1 MB string", "deep nesting"],
)
def test_oversized_inputs_are_client_errors(client: httpx.Client, body: bytes, status: int) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    # 413 once the proxy enforces a body-size limit; never a 5xx.
    assert response.status_code in (status, 413), response.text[:300]


def test_many_concurrent_requests_all_succeed(base_url: str) -> None:
    # 64 requests at once across both ingress replicas and the single model replica.
    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=base_url, headers={"x-api-key": API_KEY}, timeout=TIMEOUT_S
        ) as aclient:
            responses = await asyncio.gather(
                *(aclient.post("/predict", json={"user_id": 1 + i % 150}) for i in range(64))
            )
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 64


# ------------------------------------------------------------------ feature stores


async def test_sqlite_lookups_run_off_the_event_loop(tmp_path: Path) -> None:
    store = SQLiteFeatureStore(tmp_path / "features.sqlite3")
    store.seed([(1, {"a": 1.0}), (2, {"a": 2.0})])
    store.seed([(1, {"a": -1.0})])  # what is stored already is kept
    threads: list[str] = []
    lookup = store._lookup

    def recording_lookup(user_id: int) -> Any:
        threads.append(threading.current_thread().name)
        return lookup(user_id)

    store._lookup = recording_lookup  # type: ignore[method-assign]
    try:
        assert await store.get(1) == {"a": 1.0}
        assert await store.get(3) is None
    finally:
        await store.aclose()
    assert threads and all(name.startswith("feature-store") for name in threads)
    assert threading.current_thread().name not in threads


def test_demo_skips_business_without_sklearn() -> None:
    # sys.modules[name] = None makes the import system report the package as missing.
    code = "import sys; sys.modules['sklearn'] = None; import examples.demo as d; print(*d.SKIPPED)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "business" in proc.stdout.split()  # other sklearn examples are skipped too
    assert "skipping 'business': scikit-learn is not installed" in proc.stderr


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A throwaway redis-server on a free port (skips if redis or its client is missing)."""
    pytest.importorskip("redis")
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # blocks until the server logs that it is ready
                if "Ready to accept connections" in line:
                    break
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()


async def test_redis_store(redis_url: str) -> None:
    store = RedisFeatureStore(redis_url, key_prefix="test:")
    store.seed([(1, {"a": 1.0})])
    RedisFeatureStore(redis_url, key_prefix="test:").seed([(1, {"a": -1.0})])  # kept: SET NX
    assert await store.get(1) == {"a": 1.0}
    assert await store.get(2) is None
    await store.aclose()


# ------------------------------------------------------------------ scaling


def test_ingress_and_model_scale_separately(base_url: str) -> None:
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    replicas = {name: d.replica_states.get("RUNNING") for name, d in status.deployments.items()}
    assert replicas == {"BusinessLogic": 2, "IrisClassifier": 1}


# ------------------------------------------------------------------ fuzzing


# Schemathesis is used through its documented strategy API (``operation.as_strategy()``
# with Hypothesis' ``@given``), not its pytest integration: its lazy
# ``schemathesis.pytest.from_fixture`` writes pytest's private ``Function._nodeid``,
# which pytest 9.2 removed (AttributeError on every run).
FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=timedelta(seconds=5),
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=list(HealthCheck),
)


def test_fuzz_never_answers_5xx(base_url: str) -> None:
    # The live schema, as shoal serves it under the route prefix.
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=TIMEOUT_S)
    operations = [result.ok() for result in schema.get_all_operations()]  # raises if invalid
    assert sorted(op.label for op in operations) == [
        "GET /model", "GET /users/{user_id}/features", "POST /predict",
    ]  # fmt: skip
    for operation in operations:
        # Valid and invalid input, as schemathesis' own runner does (an operation
        # without parameters has no invalid input: one_of draws from the other).
        modes = [operation.as_strategy(generation_mode=mode) for mode in GenerationMode]

        @FUZZ_SETTINGS
        @given(case=st.one_of(modes))
        def never_5xx(case: Any) -> None:
            # A valid key gets generated bodies past authentication (schemathesis
            # still drops or replaces it in the cases that test authentication).
            response = case.call(headers={"x-api-key": API_KEY}, timeout=TIMEOUT_S)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> "
                f"{response.status_code}: {response.text[:300]}"
            )

        never_5xx()
