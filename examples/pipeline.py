"""Pipeline: featurize, then predict, behind an orchestrating ingress.

This is the pipeline pattern from "Serving ML Models in Production: Common
Patterns", made into a small real model: a bag-of-words sentiment scorer.

* ``Featurizer`` turns ``{"text": ...}`` into a fixed-length feature vector.
* ``Predictor`` applies a fixed linear model (``WEIGHTS``, ``BIAS``) and a
  logistic link; its decision threshold is live-tunable through ``user_config``.
* ``Orchestrator`` is the HTTP ingress: it validates input (business logic)
  and chains the two models through handles.

The predictor runs ``num_replicas=2`` while the featurizer runs one: each
stage scales independently, and requests are load-balanced across replicas.

Run it (serves on 127.0.0.1:8000, sends a few requests, shuts down)::

    python -m examples.pipeline
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import serve
from shoal.serve import DeploymentHandle

POSITIVE_WORDS = frozenset(
    {"good", "great", "love", "excellent", "happy", "fast", "nice", "amazing", "helpful"}
)
NEGATIVE_WORDS = frozenset(
    {"bad", "awful", "hate", "terrible", "sad", "slow", "broken", "poor", "useless"}
)

#: What each position of the feature vector means.
FEATURE_NAMES = ("positive_words", "negative_words", "exclamations", "log_words")
#: The linear model: score = WEIGHTS . features + BIAS.
WEIGHTS = (1.5, -1.8, 0.25, -0.1)
BIAS = 0.1


def featurize(text: str) -> list[float]:
    """Bag-of-words features for ``text``, in ``FEATURE_NAMES`` order."""
    words = re.findall(r"[a-z']+", text.lower())
    return [
        float(sum(w in POSITIVE_WORDS for w in words)),
        float(sum(w in NEGATIVE_WORDS for w in words)),
        float(text.count("!")),
        math.log1p(len(words)),
    ]


@serve.deployment
class Featurizer:
    """Stage 1: text to feature vector."""

    def __call__(self, text: str) -> list[float]:
        # Plain floats rather than an ndarray: cheap to send between processes
        # and directly JSON-serializable in the final response.
        return featurize(text)


@serve.deployment(num_replicas=2, user_config={"threshold": 0.5})
class Predictor:
    """Stage 2: a fixed linear model with a logistic link."""

    def __init__(self, weights: tuple[float, ...], bias: float) -> None:
        # Load the model once per replica, not per request.
        self.weights = np.asarray(weights, dtype=np.float64)
        self.bias = float(bias)
        self.threshold = 0.5

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: called at start-up and whenever the config changes."""
        self.threshold = float(config["threshold"])

    def __call__(self, features: list[float]) -> dict[str, Any]:
        score = float(np.dot(self.weights, np.asarray(features, dtype=np.float64)) + self.bias)
        probability = 1.0 / (1.0 + math.exp(-score))
        label = "positive" if probability >= self.threshold else "negative"
        return {"score": score, "probability": probability, "label": label}


@serve.deployment
class Orchestrator:
    """Ingress: validate the request, then run Featurizer -> Predictor."""

    def __init__(self, featurizer: DeploymentHandle, predictor: DeploymentHandle) -> None:
        self.featurizer = featurizer
        self.predictor = predictor

    async def __call__(self, request: Request) -> dict[str, Any] | JSONResponse:
        """HTTP entry point: expects a JSON body ``{"text": "..."}``."""
        try:
            payload = await request.json()
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        text = payload.get("text") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            return JSONResponse({"error": 'expected {"text": "<string>"}'}, status_code=400)
        return await self.classify(text)

    async def classify(self, text: str) -> dict[str, Any]:
        """Run the pipeline on ``text``; callable through a handle as well."""
        features: list[float] = await self.featurizer.remote(text)
        prediction: dict[str, Any] = await self.predictor.remote(features)
        return {"text": text, "features": features, **prediction}


app = Orchestrator.bind(Featurizer.bind(), Predictor.bind(weights=WEIGHTS, bias=BIAS))


if __name__ == "__main__":
    import json
    import urllib.request

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="pipeline", route_prefix="/")
        for text in ["I love it, great and fast!", "slow, broken and useless", "it is a phone"]:
            req = urllib.request.Request(
                "http://127.0.0.1:8000/",
                data=json.dumps({"text": text}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                print(json.loads(resp.read()))
    finally:
        serve.shutdown()
