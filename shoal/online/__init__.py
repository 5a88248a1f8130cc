"""Online learning: versioned live weight updates for every replica of a deployment.

* :class:`WeightStore` persists numbered generations of weights in a directory
  (atomic writes, strictly increasing numbers across writer processes). It is
  the source of truth: a replica that starts or restarts loads its latest
  generation.
* :class:`VersionedWeights` is what a deployment serves from: the current
  ``(generation, model)``, swapped atomically, never moving backwards.
* :func:`publish` saves new weights and broadcasts the generation to every
  replica; when it returns, every replica answers with it.

A deployment exposes a ``reload_weights(generation)`` method for ``publish``::

    from shoal import serve
    from shoal.online import VersionedWeights, WeightStore, publish_sync

    @serve.deployment(num_replicas=3)
    class Model:
        def __init__(self, store: WeightStore) -> None:
            self.weights = VersionedWeights(store)

        def reload_weights(self, generation: int) -> int:
            return self.weights.reload(generation)

        def predict(self, x: float) -> dict:
            generation, w = self.weights.snapshot()
            return {"y": w * x, "generation": generation}

    store = WeightStore("/var/lib/myapp/weights")
    handle = serve.run(Model.bind(store))
    generation = publish_sync(handle, 2.0, store)   # or: await publish(...)

Weights are stored with cloudpickle: the store directory must be trusted like code.
The guide is ``docs/online-learning.md``.
"""

from shoal.online._publish import (
    RELOAD_METHOD,
    PublishError,
    notify_replicas,
    publish,
    publish_sync,
)
from shoal.online._store import GenerationNotFoundError, WeightStore
from shoal.online._weights import Snapshot, VersionedWeights

__all__ = [
    "RELOAD_METHOD",
    "GenerationNotFoundError",
    "PublishError",
    "Snapshot",
    "VersionedWeights",
    "WeightStore",
    "notify_replicas",
    "publish",
    "publish_sync",
]
