"""Applications of tests/test_ray_runtime.py: the seed patterns spread over Ray nodes.

Every deployment says on which Ray node it ran, so the test can check that placement
followed the custom resources each node declares.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from fastapi import FastAPI

from shoal import serve


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@serve.deployment(ray_actor_options={"resources": {"node_a": 0.1}})
class Scale:
    """Pipeline stage on node_a: receives an array from another node, returns one."""

    def __call__(self, values: np.ndarray) -> dict[str, Any]:
        return {"node": _node(), "pid": os.getpid(), "array": values * 2}


@serve.deployment(ray_actor_options={"resources": {"node_a": 0.1}})
class SumModel:
    def __call__(self, values: np.ndarray) -> dict[str, Any]:
        return {"node": _node(), "score": float(values.sum())}


@serve.deployment(ray_actor_options={"resources": {"node_b": 0.1}})
class MaxModel:
    def __call__(self, values: np.ndarray) -> dict[str, Any]:
        return {"node": _node(), "score": float(values.max())}


api = FastAPI()


@serve.deployment(ray_actor_options={"resources": {"head": 0.1}})
@serve.ingress(api)
class Gateway:
    """Business logic (FastAPI) on the head node: validates, runs the pipeline, then
    the ensemble of two models on two other nodes."""

    def __init__(self, scale: Any, sum_model: Any, max_model: Any) -> None:
        self.scale, self.sum_model, self.max_model = scale, sum_model, max_model

    @api.get("/predict")
    async def predict(self, size: int = 1000) -> dict[str, Any]:
        if size <= 0:
            from fastapi import HTTPException

            raise HTTPException(status_code=422, detail=f"size must be > 0, got {size}")
        scaled = await self.scale.remote(np.arange(size, dtype=np.float64))
        array = scaled["array"]
        sums, maxes = await self.sum_model.remote(array), await self.max_model.remote(array)
        return {
            "gateway": _node(),
            "scale": {"node": scaled["node"], "pid": scaled["pid"], "dtype": str(array.dtype),
                      "shape": list(array.shape)},
            "sum": sums,
            "max": maxes,
        }  # fmt: skip


app = Gateway.bind(Scale.bind(), SumModel.bind(), MaxModel.bind())


@serve.deployment(ray_actor_options={"resources": {"nowhere": 1}})
class Unplaceable:
    def __call__(self) -> str:
        return "never"


unplaceable = Unplaceable.bind()


@serve.deployment
class Echo:
    def __call__(self, request: Any) -> str:
        return "echo"


echo = Echo.bind()


@serve.deployment(num_replicas=2, ray_actor_options={"resources": {"spread": 0.6}})
class Spread:
    """Two replicas that Ray must put on two nodes (each node declares "spread": 1)."""

    def __call__(self, request: Any) -> str:
        return _node()


spread = Spread.bind()


@serve.deployment
class Where:
    """Answers with the Ray node it runs on (it fails outside a Ray actor)."""

    def __call__(self, request: Any) -> str:
        return _node()


where = Where.bind()


@serve.deployment(
    ray_actor_options={"resources": {"node_a": 0.1}, "memory": 10**8},
    placement_group_bundles=[{"node_a": 0.1, "memory": 10**8}, {"node_b": 0.1}],
    placement_group_strategy="SPREAD",
)
class Grouped:
    """Runs in the first bundle (node_a) of a placement group that also holds node_b."""

    def __call__(self, request: Any) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context()
        return {"node": _node(), "group": context.get_placement_group_id()}


grouped = Grouped.bind()


@serve.deployment(num_replicas=3, max_replicas_per_node=1)
class PerNode:
    """Three replicas, at most one per node: one on each node of the cluster."""

    def __call__(self, request: Any) -> str:
        return _node()


per_node = PerNode.bind()
