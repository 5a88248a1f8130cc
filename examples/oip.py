"""A model served under the Open Inference Protocol (KServe / Triton "v2"), REST and gRPC.

``Classifier`` is a tiny scikit-learn logistic regression (trained in its constructor on
a toy data set) declared with ``@oip.model``: shoal serves it under
``/v2/models/classifier`` and on ``inference.GRPCInferenceService``, and any v2 client
talks to it unchanged. Here: Triton's ``tritonclient.http`` (JSON, then binary tensors)
and ``tritonclient.grpc``, and plain ``httpx`` for an error. Guide: docs/oip.md. Run it
(HTTP on 127.0.0.1:8000, gRPC on 9000; prints what the clients got, shuts down)::

    python -m examples.oip [--port 8000] [--grpc-port 9000]
"""

from __future__ import annotations

import numpy as np

from shoal import oip, serve

#: The training set: two features, two classes.
X = np.array([[0.0, 0.1], [0.2, 0.0], [0.1, 0.3], [2.0, 2.1], [2.2, 1.9], [1.8, 2.3]])
Y = np.array([0, 0, 0, 1, 1, 1])


@serve.deployment
@oip.model(
    name="classifier",
    platform="sklearn",
    inputs=[oip.TensorSpec("features", "FP64", [-1, 2])],  # -1: any number of rows
    outputs=[oip.TensorSpec("label", "INT64", [-1]), oip.TensorSpec("proba", "FP64", [-1, 2])],
)
class Classifier:
    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression

        self.model = LogisticRegression().fit(X, Y)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # inputs: {input name: numpy array}, checked against the declared inputs.
        features = inputs["features"]
        return {"label": self.model.predict(features), "proba": self.model.predict_proba(features)}


app = Classifier.bind()


def main() -> None:
    import argparse

    import httpx
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    parser = argparse.ArgumentParser(description="A scikit-learn model over the v2 protocol.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=9000)
    args = parser.parse_args()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port},
            grpc_options={
                "port": args.grpc_port,
                # shoal's GRPCInferenceService: routes ModelInfer by the model's name.
                "grpc_servicer_functions": ["shoal.oip:add_inference_service"],
            },
        )
        serve.run(app, name="classifier")  # route prefix: /v2/models/classifier
        rows = np.array([[0.1, 0.2], [2.1, 2.0]])

        http = httpclient.InferenceServerClient(f"127.0.0.1:{args.port}")
        ready = http.is_server_ready(), http.is_model_ready("classifier")
        print(f"server ready: {ready[0]}, model ready: {ready[1]}")
        print("metadata:", http.get_model_metadata("classifier")["inputs"])
        for binary in (False, True):
            features = httpclient.InferInput("features", list(rows.shape), "FP64")
            features.set_data_from_numpy(rows, binary_data=binary)
            result = http.infer("classifier", [features], request_id=f"binary-{binary}")
            print(f"REST (binary data {binary}): labels {result.as_numpy('label').tolist()}, "
                  f"id {result.get_response()['id']}")  # fmt: skip

        grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{args.grpc_port}")
        features = grpcclient.InferInput("features", list(rows.shape), "FP64")
        features.set_data_from_numpy(rows)
        result = grpc.infer("classifier", [features])
        proba = result.as_numpy("proba")
        print(f"gRPC: labels {result.as_numpy('label').tolist()}, rows of proba sum to "
              f"{np.round(proba.sum(axis=1), 6).tolist()}")  # fmt: skip

        wrong = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 3],
                             "data": [1, 2, 3]}]}  # fmt: skip
        answer = httpx.post(f"http://127.0.0.1:{args.port}/v2/models/classifier/infer", json=wrong)
        print(f"wrong shape: {answer.status_code} {answer.json()}")
        http.close()
        grpc.close()
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
