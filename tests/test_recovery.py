"""A restarted server's recovery (shoal._controller.recovery), in process on the simulated
runtime: a restored application whose replica cannot be placed does not keep the server
from serving."""

from __future__ import annotations

import asyncio
import time

from bench import scale
from shoal import serve
from shoal._api.graph import build_app
from shoal._controller.recovery import restore
from shoal._controller.status import ApplicationStatus


@serve.deployment(ray_actor_options={"num_cpus": 1000})
class TooBig:
    """Fits no node of the simulated cluster (64 CPUs each): PENDING for good."""

    def __call__(self) -> str:
        return "never"


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Fits:
    def __call__(self) -> str:
        return "served"


def test_restore_returns_while_an_application_waits_for_resources() -> None:
    async def scenario() -> None:
        controller, _ = await scale.start(nodes=2)
        stuck = build_app(TooBig.bind(), "stuck", "/stuck", None)
        fine = build_app(Fits.bind(), "fine", "/fine", None)
        started = time.monotonic()
        await asyncio.wait_for(restore(controller, [stuck, fine], wait_s=0.5), 10)
        assert time.monotonic() - started < 5
        status = controller.status().applications
        assert status["fine"].status == ApplicationStatus.RUNNING
        assert status["stuck"].status == ApplicationStatus.DEPLOYING
        # The deploy goes on in the background: deleting the application ends it.
        await asyncio.wait_for(controller.delete("stuck"), 10)
        assert "stuck" not in controller.status().applications
        await controller.shutdown(5.0)

    scale.run(scenario())
