"""Model composition: route a request through one or two models.

This is the "composed model" from Ray Serve's *Serving ML Models* guide, in
today's API. ``model_one`` scores the input; only when the score is above
``THRESHOLD`` is the input also sent to ``model_two``. The ``ComposedModel``
ingress owns that business rule and reaches the models through handles, so
each model can be scaled on its own.

Run it (serves on 127.0.0.1:8000, sends 8 requests, shuts down)::

    python -m examples.composed
"""

from __future__ import annotations

import random
from typing import Any

from starlette.requests import Request

from shoal import serve
from shoal.serve import DeploymentHandle

#: Scores above this also go through ``model_two``.
THRESHOLD = 0.5


@serve.deployment
def model_one(data: bytes) -> float:
    """Score the input: a stand-in for a real model, returning a random score in [0, 1)."""
    return random.random()


@serve.deployment
def model_two(data: bytes) -> bytes:
    """Second-stage model: a stand-in that echoes the data it was sent."""
    return data


# max_ongoing_requests bounds how many requests one replica works on at once.
# The ingress is async and spends its time awaiting the models, so it can
# usefully interleave many requests.
@serve.deployment(max_ongoing_requests=10)
class ComposedModel:
    """Ingress: call ``model_one``, and ``model_two`` too when the score is high."""

    def __init__(self, model_one: DeploymentHandle, model_two: DeploymentHandle) -> None:
        # Bound deployments passed to .bind() arrive here as handles.
        self.model_one = model_one
        self.model_two = model_two

    async def __call__(self, request: Request) -> dict[str, Any]:
        """HTTP entry point: the raw request body is the model input."""
        return await self.predict(await request.body())

    async def predict(self, data: bytes) -> dict[str, Any]:
        """Score ``data``; kept apart from ``__call__`` so handles and tests can call it."""
        # A single await: handle calls return an awaitable DeploymentResponse,
        # and awaiting it yields the model's return value.
        score: float = await self.model_one.remote(data)
        if score > THRESHOLD:
            await self.model_two.remote(data)
            return {"model_used": "1 & 2", "score": score}
        return {"model_used": "1", "score": score}


app = ComposedModel.bind(model_one.bind(), model_two.bind())


if __name__ == "__main__":
    import json
    import urllib.request

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="composed", route_prefix="/")
        for _ in range(8):
            req = urllib.request.Request("http://127.0.0.1:8000/", data=b"Hey!", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                print(json.loads(resp.read()))
    finally:
        serve.shutdown()
