"""Serve MLflow models with shoal, and follow a registry alias with safe, recorded rollouts.

``MLflowModel`` is a ready-made deployment for any MLflow pyfunc model::

    from shoal import serve
    from shoal.integrations.mlflow import MLflowModel, RolloutPolicy

    app = MLflowModel.options(num_replicas=2).bind(
        "models:/iris@champion",               # or models:/iris/3, runs:/<id>/model, a path
        tracking_uri="sqlite:///mlflow.db",    # default: MLFLOW_TRACKING_URI / mlflow's default
        poll_interval_s=30,                    # check the alias this often
        rollout=RolloutPolicy(shadow_requests=200, min_agreement=0.9),
    )
    serve.run(app, name="iris", route_prefix="/iris")

HTTP (as the application's ingress): ``POST /`` or ``POST /invocations`` with
records, columns, ``dataframe_records``/``dataframe_split`` or ``inputs``
(MLflow's scoring-server formats) -> ``{"predictions": ..., "model": {...}}``
and an ``x-model-version`` header; 422 with the offending field when the input
does not match the model's signature; ``GET /metadata``; ``GET /rollout``.
Handles: ``predict(data)`` (a DataFrame, array, or any of the JSON forms),
``predict_with_metadata(data)``, ``model_info()``, ``rollout_history()``,
``rollout_status()``. Several models in one application:
``MLflowModel.options(name="iris").bind(...)``, ``MLflowModel.options(name="wine")...``.

mlflow is imported by the replicas, never when this module is imported. The
guide is ``docs/registry.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shoal import serve
from shoal._errors import ShoalError
from shoal.integrations._coordinator import Coordinator
from shoal.integrations._mlflow_io import InvalidInputError, to_jsonable
from shoal.integrations._mlflow_models import (
    ParsedModelUri,
    load,
    parse_model_uri,
    predict,
    resolve,
)
from shoal.integrations._rollout import ModelRef, RolloutEngine, RolloutPolicy, Slot, same_output

__all__ = [
    "VERSION_HEADER",
    "InvalidInputError",
    "MLflowModel",
    "ModelRef",
    "ParsedModelUri",
    "RolloutPolicy",
    "parse_model_uri",
    "same_output",
]

logger = logging.getLogger("shoal.integrations.mlflow")

#: Response header naming the model version that produced the answer.
VERSION_HEADER = "x-model-version"


_api = FastAPI(title="shoal MLflow model")


@serve.deployment(max_ongoing_requests=16)
@serve.ingress(_api)
class MLflowModel:
    """Serves one MLflow pyfunc model; with ``models:/name@alias``, follows the alias.

    Following an alias (``follow_alias=True`` and ``poll_interval_s`` set): the
    replicas elect the oldest of them to poll the registry (each call bounded by
    ``poll_timeout_s``; errors are logged and retried at the next poll). When the
    alias names a new version, it is loaded on every replica in the background,
    optionally shadowed and canaried (``rollout``), then every replica switches,
    or it is rolled back. Requests keep being served throughout, and none fails
    because of it. Each step is recorded: ``rollout_history()``, ``GET /rollout``.
    """

    def __init__(
        self,
        model_uri: str,
        *,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        labels_artifact: str | None = None,
        validate: bool = True,
        follow_alias: bool = True,
        poll_interval_s: float | None = 30.0,
        poll_timeout_s: float = 10.0,
        load_timeout_s: float = 600.0,
        rollout: RolloutPolicy | None = None,
    ) -> None:
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        self.model_uri = model_uri
        self._tracking_uri = tracking_uri
        self._labels_artifact = labels_artifact
        self._check = validate
        self._poll_timeout_s = poll_timeout_s
        self._load_timeout_s = load_timeout_s
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
        self._registry_pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-mlflow-registry")
        self._registry_call: asyncio.Future[Any] | None = None
        ref = resolve(model_uri, self._client)
        active = Slot(ref, load(ref, labels_artifact, tracking_uri))
        self.engine = RolloutEngine(
            active, self._load_slot, rollout or RolloutPolicy(), _replica_id()
        )
        self._coordinator: Coordinator | None = None
        self._watcher: asyncio.Task[None] | None = None
        if parse_model_uri(model_uri).kind == "alias" and follow_alias and poll_interval_s:
            self._coordinator = Coordinator(
                self.engine, self._peers, self._resolve_now, model_uri,
                poll_interval_s=poll_interval_s, load_timeout_s=load_timeout_s,
            )  # fmt: skip
            with contextlib.suppress(RuntimeError):  # no loop here: started by the first request
                self._watcher = asyncio.get_running_loop().create_task(self._coordinator.run())
        self._synced = self._coordinator is None
        self._sync_lock = asyncio.Lock()

    def __del__(self) -> None:
        watcher = getattr(self, "_watcher", None)
        if watcher is not None and not watcher.done():
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                watcher.get_loop().call_soon_threadsafe(watcher.cancel)
        pool = getattr(self, "_registry_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- predictions -------------------------------------------------------------------

    async def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """The model's output for ``data`` (a DataFrame, an array, or a JSON-style dict/list)."""
        output, _ = await self._predict(data, params)
        return output

    async def __call__(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """``handle.remote(data)``: same as ``predict``, so it composes like any model
        (for instance as a member of a ``shoal.patterns`` block). HTTP goes to the routes."""
        return await self.predict(data, params)

    async def predict_with_metadata(
        self, data: Any, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``{"predictions": output, "model": {"name", "version", "uri", "run_id"}}``."""
        output, slot = await self._predict(data, params)
        return {"predictions": output, "model": dict(slot.model.info)}

    async def _predict(self, data: Any, params: dict[str, Any] | None) -> tuple[Any, Slot]:
        if not self._synced:
            if self._coordinator is not None and self._watcher is None:
                self._watcher = asyncio.get_running_loop().create_task(self._coordinator.run())
            await self._sync_once()

        async def call(slot: Slot) -> Any:
            return await asyncio.to_thread(predict, slot.model, data, params, self._check)

        return await self.engine.serve(call)

    async def _sync_once(self) -> None:
        """A (re)started replica first takes the version its peers serve, not the alias's."""
        async with self._sync_lock:
            if self._synced or self._coordinator is None:
                return
            try:
                await asyncio.wait_for(self._coordinator.sync_from_peers(), self._load_timeout_s)
            except Exception as exc:  # serve what we loaded; the leader will converge us
                if not isinstance(exc, asyncio.CancelledError):
                    logger.warning("could not sync with peer replicas: %r", exc)
            self._synced = True

    # --- information -------------------------------------------------------------------

    async def model_info(self) -> dict[str, Any]:
        """The version this replica serves, and its input signature."""
        active = self.engine.active
        schema = active.model.schema
        return {**active.model.info, "model_uri": self.model_uri,
                "signature": json.loads(schema.to_json()) if schema is not None else None,
                "labels": active.model.labels}  # fmt: skip

    async def rollout_history(self) -> list[dict[str, Any]]:
        """Every rollout step: ``time``, ``when``, ``action``, ``version``, ``reason``..."""
        return list(self.engine.history)

    async def rollout_status(self) -> dict[str, Any]:
        """The serving version, each replica's version/candidate/phase, and the history."""
        states = await asyncio.wait_for(self._peers("rollout_state"), 30.0)
        replicas = {
            replica: {key: state[key] for key in ("version", "candidate", "phase", "counts")}
            for replica, state in states.items()
        }
        return {"model_uri": self.model_uri, "serving": self.engine.active.version,
                "replicas": replicas, "history": list(self.engine.history)}  # fmt: skip

    # --- control, called by the rollout leader through broadcasts ------------------------

    async def rollout_state(self) -> dict[str, Any]:
        return self.engine.state()

    async def rollout_prepare(self, ref: ModelRef) -> str:
        return await self.engine.prepare(ref)

    async def rollout_phase(self, ref: ModelRef, phase: str, fraction: float) -> str:
        return await self.engine.set_phase(ref, phase, fraction)

    async def rollout_activate(self, ref: ModelRef) -> str:
        return await self.engine.activate(ref)

    async def rollout_abort(self, version: str) -> str:
        return self.engine.abort(version)

    async def rollout_sync(self, serving: ModelRef, history: list[dict[str, Any]]) -> str:
        self.engine.merge_history(history)
        version = await self.engine.activate(serving)
        # Synced only once the leader's version serves: a request arriving while it loads
        # syncs itself (and waits for that same load), never answering with the version
        # this replica resolved at start (which may be one the leader rolled back).
        self._synced = True
        return version

    # --- HTTP --------------------------------------------------------------------------

    @_api.post("")  # the route prefix itself (``POST /iris``), without a redirect
    @_api.post("/")
    async def root(self, request: Request) -> JSONResponse:
        """Predict (same as ``POST /invocations``)."""
        return await self._http_predict(request)

    @_api.post("/invocations")
    async def invocations(self, request: Request) -> JSONResponse:
        """Predict: records, columns, dataframe_records/split or inputs -> predictions."""
        return await self._http_predict(request)

    @_api.get("/metadata")
    async def metadata(self) -> dict[str, Any]:
        return await self.model_info()

    @_api.get("/rollout")
    async def rollout(self) -> dict[str, Any]:
        return await self.rollout_status()

    async def _http_predict(self, request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except ValueError as exc:
            return JSONResponse({"detail": f"the body is not JSON: {exc}"}, status_code=400)
        try:
            output, slot = await self._predict(payload, None)
        except InvalidInputError as exc:
            return JSONResponse({"detail": exc.errors}, status_code=422)
        info = slot.model.info
        body = {"predictions": to_jsonable(output),
                "model": {"name": info["name"], "version": info["version"]}}  # fmt: skip
        # A version that is a path or URI may hold characters a header cannot.
        version = quote(str(info["version"]), safe=":/@+-._~")
        return JSONResponse(body, headers={VERSION_HEADER: version})

    # --- plumbing ----------------------------------------------------------------------

    async def _load_slot(self, ref: ModelRef) -> Slot:
        loaded = await asyncio.wait_for(
            asyncio.to_thread(load, ref, self._labels_artifact, self._tracking_uri),
            self._load_timeout_s,
        )
        return Slot(ref, loaded)

    async def _resolve_now(self) -> ModelRef:
        """Resolve the alias in the registry thread, bounded by ``poll_timeout_s``."""
        if self._registry_call is not None and not self._registry_call.done():
            raise TimeoutError("the previous registry call has not returned yet")
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._registry_pool, resolve, self.model_uri, self._client)
        self._registry_call = call
        return await asyncio.wait_for(asyncio.shield(call), self._poll_timeout_s)

    async def _peers(self, method: str, *args: Any) -> dict[str, Any]:
        context = serve.get_replica_context()
        handle = serve.get_deployment_handle(context.deployment, context.app_name)
        replies: dict[str, Any] = await getattr(handle, method).broadcast(*args)
        return replies


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id
    except ShoalError:
        return f"local-{os.getpid()}"
