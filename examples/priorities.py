"""Request priorities: urgent requests overtake a backlog of low-priority work.

``Model`` stands for an inference call that takes ``SERVICE_TIME_S``; one replica
works on one request at a time (``max_ongoing_requests=1``), so a burst waits in
the proxy's queue. Each request names its class in the ``x-request-priority``
header. A burst of low-priority requests arrives first, then two high-priority
ones: they are served right after the request running when they arrived, ahead of
the whole low backlog, which then goes on in arrival order. Guide:
docs/priorities.md. Run it (serves on 127.0.0.1:8000, sends the burst, prints the
order in which the replica served each class, shuts down)::

    python -m examples.priorities [--port 8000]
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.requests import Request

from shoal import serve

#: How long one (simulated) inference takes.
SERVICE_TIME_S = 0.1
#: The low-priority backlog sent first.
LOW = 8


@serve.deployment(max_ongoing_requests=1)
class Model:
    def __init__(self) -> None:
        self.served = 0

    async def __call__(self, request: Request) -> dict[str, int | str]:
        self.served += 1
        position = self.served  # the order in which this replica took the requests
        await asyncio.sleep(SERVICE_TIME_S)  # the model's work
        return {"position": position, "priority": serve.get_request_context().priority}


async def burst(url: str) -> dict[str, list[int]]:
    """Send ``LOW`` low-priority requests, then two high-priority ones; the positions
    at which each class was served."""
    async with httpx.AsyncClient(timeout=30) as client:

        def send(priority: str) -> asyncio.Future[httpx.Response]:
            headers = {"x-request-priority": priority}
            return asyncio.ensure_future(client.get(url, headers=headers))

        low = [send("low") for _ in range(LOW)]
        await asyncio.sleep(SERVICE_TIME_S / 2)  # the backlog is queued by now
        high = [send("high") for _ in range(2)]
        replies = [reply.json() for reply in await asyncio.gather(*low, *high)]
    positions: dict[str, list[int]] = {"high": [], "low": []}
    for reply in replies:
        positions[reply["priority"]].append(reply["position"])
    return {priority: sorted(served) for priority, served in positions.items()}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="High-priority requests overtake a backlog.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Model.bind(), name="priorities", route_prefix="/")
        positions = asyncio.run(burst(f"http://127.0.0.1:{args.port}/"))
        total = LOW + 2
        print(f"burst: {LOW} low-priority requests, then 2 high-priority ones, to one replica")
        for priority in ("high", "low"):
            served = ", ".join(map(str, positions[priority]))
            print(f"{priority}-priority requests served at positions {served} of {total}")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
