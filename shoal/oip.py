"""Serve models under the Open Inference Protocol (KServe / Triton "v2"), REST and gRPC::

    import numpy as np
    from shoal import oip, serve

    @serve.deployment
    @oip.model(name="double", inputs=[oip.TensorSpec("x", "FP32", [-1])],
               outputs=[oip.TensorSpec("y", "FP32", [-1])])
    class Double:
        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": inputs["x"] * 2}

    serve.run(Double.bind())  # served under /v2/models/double

For gRPC, list ``"shoal.oip:add_inference_service"`` in the ``grpc_servicer_functions`` of
``grpc_options``. Any v2 client works unchanged (``tritonclient.http`` and
``.grpc``, KServe's clients). The guide is docs/oip.md.
"""

from shoal._errors import (
    InferenceError,
    InferenceRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    UnsupportedExtensionError,
)
from shoal._oip.grpc_service import add_inference_service
from shoal._oip.model import ModelSpec, TensorSpec, model
from shoal._oip.tensors import DATATYPES

__all__ = [
    "DATATYPES",
    "InferenceError",
    "InferenceRequestError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "ModelSpec",
    "TensorSpec",
    "UnsupportedExtensionError",
    "add_inference_service",
    "model",
]
