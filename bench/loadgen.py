"""Load generation: wrk (with a Lua script) when installed, else an asyncio HTTP/1.1 client.

Either way the load runs in its own process, separate from the bench driver and the
servers. The fallback client is this module's ``main``::

    python -m bench.loadgen --port 8000 --path /echo --method POST --body '{"x": 1}' -c 64 -d 3

(``--header 'x-api-key: demo-key'`` adds a request header; repeatable.)

It opens ``c`` keep-alive connections, each sending requests one after another until the
duration is over, records every request's latency and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import mean, percentile

HOST = "127.0.0.1"
MAX_REQUESTS_PER_CONNECTION = 2_000_000
WRK_THREADS = 1


@dataclass(frozen=True)
class LoadSpec:
    port: int
    path: str
    method: str = "GET"
    body: bytes | None = None
    concurrency: int = 1
    duration_s: float = 1.0
    timeout_s: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers


@dataclass(frozen=True)
class LoadResult:
    requests: int
    errors: int
    duration_s: float
    throughput_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    generator: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def wrk_path() -> str | None:
    """Path to wrk, unless absent or disabled with SHOAL_BENCH_NO_WRK=1."""
    if os.environ.get("SHOAL_BENCH_NO_WRK") == "1":
        return None
    return shutil.which("wrk")


def choose(kind: str) -> str:
    """Resolve ``auto`` to ``wrk`` or ``python``; refuse ``wrk`` when it is missing."""
    if kind == "auto":
        return "wrk" if wrk_path() else "python"
    if kind == "wrk" and not wrk_path():
        raise RuntimeError("wrk requested but not found on PATH")
    if kind not in ("wrk", "python"):
        raise ValueError(f"unknown load generator {kind!r}")
    return kind


def describe(kind: str) -> dict[str, object]:
    """What to record in results about the load generator."""
    if kind == "wrk":
        path = wrk_path() or "wrk"
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        first = (proc.stdout + proc.stderr).strip().splitlines()
        version = first[0].split(" Copyright")[0] if first else "unknown"
        return {"name": "wrk", "path": path, "version": version, "threads": WRK_THREADS}
    return {
        "name": "bench.loadgen",
        "version": "asyncio HTTP/1.1 keep-alive client",
        "event_loop": "uvloop" if _has_uvloop() else "asyncio",
        "processes": 1,
    }


def run_load(spec: LoadSpec, kind: str) -> LoadResult:
    """Run one bounded load against 127.0.0.1 in a separate process."""
    return _run_wrk(spec) if kind == "wrk" else _run_python(spec)


# --- wrk ----------------------------------------------------------------------------------
_WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"responses\": %d, \"duration_us\": %d, \"connect\": %d, \"read\": %d, " ..
    "\"write\": %d, \"status\": %d, \"timeout\": %d, \"p50_us\": %.3f, \"p90_us\": %.3f, " ..
    "\"p99_us\": %.3f, \"mean_us\": %.3f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def _lua_string(text: str) -> str:
    if "]==]" in text or "\n" in text:
        raise ValueError(f"cannot embed {text!r} in a Lua long string")
    return f"[==[{text}]==]"


def wrk_script(method: str, body: bytes | None, headers: tuple[tuple[str, str], ...] = ()) -> str:
    """The Lua script: request method/body/headers and a JSON summary printed by done()."""
    lines = [f'wrk.method = "{method}"']
    # The spaces matter: "[[" would open a Lua long string.
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers]
    if body is not None:
        text = body.decode()
        if "]==]" in text:
            raise ValueError("body cannot be embedded in a Lua long string")
        lines.append(f"wrk.body = [==[{text}]==]")
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    return "\n".join(lines) + "\n" + _WRK_DONE


def _run_wrk(spec: LoadSpec) -> LoadResult:
    seconds = max(1, math.ceil(spec.duration_s))  # wrk takes whole seconds
    with tempfile.TemporaryDirectory(prefix="shoal-bench-wrk-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(wrk_script(spec.method, spec.body, spec.headers))
        argv = [
            wrk_path() or "wrk",
            f"-t{min(WRK_THREADS, spec.concurrency)}",
            f"-c{spec.concurrency}",
            f"-d{seconds}s",
            f"--timeout={max(1, math.ceil(spec.timeout_s))}s",
            "-s",
            str(script),
            f"http://{HOST}:{spec.port}{spec.path}",
        ]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + spec.timeout_s + 20
        )
    return parse_wrk_output(proc.stdout, proc.stderr)


def parse_wrk_output(stdout: str, stderr: str = "") -> LoadResult:
    for line in stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line[len("BENCHJSON ") :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary:\n{stdout}\n{stderr}")
    socket_errors = sum(int(data[k]) for k in ("connect", "read", "write", "timeout"))
    ok = int(data["responses"]) - int(data["status"])
    duration = float(data["duration_us"]) / 1e6
    has_latency = ok > 0
    return LoadResult(
        requests=int(data["responses"]) + socket_errors,
        errors=int(data["status"]) + socket_errors,
        duration_s=duration,
        throughput_rps=ok / duration if duration > 0 else 0.0,
        p50_ms=float(data["p50_us"]) / 1e3 if has_latency else None,
        p90_ms=float(data["p90_us"]) / 1e3 if has_latency else None,
        p99_ms=float(data["p99_us"]) / 1e3 if has_latency else None,
        mean_ms=float(data["mean_us"]) / 1e3 if has_latency else None,
        generator="wrk",
    )


# --- python fallback: parent side -------------------------------------------------------------
def _run_python(spec: LoadSpec) -> LoadResult:
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--port",
        str(spec.port),
        "--path",
        spec.path,
        "--method",
        spec.method,
        "-c",
        str(spec.concurrency),
        "-d",
        str(spec.duration_s),
        "--timeout",
        str(spec.timeout_s),
    ]
    if spec.body is not None:
        argv += ["--body", spec.body.decode()]
    for name, value in spec.headers:
        argv += ["--header", f"{name}: {value}"]
    cwd = Path(__file__).resolve().parent.parent
    timeout = spec.duration_s + spec.timeout_s + 30
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.loadgen failed ({proc.returncode}):\n{proc.stderr}")
    return LoadResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


# --- python fallback: client side ---------------------------------------------------------
def build_request(spec: LoadSpec) -> bytes:
    head = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {HOST}:{spec.port}"]
    head += [f"{name}: {value}" for name, value in spec.headers]
    if spec.body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(spec.body)}"]
    elif spec.method in ("POST", "PUT", "PATCH"):
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (spec.body or b"")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns (status, connection may be reused)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get(b"connection") != b"close"
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            await reader.readexactly(size + 2)
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # body delimited by close
        keep_alive = False
    return status, keep_alive


class _Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0


async def _connection(spec: LoadSpec, request: bytes, deadline: float, stats: _Stats) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    sent = 0
    while time.perf_counter() < deadline and sent < MAX_REQUESTS_PER_CONNECTION:
        sent += 1
        try:
            async with asyncio.timeout(spec.timeout_s):
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(HOST, spec.port)
                start = time.perf_counter()
                writer.write(request)
                status, keep_alive = await read_response(reader)
            elapsed = time.perf_counter() - start
            if 200 <= status < 400:
                stats.latencies.append(elapsed)
            else:
                stats.errors += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            stats.errors += 1
            keep_alive = False
            await asyncio.sleep(0.01)
        if not keep_alive and writer is not None:
            writer.close()
            writer = reader = None
    if writer is not None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def drive(spec: LoadSpec) -> LoadResult:
    """Run the load in this process (the fallback client's core)."""
    request = build_request(spec)
    stats = _Stats()
    start = time.perf_counter()
    deadline = start + spec.duration_s
    tasks = [_connection(spec, request, deadline, stats) for _ in range(spec.concurrency)]
    await asyncio.wait_for(asyncio.gather(*tasks), spec.duration_s + spec.timeout_s + 5)
    duration = time.perf_counter() - start
    ordered = sorted(stats.latencies)
    ok = len(ordered)

    def ms(value: float) -> float | None:
        return value * 1e3 if ok else None

    return LoadResult(
        requests=ok + stats.errors,
        errors=stats.errors,
        duration_s=duration,
        throughput_rps=ok / duration if duration > 0 else 0.0,
        p50_ms=ms(percentile(ordered, 50)),
        p90_ms=ms(percentile(ordered, 90)),
        p99_ms=ms(percentile(ordered, 99)),
        mean_ms=ms(mean(ordered)),
        generator="bench.loadgen",
    )


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default=None)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args(argv)
    headers = tuple(
        (name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header)
    )
    spec = LoadSpec(
        port=args.port,
        path=args.path,
        method=args.method.upper(),
        body=None if args.body is None else args.body.encode(),
        concurrency=max(1, args.concurrency),
        duration_s=max(0.1, min(args.duration, 3600.0)),
        timeout_s=args.timeout,
        headers=headers,
    )
    if _has_uvloop():
        import uvloop

        result = uvloop.run(drive(spec))
    else:
        result = asyncio.run(drive(spec))
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
