"""W1 and W2 of the bench, for shoal or Ray Serve: the one source both frameworks run.

The module binds to shoal's ``serve`` (the default), or to Ray Serve's when the
environment variable ``SHOAL_BENCH_SERVE`` is ``ray`` (``python -m bench.ray_cluster``
sets it before importing ``bench.apps_ray``, so that both frameworks run exactly this
code on the same cluster). ``bench.apps`` serves them with shoal.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from bench.common import featurize, predict

#: ``ray`` -> Ray Serve; anything else (or unset) -> shoal.
FRAMEWORK_ENV = "SHOAL_BENCH_SERVE"

if TYPE_CHECKING:  # the type checker reads shoal's API; both take this code unchanged
    from shoal import serve
elif os.environ.get(FRAMEWORK_ENV) == "ray":
    from ray import serve
else:
    from shoal import serve

# High enough that c=64 never queues in the router because of the per-replica limit.
MAX_ONGOING = 1024


# --- W1: echo --------------------------------------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Echo:
    async def __call__(self, request: Request) -> Any:
        return await request.json()


# --- W2: ingress -> featurizer -> predictor -------------------------------------------
@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Featurizer:
    async def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        return featurize(body)


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Predictor:
    async def __call__(self, features: dict[str, Any]) -> float:
        return predict(features)


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
class Pipeline:
    def __init__(self, featurizer: Any, predictor: Any) -> None:
        self.featurizer = featurizer
        self.predictor = predictor

    async def __call__(self, request: Request) -> dict[str, float]:
        body = await request.json()
        feat = await self.featurizer.remote(body)
        y = await self.predictor.remote(feat)
        return {"y": y}
