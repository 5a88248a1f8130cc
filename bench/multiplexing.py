"""``python -m bench.multiplexing``: model multiplexing's targets (issue 14), over real HTTP.

20 models on 2 replicas with ``max_num_models_per_replica=4``; each request names its
model with the ``serve_multiplexed_model_id`` header, drawn from a Zipf distribution
(rank k has weight ``k ** -s``; ``s=2.7`` gives the first model 80% of the traffic).
A load takes ``--load-ms`` (default 50 ms: a small model read from local disk), a
request ``--work-ms`` (default 10 ms) of the replica's time (``asyncio.sleep``, so the
figures measure routing, not the 2 cores).

``--concurrency`` clients (default 16, twice what one replica takes at once with
``max_ongoing_requests=8``) send ``--requests`` requests in all; the first
``--warmup`` ones are not counted. Figures, printed (``--json`` for a JSON line):

* **hit rate** after warm-up: the share of requests whose replica held their model (loaded
  or being loaded) when the loader was asked for it, from the replicas' own counts (Ray's
  formula: 1 - loads / requests). Target ≥ 0.90.
* **the hot model**: the requests of the most frequent model each replica served after
  warm-up. Target: both replicas serve it.
* loads per replica, the models each replica holds at the end, throughput, p50/p99.

The shoal instance runs in this process (``serve.start`` on a free port, the multi-process
runtime): two replica processes and the proxy. Guide: docs/multiplexing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import httpx

from shoal import serve

MODELS, REPLICAS, PER_REPLICA, MAX_ONGOING = 20, 2, 4, 8
HEADER = "serve_multiplexed_model_id"


@serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=MAX_ONGOING)
class ZipfModels:
    """Counts, per replica, requests and loads by model (the bench reads them by broadcast)."""

    def __init__(self, load_s: float = 0.05, work_s: float = 0.01) -> None:
        self.load_s, self.work_s = load_s, work_s
        self.requests: dict[str, int] = {}
        self.loads: dict[str, int] = {}

    @serve.multiplexed(max_num_models_per_replica=PER_REPLICA)
    async def model(self, model_id: str) -> str:
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        await asyncio.sleep(self.load_s)
        return model_id

    async def __call__(self) -> str:
        model_id = serve.get_multiplexed_model_id()
        self.requests[model_id] = self.requests.get(model_id, 0) + 1
        await self.model(model_id)
        await asyncio.sleep(self.work_s)
        return model_id

    def counts(self) -> dict[str, dict[str, int]]:
        return {"requests": dict(self.requests), "loads": dict(self.loads)}


def app(load_s: float = 0.05, work_s: float = 0.01, max_ongoing: int = MAX_ONGOING) -> Any:
    return ZipfModels.options(max_ongoing_requests=max_ongoing).bind(load_s, work_s)


def zipf_weights(count: int, s: float) -> list[float]:
    weights = [(rank + 1) ** -s for rank in range(count)]
    total = sum(weights)
    return [w / total for w in weights]


async def drive(url: str, model_ids: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Send one request per model id (in order, ``concurrency`` at a time); returns the
    wall time and each request's latency (seconds)."""
    latencies: list[float] = []
    queue = iter(model_ids)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(http: httpx.AsyncClient) -> None:
        for model_id in queue:
            started = time.perf_counter()
            reply = await http.get(url, headers={HEADER: model_id})
            if reply.status_code != 200:
                raise RuntimeError(f"{model_id}: HTTP {reply.status_code} {reply.text}")
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def measure(
    handle: Any, url: str, *, requests: int, warmup: int, concurrency: int, s: float,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Run the traffic against a deployed ``app()``; returns the figures."""
    rng = random.Random(seed)
    names = [f"model-{rank}" for rank in range(MODELS)]
    weights = zipf_weights(MODELS, s)
    drawn = rng.choices(names, weights, k=requests)
    asyncio.run(drive(url, drawn[:warmup], concurrency))
    before = handle.counts.broadcast().result(timeout_s=30)
    wall, latencies = asyncio.run(drive(url, drawn[warmup:], concurrency))
    after = handle.counts.broadcast().result(timeout_s=30)
    replicas = {}
    for replica_id in sorted(after):
        old = before.get(replica_id, {"requests": {}, "loads": {}})
        replicas[replica_id] = {
            "requests": _delta(after[replica_id]["requests"], old["requests"]),
            "loads": _delta(after[replica_id]["loads"], old["loads"]),
        }
    served = sum(sum(r["requests"].values()) for r in replicas.values())
    loads = sum(sum(r["loads"].values()) for r in replicas.values())
    hot = names[0]
    latencies.sort()
    return {
        "models": MODELS, "replicas": REPLICAS, "max_num_models_per_replica": PER_REPLICA,
        "zipf_s": s, "hot_model_share": round(weights[0], 3),
        "requests_measured": served, "loads_measured": loads,
        "hit_rate": round(1 - loads / served, 4) if served else None,
        "hot_model_requests_by_replica": {
            r: counts["requests"].get(hot, 0) for r, counts in replicas.items()
        },
        "loads_by_replica": {r: sum(c["loads"].values()) for r, c in replicas.items()},
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1000, 2),
    }  # fmt: skip


def report(figures: dict[str, Any]) -> str:
    hot = figures["hot_model_requests_by_replica"]
    both = "yes" if sum(1 for n in hot.values() if n) >= 2 else "NO"
    loads = figures["loads_by_replica"]
    lines = [
        f"{figures['models']} models, {figures['replicas']} replicas, "
        f"max_num_models_per_replica={figures['max_num_models_per_replica']}, Zipf s="
        f"{figures['zipf_s']} (the hot model: {figures['hot_model_share']:.0%} of requests)",
        f"hit rate after warm-up: {figures['hit_rate']:.1%} "
        f"({figures['loads_measured']} loads for {figures['requests_measured']} requests; "
        "target >= 90%)",
        "hot model's requests by replica: "
        + ", ".join(f"{r}: {n}" for r, n in hot.items())
        + f" (target: served by both: {both})",
        "loads by replica: " + ", ".join(f"{r}: {n}" for r, n in loads.items()),
        f"throughput {figures['throughput_rps']} req/s, p50 {figures['p50_ms']} ms, "
        f"p99 {figures['p99_ms']} ms",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Model multiplexing under Zipf traffic.")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--zipf-s", type=float, default=2.7)
    parser.add_argument("--load-ms", type=float, default=50.0)
    parser.add_argument("--work-ms", type=float, default=10.0)
    parser.add_argument("--max-ongoing", type=int, default=MAX_ONGOING,
                        help="max_ongoing_requests of each replica")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    from bench.procs import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        handle = serve.run(
            app(args.load_ms / 1000, args.work_ms / 1000, args.max_ongoing),
            name="zipf",
            route_prefix="/zipf",
        )
        figures = measure(
            handle, f"http://127.0.0.1:{port}/zipf", requests=args.requests,
            warmup=args.warmup, concurrency=args.concurrency, s=args.zipf_s,
        )  # fmt: skip
    finally:
        serve.shutdown()
    print(report(figures))
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
