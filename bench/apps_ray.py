"""The applications of ``python -m bench.ray_cluster``: one source for Ray Serve and shoal.

Its ``serve`` is shoal's (the default) or Ray Serve's when the environment variable
``SHOAL_BENCH_SERVE`` is ``ray`` (see ``bench.apps_core``, whose W1 and W2 it serves, the
same code as ``bench.apps``): the bench's driver process sets it before importing this
module, so both frameworks run exactly this code on the same cluster, with the same
``max_ongoing_requests``; everything else is each framework's default.

* ``/w1``: ``POST`` echoes its JSON body (``return await request.json()``);
* ``/w2``: ingress -> featurizer -> predictor, composed with handles;
* ``/handle``: a caller pinned to the node with the custom resource ``node_a`` calls a
  callee pinned to ``node_b`` through a handle: ``GET /handle?n=N`` makes N sequential
  ``await self.target.noop.remote()`` calls timed inside the caller (p50/p90/p99/mean in
  µs); ``GET /handle?mode=where`` answers the Ray node ids of the caller and the callee.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from bench.apps_core import MAX_ONGOING, Echo, Featurizer, Pipeline, Predictor, serve
from bench.common import summarize_us

MAX_CALLS = 200_000
#: A sliver of the node's custom resource: it pins the replica without filling the node.
PIN = 0.01


def node_id() -> str | None:
    """The Ray node id of the process running this replica (None outside Ray)."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


# --- handle round trip across nodes -----------------------------------------------------------
@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=MAX_ONGOING,
    ray_actor_options={"resources": {"node_b": PIN}},
)
class Callee:
    async def noop(self) -> None:
        return None

    async def where(self) -> str | None:
        return node_id()


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=MAX_ONGOING,
    ray_actor_options={"resources": {"node_a": PIN}},
)
class Caller:
    def __init__(self, target: Any) -> None:
        self.target = target

    async def __call__(self, request: Request) -> dict[str, Any]:
        query = request.query_params
        if query.get("mode") == "where":
            return {"caller_node": node_id(), "callee_node": await self.target.where.remote()}
        n = max(1, min(int(query.get("n", "2000")), MAX_CALLS))
        durations: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            await self.target.noop.remote()
            durations.append(time.perf_counter() - start)
        return {"mode": "seq", **summarize_us(durations)}


#: (application name, route prefix, application): deployed in this order (the pinned
#: replicas first, so that the unpinned ones cannot take the pinned nodes' CPUs).
APPS: tuple[tuple[str, str, Any], ...] = (
    ("handle", "/handle", Caller.bind(Callee.bind())),
    ("w1", "/w1", Echo.bind()),
    ("w2", "/w2", Pipeline.bind(Featurizer.bind(), Predictor.bind())),
)
