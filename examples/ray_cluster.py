"""The seed patterns on a Ray cluster: every replica a Ray actor, placed by Ray.

The same application code as on one machine; only ``serve.start(runtime="ray", ...)``
changes (docs/ray.md). Each deployment asks for a custom resource that one node of
the cluster declares, so where each replica runs is visible:

* ``Gateway`` (business logic, the HTTP ingress) on the node declaring ``head``;
* ``Featurizer`` (pipeline stage) on ``node_a``;
* ``Model`` (an ensemble of two members, ``num_replicas=2``) at most one per node
  (``max_replicas_per_node=1``), on the nodes declaring ``model``.

Every node runs an HTTP proxy (``proxy_location="EveryNode"``, the default): requests
may enter through any of them (on this one-machine cluster they share the port, and
the kernel spreads connections over them). They start beside the application: ``shoal
status`` lists one per node once each serves.

Run it (starts a local three-node cluster, serves on 127.0.0.1:8000, sends requests,
prints where each part ran, shuts everything down)::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python -m examples.ray_cluster

or against a running cluster whose nodes declare those resources::

    python -m examples.ray_cluster --address auto
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

import httpx
import numpy as np
from starlette.requests import Request

from shoal import serve


def node() -> str:
    """The Ray node this replica runs on."""
    import ray

    return str(ray.get_runtime_context().get_node_id())[:8]


@serve.deployment(ray_actor_options={"resources": {"node_a": 0.1}})
class Featurizer:
    def __call__(self, text: str) -> dict[str, Any]:
        words = text.lower().split()
        return {"features": np.array([len(words), sum(map(len, words))], float), "on": node()}


@serve.deployment(
    num_replicas=2, max_replicas_per_node=1, ray_actor_options={"resources": {"model": 0.1}}
)
class Model:
    def __call__(self, features: np.ndarray) -> dict[str, Any]:
        return {"score": float(features @ np.array([0.5, 0.1])), "on": node()}


@serve.deployment(ray_actor_options={"resources": {"head": 0.1}})
class Gateway:
    def __init__(self, featurizer: Any, model: Any) -> None:
        self.featurizer, self.model = featurizer, model

    async def __call__(self, request: Request) -> dict[str, Any]:
        text = (await request.json()).get("text")
        if not isinstance(text, str) or not text:
            return {"error": f"'text' must be a non-empty string, got {text!r}"}
        featured = await self.featurizer.remote(text)
        # Concurrent calls: the router sends each to the less loaded of the two replicas,
        # so both members answer (sequential calls could all find the same one idle).
        scores = await asyncio.gather(*(self.model.remote(featured["features"]) for _ in range(4)))
        return {
            "gateway": node(),
            "featurizer": featured["on"],
            "models": sorted({s["on"] for s in scores}),
            "score": scores[0]["score"],
        }


app = Gateway.bind(Featurizer.bind(), Model.bind())


def main(address: str | None, port: int) -> dict[str, Any]:
    """Serve ``app`` on the cluster at ``address`` (None: a local three-node one made
    here), call it once, shut down; the answer."""
    cluster = None
    if address is None:
        from ray.cluster_utils import Cluster

        head = {"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        cluster.add_node(num_cpus=1, resources={"node_a": 1, "model": 1})
        cluster.add_node(num_cpus=1, resources={"model": 1})
        cluster.wait_for_nodes()
        address = cluster.address
    try:
        serve.start(runtime="ray", address=address, http_options={"port": port})
        serve.run(app)
        # A router connects to its replicas when first used: the first calls may all go
        # to the replica it reached first. A few requests show both Model replicas.
        answers = [
            httpx.post(
                f"http://127.0.0.1:{port}/", json={"text": "shoal on ray"}, timeout=60
            ).json()
            for _ in range(3)
        ]
        answer: dict[str, Any] = answers[-1]
        answer["models"] = sorted({node for a in answers for node in a["models"]})
        return answer
    finally:
        serve.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local nodes: 127.0.0.1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="a running Ray cluster's address (default: a new one)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    print(main(args.address, args.port))
