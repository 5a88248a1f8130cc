"""Business logic: authenticate, validate and look up features before calling a model.

The "business logic" pattern from "Serving ML Models in Production: Common
Patterns": the web-facing work (API keys, input validation, a feature-store
lookup) lives in one deployment and the model in another, each scaled on its own.

* ``BusinessLogic`` is the HTTP ingress, a FastAPI app (``num_replicas=2``). It
  checks the ``x-api-key`` header (401), validates the JSON body with pydantic
  (422), fetches the user's pre-computed features from a feature store (404 for
  an unknown user), overrides them with request-time ``context`` values, and
  calls the model through a handle with plain Python lists and dicts.
* ``IrisClassifier`` is the model (``num_replicas=1``): a scikit-learn logistic
  regression trained at start-up on the iris data set that ships with
  scikit-learn (well under a second).
* The feature store is a SQLite file that the ingress creates and fills at
  start-up (one row per demo user); lookups run in worker threads so they never
  block the replica's event loop. Give ``build_app(redis_url=...)`` to read
  features from Redis instead (needs the ``redis`` package).

Run it (serves on 127.0.0.1:8000 until Ctrl-C; prints curl lines)::

    python -m examples.business_logic [--port 8000] [--db PATH] [--redis-url URL]

scikit-learn is needed by the replicas only: importing this module does not import it.
"""

from __future__ import annotations

import hmac
import importlib.util
import math
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field

from examples.feature_store import Features, open_store
from shoal import serve
from shoal.serve import Application, DeploymentHandle

#: The model's inputs, in order; also the names of the stored features.
FEATURES = ("sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm")
#: The key ``build_app`` accepts unless told otherwise. Replace it in any real deployment.
DEMO_API_KEY = "demo-key"
#: SQLite stores 64-bit integers: a larger id cannot exist, so it is a 422, not a 500.
MAX_USER_ID = 2**63 - 1

UserId = Annotated[int, Field(ge=1, le=MAX_USER_ID, description="The user to score.")]
Centimetres = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]


class Context(BaseModel):
    """Request-time features: each one given replaces the stored value."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sepal_length_cm: Centimetres | None = None
    sepal_width_cm: Centimetres | None = None
    petal_length_cm: Centimetres | None = None
    petal_width_cm: Centimetres | None = None


class PredictRequest(BaseModel):
    """``POST /predict``: whom to score, plus optional request-time features."""

    # strict: "7" is not a user id, and true is not a measurement.
    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: UserId
    context: Context = Field(default_factory=Context)


class ModelInfo(BaseModel):
    name: str
    version: str
    classes: list[str]
    training_accuracy: float


class Prediction(BaseModel):
    user_id: int
    label: str
    probabilities: dict[str, float]
    features: dict[str, float]
    model: ModelInfo
    request_id: str


def demo_rows() -> list[tuple[int, Features]]:
    """The demo users' pre-computed features: user ``i`` (1..150) is row ``i - 1`` of iris."""
    from sklearn.datasets import load_iris

    rows = load_iris().data
    return [(i, dict(zip(FEATURES, map(float, row), strict=True))) for i, row in enumerate(rows, 1)]


# ------------------------------------------------------------------ the model


@serve.deployment(num_replicas=1)
class IrisClassifier:
    """Compute-bound stage: a scikit-learn model, trained once per replica at start-up."""

    def __init__(self, version: str = "1") -> None:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        iris = load_iris()
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        self.model.fit(iris.data, iris.target)
        self.classes = [str(name) for name in iris.target_names]
        self.info = ModelInfo(
            name="iris-logistic-regression",
            version=version,
            classes=self.classes,
            training_accuracy=float(self.model.score(iris.data, iris.target)),
        ).model_dump()

    def describe(self) -> dict[str, Any]:
        return self.info

    def predict(self, features: list[float]) -> dict[str, Any]:
        """Plain lists in, plain dicts out: no tensor-in/tensor-out interface to maintain.

        A sync method: shoal runs it in the replica's thread pool, off the loop.
        """
        probabilities = self.model.predict_proba([features])[0]
        best = int(probabilities.argmax())
        return {
            "label": self.classes[best],
            "probabilities": dict(zip(self.classes, map(float, probabilities), strict=True)),
            "model": self.info,
        }


# ------------------------------------------------------------------ the ingress


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Close the replica's feature store when the replica stops."""
    yield
    # shoal runs the ingress app's lifespan inside the replica, so the replica
    # context names the BusinessLogic instance whose store this is.
    await serve.get_replica_context().servable_object.store.aclose()


api = FastAPI(
    lifespan=lifespan,
    title="shoal business-logic example",
    version="1.0",
    description="Scores iris users: API key, validation, feature-store lookup, then the model.",
)
api_key_header = APIKeyHeader(
    name="x-api-key", auto_error=False, description="One of the keys given to build_app."
)
UNAUTHORIZED = {401: {"description": "Missing or invalid x-api-key header"}}
UNKNOWN_USER = {404: {"description": "No features are stored for this user"}}


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, made safe for ``NaN``/``Infinity``/``1e400`` in the body.

    Python's JSON parser accepts them, pydantic then rejects the value, and
    FastAPI's own handler fails to echo it back (JSON has no such numbers): a 500.
    """
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name (``"nan"``, ``"inf"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


async def require_api_key(api_key: str | None = Security(api_key_header)) -> None:
    """Reject the request (401) unless it carries one of the ingress's API keys."""
    if not api_key:
        raise HTTPException(
            401, "missing API key: send it in the x-api-key header",
            headers={"WWW-Authenticate": "ApiKey"},
        )  # fmt: skip
    # This runs inside the ingress replica: its instance holds the accepted keys.
    ingress = serve.get_replica_context().servable_object
    if not ingress.accepts(api_key):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "ApiKey"})


@serve.deployment(num_replicas=2)
@serve.ingress(api)
class BusinessLogic:
    """I/O-bound stage: authentication, validation, feature lookup, then the model."""

    def __init__(
        self,
        model: DeploymentHandle,
        db_path: str,
        api_keys: Sequence[str],
        redis_url: str | None = None,
    ) -> None:
        self.model = model
        self._keys = [key.encode() for key in api_keys]
        self.store = open_store(db_path, redis_url)
        # Demo data only: in production a feature pipeline fills the store.
        self.store.seed(demo_rows())

    def accepts(self, api_key: str) -> bool:
        supplied = api_key.encode()
        # compare_digest against every key: the time taken reveals nothing about them.
        return sum(hmac.compare_digest(supplied, key) for key in self._keys) > 0

    @api.post(
        "/predict",
        dependencies=[Depends(require_api_key)],
        responses={**UNAUTHORIZED, **UNKNOWN_USER},
    )
    async def predict(self, body: PredictRequest) -> Prediction:
        """Score a user from their stored features, overridden by ``context``."""
        features = await self._features(body.user_id)
        features.update(body.context.model_dump(exclude_none=True))
        result = await self.model.predict.remote([features[name] for name in FEATURES])
        return Prediction(
            user_id=body.user_id,
            features=features,
            request_id=serve.get_request_context().request_id,
            **result,
        )

    @api.get(
        "/users/{user_id}/features",
        dependencies=[Depends(require_api_key)],
        responses={**UNAUTHORIZED, **UNKNOWN_USER},
    )
    async def features(self, user_id: Annotated[int, PathParam(ge=1, le=MAX_USER_ID)]) -> Features:
        """The user's stored features."""
        return await self._features(user_id)

    @api.get("/model")
    async def model_info(self) -> ModelInfo:
        """Which model answers (public: no key needed)."""
        return ModelInfo(**await self.model.describe.remote())

    async def _features(self, user_id: int) -> Features:
        features = await self.store.get(user_id)
        if features is None:
            raise HTTPException(404, f"no features stored for user {user_id}")
        return features


def default_db_path() -> Path:
    """Where the SQLite store lives unless ``build_app(db_path=...)`` says otherwise."""
    return Path(tempfile.gettempdir()) / "shoal-business-logic" / "features.sqlite3"


def build_app(
    db_path: str | Path | None = None,
    redis_url: str | None = None,
    api_keys: Iterable[str] = (DEMO_API_KEY,),
    model_version: str = "1",
) -> Application:
    """The application: ``BusinessLogic`` in front of ``IrisClassifier``.

    Nothing is created here; each ingress replica creates and fills the store
    (SQLite at ``db_path``, or Redis at ``redis_url``) when it starts.
    """
    # A lone string is one key, not an iterable of one-character keys.
    keys = (api_keys,) if isinstance(api_keys, str) else tuple(api_keys)
    if not keys or not all(isinstance(key, str) and key for key in keys):
        raise ValueError("api_keys must hold at least one non-empty string")
    if redis_url and importlib.util.find_spec("redis") is None:
        raise ValueError("redis_url needs the redis package: pip install redis")
    path = str(db_path if db_path is not None else default_db_path())
    return BusinessLogic.bind(IrisClassifier.bind(model_version), path, keys, redis_url)


app = build_app()


def curl_lines(base_url: str, api_key: str = DEMO_API_KEY) -> list[str]:
    """Copy-pasteable requests against an app served at ``base_url``."""
    key = f"-H 'x-api-key: {api_key}'"
    json_type = "-H 'content-type: application/json'"
    return [
        f"curl -s {base_url}/model",
        f"curl -s {key} {base_url}/users/1/features",
        f"curl -s {key} {json_type} {base_url}/predict -d '{{\"user_id\": 1}}'",
        f"curl -s {key} {json_type} {base_url}/predict "
        '-d \'{"user_id": 1, "context": {"petal_length_cm": 5.5, "petal_width_cm": 2.1}}\'',
        f"curl -s -i {base_url}/predict -d '{{\"user_id\": 1}}'   # 401: no key",
    ]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve the business-logic example.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default=None, help=f"SQLite file (default: {default_db_path()})")
    parser.add_argument("--redis-url", default=None, help="read features from Redis instead")
    parser.add_argument(
        "--api-key", action="append", help=f"an accepted key, repeatable (default: {DEMO_API_KEY})"
    )
    args = parser.parse_args()
    application = build_app(args.db, args.redis_url, args.api_key or (DEMO_API_KEY,))
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(application, name="business", route_prefix="/business")
        print("\n".join(curl_lines(f"http://{args.host}:{args.port}/business")))
        print("Serving. Press Ctrl-C to stop.", flush=True)
        while True:  # until Ctrl-C raises KeyboardInterrupt here (short sleeps: see demo.py)
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
