"""Autoscaling: a deployment that grows with its load, shrinks when idle, and starts
from zero on the first request.

``Model`` stands for an inference call taking ``SERVICE_TIME_S``. Its
``autoscaling_config`` (Ray Serve's options) aims at 2 requests per replica,
between 0 and 4 replicas; the delays are short so that the example runs in
seconds (production values are tens of seconds). The script sends nothing at
first (no replica runs), then 10 concurrent clients until the deployment has
scaled to 4 replicas and a second more, then nothing (it scales back to zero),
and prints every scaling decision ``serve.status()`` recorded. Guide:
docs/autoscaling.md. Run it::

    python -m examples.autoscaling [--port 8000]
"""

from __future__ import annotations

import asyncio
import time

import httpx
from starlette.requests import Request

from shoal import serve

#: How long one (simulated) inference takes.
SERVICE_TIME_S = 0.1

AUTOSCALING = {
    "min_replicas": 0,  # idle: no replica, no memory used
    "max_replicas": 4,
    "target_ongoing_requests": 2,  # requests (running + waiting) per replica
    "metrics_interval_s": 0.2,  # how often load is reported (Ray's default: 10 s)
    "look_back_period_s": 1.0,  # the window load is averaged over (default: 30 s)
    "upscale_delay_s": 0.5,  # how long more replicas must be wanted (default: 30 s)
    "downscale_delay_s": 2.0,  # how long fewer must be wanted (default: 600 s)
    "downscale_to_zero_delay_s": 1.0,  # the last step, 1 -> 0 (default: downscale_delay_s)
}


@serve.deployment(max_ongoing_requests=4, autoscaling_config=AUTOSCALING)
class Model:
    async def __call__(self, request: Request) -> dict[str, str]:
        await asyncio.sleep(SERVICE_TIME_S)  # the model's work
        return {"prediction": "ok"}


def replicas() -> tuple[int, int]:
    """(replicas running or starting or stopping, target) of the Model deployment."""
    overview = serve.status().applications["autoscaling"].deployments["Model"]
    return sum(overview.replica_states.values()), overview.target_replicas


def running() -> int:
    overview = serve.status().applications["autoscaling"].deployments["Model"]
    return int(overview.replica_states.get("RUNNING", 0))


async def load(url: str, clients: int, until_replicas: int) -> tuple[int, int, float]:
    """``clients`` callers, each sending one request after another, until
    ``until_replicas`` replicas run (at most 30 s), and one second more:
    (answered, failed, seconds until they ran)."""
    results = {"ok": 0, "failed": 0}
    started = time.monotonic()
    end = started + 30

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            reply = await http.get(url)
            results["ok" if reply.status_code == 200 else "failed"] += 1

    async def watch() -> float:
        nonlocal end
        while await asyncio.to_thread(running) < until_replicas and time.monotonic() < end:
            await asyncio.sleep(0.1)
        reached = time.monotonic() - started
        end = min(end, time.monotonic() + 1.0)
        return reached

    async with httpx.AsyncClient(timeout=60) as http:
        reached, *_ = await asyncio.gather(watch(), *(client(http) for _ in range(clients)))
    return results["ok"], results["failed"], reached


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Watch a deployment scale with its load.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Model.bind(), name="autoscaling", route_prefix="/")
        print(f"idle: {replicas()[0]} replicas")
        answered, failed, reached = asyncio.run(load(url, clients=10, until_replicas=4))
        print(f"under load: {running()} replicas running after {reached:.1f} s; "
              f"{answered} answered, {failed} failed")  # fmt: skip
        deadline = time.monotonic() + 30
        while replicas() != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"idle again: {replicas()[0]} replicas")
        overview = serve.status().applications["autoscaling"].deployments["Model"]
        for decision in overview.scaling_decisions:
            print(f"  {decision.from_replicas} -> {decision.to_replicas}: {decision.reason}")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
