"""Ensemble: query several models concurrently and aggregate their answers.

This is the ensemble from Ray Serve's *Serving ML Models* guide, in today's
API. Three regressors (one class deployed three times under different names
and parameters) each take ``MODEL_DELAY_S`` to answer. ``EnsembleModel``
sends the input to all of them at once with ``asyncio.gather``, so a request
takes about one model's latency rather than the sum, and returns every
prediction plus their mean (regression-style aggregation).

Run it (serves on 127.0.0.1:8000, sends a few concurrent requests, shuts down)::

    python -m examples.ensemble
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import serve
from shoal.serve import DeploymentHandle

#: Simulated inference time of each member model.
MODEL_DELAY_S = 0.2

#: Member name -> (slope, intercept). Their order is the order of "predictions".
MEMBERS: dict[str, tuple[float, float]] = {
    "regressor_a": (2.0, 1.0),
    "regressor_b": (1.5, 3.0),
    "regressor_c": (-0.5, 4.0),
}


@serve.deployment
class LinearRegressor:
    """One ensemble member: ``y = slope * x + intercept``."""

    def __init__(self, slope: float, intercept: float) -> None:
        self.slope = slope
        self.intercept = intercept

    async def __call__(self, x: float) -> float:
        # An async sleep stands in for inference; it yields the event loop, so
        # the members' delays overlap instead of adding up.
        await asyncio.sleep(MODEL_DELAY_S)
        return self.slope * x + self.intercept


@serve.deployment(max_ongoing_requests=10)
class EnsembleModel:
    """Ingress: fan out to every member concurrently, then average."""

    def __init__(self, *members: DeploymentHandle) -> None:
        self.members = members

    async def __call__(self, request: Request) -> dict[str, Any] | JSONResponse:
        """HTTP entry point: expects a JSON body ``{"x": <number>}``."""
        try:
            x = float((await request.json())["x"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'expected {"x": <number>}'}, status_code=400)
        return await self.predict(x)

    async def predict(self, x: float) -> dict[str, Any]:
        """Ask every member about ``x`` at once; callable through a handle as well."""
        # Start all calls before awaiting any of them: that is what makes the
        # ensemble concurrent. gather() keeps the members' order.
        predictions = await asyncio.gather(*(member.remote(x) for member in self.members))
        return {"x": x, "predictions": list(predictions), "mean": statistics.fmean(predictions)}


# One class, three deployments: .options(name=...) gives each its own name
# (and could give each its own num_replicas).
app = EnsembleModel.bind(
    *(
        LinearRegressor.options(name=name).bind(slope, intercept)
        for name, (slope, intercept) in MEMBERS.items()
    )
)


if __name__ == "__main__":
    import json
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def ask(x: float) -> Any:
        """POST ``{"x": x}`` to the ensemble and return the decoded JSON."""
        req = urllib.request.Request(
            "http://127.0.0.1:8000/",
            data=json.dumps({"x": x}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    try:
        serve.run(app, name="ensemble", route_prefix="/")
        start = time.perf_counter()
        # Four concurrent requests, each fanning out to three members: twelve
        # model calls in flight, all done in about one MODEL_DELAY_S.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for result in pool.map(ask, [0.0, 1.0, 2.0, 3.0]):
                print(result)
        print(f"4 requests x {len(MEMBERS)} models in {time.perf_counter() - start:.2f}s")
    finally:
        serve.shutdown()
