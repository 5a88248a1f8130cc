"""The load clients of ``python -m bench.overload``, each run in its own process.

:func:`run_client` starts ``python -m bench.overload --client SPEC`` (SPEC: JSON with the
client's ``kind``, its keyword arguments and the file for its result) and reads the
result back; in that process :func:`client_main` runs one of :data:`CLIENTS` under
asyncio (uvloop when installed): an open-loop Poisson load (:func:`open_loop`), clients
that retry after a timeout or a 503 (:func:`retry_clients`) or closed-loop clients in
steps (:func:`closed_steps`). Each records every request as a :data:`Record`; the
figures drawn from the records are in :mod:`bench.overload_analysis`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import percentile
from bench.loadgen import LoadSpec, build_request, read_response
from bench.procs import HOST, REPO_ROOT

TIMEOUT, ERROR = -1, 0  # a record's status when the client timed out / the socket failed

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Record = tuple[float, float, int]  # (monotonic time sent, seconds to the full answer, status)


ERROR_KINDS: dict[str, int] = {}  # the client process's socket errors by kind
CONNECTS: list[float] = []  # the client process's connection set-up times (s)


def _ms(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds):
        return None
    return round(seconds * 1e3, 3)


def _request(port: int, path: str) -> bytes:
    return build_request(LoadSpec(port=port, path=path))


def _close(conn: Conn | None) -> None:
    if conn is not None:
        conn[1].close()


async def _send(
    port: int, request: bytes, conn: Conn | None, timeout_s: float
) -> tuple[int, Conn | None, float]:
    """One request (connecting first when ``conn`` is None): (status, connection to reuse,
    ``time.monotonic()`` when the request was written, or the call began if it never was).

    A kept-alive connection that the server has closed meanwhile (uvicorn closes one idle
    for 5 s) is replaced by a new one, as HTTP clients do: before the request when its
    end was already seen, or once after the request failed without any answer."""
    written = time.monotonic()
    if conn is not None and conn[0].at_eof():
        _close(conn)
        conn = None
        _count("stale keep-alive connection replaced")
    try:
        async with asyncio.timeout(timeout_s):
            for attempt in (0, 1):
                reused = conn is not None
                if conn is None:
                    conn = await asyncio.open_connection(HOST, port)
                    CONNECTS.append(time.monotonic() - written)
                try:
                    written = time.monotonic()
                    conn[1].write(request)
                    status, keep_alive = await read_response(conn[0])
                    break
                except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
                    partial = getattr(exc, "partial", b"")
                    if not reused or attempt or partial:
                        raise
                    _close(conn)
                    conn = None
                    _count("stale keep-alive connection retried")
    except TimeoutError:
        _close(conn)  # the client gives up: it drops the connection, as a browser or SDK would
        return TIMEOUT, None, written
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        _close(conn)
        _count(f"{type(exc).__name__}{'' if conn else ' (connecting)'}")
        return ERROR, None, written
    if not keep_alive:
        _close(conn)
        return status, None, written
    return status, conn, written


def _count(kind: str) -> None:
    ERROR_KINDS[kind] = ERROR_KINDS.get(kind, 0) + 1


def _arrivals(rate: float, duration_s: float, seed: int) -> Iterator[float]:
    """Poisson arrival times (s from the start) at ``rate``/s within ``duration_s``."""
    rng = random.Random(seed)
    offset = 0.0
    while True:
        offset += rng.expovariate(rate)
        if offset >= duration_s:
            return
        yield offset


async def open_loop(
    port: int,
    path: str,
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
    pool: int = 64,
    max_inflight: int = 4000,
    seed: int = 1,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s for ``duration_s``, each on an idle keep-alive
    connection (a new one when none is idle): arrivals never wait for answers. Latency
    runs from writing the request to reading the whole answer; setting up a connection
    is timed apart (the result's ``connects``)."""
    request = _request(port, path)
    idle: list[Conn] = [await asyncio.open_connection(HOST, port) for _ in range(pool)]
    opened, not_sent = pool, 0
    records: list[Record] = []
    lateness: list[float] = []
    inflight: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        nonlocal opened
        conn = idle.pop() if idle else None
        opened += conn is None
        status, conn, written = await _send(port, request, conn, timeout_s)
        records.append((written, time.monotonic() - written, status))
        lateness.append(written - due)
        if conn is not None:
            idle.append(conn)

    begin = time.monotonic() + 0.05
    for offset in _arrivals(rate, duration_s, seed):
        due = begin + offset
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(inflight) >= max_inflight:
            not_sent += 1
            continue
        task = asyncio.create_task(one(due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    if inflight:
        await asyncio.wait(inflight, timeout=timeout_s + 5)
    for conn in idle:
        _close(conn)
    late = sorted(lateness)
    return {
        "records": records,
        "begin": begin,
        "rate": rate,
        "sent": len(records),
        "not_sent": not_sent,
        "connections": opened,
        "lateness_p99_ms": _ms(percentile(late, 99)),
        "lateness_max_ms": _ms(late[-1]) if late else None,
    }


async def retry_clients(
    port: int,
    path: str,
    clients: int,
    duration_s: float,
    timeout_s: float,
    backoff_s: Sequence[float],
    seed: int = 1,
) -> dict[str, Any]:
    """``clients`` closed-loop clients: the next request as soon as one succeeds; after
    ``timeout_s`` without an answer the client drops its connection and retries at once;
    after a 503 it waits uniform(``backoff_s``) and retries."""
    request = _request(port, path)
    records: list[Record] = []
    begin = time.monotonic()
    end = begin + duration_s

    async def client(i: int) -> None:
        rng = random.Random(seed * 100_003 + i)
        conn: Conn | None = None
        while time.monotonic() < end:
            sent = time.monotonic()
            status, conn, _ = await _send(port, request, conn, timeout_s)
            records.append((sent, time.monotonic() - sent, status))
            if status == 503:
                await asyncio.sleep(rng.uniform(backoff_s[0], backoff_s[1]))
            elif status == ERROR:
                await asyncio.sleep(0.01)
        _close(conn)

    await asyncio.gather(*(client(i) for i in range(clients)))
    return {"records": records, "begin": begin}


async def closed_steps(
    port: int, path: str, steps: Sequence[Sequence[float]], timeout_s: float = 10.0
) -> dict[str, Any]:
    """Closed-loop clients, ``steps`` = [(clients, seconds), ...]: client ``i`` sends one
    request after another while the current step has more than ``i`` clients. Latency
    runs from writing the request (a connection's set-up is not in it)."""
    request = _request(port, path)
    records: list[Record] = []
    level, stop = 0, False
    starts: list[float] = []

    async def worker(i: int) -> None:
        conn: Conn | None = None
        while not stop:
            if i >= level:
                await asyncio.sleep(0.005)
                continue
            status, conn, written = await _send(port, request, conn, timeout_s)
            records.append((written, time.monotonic() - written, status))
            if status == ERROR:
                await asyncio.sleep(0.01)
        _close(conn)

    workers = [asyncio.create_task(worker(i)) for i in range(int(max(c for c, _ in steps)))]
    for clients, seconds in steps:
        level = int(clients)
        starts.append(time.monotonic())
        await asyncio.sleep(seconds)
    end = time.monotonic()
    stop = True
    await asyncio.wait(workers, timeout=timeout_s + 5)
    return {"records": records, "starts": starts, "end": end}


CLIENTS: dict[str, Callable[..., Any]] = {
    "open": open_loop,
    "retry": retry_clients,
    "steps": closed_steps,
}


def client_main(spec: str) -> int:
    """The client process: runs ``spec`` and writes its result (JSON) to ``spec["out"]``."""
    args = json.loads(spec)
    kind, out = args.pop("kind"), Path(args.pop("out"))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(CLIENTS[kind](**args))
    else:
        result = uvloop.run(CLIENTS[kind](**args))
    connects = sorted(CONNECTS)
    setup = {
        "n": len(connects),
        "p50_ms": _ms(percentile(connects, 50)),
        "p99_ms": _ms(percentile(connects, 99)),
        "max_ms": _ms(connects[-1]) if connects else None,
    }
    out.write_text(json.dumps({**result, "error_kinds": ERROR_KINDS, "connects": setup}))
    return 0


def run_client(kind: str, wall_s: float, **kwargs: Any) -> dict[str, Any]:
    """Run one client in a separate process; ``wall_s``: its expected running time."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-client-") as tmp:
        out = Path(tmp) / "result.json"
        spec = json.dumps({"kind": kind, "out": str(out), **kwargs})
        argv = [sys.executable, "-m", "bench.overload", "--client", spec]
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=wall_s + 60,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{kind} client failed ({done.returncode}): {done.stderr[-1500:]}")
        return dict(json.loads(out.read_text()))
