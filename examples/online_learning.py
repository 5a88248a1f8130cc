"""Online learning: a classifier that learns from labelled feedback while it serves.

The "online learning" pattern from "Serving ML Models in Production: Common
Patterns", with versioned live weight updates (:mod:`shoal.online`):

* ``Predictor`` (3 replicas) serves a scikit-learn ``SGDClassifier`` from a
  :class:`~shoal.online.VersionedWeights`: each answer says which weight
  generation produced it.
* ``Trainer`` (1 replica) receives labelled examples, calls ``partial_fit``,
  and publishes the updated model: ``publish`` writes a new generation to the
  :class:`~shoal.online.WeightStore` and returns once all three predictor
  replicas serve it. It warm-starts from the store, so a restart loses nothing.
* ``OnlineApi`` is the FastAPI ingress: ``POST /predict``, ``POST /feedback``,
  ``POST /reload`` (for an external trainer that wrote to the same store),
  ``GET /generations`` (the generation each predictor replica serves). Answers
  carry the generation in the JSON and in the ``x-model-generation`` header.

Run it (a fresh store in a temporary directory unless ``--store``; it drives a
simulated stream whose concept drifts, and prints prequential accuracy: each
batch is predicted first, then sent as feedback)::

    python -m examples.online_learning [--port 8000] [--steps 80] [--store DIR]

scikit-learn is needed by the replicas only: importing this module does not import it.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from shoal import serve
from shoal.online import VersionedWeights, WeightStore, notify_replicas, publish
from shoal.serve import Application, DeploymentHandle

#: Features per example.
DIMENSIONS = 2
GENERATION_HEADER = "x-model-generation"

Feature = Annotated[float, Field(allow_inf_nan=False)]
Row = Annotated[list[Feature], Field(min_length=DIMENSIONS, max_length=DIMENSIONS)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: Annotated[list[Row], Field(min_length=1, max_length=10_000)]


class FeedbackRequest(PredictRequest):
    labels: list[Annotated[int, Field(ge=0, le=1)]]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: Annotated[int, Field(ge=1)] | None = None


# ------------------------------------------------------------------ the data


class DriftingStream:
    """Points in [-1, 1]², labelled by which side of a line through 0 they fall on.

    The line turns slowly (gradual drift), jumps by 90 degrees at ``drift_at``
    (sudden drift: half the points change label), and 5% of labels are noise.
    """

    def __init__(self, seed: int = 0, drift_at: int = 40, noise: float = 0.05) -> None:
        self.rng = np.random.default_rng(seed)
        self.drift_at = drift_at
        self.noise = noise

    def angle(self, step: int) -> float:
        return 0.6 + 0.01 * step + (math.pi / 2 if step >= self.drift_at else 0.0)

    def batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` examples at time ``step``: features (size x 2) and 0/1 labels."""
        x = self.rng.uniform(-1.0, 1.0, (size, DIMENSIONS))
        theta = self.angle(step)
        y = (x @ np.array([math.cos(theta), math.sin(theta)]) > 0).astype(np.int64)
        flip = self.rng.random(size) < self.noise
        y[flip] = 1 - y[flip]
        return x, y


# ------------------------------------------------------------------ the model


def _model_of(weights: dict[str, Any]) -> Any:
    """What the store holds -> what the predictor serves (the fitted estimator)."""
    return weights["model"]


@serve.deployment(num_replicas=3)
class Predictor:
    """Serves the newest generation; ``reload_weights`` is what ``publish`` calls."""

    def __init__(self, store: WeightStore) -> None:
        # initial=None: until the first feedback there is no model, and we predict class 0.
        self.weights: VersionedWeights[Any] = VersionedWeights(store, _model_of)

    def reload_weights(self, generation: int) -> int:
        return self.weights.reload(generation)

    def generation(self) -> int:
        return self.weights.generation

    def predict(self, instances: list[list[float]]) -> dict[str, Any]:
        generation, model = self.weights.snapshot()  # one consistent pair per request
        if model is None:
            predictions = [0] * len(instances)
        else:
            predictions = [int(p) for p in model.predict(np.asarray(instances))]
        return {"predictions": predictions, "generation": generation}


@serve.deployment(num_replicas=1)
class Trainer:
    """The single writer: learns from feedback, then publishes to every predictor replica."""

    def __init__(self, predictor: DeploymentHandle, store: WeightStore, eta0: float = 0.1) -> None:
        from sklearn.linear_model import SGDClassifier

        self.predictor = predictor
        self.store = store
        self.lock = asyncio.Lock()  # one update at a time: generations follow the feedback order
        self.examples_seen = 0
        self.model = SGDClassifier(
            loss="log_loss", learning_rate="constant", eta0=eta0, random_state=0
        )
        if store.latest_generation() > 0:  # warm start: continue from what was published
            _, weights = store.load()
            self.model, self.examples_seen = weights["model"], weights["examples_seen"]

    async def learn(self, instances: list[list[float]], labels: list[int]) -> dict[str, int]:
        async with self.lock:
            x, y = np.asarray(instances, dtype=np.float64), np.asarray(labels)
            await asyncio.to_thread(self.model.partial_fit, x, y, classes=[0, 1])
            self.examples_seen += len(labels)
            weights = {"model": self.model, "examples_seen": self.examples_seen}
            generation = await publish(self.predictor, weights, self.store)
        return {"generation": generation, "examples_seen": self.examples_seen}


# ------------------------------------------------------------------ the ingress

api = FastAPI(title="shoal online-learning example")


def _answer(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={GENERATION_HEADER: str(body["generation"])})


@serve.deployment(num_replicas=1)
@serve.ingress(api)
class OnlineApi:
    def __init__(
        self, predictor: DeploymentHandle, trainer: DeploymentHandle, store: WeightStore
    ) -> None:
        self.predictor, self.trainer, self.store = predictor, trainer, store

    @api.post("/predict")
    async def predict(self, body: PredictRequest) -> JSONResponse:
        """Class 0/1 per instance, and the weight generation that produced them."""
        return _answer(await self.predictor.predict.remote(body.instances))

    @api.post("/feedback")
    async def feedback(self, body: FeedbackRequest) -> JSONResponse:
        """Learn from labelled instances; answers once every replica serves the result."""
        if len(body.labels) != len(body.instances):
            return JSONResponse({"detail": "one label per instance"}, status_code=422)
        return _answer(await self.trainer.learn.remote(body.instances, body.labels))

    @api.post("/reload")
    async def reload(self, body: ReloadRequest) -> JSONResponse:
        """Make every replica serve ``generation`` (default: the store's latest).

        For a trainer outside shoal: it saves to the same store, then calls this.
        """
        generation = body.generation
        if generation is None:
            generation = await asyncio.to_thread(self.store.latest_generation)
        replicas = await notify_replicas(self.predictor, generation)
        return _answer({"generation": generation, "replicas": replicas})

    @api.get("/generations")
    async def generations(self) -> dict[str, int]:
        """The generation each predictor replica serves right now."""
        result: dict[str, int] = await self.predictor.generation.broadcast()
        return result


def default_store_path() -> Path:
    return Path(tempfile.gettempdir()) / "shoal-online-learning" / "weights"


def build_app(store_path: str | Path | None = None, num_replicas: int = 3) -> Application:
    """The application; nothing is created on disk until the first feedback."""
    store = WeightStore(store_path if store_path is not None else default_store_path())
    predictor = Predictor.options(num_replicas=num_replicas).bind(store)
    return OnlineApi.bind(predictor, Trainer.bind(predictor, store), store)


app = build_app()


# ------------------------------------------------------------------ the simulation


def simulate(base_url: str, steps: int = 80, batch: int = 25, window: int = 5) -> list[float]:
    """Drive the stream over HTTP; print and return prequential accuracy per window."""
    import httpx

    stream = DriftingStream(drift_at=steps // 2)
    accuracies: list[float] = []
    correct = total = 0
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for step in range(steps):
            x, y = stream.batch(step, batch)
            predicted = client.post("/predict", json={"instances": x.tolist()})
            predicted.raise_for_status()
            correct += int((np.asarray(predicted.json()["predictions"]) == y).sum())
            total += len(y)
            learned = client.post("/feedback", json={"instances": x.tolist(), "labels": y.tolist()})
            learned.raise_for_status()
            if (step + 1) % window == 0:
                accuracies.append(correct / total)
                jumped = step + 1 - window <= stream.drift_at <= step
                drift = "  <- the concept jumped in this window" if jumped else ""
                print(
                    f"examples {(step + 1) * batch:>5}  generation "
                    f"{learned.headers[GENERATION_HEADER]:>4}  accuracy {correct / total:5.1%} "
                    f"{'#' * round(40 * correct / total)}{drift}",
                    flush=True,
                )
                correct = total = 0
        print("generation per predictor replica:", client.get("/generations").json())
    return accuracies


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve the online-learning example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=80, help="feedback batches of 25 examples")
    parser.add_argument("--store", default=None, help="weight store directory (default: fresh)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-online-") as fresh:
        application = build_app(args.store or Path(fresh) / "weights")
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(application, name="online", route_prefix="/online")
            simulate(f"http://{args.host}:{args.port}/online", steps=args.steps)
        finally:
            serve.shutdown()


if __name__ == "__main__":
    main()
