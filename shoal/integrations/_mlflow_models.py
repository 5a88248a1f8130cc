"""MLflow plumbing for ``MLflowModel``: model URIs, resolving versions, loading, predicting.

Every function that touches mlflow imports it when called (they run in replicas).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shoal.integrations._mlflow_io import InvalidInputError, parse_payload, validate
from shoal.integrations._rollout import ModelRef

_INPUT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST"}


class ParsedModelUri(NamedTuple):
    """``kind``: alias, version, stage, latest, logged (``models:/m-...``), runs or path."""

    kind: str
    name: str | None = None
    selector: str | None = None


def parse_model_uri(uri: str) -> ParsedModelUri:
    """Split a model URI into what the registry needs to resolve it."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return ParsedModelUri("alias", name, alias)
        if "/" not in rest:
            return ParsedModelUri("logged", rest)
        name, selector = rest.rsplit("/", 1)
        if selector.isdigit():
            return ParsedModelUri("version", name, selector)
        return ParsedModelUri("latest" if selector == "latest" else "stage", name, selector)
    if uri.startswith("runs:/"):
        run_id = uri[len("runs:/") :].split("/", 1)[0]
        return ParsedModelUri("runs", None, run_id)
    return ParsedModelUri("path", None, uri)


def resolve(uri: str, client: Any) -> ModelRef:
    """The exact version ``uri`` names now (blocking: registry calls)."""
    parsed = parse_model_uri(uri)
    if parsed.kind == "alias":
        found = client.get_model_version_by_alias(parsed.name, parsed.selector)
        return ModelRef(f"models:/{parsed.name}/{found.version}", str(found.version),
                        parsed.name, found.run_id)  # fmt: skip
    if parsed.kind == "version":
        found = client.get_model_version(parsed.name, parsed.selector)
        return ModelRef(uri, str(found.version), parsed.name, found.run_id)
    if parsed.kind in ("latest", "stage"):
        if parsed.kind == "latest":
            versions = client.search_model_versions(f"name = '{parsed.name}'")
        else:
            with warnings.catch_warnings():  # stages are deprecated, and still work
                warnings.simplefilter("ignore", FutureWarning)
                versions = client.get_latest_versions(parsed.name, stages=[parsed.selector])
        if versions:
            found = max(versions, key=lambda v: int(v.version))
            return ModelRef(f"models:/{parsed.name}/{found.version}", str(found.version),
                            parsed.name, found.run_id)  # fmt: skip
    if parsed.kind == "runs":
        return ModelRef(uri, uri, None, parsed.selector)
    return ModelRef(uri, uri)  # a path, or a logged model (models:/m-...): no registry version


@dataclass
class Loaded:
    """A loaded pyfunc model with what requests need from it."""

    model: Any
    schema: Any
    labels: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)


def load(ref: ModelRef, labels_artifact: str | None, tracking_uri: str | None) -> Loaded:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(ref.uri)
    labels = None
    if labels_artifact:
        labels = read_labels(ref, labels_artifact, tracking_uri)
    info = {"uri": ref.uri, "name": ref.name, "version": ref.version, "run_id": ref.run_id}
    return Loaded(model, model.metadata.get_input_schema(), labels, info)


def read_labels(ref: ModelRef, artifact: str, tracking_uri: str | None) -> list[str]:
    import mlflow.artifacts

    if ref.run_id is None:
        if parse_model_uri(ref.uri).kind != "path":
            raise ValueError(f"labels_artifact needs a run: {ref.uri} has none")
        with open(os.path.join(ref.uri, artifact)) as file:
            return [str(label) for label in json.load(file)]
    with tempfile.TemporaryDirectory(prefix="shoal-mlflow-") as directory:
        path = mlflow.artifacts.download_artifacts(
            run_id=ref.run_id, artifact_path=artifact, dst_path=directory, tracking_uri=tracking_uri
        )
        with open(path) as file:
            return [str(label) for label in json.load(file)]


def predict(loaded: Loaded, data: Any, params: dict[str, Any] | None, check: bool) -> Any:
    """Parse, validate and predict on one version (blocking: runs in a worker thread)."""
    from mlflow.exceptions import MlflowException

    if isinstance(data, dict | list):
        parsed = parse_payload(data, loaded.schema)
        data, params = parsed.data, parsed.params or params
    if check:
        data = validate(data, loaded.schema)
    try:
        output = loaded.model.predict(data, params=params) if params else loaded.model.predict(data)
    except MlflowException as exc:
        if exc.error_code not in _INPUT_ERROR_CODES:
            raise
        raise InvalidInputError([{"loc": ["body"], "msg": exc.message, "type": "mlflow"}]) from None
    if loaded.labels is not None:
        output = with_labels(output, loaded.labels)
    return output


def with_labels(output: Any, labels: list[str]) -> Any:
    import numpy as np

    values = np.asarray(output)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        return output  # not class indices: leave it as the model gave it
    return [labels[int(index)] for index in values]
