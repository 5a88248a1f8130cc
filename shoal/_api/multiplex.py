"""Model multiplexing: ``@serve.multiplexed`` and ``serve.get_multiplexed_model_id()``.

A loader decorated with ``@serve.multiplexed(max_num_models_per_replica=N)`` gets one
LRU cache of loaded models per replica (per decorated method and object, as in Ray
Serve). Guarantees:

- a model id already loaded (or being loaded) is returned without calling the
  loader again: concurrent calls for an id share one load;
- at most N models are held (loaded or loading); the least recently used is evicted
  to make room, and released: its ``__del__`` is called (awaited when async), as in
  Ray Serve; a model without one has its ``aclose()`` awaited or its ``close()``
  called instead (a shoal extension). Errors there are logged, never raised;
- at most ``max_concurrent_loads`` loads run at once (Ray: 1, its only behaviour);
- a failed load is not cached: the next call tries again;
- the replica reports the ids it holds (loaded, and loading) to every router that
  watches it (:meth:`ReplicaModels.watch`, which the replica serves as the reserved
  method :data:`shoal._router.models.WATCH_METHOD`), at once on every change;
- when the replica stops, every model is released (:func:`close_replica`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shoal._api.context import replica_context, request_context
from shoal._observe import metrics
from shoal._observe.logs import SERVE_LOGGER_NAME

logger = logging.getLogger(SERVE_LOGGER_NAME)  # the replica's log, as Ray's lines

#: Ray Serve's default ``max_num_models_per_replica``.
DEFAULT_MAX_MODELS = 3
#: The attribute prefix under which a method's cache lives on its object.
_ATTRIBUTE = "__shoal_multiplexed_"
_MODEL_LOAD_BUCKETS_MS = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 60000, 300000)


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the request being served ("" when it has none).

    It comes from the ``serve_multiplexed_model_id`` HTTP header or from
    ``handle.options(multiplexed_model_id=...)``.
    """
    return request_context.get().multiplexed_model_id


def multiplexed(
    func: Callable[..., Any] | None = None,
    max_num_models_per_replica: int = DEFAULT_MAX_MODELS,
    max_concurrent_loads: int = 1,
) -> Any:
    """Make an async model loader (``async def load(self, model_id: str)``) cache its
    models per replica, at most ``max_num_models_per_replica`` (-1: no limit), evicting
    the least recently used. ``max_concurrent_loads`` (a shoal extension) bounds how
    many loads of this loader run at once in a replica (default 1, as Ray Serve)."""
    _check_limits(max_num_models_per_replica, max_concurrent_loads)
    if func is not None:
        _check_loader(func)

    def decorate(loader: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        _check_loader(loader)
        is_method = len(inspect.signature(loader).parameters) == 2
        caches: dict[Any, ModelCache] = {}  # functions: by replica id
        attribute = _ATTRIBUTE + loader.__name__  # methods: on their object

        @functools.wraps(loader)
        async def load(*args: Any) -> Any:
            if len(args) != (2 if is_method else 1):
                raise TypeError(
                    f"@serve.multiplexed function '{loader.__qualname__}' takes exactly one "
                    f"argument, the model id (str); got {len(args) - is_method} arguments"
                )
            cache = args[0].__dict__.get(attribute) if is_method else None
            if cache is None:
                owner = args[0] if is_method else None
                cache = _cache_of(loader, owner, caches, attribute, max_num_models_per_replica,
                                  max_concurrent_loads)  # fmt: skip
            return await cache.get(args[-1])

        return load

    return decorate(func) if func is not None else decorate


def _check_limits(max_models: Any, max_loads: Any) -> None:
    if isinstance(max_models, bool) or not isinstance(max_models, int):
        raise TypeError(f"max_num_models_per_replica must be an integer, got {max_models!r}")
    if max_models != -1 and max_models <= 0:
        raise ValueError(
            f"max_num_models_per_replica must be positive (or -1: no limit), got {max_models!r}"
        )
    if isinstance(max_loads, bool) or not isinstance(max_loads, int) or max_loads < 1:
        raise ValueError(f"max_concurrent_loads must be a positive integer, got {max_loads!r}")
    if max_models != -1 and max_loads > max_models:
        raise ValueError(
            f"max_concurrent_loads={max_loads!r} exceeds max_num_models_per_replica="
            f"{max_models!r}: a replica cannot load more models at once than it holds"
        )


def _check_loader(func: Any) -> None:
    if not callable(func):
        raise TypeError(f"@serve.multiplexed decorates a function or method, got {func!r}")
    if not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"@serve.multiplexed can only decorate async functions or methods; "
            f"'{getattr(func, '__qualname__', func)!s}' is not (define it with async def)"
        )
    count = len(inspect.signature(func).parameters)
    if count not in (1, 2):
        raise TypeError(
            f"@serve.multiplexed decorates functions or methods taking one 'model_id: str' "
            f"argument; '{func.__qualname__}' takes {count}"
        )


def _cache_of(
    loader: Callable[..., Any], owner: Any, caches: dict[Any, ModelCache], attribute: str,
    max_models: int, max_loads: int,
) -> ModelCache:  # fmt: skip
    """The cache of ``loader`` for ``owner`` (a method's object; made on first use) or,
    for a function, of this replica."""
    context = replica_context.get()
    replica_id = context.replica_id if context is not None else ""
    if owner is not None:
        cache = ModelCache(
            functools.partial(loader, owner), max_models, max_loads, replica_id, context
        )
        setattr(owner, attribute, cache)
        return cache
    shared = caches.get(replica_id)
    if shared is None:
        shared = caches[replica_id] = ModelCache(loader, max_models, max_loads, replica_id, context)
    return shared


class ModelCache:
    """The loaded models of one loader in one replica, least recently used first."""

    def __init__(
        self, load: Callable[[str], Awaitable[Any]], max_models: int, max_loads: int,
        replica_id: str, context: Any,
    ) -> None:  # fmt: skip
        self._load = load
        self.max_models = max_models
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Task[Any]] = {}
        self._loads = asyncio.Semaphore(max_loads)
        self._started = 0  # loads holding a load slot (they count against max_models)
        self._replica = replica_models(replica_id)
        self._replica.add(self)
        self._metrics = _CacheMetrics(context) if context is not None else None

    async def get(self, model_id: Any) -> Any:
        if type(model_id) is not str:
            raise TypeError(f"the model id must be a str, got {model_id!r}")
        if not model_id:
            raise ValueError("the model id cannot be empty ('')")
        models = self.models
        if model_id in models:
            models.move_to_end(model_id)
            if self._metrics is not None:
                self._metrics.requested(hit=True)
            return models[model_id]
        task = self.loading.get(model_id)
        if self._metrics is not None:
            self._metrics.requested(hit=task is not None)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_one(model_id))
            task.add_done_callback(_retrieved)  # every caller may have left
            self.loading[model_id] = task
            self._replica.changed()
        # Shielded: a caller that leaves (cancelled) does not abort a load others share.
        return await asyncio.shield(task)

    async def _load_one(self, model_id: str) -> Any:
        try:
            async with self._loads:
                self._started += 1
                try:
                    await self._make_room()
                    logger.info("Loading model '%s'.", model_id)
                    started = time.perf_counter()
                    model = await self._load(model_id)
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    logger.info("Loaded model '%s' in %.1f ms.", model_id, elapsed_ms)
                    if self._metrics is not None:
                        self._metrics.loaded(elapsed_ms)
                    self.models[model_id] = model
                    return model
                finally:
                    self._started -= 1
        except Exception as exc:
            logger.error("Failed to load model '%s': %r", model_id, exc)
            raise
        finally:
            self.loading.pop(model_id, None)
            self._replica.changed()

    async def _make_room(self) -> None:
        """Evict least recently used models until the loads started fit in the limit."""
        if self.max_models == -1:
            return
        while self.models and len(self.models) + self._started > self.max_models:
            model_id, model = self.models.popitem(last=False)
            self._replica.changed()
            await self._release(model_id, model)

    async def _release(self, model_id: str, model: Any, in_thread: bool = True) -> None:
        logger.info("Unloading model '%s'.", model_id)
        started = time.perf_counter()
        try:
            await release(model, in_thread)
        except Exception:
            logger.exception("Releasing model '%s' raised", model_id)
        if self._metrics is not None:
            self._metrics.unloaded((time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        """Release every model (the replica stops; on the loop: at interpreter exit the
        thread pools are closed already)."""
        while self.models:
            model_id, model = self.models.popitem(last=False)
            await self._release(model_id, model, in_thread=False)


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def release(model: Any, in_thread: bool = True) -> None:
    """Release an evicted model: its ``__del__`` (Ray Serve), else ``aclose()``/``close()``;
    a sync one runs in a thread (``in_thread``) or on the loop."""
    destructor = getattr(type(model), "__del__", None)
    names = ("__del__",) if destructor is not None else ("aclose", "close")
    for name in names:
        method = getattr(model, name, None)
        if not callable(method) or isinstance(model, type):
            continue
        if inspect.iscoroutinefunction(method):
            await method()
            return
        if in_thread:
            result = await asyncio.get_running_loop().run_in_executor(None, method)
        else:
            result = method()
        if inspect.isawaitable(result):
            await result
        return


class _CacheMetrics:
    """Ray Serve's multiplexing metrics of one cache, plus shoal's hit/miss counter."""

    def __init__(self, context: Any) -> None:
        labels = (context.deployment, context.replica_id, context.app_name)
        names = ("deployment", "replica", "application")
        self._load_ms = metrics.histogram(
            "ray_serve_multiplexed_model_load_latency_ms", "The time it takes to load a model.",
            names, buckets=_MODEL_LOAD_BUCKETS_MS,
        ).labels(*labels)  # fmt: skip
        self._unload_ms = metrics.histogram(
            "ray_serve_multiplexed_model_unload_latency_ms",
            "The time it takes to unload a model.", names, buckets=_MODEL_LOAD_BUCKETS_MS,
        ).labels(*labels)  # fmt: skip
        self._loads = metrics.counter(
            "ray_serve_multiplexed_models_load_counter",
            "The counter for loaded models on the current replica.", names,
        ).labels(*labels)  # fmt: skip
        self._unloads = metrics.counter(
            "ray_serve_multiplexed_models_unload_counter",
            "The counter for unloaded models on the current replica.", names,
        ).labels(*labels)  # fmt: skip
        self._requests = metrics.counter(
            "ray_serve_multiplexed_get_model_requests_counter",
            "The counter for get model requests on the current replica.", names,
        ).labels(*labels)  # fmt: skip
        results = metrics.counter(
            "shoal_multiplexed_model_requests",
            "Calls of a multiplexed loader by result: hit (the model was loaded or being "
            "loaded on this replica) or miss (the call started a load).",
            (*names, "result"),
        )  # fmt: skip
        self._hits = results.labels(*labels, "hit")
        self._misses = results.labels(*labels, "miss")

    def requested(self, hit: bool) -> None:
        self._requests.inc()
        (self._hits if hit else self._misses).inc()

    def loaded(self, elapsed_ms: float) -> None:
        self._loads.inc()
        self._load_ms.observe(elapsed_ms)

    def unloaded(self, elapsed_ms: float) -> None:
        self._unloads.inc()
        self._unload_ms.observe(elapsed_ms)


class ReplicaModels:
    """Every multiplexed cache of one replica, and the routers watching their ids."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.caches: list[ModelCache] = []
        self.version = 0
        self.closed = False
        self._changed: asyncio.Event | None = None
        self._gauge: tuple[str, ...] | None = None  # the labels of our models gauge

    def add(self, cache: ModelCache) -> None:
        if not self.caches and self.replica_id:
            context = replica_context.get()
            if context is not None and metrics.enabled():
                self._gauge = (context.deployment, context.replica_id, context.app_name)
                _models_gauge().watch(self.count, *self._gauge)  # read when collected
        self.caches.append(cache)
        self.changed()

    def count(self) -> int:
        return sum(len(cache.models) for cache in self.caches)

    def model_ids(self) -> tuple[list[str], list[str]]:
        """The ids loaded, and the ids being loaded, by every cache (without repeats)."""
        loaded = dict.fromkeys(m for cache in self.caches for m in cache.models)
        loading = [m for c in self.caches for m in c.loading if m not in c.models]
        return list(loaded), [m for m in dict.fromkeys(loading) if m not in loaded]

    def changed(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def watch(self) -> AsyncIterator[tuple[list[str], list[str]]]:
        """The model ids held now (loaded, loading), then after every change, until the
        replica stops (changes made meanwhile are coalesced: the latest is sent)."""
        seen = -1
        while not self.closed:
            if seen != self.version:
                seen = self.version
                yield self.model_ids()
                continue
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def close(self) -> None:
        """The replica stops: release every model, end the watches."""
        for cache in self.caches:
            await cache.close()
        self.closed = True
        self.changed()
        _REPLICAS.pop(self.replica_id, None)
        if self._gauge is not None:
            _models_gauge().remove(*self._gauge)


def _models_gauge() -> Any:
    return metrics.gauge(
        "ray_serve_num_multiplexed_models",
        "The number of models loaded on the current replica.",
        ("deployment", "replica", "application"),
    )


_REPLICAS: dict[str, ReplicaModels] = {}


def models_of(instance: Any) -> dict[str, dict[str, Any]]:
    """The multiplexed caches of a deployment object by loader name, for status details:
    ``loaded`` (least recently used first), ``loading``, ``max_num_models_per_replica``."""
    found = {}
    for name, cache in getattr(instance, "__dict__", {}).items():
        if name.startswith(_ATTRIBUTE) and isinstance(cache, ModelCache):
            found[name[len(_ATTRIBUTE) :]] = {
                "loaded": list(cache.models),
                "loading": [m for m in cache.loading if m not in cache.models],
                "max_num_models_per_replica": cache.max_models,
            }
    return found


def replica_models(replica_id: str) -> ReplicaModels:
    """The multiplexed models of replica ``replica_id`` in this process."""
    models = _REPLICAS.get(replica_id)
    if models is None:
        models = _REPLICAS[replica_id] = ReplicaModels(replica_id)
    return models


async def close_replica(replica_id: str) -> None:
    """Release the models of a stopping replica and end the routers' watches."""
    models = _REPLICAS.get(replica_id)
    if models is not None:
        await models.close()
