"""Request batching: one matrix product per batch instead of one per request.

A multi-layer perceptron (``width`` inputs -> ``width`` hidden units, ReLU ->
``OUTPUTS``; fixed random weights) served two ways: ``PerRequestMLP`` runs the
network on each request's vector, ``BatchedMLP`` stacks up to 64 concurrent
requests into one matrix with ``@serve.batch`` and runs the network once. At
``width=1024`` the first layer's weights take 4 MB: a vector-matrix product
reads every weight for two floating-point operations, a 64-row matrix product
reads each once for 128, and the batched replica serves about twice as many
requests. At ``width=256`` a forward pass costs ~15 µs, less than serving a
request costs, and batching does not pay. The numbers are in docs/batching.md.

Each model sits behind a ``LoadGenerator`` deployment that sends requests
through a handle (the path any deployment calling another takes). Run it
(deploys both, sends 2,000 requests at concurrency 64 to each, prints
requests/s, shuts down)::

    python -m examples.batching [--width 1024] [--requests 2000] [--concurrency 64]
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from shoal import serve

WIDTH, OUTPUTS = 1024, 10
MAX_BATCH_SIZE = 64


class MLP:
    """``relu(x @ w1 + b1) @ w2 + b2`` on the rows of ``x``, with seeded random weights."""

    def __init__(self, width: int = WIDTH, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        scale = 1.0 / np.sqrt(width)
        self.w1 = (rng.standard_normal((width, width)) * scale).astype(np.float32)
        self.b1 = np.zeros(width, dtype=np.float32)
        self.w2 = (rng.standard_normal((width, OUTPUTS)) * scale).astype(np.float32)
        self.b2 = np.zeros(OUTPUTS, dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return hidden @ self.w2 + self.b2


# max_ongoing_requests lets 64 requests reach the replica at once, so that the
# batched model can gather them; the per-request model gets the same allowance.
@serve.deployment(max_ongoing_requests=MAX_BATCH_SIZE)
class PerRequestMLP:
    """One forward pass per request: a vector-matrix product each time."""

    def __init__(self, width: int = WIDTH) -> None:
        self.mlp = MLP(width)

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.mlp(x[np.newaxis, :])[0]


@serve.deployment(max_ongoing_requests=MAX_BATCH_SIZE)
class BatchedMLP:
    """One forward pass per batch: each caller sends one vector and gets one output row."""

    def __init__(self, width: int = WIDTH) -> None:
        self.mlp = MLP(width)

    # A short wait: under load the queue fills while the previous batch runs, so
    # batches are large without waiting; at low load a request waits at most 2 ms.
    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.002)
    async def __call__(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.mlp(np.stack(xs)))

    def batch_stats(self) -> object:
        """The batcher's sizes, waits and durations (see docs/batching.md)."""
        return self.__call__.batch_stats()


@serve.deployment
class LoadGenerator:
    """Calls a model through its handle, ``concurrency`` requests in flight, and times it."""

    def __init__(self, model: serve.DeploymentHandle, width: int = WIDTH) -> None:
        self.model = model
        self.inputs = np.random.default_rng(1).standard_normal((64, width)).astype(np.float32)

    async def run(self, requests: int, concurrency: int) -> float:
        """Requests per second over ``requests`` calls (after a warm-up round)."""
        remaining = iter(range(requests))

        async def worker() -> None:
            for i in remaining:
                result = await self.model.remote(self.inputs[i % len(self.inputs)])
                assert result.shape == (OUTPUTS,)

        await asyncio.gather(*(self.model.remote(x) for x in self.inputs[:concurrency]))
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - started)


def apps(width: int = WIDTH) -> dict[str, serve.Application]:
    """The two applications to compare, by name."""
    return {
        "per-request": LoadGenerator.bind(PerRequestMLP.bind(width), width),
        "batched": LoadGenerator.bind(BatchedMLP.bind(width), width),
    }


def main() -> None:
    import argparse
    import os

    # One BLAS thread per replica (inherited by the replica processes started below):
    # replicas, not BLAS threads, should share the cores. Multi-threaded BLAS on
    # small matrices, next to the load generator, mostly spins and makes numbers erratic.
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    parser = argparse.ArgumentParser(description="Compare a per-request and a batched MLP.")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    rates = {}
    try:
        for name, app in apps(args.width).items():
            handle = serve.run(app, name=name, route_prefix=None)
            rates[name] = handle.run.remote(args.requests, args.concurrency).result()
            print(f"{name:>12}: {rates[name]:7.0f} requests/s")
            if name == "batched":
                model = serve.get_deployment_handle("BatchedMLP", name)
                size = model.batch_stats.remote().result().size
                print(f"{'':>12}  batch size: mean {size.mean:.1f}, median {size.p50:.0f}")
            serve.delete(name)
    finally:
        serve.shutdown()
    print(f"{'speed-up':>12}: {rates['batched'] / rates['per-request']:7.1f}x")


if __name__ == "__main__":
    main()
