"""Serve a model from the MLflow model registry, then roll out a new version by moving an alias.

The end-to-end example of Ray Serve's "Integration with Model Registries", in
today's API, against a real MLflow tracking store:

1. train a ``GradientBoostingClassifier`` on iris (fixed seeds, a stratified
   split: the answers are the same on every run);
2. log it to MLflow with its signature, and its label list as a run artifact
   (``labels/iris_labels.json``);
3. register it as ``iris`` and point the alias ``champion`` at it;
4. serve ``models:/iris@champion`` with :class:`~shoal.integrations.mlflow.MLflowModel`
   (2 replicas) under ``/iris``, the labels mapping class indices to names;
5. query the three sample flowers: virginica, setosa, versicolor;
6. register a second version, move ``champion`` to it, and watch shoal roll
   the replicas over to it (``GET /iris/rollout``).

The tracking store is ``MLFLOW_TRACKING_URI`` when it is set (for example a
running ``mlflow server``); otherwise a SQLite backend store and a local
artifact directory in a fresh temporary directory (``--store DIR`` keeps them)::

    python -m examples.mlflow_iris [--port 8000] [--store DIR]

Needs ``pip install shoal[mlflow]``; importing this module imports neither mlflow
nor scikit-learn.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal import serve
from shoal.integrations.mlflow import MLflowModel
from shoal.serve import Application

MODEL_NAME = "iris"
ALIAS = "champion"
EXPERIMENT = "shoal-iris"
FEATURES = ["sepal length", "sepal width", "petal length", "petal width"]
LABELS_ARTIFACT = "labels/iris_labels.json"

#: The seed's three flowers, and what the model answers for them.
SAMPLE_FLOWERS: list[dict[str, float]] = [
    {"sepal length": 6.3, "sepal width": 3.3, "petal length": 6.0, "petal width": 2.5},
    {"sepal length": 5.1, "sepal width": 3.5, "petal length": 1.4, "petal width": 0.2},
    {"sepal length": 6.4, "sepal width": 3.2, "petal length": 4.5, "petal width": 1.5},
]
EXPECTED = ["virginica", "setosa", "versicolor"]


def local_store(directory: str | Path) -> tuple[str, str]:
    """``(tracking_uri, artifact_location)`` of a SQLite store and artifact dir in ``directory``."""
    root = Path(directory).resolve()
    (root / "artifacts").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def train_and_register(
    tracking_uri: str, artifact_location: str | None = None, n_estimators: int = 100
) -> str:
    """Train, log (model + labels artifact), register; point the alias at it; return the version."""
    import mlflow
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.model_selection import train_test_split

    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    )
    iris = load_iris()
    data = pd.DataFrame(iris.data, columns=FEATURES)
    # The seed shuffled features and targets separately; split them together instead.
    train_x, val_x, train_y, val_y = train_test_split(
        data, iris.target, test_size=0.3, stratify=iris.target, random_state=0
    )
    model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=0)
    model.fit(train_x, train_y)
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_params({"n_estimators": n_estimators})
        mlflow.log_metric("val_accuracy", float(model.score(val_x, val_y)))
        with tempfile.TemporaryDirectory() as directory:
            labels = Path(directory) / "iris_labels.json"
            labels.write_text(json.dumps(iris.target_names.tolist()))
            mlflow.log_artifact(str(labels), artifact_path="labels")
        info = mlflow.sklearn.log_model(
            model,
            signature=infer_signature(train_x, model.predict(train_x)),
            registered_model_name=MODEL_NAME,
            pip_requirements=["scikit-learn"],  # skips inferring them (a subprocess)
            **log_model_options(mlflow.sklearn.log_model),
        )
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, ALIAS, version)
    return version


def log_model_options(log_model: Any) -> dict[str, Any]:
    """Keyword arguments that differ between MLflow 2 and 3."""
    accepted = inspect.signature(log_model).parameters
    # MLflow 3 names a logged model with name=, MLflow 2 with artifact_path=.
    options: dict[str, Any] = {"name" if "name" in accepted else "artifact_path": "model"}
    if "skops_trusted_types" in accepted:  # MLflow 3 stores sklearn models with skops
        options["skops_trusted_types"] = ["sklearn.tree._tree.Tree"]
    return options


def build_app(
    tracking_uri: str, num_replicas: int = 2, poll_interval_s: float = 2.0
) -> Application:
    """MLflowModel following ``models:/iris@champion``, with class names from the run's labels."""
    return MLflowModel.options(num_replicas=num_replicas).bind(
        f"models:/{MODEL_NAME}@{ALIAS}",
        tracking_uri=tracking_uri,
        labels_artifact=LABELS_ARTIFACT,
        poll_interval_s=poll_interval_s,
    )


def query(base_url: str) -> list[str]:
    """Send the three sample flowers, one request each like the seed; print and return labels."""
    import httpx

    answers = []
    for flower in SAMPLE_FLOWERS:
        response = httpx.post(base_url, json=[flower], timeout=30.0)
        response.raise_for_status()
        label = response.json()["predictions"][0]
        print(f"{flower} -> {label} (model version {response.headers['x-model-version']})")
        answers.append(label)
    return answers


def wait_for_promotion(base_url: str, version: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll ``GET /rollout`` until ``version`` is promoted (or rolled back); return the status."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status: dict[str, Any] = httpx.get(f"{base_url}/rollout", timeout=30.0).json()
        if any(e["version"] == version and e["action"] in ("promote", "rollback", "fail")
               for e in status["history"]):  # fmt: skip
            return status
        time.sleep(0.2)
    raise TimeoutError(f"version {version} was not rolled out within {timeout_s} s")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve an MLflow registry model with shoal.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--store", default=None, help="local store directory (default: fresh)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-mlflow-") as fresh:
        # Read at run time: a running `mlflow server` wins over the local store.
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not tracking_uri:
            tracking_uri, artifacts = local_store(args.store or fresh)
        print(f"tracking store: {tracking_uri}")
        version = train_and_register(tracking_uri, artifacts)
        print(f"registered {MODEL_NAME} version {version} as @{ALIAS}")
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(build_app(tracking_uri), name="iris", route_prefix="/iris")
            base_url = f"http://{args.host}:{args.port}/iris"
            query(base_url)
            new = train_and_register(tracking_uri, artifacts, n_estimators=50)
            print(f"registered version {new} and moved @{ALIAS} to it; shoal rolls it out:")
            for event in wait_for_promotion(base_url, new)["history"]:
                print(f"  {event['when']}  {event['action']:<8} v{event['version']}: "
                      f"{event['reason']}")  # fmt: skip
            query(base_url)
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
