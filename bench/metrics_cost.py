"""What metrics add to one request, measured on the code the request path runs.

``python -m bench.metrics_cost``: the proxy's per-request recording (status capture,
two clock reads, cached children: counter, latency histogram, ongoing gauge) and the
replica's (request counter, processing latency), enabled and disabled, in
microseconds per request. The router records nothing per request (its queue gauge
is read when collected).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoal._observe import metrics
from shoal._observe.options import MetricsOptions
from shoal._proxy.metrics import proxy_metrics
from shoal._proxy.observe import observed
from shoal._replica.metrics import ReplicaMetrics, replica_metrics
from shoal._transport.http import HttpRequestData
from shoal._transport.messages import Request

N = 50_000


async def _send(message: dict[str, Any]) -> None:
    pass


async def _serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _route(path: str) -> tuple[str, str, str]:
    return ("/", "app", "Ingress")


async def _proxy_us(enabled: bool) -> float:
    metrics.configure(MetricsOptions(enabled=enabled), "bench")
    recorder = proxy_metrics("node", "127.0.0.1", lambda: 0)
    serve = observed(_serve, _route, recorder, access=None)  # _serve itself when disabled
    scope = {"type": "http", "path": "/", "method": "GET"}
    start = time.perf_counter()
    for _ in range(N):
        await serve(scope, None, _send)
    return (time.perf_counter() - start) / N * 1e6


def _replica_us(enabled: bool) -> float:
    from shoal._seam.specs import ReplicaSpec

    metrics.configure(MetricsOptions(enabled=enabled), "bench")
    spec: Any = ReplicaSpec.__new__(ReplicaSpec)
    object.__setattr__(spec, "app", "app")
    object.__setattr__(spec, "deployment", "Ingress")
    object.__setattr__(spec, "replica_id", "app#Ingress#abc")
    recorder: ReplicaMetrics | None = replica_metrics(spec, lambda: 0)
    data = HttpRequestData("GET", "http", "/", "", b"", [], b"", None, None)
    request = Request("__call__", (data,), {}, "id", True)
    start = time.perf_counter()
    for _ in range(N):
        started = time.perf_counter()
        if recorder is not None:
            recorder.done(request, started)
    return (time.perf_counter() - start) / N * 1e6


def _best(measure: Any, rounds: int = 7) -> float:
    """The fastest of ``rounds`` runs: the least disturbed by other work on the machine."""
    return min(measure() for _ in range(rounds))


def main() -> None:
    on = _best(lambda: asyncio.run(_proxy_us(True)))
    off = _best(lambda: asyncio.run(_proxy_us(False)))
    print(f"proxy:   {on:.2f} us/request enabled, {off:.2f} disabled: +{on - off:.2f} us")
    on, off = _best(lambda: _replica_us(True)), _best(lambda: _replica_us(False))
    print(f"replica: {on:.2f} us/request enabled, {off:.2f} disabled: +{on - off:.2f} us")


if __name__ == "__main__":
    main()
