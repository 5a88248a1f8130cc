"""Deadlines that travel: the HTTP timeout bounds every call the request makes.

``Frontend`` (the ingress) calls ``Model``, whose work takes ``work_s`` seconds.
The proxy's ``request_timeout_s`` (``TIMEOUT_S``) is each HTTP request's deadline:
both stages can read the time they have left, and when it runs out the client
gets 504 and the model's work is cancelled, not left running for nobody. A handle
call gets its own deadline with ``handle.options(timeout_s=...)``. Guide:
docs/deadlines.md. Run it (serves on 127.0.0.1:8000, sends a fast and a slow
request and one handle call, prints what happened, shuts down)::

    python -m examples.deadlines [--port 8000]
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from starlette.requests import Request

from shoal import serve
from shoal.serve.exceptions import RequestTimeoutError

#: The proxy's deadline for every HTTP request.
TIMEOUT_S = 0.5


@serve.deployment
class Model:
    def __init__(self) -> None:
        self.cancelled = 0

    async def __call__(self, work_s: float) -> float | None:
        remaining = serve.get_request_context().remaining_s  # what this call has left
        try:
            await asyncio.sleep(work_s)  # the model's work
        except asyncio.CancelledError:  # its deadline passed: nobody waits for the answer
            self.cancelled += 1
            raise
        return remaining

    async def cancelled_calls(self) -> int:
        return self.cancelled


@serve.deployment
class Frontend:
    def __init__(self, model: Any) -> None:
        self.model = model

    async def __call__(self, request: Request) -> dict[str, float]:
        own = serve.get_request_context().remaining_s
        work_s = float(request.query_params.get("work_s", "0.05"))
        model = await self.model.remote(work_s)  # inherits what is left of the deadline
        return {"frontend_remaining_s": round(own or 0, 3), "model_remaining_s": round(model, 3)}


app = Frontend.bind(Model.bind())


def _cancelled(model: Any, expected: int) -> int:
    """The model's cancelled calls, once ``expected`` of them are (at most 5 s)."""
    deadline = time.monotonic() + 5
    while (count := model.cancelled_calls.remote().result()) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return int(count)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Deadlines through a two-stage pipeline.")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    url = f"http://127.0.0.1:{args.port}/"
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": TIMEOUT_S}
        )
        serve.run(app, name="deadlines", route_prefix="/")
        with httpx.Client(timeout=30) as client:
            fast = client.get(url)
            print(f"fast request: {fast.status_code} {fast.json()}")
            started = time.monotonic()
            slow = client.get(url, params={"work_s": 10})
            took = time.monotonic() - started
            print(f"slow request: {slow.status_code} after {took:.2f} s: {slow.text}")
        model = serve.get_deployment_handle("Model", "deadlines")
        started = time.monotonic()
        try:
            model.options(timeout_s=0.2).remote(10).result()
        except RequestTimeoutError:
            took = time.monotonic() - started
            print(f"handle call with timeout_s=0.2: RequestTimeoutError after {took:.2f} s")
        print(f"model calls cancelled at their deadline: {_cancelled(model, 2)}")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
