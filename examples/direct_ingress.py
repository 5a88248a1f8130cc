"""Direct ingress: the ingress replicas accept HTTP themselves, besides the proxy.

``Echo`` (two replicas) is served at ``/echo`` by the proxy on ``--port`` and, with
``direct_ingress_port``, by each of its replicas on ``--direct-port``: both replicas
listen on that one port (``SO_REUSEPORT``) and the kernel spreads new connections over
them. The proxy balances every request (power-of-two choices), so even one keep-alive
connection reaches both replicas; on the direct port a connection stays with the replica
that accepted it, and new connections are spread by the kernel. The same rules hold on
both ports (here: 404 outside the route prefix, an ``x-request-id`` on every answer).
Guide: docs/direct-ingress.md. Run it (serves on 127.0.0.1:8000 and 8001, makes a few
requests over each path, prints which replica answered and the latencies, shuts down)::

    python -m examples.direct_ingress [--port 8000] [--direct-port 8001]
"""

from __future__ import annotations

import statistics
import time

import httpx
from starlette.requests import Request

from shoal import serve

#: Requests per path in each comparison.
REQUESTS = 20
#: Requests per path whose latency is measured (one keep-alive connection).
TIMED = 100


@serve.deployment(num_replicas=2)
class Echo:
    async def __call__(self, request: Request) -> dict[str, str]:
        replica = serve.get_replica_context().replica_id
        return {"echo": request.query_params.get("msg", ""), "replica": replica}


class Replicas:
    """Names the replicas 1, 2 in the order they first answer (their ids are random)."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def name(self, reply: httpx.Response) -> int:
        return self.names.setdefault(reply.json()["replica"], len(self.names) + 1)


def show(path: str, url: str, replicas: Replicas) -> None:
    """One request, then one outside the route prefix; their status and what they say."""
    with httpx.Client(base_url=url, timeout=30) as client:
        reply = client.get("/echo", params={"msg": "hello"})
        has_id = "x-request-id" in reply.headers
        echo = reply.json()["echo"]
        replicas.name(reply)
        print(f"{path}: {reply.status_code} echo={echo!r}, x-request-id: {has_id}")
        print(f"{path}: GET /elsewhere -> {client.get('/elsewhere').status_code}")


def spread(path: str, url: str, replicas: Replicas) -> None:
    """Which replicas answer ``REQUESTS`` requests on one keep-alive connection, then
    ``REQUESTS`` requests each on a new connection."""
    with httpx.Client(base_url=url, timeout=30) as client:
        kept = {replicas.name(client.get("/echo")) for _ in range(REQUESTS)}
    fresh = set()
    for _ in range(REQUESTS):
        with httpx.Client(base_url=url, timeout=30) as client:
            fresh.add(replicas.name(client.get("/echo")))
    print(f"{path}, {REQUESTS} requests on one connection: answered by {len(kept)} replica(s)")
    print(f"{path}, {REQUESTS} new connections: answered by {len(fresh)} replica(s)")


def latency(path: str, url: str) -> None:
    """The median and 99th percentile of ``TIMED`` sequential requests, one connection."""
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get("/echo")  # connect first: the timings below are the server's answers
        seconds = []
        for _ in range(TIMED):
            started = time.perf_counter()
            client.get("/echo", params={"msg": "x"})
            seconds.append(time.perf_counter() - started)
    cuts = statistics.quantiles(seconds, n=100)
    print(f"latency {path}: p50 {cuts[49] * 1e6:.0f} us, p99 {cuts[98] * 1e6:.0f} us "
          f"({TIMED} requests, one connection)")  # fmt: skip


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Serve an ingress over the proxy and directly.")
    parser.add_argument("--port", type=int, default=8000, help="the proxy's port")
    parser.add_argument("--direct-port", type=int, help="the replicas' port (default: port + 1)")
    args = parser.parse_args()
    direct_port = args.port + 1 if args.direct_port is None else args.direct_port
    urls = {"proxy": f"http://127.0.0.1:{args.port}", "direct": f"http://127.0.0.1:{direct_port}"}
    replicas = Replicas()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(Echo.bind(), name="echo", route_prefix="/echo", direct_ingress_port=direct_port)
        for path, url in urls.items():
            show(path, url, replicas)
        for path, url in urls.items():
            spread(path, url, replicas)
        for path, url in urls.items():
            latency(path, url)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
