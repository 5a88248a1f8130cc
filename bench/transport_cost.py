"""What the transport costs per message, measured on the code the request path runs.

``python -m bench.transport_cost``: for typical messages (a handle call and its
reply, an HTTP GET and its JSON reply, a 1 MiB POST body and a 1 MiB reply), the
encoding (``codec.encode``) and the receiving side (``Connection.get_buffer`` /
``buffer_updated``: framing, copies, unpickling) without system calls; request id
generation; and a round trip over a Unix socket pair in one process on uvloop
(``pingpong``: one call at a time, and 64 in flight). Timings are the fastest of
several runs (the least disturbed by other work on the machine), in microseconds.

``--only CASE --n N`` runs one case N times and prints nothing else: run it under
``valgrind --tool=callgrind`` with two values of N and divide the difference in
instructions by the difference in N to get instructions per message, independent
of the machine's load (``--instructions`` does exactly that for every case).

``--handle-instructions``: a handle call between two processes as replicas make it: a
caller (``DeploymentHandle`` -> router -> connection, in a request's context) and a
replica process (``Replica`` + ``ReplicaServer`` on a Unix socket, a no-op async method,
no access log), each run in turn under callgrind with two numbers of sequential calls:
instructions per call of the replica process and of the caller process, wake-ups
included. ``--handle-rtt``: the same two processes without valgrind, the caller's p50
round trip and both processes' CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from shoal._transport.codec import encode
from shoal._transport.connection import Connection
from shoal._transport.http import HttpRequestData, HttpResponseData
from shoal._transport.messages import Message, Request, Result

MIB = 1 << 20
_HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
_JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"11")]
_RID = "0123456789abcdef0123456789abcdef"


def _http(body: bytes, method: str = "GET") -> Request:
    data = HttpRequestData(
        method, "http", "/", "", b"", _HEADERS, body, ("127.0.0.1", 51234), ("127.0.0.1", 8000)
    )
    return Request("__call__", (data,), {}, _RID, True, "", None, 1)


MESSAGES: dict[str, Callable[[], Message]] = {
    "handle_request": lambda: Request("__call__", (1,), {}, _RID, False, "", None, 1),
    "handle_result": lambda: Result(2),
    "http_get": lambda: _http(b""),
    "http_json_reply": lambda: Result(HttpResponseData(200, _JSON_HEADERS, b'{"ok":true}')),
    "http_post_1mib": lambda: _http(os.urandom(MIB), "POST"),
    "http_reply_1mib": lambda: Result(HttpResponseData(200, _JSON_HEADERS, os.urandom(MIB))),
}
_LARGE = ("http_post_1mib", "http_reply_1mib")


class _Sink:
    """A transport that hands every written byte to a receiving Connection, in reads
    of at most the buffer the protocol offers (as a socket would)."""

    def __init__(self, peer: Connection) -> None:
        self.peer = peer

    def writelines(self, chunks: list[Any]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        peer = self.peer
        while view:
            buf = peer.get_buffer(-1)
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            peer.buffer_updated(n)
            view = view[n:]

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass


def _codec_loop(msg: Message, n: int) -> None:
    """Encode ``msg`` and receive it ``n`` times (the receiver decodes every frame)."""
    received = []
    receiver = Connection(lambda conn, corr, m: received.append(corr))
    sink = _Sink(receiver)
    for corr in range(n):
        sink.writelines(encode(corr, msg))
    assert len(received) == n


def _request_id_loop(n: int) -> None:
    try:
        from shoal._transport.ids import new_request_id
    except ImportError:  # the code before request ids became prefix + counter

        def new_request_id() -> str:
            return uuid.uuid4().hex

    for _ in range(n):
        new_request_id()


def _uuid_loop(n: int) -> None:
    for _ in range(n):
        uuid.uuid4().hex  # noqa: B018


async def _pingpong(n: int, concurrency: int) -> float:
    """Seconds for ``n`` handle-sized calls over a socket pair, ``concurrency`` in flight."""
    import socket

    loop = asyncio.get_running_loop()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def echo(conn: Connection, corr: int, msg: Message) -> None:
        conn.send(corr, Result(msg.args[0]))  # type: ignore[attr-defined]

    await loop.create_unix_connection(lambda: Connection(echo, name="server"), sock=right)
    _, client = await loop.create_unix_connection(lambda: Connection(name="client"), sock=left)
    request = MESSAGES["handle_request"]()

    async def worker(count: int) -> None:
        for _ in range(count):
            await client.call(request)

    start = time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


async def _serve_echo(path: str) -> None:
    """An echo server for ``_two_processes``: answers every Request with its first argument."""
    from shoal._transport.connection import serve_unix

    def echo(conn: Connection, corr: int, msg: Message) -> None:
        conn.send(corr, Result(msg.args[0]))  # type: ignore[attr-defined]

    server = await serve_unix(path, echo, "echo")
    print("ready", flush=True)
    started = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    print(time.process_time() - started, flush=True)  # the CPU the calls cost it
    server.close()


def _two_processes(n: int, concurrency: int) -> tuple[float, float, float]:
    """(median round trip in us, seconds for n calls, CPU per call of both processes in
    us: less sensitive to other work on the machine than the wall clock) with the echo
    server in another process, as between a router and a replica."""
    import tempfile

    import uvloop

    from shoal._transport.connection import connect_unix

    path = os.path.join(tempfile.mkdtemp(), "echo.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.transport_cost", "--serve", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"

    async def run() -> tuple[float, float, float]:
        client = await connect_unix(path, None, "echo")
        request = MESSAGES["handle_request"]()
        times = []
        for _ in range(n // 10):  # warm up
            await client.call(request)

        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await client.call(request)
                times.append(time.perf_counter() - started)

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        client.close()
        times.sort()
        return times[len(times) // 2] * 1e6, elapsed, cpu

    try:
        p50, elapsed, cpu = uvloop.run(run())
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server_cpu = float(server.stdout.readline())
        server.wait(10)
    return p50, elapsed, (cpu + server_cpu) / n * 1e6


def _run_pingpong(n: int, concurrency: int) -> float:
    import uvloop

    return uvloop.run(_pingpong(n, concurrency))


def _case(name: str, n: int) -> None:
    if name in MESSAGES:
        msg = MESSAGES[name]()
        asyncio.run(_async(_codec_loop, msg, n))
    elif name == "request_id":
        _request_id_loop(n)
    elif name == "uuid4":
        _uuid_loop(n)
    elif name == "pingpong_c1":
        _run_pingpong(n, 1)
    elif name == "pingpong_c64":
        _run_pingpong(n, 64)
    else:
        raise SystemExit(f"unknown case {name!r}")


async def _async(function: Callable[..., None], *args: Any) -> None:
    function(*args)  # Connection needs a running loop


CASES = [*MESSAGES, "request_id", "uuid4", "pingpong_c1", "pingpong_c64"]


def _timings(rounds: int) -> None:
    for name in CASES:
        n = 200 if name in _LARGE else 3200 if name.startswith("pingpong") else 20_000
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter_ns()
            _case(name, n)
            best = min(best, time.perf_counter_ns() - start)
        print(f"{name:18} {best / n / 1000:9.2f} us/message (fastest of {rounds})")


def _instructions(names: list[str]) -> None:
    """Instructions per message by callgrind: (Ir(n2) - Ir(n1)) / (n2 - n1)."""
    for name in names:
        n1, n2 = (20, 120) if name in _LARGE else (640, 3200) if "pingpong" in name else (
            1000, 11000)  # fmt: skip
        counts = [_callgrind(name, n) for n in (n1, n2)]
        print(f"{name:18} {(counts[1] - counts[0]) / (n2 - n1):12,.0f} instructions/message")


def _callgrind(name: str, n: int) -> int:
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-m", "bench.transport_cost", "--only", name, "--n", str(n)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return _collected(result.stderr)


# --- a handle call between a caller process and a replica process ----------------------


class NoopTarget:
    """The replica of ``--handle-*``: bench.apps' handle target, without Starlette."""

    async def noop(self) -> None:
        return None


async def _serve_replica(path: str) -> None:
    """A replica of NoopTarget served on ``path`` as a worker serves it; until stdin's EOF."""
    from shoal._config import DeploymentConfig
    from shoal._replica.replica import Replica
    from shoal._replica.server import ReplicaServer
    from shoal._seam.code import UserCode
    from shoal._seam.specs import ReplicaSpec

    config = DeploymentConfig(max_ongoing_requests=1000)
    code = UserCode(NoopTarget, (), {})
    spec = ReplicaSpec("app", "NoopTarget", "app#NoopTarget#r1", code, config)
    replica = Replica(spec)
    await replica.initialize()
    server = ReplicaServer(replica)
    await server.listen(path)
    print("ready", flush=True)
    started = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    print(time.process_time() - started, flush=True)
    server.close()
    await replica.close()


class _Connector:
    """The routers' connector: every replica at the one socket."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def connect(self, info: Any) -> Any:
        from shoal._transport.client import SocketClient
        from shoal._transport.connection import connect_unix

        return SocketClient(await connect_unix(self.path, None, info.replica_id), info.replica_id)


async def _handle_calls(path: str, n: int, warmup: int) -> tuple[list[float], float]:
    """``n`` sequential ``await handle.noop.remote()`` (after ``warmup``), made in a
    request's context as a replica makes them: their round trips and the CPU they took."""
    from shoal._api.context import RequestContext, request_context
    from shoal._api.handle import DeploymentHandle
    from shoal._router.router import RouterRegistry
    from shoal._transport.messages import ReplicaInfo, ReplicaSetUpdate

    registry = RouterRegistry(_Connector(path), asyncio.get_running_loop())
    info = ReplicaInfo("app#NoopTarget#r1", path, 1000)
    registry.apply(ReplicaSetUpdate("app", "NoopTarget", [info]))
    target = DeploymentHandle("NoopTarget", "app", registry=registry)
    request_context.set(RequestContext(_RID, "app"))
    for _ in range(warmup):
        await target.noop.remote()
    times = []
    cpu = time.process_time()
    for _ in range(n):  # as bench.apps.HandleBench calls
        started = time.perf_counter()
        await target.noop.remote()
        times.append(time.perf_counter() - started)
    return times, time.process_time() - cpu


def _handle_pair(n: int, valgrind: str = "") -> tuple[float, float, float]:
    """(p50 round trip in us, caller CPU per call in us, replica CPU per call in us) of
    ``n`` calls; ``valgrind`` ("replica" or "caller"): that process runs under callgrind
    and the result is its instruction count (the others are 0)."""
    import tempfile

    import uvloop

    path = os.path.join(tempfile.mkdtemp(), "replica.sock")
    grind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command = [sys.executable, "-m", "bench.transport_cost", "--serve-replica", path]
    server = subprocess.Popen(
        grind + command if valgrind == "replica" else command,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        if valgrind == "caller":
            caller = subprocess.run(
                [*grind, sys.executable, "-m", "bench.transport_cost", "--handle-caller", path,
                 "--n", str(n)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return float(_collected(caller.stderr)), 0.0, 0.0
        times, cpu = uvloop.run(_handle_calls(path, n, 200 if not valgrind else 20))
    finally:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.close()
        replica_cpu = server.stdout.readline()
        assert server.stderr is not None
        errors = server.stderr.read()
        server.wait(60)
    if valgrind == "replica":
        return float(_collected(errors.decode())), 0.0, 0.0
    times.sort()
    return times[len(times) // 2] * 1e6, cpu / n * 1e6, float(replica_cpu) / n * 1e6


def _collected(stderr: str) -> int:
    match = re.search(r"Collected : (\d+)", stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind: {stderr[-500:]}")
    return int(match.group(1))


def _handle_instructions(rounds: int) -> None:
    n1, n2 = 200, 1200
    for _ in range(rounds):
        per = {}
        for side in ("replica", "caller"):
            counts = [_handle_pair(n, side)[0] for n in (n1, n2)]
            per[side] = (counts[1] - counts[0]) / (n2 - n1)
        print(
            f"handle call: replica process {per['replica']:8,.0f} instructions/call, "
            f"caller process {per['caller']:8,.0f} instructions/call"
        )


def _handle_rtt(rounds: int) -> None:
    for _ in range(rounds):
        p50, caller, replica = _handle_pair(4000)
        print(
            f"handle call: p50 {p50:6.1f} us, CPU/call caller {caller:5.1f} us, "
            f"replica {replica:5.1f} us"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run one case N times, print nothing")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--serve-replica", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--handle-caller", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--handle-instructions", action="store_true",
        help="instructions per handle call of a replica process and of its caller (callgrind)",
    )  # fmt: skip
    parser.add_argument(
        "--handle-rtt", action="store_true", help="handle calls between two processes: p50, CPU"
    )
    parser.add_argument(
        "--two-processes", action="store_true", help="round trips to an echo server process"
    )
    parser.add_argument(
        "--instructions",
        nargs="*",
        metavar="CASE",
        help="count instructions per message with callgrind (all cases if none)",
    )
    args = parser.parse_args()  # fmt: skip
    if args.serve or args.serve_replica or args.handle_caller:
        import uvloop

        if args.serve:
            uvloop.run(_serve_echo(args.serve))
        elif args.serve_replica:
            uvloop.run(_serve_replica(args.serve_replica))
        else:
            uvloop.run(_handle_calls(args.handle_caller, args.n, 20))
    elif args.handle_instructions:
        _handle_instructions(args.rounds)
    elif args.handle_rtt:
        _handle_rtt(args.rounds)
    elif args.two_processes:
        for _ in range(args.rounds):
            p50, _elapsed, cpu1 = _two_processes(4000, 1)
            _p50, elapsed, cpu64 = _two_processes(32000, 64)
            print(
                f"two processes: c=1 p50 {p50:6.1f} us ({cpu1:5.1f} us CPU/call), "
                f"c=64 {32000 / elapsed:6.0f} calls/s ({cpu64:5.1f} us CPU/call)"
            )
    elif args.only:
        _case(args.only, args.n)
    elif args.instructions is not None:
        _instructions(args.instructions or CASES)
    else:
        _timings(args.rounds)


if __name__ == "__main__":
    main()
