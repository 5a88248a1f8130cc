"""VersionedWeights: the model a replica serves, kept at the newest generation of a WeightStore."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from shoal.online._store import GenerationNotFoundError, WeightStore

logger = logging.getLogger("shoal.online")

M = TypeVar("M")


class Snapshot(NamedTuple, Generic[M]):
    """A generation and the model built from it, read together (never a mix of two updates)."""

    generation: int
    model: M


def _identity(weights: Any) -> Any:
    return weights


class VersionedWeights(Generic[M]):
    """Holds ``(generation, model)`` for one replica and moves it forward, never back.

    * At construction it loads the store's latest generation (generation 0 and
      ``initial`` while the store is empty), so a replica that starts or restarts
      serves the newest persisted weights.
    * ``reload(generation)`` loads that generation (or a newer one if it was
      pruned), builds the model with ``apply(weights)`` and swaps it in with one
      assignment: a reader gets the old pair or the new one. Reloads are
      serialized; one for a generation already served is a no-op.
    * Every ``sync_interval_s`` seconds a daemon thread checks ``LATEST`` and
      catches up: a replica that missed a broadcast (it was starting when the
      generation was published) converges anyway. ``None`` turns it off.

    ``apply`` must build a new object rather than mutate the model being served:
    requests still running keep using the old one. Call ``close()`` to stop the
    thread early; it also ends on its own when this object is garbage-collected.
    """

    def __init__(
        self,
        store: WeightStore,
        apply: Callable[[Any], M] | None = None,
        *,
        initial: M | None = None,
        sync_interval_s: float | None = 1.0,
    ) -> None:
        if sync_interval_s is not None and sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be > 0 or None, got {sync_interval_s!r}")
        self.store = store
        self._apply: Callable[[Any], M] = apply or _identity
        self._lock = threading.Lock()
        self._snapshot: Snapshot[M] = Snapshot(0, initial)  # type: ignore[arg-type]
        self._stop = threading.Event()
        self.reload()
        if sync_interval_s is not None:
            threading.Thread(
                target=_follow,
                args=(weakref.ref(self), self._stop, sync_interval_s),
                name="shoal-weights-sync",
                daemon=True,
            ).start()

    @property
    def generation(self) -> int:
        """The generation being served (0 before the first one exists)."""
        return self._snapshot.generation

    @property
    def model(self) -> M:
        """The model being served. To pair it with its generation, use :meth:`snapshot`."""
        return self._snapshot.model

    def snapshot(self) -> Snapshot[M]:
        """The current ``(generation, model)`` pair, consistent with each other."""
        return self._snapshot

    def reload(self, generation: int | None = None) -> int:
        """Serve ``generation`` (default: the newest) unless a newer one is served already.

        Returns the generation served afterwards, which is >= ``generation``.
        Raises :class:`GenerationNotFoundError` if the store has no such
        generation and nothing newer either.
        """
        if generation is not None and generation <= self._snapshot.generation:
            return self._snapshot.generation  # idempotent, and never backwards
        with self._lock:
            current = self._snapshot.generation
            if generation is not None and generation <= current:
                return current
            try:
                found, weights = self.store.load(generation)
            except GenerationNotFoundError:
                if generation is None:
                    return current  # the store is empty: keep the initial model
                if self.store.latest_generation() < generation:
                    raise
                found, weights = self.store.load()  # pruned: the newest one includes it
            if found <= current:
                return current
            model = self._apply(weights)  # may be slow: readers keep the old pair meanwhile
            self._snapshot = Snapshot(found, model)
            return found

    def catch_up(self) -> int:
        """Reload if the store has a newer generation than the one served; cheap otherwise."""
        if self.store.latest_generation() > self._snapshot.generation:
            return self.reload()
        return self._snapshot.generation

    def close(self) -> None:
        """Stop the background sync (the model stays usable)."""
        self._stop.set()


def _follow(
    ref: weakref.ref[VersionedWeights[Any]], stop: threading.Event, interval_s: float
) -> None:
    """The sync thread: holds only a weak reference, so it never keeps its owner alive."""
    last_error = ""
    while not stop.wait(interval_s):
        owner = ref()
        if owner is None:
            return
        try:
            owner.catch_up()
            last_error = ""
        except Exception as exc:  # keep serving the current model; say so once per error
            if repr(exc) != last_error:
                last_error = repr(exc)
                logger.warning("could not catch up with %s: %r", owner.store, exc)
        del owner
