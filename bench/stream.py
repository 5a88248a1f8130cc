"""Streaming over HTTP: time to first chunk and chunks per second through one stream.

The client is a raw asyncio HTTP/1.1 client (one keep-alive connection, chunked bodies
parsed by hand) running in the bench driver, against ``bench.apps:streams`` (shoal) and the
Starlette reference (``StreamingResponse`` over the same async generators):

* **first chunk**: ``GET /stream/first``: the generator sleeps 20 ms, then yields one line
  with the wall-clock times at which it started and yielded. ``ttfc`` is from just before
  the request is written to the first chunk fully received; ``overhead = ttfc - (yield -
  start)``: what serving added before and after the generator (request in, chunk out);
  ``delivery`` is from the yield to the client.
* **rate**: ``GET /stream/many?n=N``: N items of 16 bytes; items (bytes / 16), HTTP chunks
  and seconds from the request to the end of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from bench.common import STREAM_FIRST_DELAY_S, STREAM_ITEM, median_or_none, percentile
from bench.procs import HOST, ServerProcess, free_port
from bench.suite import (
    READY_DEADLINE_S,
    Log,
    Settings,
    error_text,
    fmt,
    reference_server,
    shoal_server,
)

FIRST_PATH = "/stream/first"
MANY_PATH = "/stream/many"
READ_SIZE = 1 << 16
T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on uvloop when installed (as bench.loadgen does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class StreamClient:
    """One keep-alive HTTP/1.1 connection reading chunked responses."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""
        self.pos = 0

    async def __aenter__(self) -> StreamClient:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def _fill(self) -> None:
        assert self.reader is not None
        more = await self.reader.read(READ_SIZE)
        if not more:
            raise ConnectionError("server closed the connection mid-response")
        self.buf = self.buf[self.pos :] + more
        self.pos = 0

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            await self._fill()
        line = self.buf[self.pos : end]
        self.pos = end + 2
        return line

    async def _take(self, size: int) -> bytes:
        while len(self.buf) - self.pos < size:
            await self._fill()
        data = self.buf[self.pos : self.pos + size]
        self.pos += size
        return data

    async def request(self, path: str) -> float:
        """Send ``GET path``, read the head (200, chunked); returns the send time (wall)."""
        assert self.writer is not None
        sent = time.time()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode())
        status = await self._line()
        headers = []
        while line := await self._line():
            headers.append(line.lower())
        if not status.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"GET {path}: {status.decode(errors='replace')}")
        if b"transfer-encoding: chunked" not in headers:
            raise RuntimeError(f"GET {path}: not a chunked response ({headers})")
        return sent

    async def chunk(self) -> bytes | None:
        """The next chunk's data; None at the end of the body (trailers skipped)."""
        size = int((await self._line()).split(b";")[0], 16)
        if size == 0:
            while await self._line():
                pass
            return None
        data = await self._take(size)
        await self._take(2)  # CRLF after the data
        return data


async def first_chunks(port: int, n: int) -> list[dict[str, float]]:
    """``n`` sequential ``GET /stream/first`` on one connection; times in ms."""
    samples = []
    async with StreamClient(port) as client:
        for _ in range(n):
            sent = await client.request(FIRST_PATH)
            data = await client.chunk()
            received = time.time()
            if data is None:
                raise RuntimeError(f"GET {FIRST_PATH}: empty stream")
            while await client.chunk() is not None:
                pass
            times = json.loads(data)
            generator = times["first_yield"] - times["gen_start"]
            samples.append(
                {
                    "ttfc_ms": (received - sent) * 1e3,
                    "generator_ms": generator * 1e3,
                    "overhead_ms": (received - sent - generator) * 1e3,
                    "request_in_ms": (times["gen_start"] - sent) * 1e3,
                    "delivery_ms": (received - times["first_yield"]) * 1e3,
                }
            )
    return samples


async def count_stream(port: int, items: int) -> dict[str, Any]:
    """Read ``GET /stream/many?n=items`` to its end; counts items, chunks, bytes, seconds."""
    chunks = nbytes = 0
    async with StreamClient(port) as client:
        sent = await client.request(f"{MANY_PATH}?n={items}")
        while (data := await client.chunk()) is not None:
            chunks += 1
            nbytes += len(data)
        seconds = time.time() - sent
    received = nbytes // len(STREAM_ITEM)
    if received != items:
        raise RuntimeError(f"GET {MANY_PATH}: expected {items} items, got {received}")
    return {
        "items": received,
        "http_chunks": chunks,
        "bytes": nbytes,
        "seconds": seconds,
        "items_per_s": received / seconds if seconds > 0 else 0.0,
    }


def summarize_first(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(samples)}
    for key in ("ttfc_ms", "generator_ms", "overhead_ms", "request_in_ms", "delivery_ms"):
        out[f"{key[:-3]}_p50_ms"] = median_or_none(s[key] for s in samples)
    out["overhead_p90_ms"] = percentile(sorted(s["overhead_ms"] for s in samples), 90)
    return out


def _one_server(name: str, settings: Settings) -> tuple[ServerProcess, int]:
    port = free_port()
    if name == "shoal":
        return shoal_server("streams", port, settings.log_dir), port
    return reference_server(name, port, settings.log_dir, tag="-stream"), port


def run_stream(settings: Settings, log: Log) -> dict[str, Any]:
    """Both servers up together; first-chunk blocks and rate runs interleaved."""
    log(f"stream: first chunk after {STREAM_FIRST_DELAY_S * 1e3:g} ms; "
        f"{settings.stream_items} items through one stream")  # fmt: skip
    live: dict[str, tuple[ServerProcess, int]] = {}
    out: dict[str, Any] = {"first_delay_ms": STREAM_FIRST_DELAY_S * 1e3}
    out.update(items=settings.stream_items, first_chunk={}, rate={})
    errors: dict[str, str] = {}
    try:
        for name in ("shoal", "starlette"):
            live[name] = _one_server(name, settings)
            live[name][0].start()
        for name, (proc, port) in live.items():
            try:
                proc.wait_http_ok(port, "GET", FIRST_PATH, None, READY_DEADLINE_S)
                proc.remember_tree()
            except Exception as exc:
                errors[name] = error_text(exc)
        for name, (proc, _) in live.items():  # start-up work done before any is measured
            if name not in errors:
                proc.wait_quiet()
        _measure(live, errors, settings, out)
    finally:
        for proc, _ in live.values():
            proc.stop()
    for name, message in errors.items():
        log(f"  stream {name}: FAILED: {message.splitlines()[0]} (log: {live[name][0].log_path})")
        out["first_chunk"][name] = out["rate"][name] = {"error": message}
    for name in live:
        if name in errors:
            continue
        first, rate = out["first_chunk"][name], out["rate"][name]
        log(
            f"  stream {name:<9} first chunk {fmt(first['ttfc_p50_ms'], 2)} ms "
            f"(generator {fmt(first['generator_p50_ms'], 2)}, overhead "
            f"{fmt(first['overhead_p50_ms'], 2)} ms)  {fmt(rate['items_per_s'], 0)} items/s"
        )
    return out


def _measure(
    live: dict[str, tuple[ServerProcess, int]],
    errors: dict[str, str],
    settings: Settings,
    out: dict[str, Any],
) -> None:
    repeats = settings.repeats
    per_block = max(1, -(-settings.stream_requests // repeats))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in live}
    rates: dict[str, list[dict[str, Any]]] = {name: [] for name in live}
    warm_items = min(settings.stream_items, 20_000)
    for block in range(-1, repeats):  # block -1: warm-up, not recorded
        for name, (_, port) in live.items():
            if name in errors:
                continue
            n, items = (5, warm_items) if block < 0 else (per_block, settings.stream_items)
            try:
                firsts = run_async(first_chunks(port, n))
                rate = run_async(count_stream(port, items))
            except Exception as exc:
                errors[name] = error_text(exc)
                continue
            if block >= 0:
                samples[name] += firsts
                rates[name].append(rate)
    for name in live:
        if name in errors:
            continue
        out["first_chunk"][name] = summarize_first(samples[name])
        out["rate"][name] = {
            "items_per_s": median_or_none(r["items_per_s"] for r in rates[name]),
            "http_chunks_per_item": rates[name][-1]["http_chunks"] / rates[name][-1]["items"],
            "runs": rates[name],
        }
