"""shoal.integrations.mlflow against a real MLflow store: SQLite backend, local artifacts.

One module-scoped registry holds a tiny model in three versions (logistic
regressions on two columns, the third one on three: an incompatible release).
URI forms, composition and rollout policies run in-process
(``_local_testing_mode``); HTTP and the alias move under load run on the
session's multi-process shoal.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import async_wait_until, wait_until

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")
pytest.importorskip("sklearn")

from mlflow.models import infer_signature  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.integrations._coordinator import Coordinator  # noqa: E402
from shoal.integrations._mlflow_io import parse_payload, to_jsonable, validate  # noqa: E402
from shoal.integrations._rollout import ModelRef, RolloutEngine, Slot  # noqa: E402
from shoal.integrations.mlflow import (  # noqa: E402
    VERSION_HEADER,
    InvalidInputError,
    MLflowModel,
    RolloutPolicy,
    parse_model_uri,
)

ROOT = Path(__file__).resolve().parents[1]

from examples import mlflow_iris  # noqa: E402

TIMEOUT_S = 30.0
LABELS = "labels/labels.json"
ROWS = pd.DataFrame({"x1": [-1.0, -0.5, 0.5, 1.0], "x2": [0.3, -0.2, 0.1, 0.0]})


@dataclass
class Registry:
    tracking_uri: str
    artifacts: str  # where runs of new experiments store artifacts: never the cwd
    client: Any
    run_ids: dict[str, str]  # version -> run id
    local_path: str

    def point(self, version: str) -> None:
        self.client.set_registered_model_alias("tiny", "champion", version)


def _log(experiment: str, frame: Any, c: float, workdir: Path) -> str:
    model = LogisticRegression(C=c).fit(frame, (frame["x1"] > 0).astype(int))
    with mlflow.start_run(experiment_id=experiment) as run:
        labels = workdir / "labels.json"
        labels.write_text(json.dumps(["negative", "positive"]))
        mlflow.log_artifact(str(labels), artifact_path="labels")
        mlflow.sklearn.log_model(
            model, signature=infer_signature(frame, model.predict(frame)),
            registered_model_name="tiny", pip_requirements=["scikit-learn"],
            **mlflow_iris.log_model_options(mlflow.sklearn.log_model),
        )  # fmt: skip
    return str(run.info.run_id)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri, artifacts = mlflow_iris.local_store(root)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("tests", artifact_location=artifacts)
    wide = ROWS.assign(x3=[1.0, 2.0, 3.0, 4.0])
    frames = {"1": (ROWS, 1.0), "2": (ROWS, 0.01), "3": (wide, 1.0)}
    run_ids = {v: _log(experiment, frame, c, root) for v, (frame, c) in frames.items()}
    local = root / "local-model"
    mlflow.sklearn.save_model(
        LogisticRegression().fit(ROWS, [0, 0, 1, 1]), str(local),
        signature=infer_signature(ROWS, np.array([0, 1])), pip_requirements=["scikit-learn"],
    )  # fmt: skip
    (local / "labels.json").write_text('["no", "yes"]')
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    registry = Registry(tracking_uri, artifacts, client, run_ids, str(local))
    registry.point("1")
    yield registry


@contextlib.contextmanager
def local(app: Any, name: str) -> Iterator[Any]:
    """Run ``app`` in-process; delete it afterwards, whatever happens."""
    try:
        yield serve.run(app, name=name, route_prefix=None, _local_testing_mode=True)
    finally:
        with contextlib.suppress(serve.NotFoundError):
            serve.delete(name)


# ------------------------------------------------------------------ units


def test_model_uris_are_parsed_into_what_resolves_them() -> None:
    assert parse_model_uri("models:/iris@champion") == ("alias", "iris", "champion")
    assert parse_model_uri("models:/iris/3") == ("version", "iris", "3")
    assert parse_model_uri("models:/iris/Production") == ("stage", "iris", "Production")
    assert parse_model_uri("models:/iris/latest") == ("latest", "iris", "latest")
    assert parse_model_uri("models:/m-0123") == ("logged", "m-0123", None)
    assert parse_model_uri("runs:/abc/model") == ("runs", None, "abc")
    assert parse_model_uri("/srv/model") == ("path", None, "/srv/model")


def test_json_bodies_become_model_inputs_and_outputs_become_json(registry: Registry) -> None:
    schema = mlflow.pyfunc.load_model("models:/tiny/1").metadata.get_input_schema()
    expected = pd.DataFrame({"x1": [1.0, 3.0], "x2": [2.0, 4.0]})
    for body in (
        [{"x1": 1, "x2": 2}, {"x1": 3, "x2": 4}],
        {"x1": [1, 3], "x2": [2, 4]},
        {"dataframe_records": [{"x1": 1, "x2": 2}, {"x1": 3, "x2": 4}]},
        {"dataframe_split": {"columns": ["x1", "x2"], "data": [[1, 2], [3, 4]]}},
        {"inputs": [[1, 2], [3, 4]]},  # rows take the signature's column names
        {"instances": {"x1": [1, 3], "x2": [2, 4]}},
    ):
        frame = validate(parse_payload(body, schema).data, schema)
        pd.testing.assert_frame_equal(frame, expected, check_dtype=True)
    assert parse_payload({"x1": 1, "x2": 2, "params": {"k": 1}}).params == {"k": 1}
    with pytest.raises(InvalidInputError) as caught:
        validate(pd.DataFrame({"x1": [1.0, True], "x9": [0, 0]}), schema)
    assert caught.value.errors == [
        {"loc": ["body", 1, "x1"], "msg": "expected double, got True", "type": "type_error",
         "expected": "double"},
        {"loc": ["body", "x2"], "msg": "field required", "type": "missing", "expected": "double"},
    ]  # fmt: skip
    for bad in ("text", {}, {"inputs": [[1]]}, {"inputs": 1, "dataframe_records": []}):
        with pytest.raises(InvalidInputError):
            parse_payload(bad, schema)
    table = pd.DataFrame({"a": [1.5, np.nan], "b": ["x", "y"]})
    assert to_jsonable(table) == [{"a": 1.5, "b": "x"}, {"a": None, "b": "y"}]
    assert to_jsonable({"p": np.array([0.5, np.inf]), "n": np.int64(3)}) == {
        "p": [0.5, None], "n": 3,
    }  # fmt: skip


async def test_the_leader_rides_out_registry_errors_and_no_answer_follows_the_switch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The rollout machinery alone (no mlflow): fake registry, one replica, exact timings."""

    async def load(ref: ModelRef) -> Slot:
        await asyncio.sleep(0.05)  # loading takes a while; requests keep flowing meanwhile
        return Slot(ref, ref.version)

    engine = RolloutEngine(Slot(ModelRef("m/1", "1"), "1"), load, RolloutPolicy(), "r1")
    handlers = {
        "rollout_state": engine.state, "rollout_prepare": engine.prepare,
        "rollout_phase": engine.set_phase, "rollout_activate": engine.activate,
        "rollout_abort": engine.abort,
    }  # fmt: skip

    async def peers(method: str, *args: Any) -> dict[str, Any]:
        """A broadcast to a deployment of one replica: the engine's control methods."""
        if method == "rollout_sync":  # (serving, history)
            engine.merge_history(args[1])
            method, args = "rollout_activate", args[:1]
        result = handlers[method](*args)
        return {"r1": await result if inspect.isawaitable(result) else result}

    outcomes: list[Any] = [ConnectionError("registry down")] * 3 + [TimeoutError("slow")]

    async def resolve() -> ModelRef:
        if outcomes:
            raise outcomes.pop(0)
        return ModelRef("m/2", "2")

    coordinator = Coordinator(engine, peers, resolve, "models:/m@a", poll_interval_s=0.01,
                              load_timeout_s=5)  # fmt: skip
    calls: list[tuple[float, float, str]] = []

    async def call(slot: Slot) -> str:
        await asyncio.sleep(0.003)
        return str(slot.model)

    async def client() -> None:
        while True:
            started = time.time()
            output, _ = await engine.serve(call)
            calls.append((started, time.time(), output))

    with caplog.at_level(logging.WARNING, "shoal.integrations.rollout"):
        tasks = [asyncio.create_task(client()) for _ in range(8)]
        watcher = asyncio.create_task(coordinator.run())

        async def promotion() -> Any:
            return next((e for e in engine.history if e["action"] == "promote"), None)

        promoted = (await async_wait_until(promotion, 10, "the promotion"))["time"]

        async def served_after_the_switch() -> bool:  # two rounds of the 8 clients
            return sum(start > promoted for start, _, _ in calls) >= 16

        await async_wait_until(served_after_the_switch, 10, "calls after the switch")
        for task in [*tasks, watcher]:
            task.cancel()
        await asyncio.gather(*tasks, watcher, return_exceptions=True)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # each distinct error logged once, then retried
    assert "registry down" in warnings[0] and "slow" in warnings[1]
    assert {version for _, _, version in calls} == {"1", "2"}
    assert all(version == "2" for start, _, version in calls if start > promoted)
    # Stronger than "requests after the switch": no answer from 1 completed after it.
    assert all(end <= promoted for _, end, version in calls if version == "1")


async def test_a_starting_replica_syncs_only_from_a_replica_set_that_names_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica whose router has no replica set yet (a broadcast reaches nobody), or an
    older one without it, must not take itself for the oldest: it waits for a set that
    names it, then serves the oldest replica's version."""

    async def load(ref: ModelRef) -> Slot:
        return Slot(ref, ref.version)

    old = RolloutEngine(Slot(ModelRef("m/1", "1"), "1"), load, RolloutPolicy(), "r1")
    new = RolloutEngine(Slot(ModelRef("m/3", "3"), "3"), load, RolloutPolicy(), "r2")
    # What the new replica's router knows, one broadcast after another (then the last).
    known: list[dict[str, RolloutEngine]] = [{}, {}, {"r1": old}, {"r1": old, "r2": new}]
    asked: list[int] = []

    async def peers(method: str, *args: Any) -> dict[str, Any]:
        assert method == "rollout_state"
        engines = known.pop(0) if len(known) > 1 else known[0]
        asked.append(len(engines))
        return {replica: engine.state() for replica, engine in engines.items()}

    async def resolve() -> ModelRef:
        return ModelRef("m/3", "3")  # the alias names a version the peers do not serve

    coordinator = Coordinator(new, peers, resolve, "models:/m@a", poll_interval_s=0.01,
                              load_timeout_s=5)  # fmt: skip
    with caplog.at_level(logging.WARNING, "shoal.integrations.rollout"):
        await coordinator.tick()  # a poll before any set: nothing to lead, nothing to log
        await coordinator.sync_from_peers()
    assert asked == [0, 0, 1, 2]
    assert new.active.version == "1"
    assert not caplog.records, [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------------ serving, in-process


def test_each_uri_form_is_served_with_its_version_and_labels(registry: Registry) -> None:
    run_1 = registry.run_ids["1"]
    forms = {
        "models:/tiny/2": "2",
        "models:/tiny@champion": "1",
        f"runs:/{run_1}/model": f"runs:/{run_1}/model",
        registry.local_path: registry.local_path,
    }
    for uri, version in forms.items():
        labels = "labels.json" if uri == registry.local_path else LABELS
        app = MLflowModel.bind(uri, tracking_uri=registry.tracking_uri, labels_artifact=labels)
        with local(app, "forms") as handle:
            answer = handle.predict_with_metadata.remote(ROWS).result(timeout_s=TIMEOUT_S)
            assert answer["model"]["version"] == version, uri
            expected = ["no", "no", "yes", "yes"] if labels == "labels.json" else None
            assert answer["predictions"] == (expected or ["negative"] * 2 + ["positive"] * 2)
            records = ROWS.to_dict(orient="records")
            same = handle.predict.remote(records).result(timeout_s=TIMEOUT_S)
            assert same == answer["predictions"]
            called = handle.remote(ROWS).result(timeout_s=TIMEOUT_S)  # __call__ is predict
            assert called == answer["predictions"]
            with pytest.raises(InvalidInputError) as caught:
                handle.predict.remote([{"x1": "high", "x2": 0}]).result(timeout_s=TIMEOUT_S)
            assert caught.value.errors[0]["loc"] == ["body", 0, "x1"]


@serve.deployment
class Compare:
    """One application, two registry models: answers with both."""

    def __init__(self, old: Any, new: Any) -> None:
        self.old, self.new = old, new

    async def __call__(self, rows: Any) -> dict[str, Any]:
        old = await self.old.predict_with_metadata.remote(rows)
        new = await self.new.predict_with_metadata.remote(rows)
        return {"old": old["model"]["version"], "new": new["model"]["version"]}


def test_several_registry_models_in_one_application(registry: Registry) -> None:
    uri = registry.tracking_uri
    app = Compare.bind(
        MLflowModel.options(name="tiny_v1").bind("models:/tiny/1", tracking_uri=uri),
        MLflowModel.options(name="tiny_v2").bind("models:/tiny/2", tracking_uri=uri),
    )
    with local(app, "two-models") as handle:
        assert handle.remote(ROWS).result(timeout_s=TIMEOUT_S) == {"old": "1", "new": "2"}
        deployments = serve.status().applications["two-models"].deployments
        assert {"tiny_v1", "tiny_v2", "Compare"} <= set(deployments)


class _VersionOneGate:
    """Holds a replica's load of version 1 while closed (see the test below)."""

    open = threading.Event()
    loading = threading.Event()  # a load of version 1 waits at the gate
    calls: dict[str, int] = {}  # replica id -> predictions asked of it


@serve.deployment(max_ongoing_requests=16)
class GatedModel(MLflowModel.func_or_class):  # type: ignore[misc, name-defined]
    """MLflowModel whose loads of version 1 wait for ``_VersionOneGate.open``."""

    async def _load_slot(self, ref: ModelRef) -> Slot:
        if ref.version == "1" and not _VersionOneGate.open.is_set():
            _VersionOneGate.loading.set()
            await asyncio.to_thread(_VersionOneGate.open.wait, TIMEOUT_S)
        return await super()._load_slot(ref)

    async def predict_with_metadata(self, data: Any, params: Any = None) -> dict[str, Any]:
        replica = self.engine.replica_id
        _VersionOneGate.calls[replica] = _VersionOneGate.calls.get(replica, 0) + 1
        return await super().predict_with_metadata(data, params)


def test_shadow_rolls_back_an_incompatible_version_and_canary_promotes_a_good_one(
    registry: Registry,
) -> None:
    registry.point("1")
    _VersionOneGate.open.set()
    policy = RolloutPolicy(
        shadow_requests=8, min_agreement=0.5, canary_fraction=0.5, canary_requests=8,
        check_interval_s=0.05,
    )  # fmt: skip

    def run(replicas: int) -> Any:
        # version=: the same code, so a new num_replicas scales instead of replacing replicas
        app = GatedModel.options(num_replicas=replicas, version="1").bind(
            "models:/tiny@champion", tracking_uri=registry.tracking_uri, poll_interval_s=0.1,
            rollout=policy,
        )  # fmt: skip
        return serve.run(app, name="policy", route_prefix=None, _local_testing_mode=True)

    try:
        handle = run(1)
        served: list[str] = []

        def decided(version: str) -> dict[str, Any] | None:
            # Traffic keeps flowing: shadow and canary judge live requests.
            answer = handle.predict_with_metadata.remote(ROWS).result(timeout_s=TIMEOUT_S)
            served.append(answer["model"]["version"])
            history = handle.rollout_history.remote().result(timeout_s=TIMEOUT_S)
            return next((e for e in history if e["version"] == version
                         and e["action"] in ("promote", "rollback", "fail")), None)  # fmt: skip

        registry.point("3")  # needs a column the clients do not send: every mirror fails
        rollback = wait_until(lambda: decided("3"), TIMEOUT_S, "a decision on version 3")
        assert rollback["action"] == "rollback"
        assert re.match(r"shadow: (\d+) of \1 requests failed on it", rollback["reason"]), rollback
        assert set(served) == {"1"}  # the candidate never answered a caller
        # A replica that starts now resolves the alias to version 3, but takes its peers'
        # version, and answers nobody until it serves it: not while the leader's sync
        # loads it (held at the gate here), which may start before its first request.
        _VersionOneGate.open.clear()
        _VersionOneGate.loading.clear()
        before = dict(_VersionOneGate.calls)
        handle = run(2)
        assert _VersionOneGate.loading.wait(TIMEOUT_S), "nobody loaded version 1 on the new replica"
        answers = [handle.predict_with_metadata.remote(ROWS) for _ in range(20)]
        wait_until(lambda: set(_VersionOneGate.calls) - set(before), TIMEOUT_S,
                   "a request reaching the new replica")  # fmt: skip
        _VersionOneGate.open.set()
        served += [a.result(timeout_s=TIMEOUT_S)["model"]["version"] for a in answers]
        status = handle.rollout_status.remote().result(timeout_s=TIMEOUT_S)
        assert [r["version"] for r in status["replicas"].values()] == ["1", "1"]
        assert set(served) == {"1"}
        registry.point("2")
        promote = wait_until(lambda: decided("2"), TIMEOUT_S, "a decision on version 2")
        assert promote["action"] == "promote", promote
        assert "shadow: " in promote["reason"] and "canary: " in promote["reason"]
        actions = [(e["action"], e["version"]) for e in handle.rollout_history.remote().result()]
        assert actions == [
            ("start", "1"), ("detect", "3"), ("load", "3"), ("shadow", "3"), ("rollback", "3"),
            ("detect", "2"), ("load", "2"), ("shadow", "2"), ("canary", "2"), ("promote", "2"),
        ]  # fmt: skip
        assert handle.predict_with_metadata.remote(ROWS).result()["model"]["version"] == "2"
    finally:
        _VersionOneGate.open.set()
        serve.delete("policy")
        registry.point("1")


def test_iris_example_answers_virginica_setosa_versicolor(registry: Registry) -> None:
    version = mlflow_iris.train_and_register(registry.tracking_uri, registry.artifacts)
    app = mlflow_iris.build_app(registry.tracking_uri, num_replicas=1)
    with local(app, "iris") as handle:
        answer = handle.predict_with_metadata.remote(mlflow_iris.SAMPLE_FLOWERS).result()
    assert answer["predictions"] == mlflow_iris.EXPECTED == ["virginica", "setosa", "versicolor"]
    assert answer["model"]["version"] == version


# ------------------------------------------------------------------ HTTP, multi-process


def test_alias_move_under_steady_load_fails_no_request(registry: Registry, http_port: int) -> None:
    registry.point("1")
    app = MLflowModel.options(num_replicas=2).bind(
        "models:/tiny@champion", tracking_uri=registry.tracking_uri, poll_interval_s=0.2
    )
    serve.run(app, name="tiny", route_prefix="/tiny")
    base = f"http://127.0.0.1:{http_port}/tiny"
    try:
        _check_http_interface(base)
        results, moved_at, promote = _move_alias_under_load(registry, base, concurrency=8)
        switched_at = promote["time"]
        failures = [r for r in results if r[2] != 200]
        after = [r for r in results if r[0] > switched_at]
        print(
            f"\nalias move under load (c=8): {len(results)} requests, {len(failures)} failed, "
            f"promoted {switched_at - moved_at:.3f} s after the alias moved; "
            f"{len(after)} requests sent after the switch, all served by version 2"
        )
        assert failures == []
        assert after and {r[3] for r in after} == {"2"}
        assert {r[3] for r in results if r[1] < moved_at} == {"1"}
        status = httpx.get(f"{base}/rollout").json()
        assert {r["version"] for r in status["replicas"].values()} == {"2"}
        assert len(status["replicas"]) == 2 and status["serving"] == "2"
    finally:
        serve.delete("tiny")
        registry.point("1")


def _check_http_interface(base: str) -> None:
    answer = httpx.post(base, json=ROWS.to_dict(orient="records"))
    assert answer.status_code == 200 and answer.headers[VERSION_HEADER] == "1"
    assert answer.json() == {"predictions": [0, 0, 1, 1], "model": {"name": "tiny", "version": "1"}}
    split = {"dataframe_split": json.loads(ROWS.to_json(orient="split", index=False))}
    assert httpx.post(f"{base}/invocations", json=split).json()["predictions"] == [0, 0, 1, 1]
    missing = httpx.post(base, json={"x1": [1.0]})
    assert missing.status_code == 422
    assert missing.json()["detail"] == [
        {"loc": ["body", "x2"], "msg": "field required", "type": "missing", "expected": "double"}
    ]
    wrong = httpx.post(base, json=[{"x1": 1.0, "x2": "0.5"}])
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", 0, "x2"]
    assert httpx.post(base, content=b"{not json").status_code == 400
    metadata = httpx.get(f"{base}/metadata").json()
    assert metadata["version"] == "1" and [c["name"] for c in metadata["signature"]] == ["x1", "x2"]


def _move_alias_under_load(
    registry: Registry, base: str, concurrency: int
) -> tuple[list[tuple[float, float, Any, str | None]], float, dict[str, Any]]:
    """Steady load; move the alias to version 2; keep loading until well after the switch."""
    results: list[tuple[float, float, Any, str | None]] = []
    stop = threading.Event()
    body = ROWS.to_dict(orient="records")

    def client() -> None:
        with httpx.Client(timeout=TIMEOUT_S) as http:
            while not stop.is_set():
                sent = time.time()
                try:
                    response = http.post(base, json=body)
                    results.append((sent, time.time(), response.status_code,
                                    response.headers.get(VERSION_HEADER)))  # fmt: skip
                except httpx.HTTPError as exc:
                    results.append((sent, time.time(), repr(exc), None))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(results) >= 100, TIMEOUT_S, "steady load")
        moved_at = time.time()
        registry.point("2")

        def promoted() -> dict[str, Any] | None:
            history = httpx.get(f"{base}/rollout").json()["history"]
            return next((e for e in history if e["action"] == "promote"), None)

        promote = wait_until(promoted, TIMEOUT_S, "the promotion of version 2")
        wait_until(lambda: sum(r[0] > promote["time"] for r in results) >= 200, TIMEOUT_S,
                   "requests after the switch")  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return results, moved_at, promote
