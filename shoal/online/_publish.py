"""publish(): persist new weights, then make every replica of a deployment serve them."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal._api.handle import DeploymentHandle
from shoal._errors import PublishError, ReplicaDiedError
from shoal.online._store import WeightStore

#: The replica method ``publish`` and ``notify_replicas`` call, with the generation.
RELOAD_METHOD = "reload_weights"

_FIRST_RETRY_S = 0.05
_MAX_RETRY_S = 1.0


async def publish(
    handle: DeploymentHandle,
    weights: Any,
    store: WeightStore,
    *,
    method: str = RELOAD_METHOD,
    timeout_s: float = 60.0,
) -> int:
    """Save ``weights`` as a new generation, then wait until every replica serves it.

    When it returns, every replica of ``handle``'s deployment has applied the
    generation (or a newer one), so every later request is answered with it.
    Works in the driver, in a replica (e.g. a feedback route), anywhere with a
    handle. Do not mutate ``weights`` until it returns: it is pickled in a thread.
    """
    generation = await asyncio.to_thread(store.save, weights)
    await notify_replicas(handle, generation, method=method, timeout_s=timeout_s)
    return generation


def publish_sync(
    handle: DeploymentHandle,
    weights: Any,
    store: WeightStore,
    *,
    method: str = RELOAD_METHOD,
    timeout_s: float = 60.0,
) -> int:
    """:func:`publish` for synchronous code (not from a thread running an event loop)."""
    return asyncio.run(publish(handle, weights, store, method=method, timeout_s=timeout_s))


async def notify_replicas(
    handle: DeploymentHandle,
    generation: int,
    *,
    method: str = RELOAD_METHOD,
    timeout_s: float = 60.0,
) -> dict[str, int]:
    """Call ``method(generation)`` on every replica; their served generations by replica id.

    For a generation already in the store, e.g. written by an external trainer.
    A replica that dies during the call is not waited for (its replacement loads
    the latest generation when it starts): the broadcast is retried on the
    current replica set until ``timeout_s``. Raises :class:`PublishError` if a
    replica reports an older generation or time runs out; a replica's own
    exception (a bad store path, weights that fail to load) is raised as is.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = _FIRST_RETRY_S
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                replies = await getattr(handle, method).broadcast(generation)
            break
        except TimeoutError:
            raise PublishError(
                f"not every replica of '{handle.deployment_name}' applied generation "
                f"{generation} within {timeout_s} s",
                generation,
            ) from None
        except (ReplicaDiedError, OSError) as exc:  # membership changing: try the new set
            if loop.time() + delay >= deadline:
                raise PublishError(
                    f"generation {generation} of '{handle.deployment_name}' not confirmed by "
                    f"every replica within {timeout_s} s: {exc}",
                    generation,
                ) from exc
            await asyncio.sleep(delay)
            delay = min(2 * delay, _MAX_RETRY_S)
    behind = {
        rid: got for rid, got in replies.items() if not isinstance(got, int) or got < generation
    }
    if behind:
        raise PublishError(
            f"replicas of '{handle.deployment_name}' answered {method}({generation}) with older "
            f"generations {behind}: do they read the same store?",
            generation,
        )
    return dict(replies)
