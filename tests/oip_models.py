"""The models tests/test_oip.py serves under the Open Inference Protocol, and the driver
that serves them (``python tests/oip_models.py``: its own shoal, HTTP and gRPC on free
ports, printed as one JSON line; it shuts down when its stdin closes)."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np

from shoal import oip, serve

#: The training set of the scikit-learn model (two features, two classes).
X_TRAIN = np.array([[0.0, 0.1], [0.2, 0.0], [0.1, 0.3], [2.0, 2.1], [2.2, 1.9], [1.8, 2.3]])
Y_TRAIN = np.array([0, 0, 0, 1, 1, 1])


def train() -> Any:
    """The fitted classifier (it separates the training set: it predicts Y_TRAIN). scikit-learn
    is imported here, so only the replica that serves it pays for the import."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit(X_TRAIN, Y_TRAIN)


@serve.deployment
@oip.model(
    name="iris",
    versions=["1"],
    platform="sklearn",
    inputs=[oip.TensorSpec("features", "FP64", [-1, 2])],
    outputs=[oip.TensorSpec("label", "INT64", [-1]), oip.TensorSpec("proba", "FP64", [-1, 2])],
)
class SklearnModel:
    """A scikit-learn classifier (sync: runs in the replica's threads)."""

    def __init__(self) -> None:
        self.model = train()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = inputs["features"]
        return {"label": self.model.predict(features), "proba": self.model.predict_proba(features)}


@serve.deployment
@oip.model(
    name="iris",
    versions=["2"],
    platform="numpy",
    inputs=[oip.TensorSpec("features", "FP64", [-1, 2])],
    outputs=[oip.TensorSpec("label", "INT64", [-1]), oip.TensorSpec("proba", "FP64", [-1, 2])],
)
class IrisV2:
    """Version 2 of "iris", its own deployment (served at /v2/models/iris/versions/2)."""

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(inputs["features"])
        return {"label": np.full(rows, 7), "proba": np.full((rows, 2), 0.5)}


@serve.deployment
@oip.model(
    name="linear",
    versions=["1", "2"],
    platform="numpy",
    inputs=[oip.TensorSpec("x", "FP32", [-1, 4]), oip.TensorSpec("scale", "FP32", [1])],
    outputs=[oip.TensorSpec("y", "FP32", [-1]), oip.TensorSpec("version", "BYTES", [1])],
)
class NumpyModel:
    """y = x @ w * scale (async); says which version the request named."""

    WEIGHTS = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)

    async def infer(self, inputs: dict[str, np.ndarray], version: str) -> dict[str, object]:
        if not np.isfinite(inputs["x"]).all():
            raise oip.InferenceRequestError("input 'x' holds NaN or infinity; expected numbers")
        return {
            "y": inputs["x"] @ self.WEIGHTS * inputs["scale"][0],
            "version": np.array([version.encode()], dtype=object),
        }


@serve.deployment
@oip.model(name="echo")
class Echo:
    """Returns every input as the output of the same name (any datatype, any shape)."""

    async def infer(self, inputs: dict[str, np.ndarray], parameters: dict) -> dict:
        if parameters.get("fail"):
            raise RuntimeError("asked to fail")
        return dict(inputs)


@serve.deployment
@oip.model(name="probe", outputs=[oip.TensorSpec("buffer_bytes", "INT64", [1]),
                                  oip.TensorSpec("owns_data", "BOOL", [1])])  # fmt: skip
class Probe:
    """Where the input's memory comes from: an array that does not own its data and views
    a buffer larger than itself was not copied out of the request."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        array = next(iter(inputs.values()))
        base = array
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        size = memoryview(base).obj.__len__() if isinstance(base, memoryview) else -1
        return {"buffer_bytes": np.array([size]), "owns_data": np.array([array.flags.owndata])}


@serve.deployment
@oip.model(name="versions", versions=["a", "b"], multiplexed=True)
class Multiplexed:
    """Each version is a multiplexed model id (any version is accepted)."""

    async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model_id = serve.get_multiplexed_model_id()
        return {"model_id": np.array([model_id.encode()], dtype=object)}


def main() -> None:
    from conftest import free_port

    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={
            "port": grpc_port,
            "grpc_servicer_functions": ["shoal.oip:add_inference_service"],
        },
    )
    serve.run_many([
        serve.RunTarget(SklearnModel.bind(), name="iris"),
        serve.RunTarget(IrisV2.bind(), name="iris-v2", route_prefix="/v2/models/iris/versions/2"),
        serve.RunTarget(NumpyModel.bind(), name="linear"),
        serve.RunTarget(Echo.bind(), name="echo"),
        serve.RunTarget(Probe.bind(), name="probe"),
        serve.RunTarget(Multiplexed.bind(), name="versions"),
    ])  # fmt: skip
    print(json.dumps({"http": http_port, "grpc": grpc_port}), flush=True)
    sys.stdin.read()  # until the test closes it
    serve.shutdown()


if __name__ == "__main__":
    main()
