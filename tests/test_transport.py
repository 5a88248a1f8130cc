"""The framed Unix-socket transport between shoal processes."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import numpy
import pytest

from shoal._errors import RequestTimeoutError, TransportError
from shoal._transport.codec import SerializationError, decode, encode
from shoal._transport.connection import Connection, connect_unix, serve_unix
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
