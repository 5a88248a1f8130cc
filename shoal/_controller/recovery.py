"""A restarted controller takes its applications back (``shoal start`` after a crash).

The desired state comes from the server's checkpoint; the running replicas and
the proxy say who they are when they rejoin (``Rejoin``). Replicas still right
for their deployment are adopted as they are, so traffic never stops; the
others are stopped; whatever is missing is started by the normal deploy.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from shoal._seam.specs import AppSpec

if TYPE_CHECKING:
    from shoal._controller.controller import Controller

logger = logging.getLogger("shoal.controller")


async def restore(controller: Controller, apps: list[AppSpec]) -> None:
    """Adopt the replicas that rejoined ``controller``'s runtime, then deploy each of
    ``apps`` (starting what is missing) and republish every replica set."""
    from shoal._controller.controller import _App

    rejoined: dict[tuple[str, str], list[tuple[Any, Any]]] = defaultdict(list)
    for handle, said in controller.runtime.rejoined.replicas:  # type: ignore[attr-defined]
        rejoined[(said.app, said.deployment)].append((handle, said))
    stale: list[Any] = []
    for spec in apps:
        app = controller.apps[spec.name] = _App(spec)
        for name, deployment in spec.deployments.items():
            state = controller.new_state(spec.name, name == spec.ingress)
            app.deployments[name] = state
            stale += state.adopt(deployment, rejoined.pop((spec.name, name), []))
    stale += [handle for candidates in rejoined.values() for handle, _ in candidates]
    adopted = sum(len(d.replicas) for a in controller.apps.values() for d in a.deployments.values())
    logger.warning(
        "restored %d application(s): adopted %d running replica(s), stopping %d stale one(s)",
        len(apps), adopted, len(stale),
    )  # fmt: skip
    stopping = asyncio.gather(*(h.stop(0.0, 5.0) for h in stale), return_exceptions=True)
    results = await asyncio.gather(
        *(controller.deploy(spec) for spec in apps), return_exceptions=True
    )
    await stopping
    for spec, result in zip(apps, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("application '%s' could not be restored: %s", spec.name, result)
    for app in controller.apps.values():
        for state in app.deployments.values():
            if state.spec is not None:
                await state.publish()  # the new runtime's processes learn every set
