"""The deployments of ``python -m bench.overload`` (imported by its servers' replicas: keep
this module's imports light).

``Work`` stands for a model with a fixed service time: each request sleeps ``service_s``
(an ``asyncio.sleep``, so a replica's capacity is ``max_ongoing_requests / service_s``
requests/s and costs almost no CPU) and answers the replica's pid as text. ``GET
.../stats`` answers the replica's counters instead: requests started, completed and
cancelled while running (a client that gave up), so the bench can tell work done for
nobody from work done for a client. Every option that matters (``max_ongoing_requests``,
``max_queued_requests``, ``num_replicas``, ``autoscaling_config``) is set by the bench
in its config file's ``deployments`` overrides, not here.
"""

from __future__ import annotations

import asyncio
import os

from starlette.requests import Request

from shoal import serve

SERVICE_S = 0.020  # overload and goodput: 2 ongoing => ~100 req/s per replica
SLOW_SERVICE_S = 0.050  # autoscaling: 2 ongoing (the target) => ~40 req/s per replica


@serve.deployment
class Work:
    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.started = self.completed = self.cancelled = 0

    async def __call__(self, request: Request) -> str | dict[str, int]:
        if request.url.path.endswith("/stats"):
            return {
                "pid": os.getpid(),
                "started": self.started,
                "completed": self.completed,
                "cancelled": self.cancelled,
            }
        self.started += 1
        try:
            await asyncio.sleep(self.service_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.completed += 1
        return str(os.getpid())


work = Work.bind(SERVICE_S)
slow_work = Work.bind(SLOW_SERVICE_S)
