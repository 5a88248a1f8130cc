"""Model multiplexing: many models served by a few replicas, each loaded where it is used.

One model per customer (a tiny linear forecaster whose weights sit in ``STORE``,
standing in for files in object storage). ``Forecaster`` runs two replicas; each
loads a customer's model the first time a request for it arrives and keeps at most
two (``@serve.multiplexed(max_num_models_per_replica=2)``), dropping the least
recently used. A request names its model with the ``serve_multiplexed_model_id``
HTTP header, or ``handle.options(multiplexed_model_id=...)``; shoal sends it to a
replica that already holds that model, so each model is loaded once, not on every
replica. Guide: docs/multiplexing.md. Run it (serves on 127.0.0.1:8000, sends a few
requests, prints the answers, shuts down)::

    python -m examples.multiplexing [--port 8000]

    curl -H 'serve_multiplexed_model_id: alice' 'http://127.0.0.1:8000/forecast?x=3'
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx
from starlette.requests import Request

from shoal import serve

#: Each customer's model: (slope, intercept).
STORE = {"alice": (2.0, 1.0), "bob": (-1.0, 4.0), "carol": (0.5, 0.0)}


class LinearModel:
    def __init__(self, slope: float, intercept: float) -> None:
        self.slope, self.intercept = slope, intercept

    def predict(self, x: float) -> float:
        return self.slope * x + self.intercept

    def __del__(self) -> None:
        """Called when the model is evicted (free GPU memory, close files... here)."""


@serve.deployment(num_replicas=2)
class Forecaster:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> LinearModel:
        if model_id not in STORE:
            raise KeyError(f"no model for customer {model_id!r}")
        await asyncio.sleep(0.1)  # reading the weights from storage
        self.loads.append(model_id)
        return LinearModel(*STORE[model_id])

    async def predict(self, x: float) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()  # from the header or the handle
        model = await self.get_model(model_id)
        replica = serve.get_replica_context().replica_id
        return {"model": model_id, "x": x, "y": model.predict(x), "replica": replica}

    async def __call__(self, request: Request) -> dict[str, Any]:
        return await self.predict(float(request.query_params["x"]))

    def loaded(self) -> list[str]:
        return self.loads


app = Forecaster.bind()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Model multiplexing over HTTP and handles.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/forecast"
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        handle = serve.run(app, name="forecast", route_prefix="/forecast")
        with httpx.Client(timeout=10) as client:

            def forecast(customer: str, x: float) -> dict[str, Any]:
                headers = {"serve_multiplexed_model_id": customer}
                reply = client.get(url, params={"x": x}, headers=headers)
                reply.raise_for_status()
                return dict(reply.json())

            first = forecast("alice", 3)
            print(f"alice(3) = {first['y']}")
            replicas = {forecast("alice", x)["replica"] for x in range(4)}
            print(f"alice, 4 more requests: served by {len(replicas)} replica")
            print(f"bob(3) = {forecast('bob', 3)['y']}")
        carol = handle.options(multiplexed_model_id="carol").predict.remote(3).result()
        print(f"carol(3) = {carol['y']} (through a handle)")
        loads = collections.Counter()
        for replica_loads in handle.loaded.broadcast().result().values():
            loads.update(replica_loads)
        print(f"loads per model: {dict(sorted(loads.items()))}")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
