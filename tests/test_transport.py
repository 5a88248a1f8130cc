"""The framed Unix-socket transport between shoal processes."""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy
import pytest

from shoal._errors import RequestTimeoutError, TransportError
from shoal._transport import codec
from shoal._transport.codec import Encoded, SerializationError, decode, encode
from shoal._transport.connection import Connection, connect_unix, serve_unix
from shoal._transport.http import HttpResponseData
from shoal._transport.ids import new_request_id
from shoal._transport.messages import Request, Result, StreamEnd, StreamItem


def _roundtrip(message: Request) -> Request:
    frame = b"".join(bytes(chunk) for chunk in encode(7, message))
    body = memoryview(bytearray(frame[14:]))
    nbuf = int.from_bytes(frame[12:14], "little")
    decoded = decode(body, nbuf)
    assert isinstance(decoded, Request)
    return decoded


def test_codec_round_trips_messages_and_lambdas() -> None:
    decoded = _roundtrip(Request("m", (1, "two", [3.0]), {"k": {"v": None}}, "rid", True, "mux"))
    assert (decoded.method, decoded.args, decoded.kwargs) == (
        "m",
        (1, "two", [3.0]),
        {"k": {"v": None}},
    )
    assert (decoded.request_id, decoded.stream, decoded.multiplexed_model_id) == (
        "rid",
        True,
        "mux",
    )
    assert _roundtrip(Request("m", (lambda x: x + 1,), {})).args[0](1) == 2  # via cloudpickle


def test_numpy_arrays_travel_out_of_band_without_copies() -> None:
    array = numpy.arange(1_000_000, dtype=numpy.float32)
    chunks = encode(1, Request("m", (array,), {}))
    assert len(chunks) == 2 and chunks[1].nbytes == array.nbytes
    assert numpy.shares_memory(numpy.frombuffer(chunks[1], dtype=numpy.float32), array)
    frame = bytearray(b"".join(bytes(chunk) for chunk in chunks))
    body = memoryview(frame)[14:]
    received = decode(body, 1).args[0]  # type: ignore[attr-defined]
    assert numpy.array_equal(received, array)
    assert numpy.shares_memory(received, numpy.frombuffer(frame, dtype=numpy.uint8))


def test_unpicklable_values_name_the_problem() -> None:
    import threading

    with pytest.raises(SerializationError, match="cannot serialize"):
        encode(1, Request("m", (threading.Lock(),), {}))


@pytest.fixture
async def echo_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = str(tmp_path / "echo.sock")

    def on_message(conn: Connection, corr: int, msg: object) -> None:
        assert isinstance(msg, Request)
        if msg.method == "echo":
            conn.send(corr, Result(msg.args[0]))
        elif msg.method == "stream":
            for i in range(msg.args[0]):
                conn.send(corr, StreamItem(i))
            conn.send(corr, StreamEnd())
        elif msg.method == "die":
            conn.close()
        # "ignore": never answers

    server = await serve_unix(path, on_message, "echo")
    yield path
    server.close()


async def test_interleaved_requests_get_their_own_replies(echo_server: str) -> None:
    conn = await connect_unix(echo_server, None, "echo")
    payloads = [b"x" * size for size in (0, 10, 300_000, 5, 2_000_000)] * 20
    replies = await asyncio.gather(*(conn.call(Request("echo", (p,), {})) for p in payloads))
    assert [r.value for r in replies] == payloads  # type: ignore[attr-defined]
    big = numpy.random.default_rng(0).random((512, 512))
    reply = await conn.call(Request("echo", (big,), {}))
    assert numpy.array_equal(reply.value, big)  # type: ignore[attr-defined]
    conn.close()


async def test_in_band_frames_of_any_size_arrive_whole(echo_server: str) -> None:
    # Strings are pickled in band: a frame larger than the receive buffer makes it grow,
    # and a burst of small ones runs past its end, where what is left is moved back to
    # its start. Both directions, interleaved.
    conn = await connect_unix(echo_server, None, "echo")
    small = [100 + i % 900 for i in range(3000)]  # first: the buffers are still small
    for sizes in (small, [3, 250_000, 7, 600_000, 1, 3_000_000, 40_000]):
        payloads = [chr(65 + i % 26) * size for i, size in enumerate(sizes)]
        calls = asyncio.gather(*(conn.call(Request("echo", (p,), {})) for p in payloads))
        replies = await asyncio.wait_for(calls, 30)  # a frame misparsed: no reply, not a hang
        assert [r.value for r in replies] == payloads  # type: ignore[attr-defined]
    conn.close()


async def test_streams_deliver_items_in_order(echo_server: str) -> None:
    conn = await connect_unix(echo_server, None, "echo")
    _corr, stream = conn.open_stream(Request("stream", (100,), {}))
    items = []
    while isinstance(message := await stream.next(), StreamItem):
        items.append(message.value)
    assert items == list(range(100)) and isinstance(message, StreamEnd)
    conn.close()


async def test_peer_death_fails_pending_requests_instead_of_hanging(echo_server: str) -> None:
    conn = await connect_unix(echo_server, None, "echo")
    pending = conn.call(Request("ignore", (), {}))
    await conn.call(Request("echo", (1,), {}))
    dying = conn.call(Request("die", (), {}))
    with pytest.raises(TransportError, match="lost"):
        await asyncio.wait_for(dying, 10)
    with pytest.raises(TransportError):
        await asyncio.wait_for(pending, 10)
    with pytest.raises(TransportError):
        await conn.call(Request("echo", (1,), {}))  # a closed connection fails at once


async def test_requests_have_timeouts(echo_server: str) -> None:
    conn = await connect_unix(echo_server, None, "echo")
    with pytest.raises(RequestTimeoutError, match=r"no reply within 0\.05 s"):
        await conn.request(Request("ignore", (), {}), timeout_s=0.05)
    conn.close()


async def test_connecting_to_a_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        await connect_unix(str(tmp_path / "nobody.sock"), None, "nobody", timeout_s=1)


def test_messages_are_typed_dataclasses() -> None:
    request = Request("m", (), {})
    assert pickle.loads(pickle.dumps(request.to_wire()))[0] == Request.tag
    with pytest.raises(AttributeError):
        request.unknown_field = 1  # type: ignore[attr-defined]


_MAIN_SCRIPT = """
import sys
from shoal._transport.codec import encode
from shoal._transport.messages import Request

class Point:  # a class of the driver's script: its __main__ is not the replica's
    def __init__(self, x):
        self.x = x

def double(value):
    return 2 * value

body = b"__main__" * int(sys.argv[1])
chunks = encode(3, Request("m", (Point(21), double, [Point(1)], body), {"text": "__main__"}))
sys.stdout.buffer.write(b"".join(bytes(chunk) for chunk in chunks))
"""


@pytest.mark.parametrize("size", [1, 1 << 17])  # a pickle scanned; one checked object by object
def test_objects_of_the_drivers_main_module_reach_another_process(
    tmp_path: Path, size: int
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(_MAIN_SCRIPT)
    frame = subprocess.run(
        [sys.executable, str(script), str(size)], capture_output=True, check=True, timeout=60
    ).stdout
    decoded = decode(memoryview(bytearray(frame[14:])), int.from_bytes(frame[12:14], "little"))
    assert isinstance(decoded, Request)
    point, double, points, body = decoded.args
    assert (point.x, double(point.x), points[0].x, body) == (21, 42, 1, b"__main__" * size)
    assert type(point).__name__ == "Point" and decoded.kwargs == {"text": "__main__"}


def test_data_that_mentions_main_is_still_pickled_plainly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_cloudpickle(*args: object) -> bytes:
        raise AssertionError("fell back to cloudpickle")

    monkeypatch.setattr(codec, "_cloud_dumps", no_cloudpickle)
    for size in (1, 1 << 14):  # a pickle scanned (a match is checked again); a large one
        message = Request("m", (b"__main__" * size, HttpResponseData(200, [], b"__main__")), {})
        assert _roundtrip(message).args == message.args


def test_large_bytes_are_written_from_their_own_memory() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, an HTTP body
    chunks = encode(1, Request("m", (body, b"small"), {}))
    assert any(chunk is body for chunk in chunks)  # never copied into the pickle or frame
    assert _roundtrip(Request("m", (body, b"small"), {})).args == (body, b"small")


def test_the_reusable_pickler_keeps_no_reference_to_what_it_sent() -> None:
    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)
    encode(1, Request("m", (payload,), {}))
    del payload
    gc.collect()
    assert ref() is None


class _RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[Any]) -> None:
        self.written.append(b"".join(bytes(chunk) for chunk in chunks))

    def get_extra_info(self, name: str) -> Any:
        return None


async def test_an_idle_connection_writes_at_once_a_busy_one_coalesces_in_order() -> None:
    conn = Connection()
    transport = _RecordingTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.send(1, Result("first"))
    assert len(transport.written) == 1  # written now, not on the loop's next turn
    conn.send(2, Result(2))  # same loop iteration: queued behind the first
    assert len(transport.written) == 1
    for i in range(3, 56):  # 54 queued in all: a few groups and a rest
        conn.send(i, Result(i))
    # A long burst is written in groups as it grows (the peer starts on the first
    # messages while this turn produces the rest), not all at the turn's end.
    during_the_turn = len(transport.written)
    assert 3 <= during_the_turn <= 5
    await asyncio.sleep(0)
    assert len(transport.written) == during_the_turn + 1  # the rest: one writelines
    receiver = Connection(lambda conn, corr, msg: got.append((corr, msg.value)))  # type: ignore[attr-defined]
    got: list[tuple[int, Any]] = []
    for data in transport.written:
        receiver.get_buffer(len(data))[: len(data)] = data
        receiver.buffer_updated(len(data))
    assert got == [(1, "first"), *((i, i) for i in range(2, 56))]
    written = len(transport.written)
    conn.send(60, Result(60))  # busy (the last iteration sent a burst): queued
    assert len(transport.written) == written
    await asyncio.sleep(0)
    assert len(transport.written) == written + 1  # an iteration with one message: idle again
    conn.send(61, Result(61))
    assert len(transport.written) == written + 2  # at once


async def test_replies_from_concurrent_tasks_keep_their_order_per_stream(echo_server: str) -> None:
    conn = await connect_unix(echo_server, None, "echo")
    streams = [conn.open_stream(Request("stream", (300,), {}))[1] for _ in range(8)]
    calls = [conn.call(Request("echo", (i,), {})) for i in range(200)]

    async def drain(stream: Any) -> list[int]:
        items = []
        while isinstance(message := await stream.next(), StreamItem):
            items.append(message.value)
        return items

    results = await asyncio.gather(*(drain(stream) for stream in streams))
    assert results == [list(range(300))] * 8
    replies = await asyncio.gather(*calls)
    assert [reply.value for reply in replies] == list(range(200))  # type: ignore[attr-defined]
    conn.close()


def test_request_ids_are_32_hex_digits_unique_even_across_forks() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a forked worker
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = new_request_id()
    assert len(child) == 32 and child[12:] != mine[12:]  # its own random suffix


def test_a_message_encoded_once_frames_as_encoding_it_per_connection() -> None:
    """A broadcast (a replica set to every process) is pickled once: each connection's
    frame, header and out-of-band buffers included, is what encoding it there gives."""
    for msg in (Result("small"), Result(b"x" * 100_000), Result(numpy.arange(1000.0))):
        once = Encoded(msg)
        for corr in (1, 7, 2**40):
            framed = once.frame(corr)
            assert [bytes(c) for c in framed] == [bytes(c) for c in encode(corr, msg)]
