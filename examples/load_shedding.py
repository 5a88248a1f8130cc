"""Load shedding: refuse what cannot be served soon, at once, instead of queueing it.

``Model`` stands for an inference call that takes ``SERVICE_TIME_S``. One replica
works on at most ``max_ongoing_requests=2`` requests; ``max_queued_requests=4``
more may wait for it in the proxy. A burst beyond those 6 is answered 503 with
``Retry-After: 1`` at once, without reaching the replica, so the requests that
were accepted keep their latency (3 rounds of ``SERVICE_TIME_S``) and the
refused clients can retry or go elsewhere right away. Guide:
docs/load-shedding.md. Run it (serves on 127.0.0.1:8000, sends a burst of 40
concurrent requests, prints how many were served and refused, shuts down)::

    python -m examples.load_shedding [--port 8000] [--requests 40]
"""

from __future__ import annotations

import asyncio
import time

import httpx
from starlette.requests import Request

from shoal import serve

#: How long one (simulated) inference takes.
SERVICE_TIME_S = 0.5


@serve.deployment(max_ongoing_requests=2, max_queued_requests=4)
class Model:
    async def __call__(self, request: Request) -> dict[str, str]:
        await asyncio.sleep(SERVICE_TIME_S)  # the model's work
        return {"prediction": "ok"}


async def burst(url: str, requests: int) -> list[tuple[int, float]]:
    """Send ``requests`` concurrent GETs; each one's status code and seconds taken."""

    async def one(client: httpx.AsyncClient) -> tuple[int, float]:
        started = time.perf_counter()
        reply = await client.get(url)
        return reply.status_code, time.perf_counter() - started

    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        # Open the connections first (the proxy's health check costs no model time),
        # so that the timings below are the server's answers, not TCP handshakes.
        await asyncio.gather(*(client.get(f"{url}-/healthz") for _ in range(requests)))
        return await asyncio.gather(*(one(client) for _ in range(requests)))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Send a burst to a deployment that sheds load.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Model.bind(), name="load_shedding", route_prefix="/")
        replies = asyncio.run(burst(f"http://127.0.0.1:{args.port}/", args.requests))
    finally:
        serve.shutdown()
    served = [seconds for status, seconds in replies if status == 200]
    refused = [seconds for status, seconds in replies if status == 503]
    print(f"burst of {len(replies)}: {len(served)} served, {len(refused)} refused with 503")
    if refused:
        print(f"refused within {max(refused) * 1000:.0f} ms; served within {max(served):.2f} s")


if __name__ == "__main__":
    main()
