"""A restarted controller takes its applications back (``shoal start`` after a crash).

The desired state comes from the server's checkpoint; the running replicas and
the proxy say who they are when they rejoin (``Rejoin``). Replicas still right
for their deployment are adopted as they are, so traffic never stops; the
others are stopped; whatever is missing is started by the normal deploy.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from shoal._config import TIMEOUTS
from shoal._seam.specs import AppSpec

if TYPE_CHECKING:
    from shoal._controller.controller import Controller

logger = logging.getLogger("shoal.controller")

#: The deploys of restored applications still running (see :func:`restore`).
_DEPLOYING: set[asyncio.Future[None]] = set()


async def restore(
    controller: Controller, apps: list[AppSpec], wait_s: float = TIMEOUTS.restore_s
) -> None:
    """Adopt the replicas that rejoined ``controller``'s runtime, then deploy each of
    ``apps`` (starting what is missing) and republish every replica set.

    Returns once every deploy has ended or ``wait_s`` has passed: a deploy waiting for
    a replica that cannot be placed now (PENDING: its node is gone, the cluster is
    full) goes on in the background, with its application DEPLOYING, so that the server
    serves (and can be told to delete or change it) rather than never starting."""
    from shoal._controller.controller import _App

    rejoined: dict[tuple[str, str], list[tuple[Any, Any]]] = defaultdict(list)
    adopted_by = getattr(controller.runtime, "rejoined", None)  # None: adopts nothing
    for handle, said in adopted_by.replicas if adopted_by is not None else []:
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
    deploys = [asyncio.ensure_future(controller.deploy(spec)) for spec in apps]
    for spec, deploy in zip(apps, deploys, strict=True):
        _DEPLOYING.add(deploy)  # held until done: the loop keeps only weak references
        deploy.add_done_callback(functools.partial(_report, spec.name))
    if deploys:
        _, waiting = await asyncio.wait(deploys, timeout=wait_s)
        if waiting:
            names = [spec.name for spec, d in zip(apps, deploys, strict=True) if d in waiting]
            logger.warning(
                "%d application(s) not running %g s after the restart (%s): serving meanwhile;"
                " they keep deploying (serve.status() says why)",
                len(names), wait_s, ", ".join(names),
            )  # fmt: skip
    await stopping
    for app in controller.apps.values():
        for state in app.deployments.values():
            if state.spec is not None:
                await state.publish()  # the new runtime's processes learn every set


def _report(name: str, deploy: asyncio.Future[None]) -> None:
    _DEPLOYING.discard(deploy)
    if not deploy.cancelled() and deploy.exception() is not None:
        logger.error("application '%s' could not be restored: %s", name, deploy.exception())
