"""Authenticated TCP between shoal processes: the handshake, its refusals, the connector."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest

import shoal._transport.connection as connection_module
from shoal._config import TIMEOUTS, DeploymentConfig
from shoal._errors import TransportError
from shoal._seam.code import UserCode
from shoal._seam.specs import ReplicaSpec
from shoal._transport.auth import (
    MAGIC,
    NONCE_SIZE,
    bound_address,
    connect_tcp,
    join_host_port,
    new_instance_secret,
    serve_tcp,
    split_host_port,
)
from shoal._transport.client import NetworkConnector
from shoal._transport.codec import encode
from shoal._transport.connection import Connection, connect_unix, serve_unix
from shoal._transport.messages import (
    Message,
    ReplicaInfo,
    Request,
    Result,
    StreamCredit,
    StreamEnd,
    StreamItem,
)

SECRET = new_instance_secret()
_CHALLENGE = len(MAGIC) + NONCE_SIZE + 32


def _echo(tag: str, seen: list[Connection] | None = None) -> Callable[..., None]:
    """A server handler: ``echo`` replies (tag, value), ``stream`` sends n items."""

    def on_message(conn: Connection, corr: int, msg: Message) -> None:
        if seen is not None:
            seen.append(conn)
        if not isinstance(msg, Request):
            assert isinstance(msg, StreamCredit)
        elif msg.method == "echo":
            conn.send(corr, Result((tag, msg.args[0])))
        elif msg.method == "stream":
            for i in range(msg.args[0]):
                conn.send(corr, StreamItem(i))
            conn.send(corr, StreamEnd())

    return on_message


class _Warnings(logging.Handler):
    """Collects shoal.transport's records; ``arrived`` is set by the first one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.arrived.set()

    async def one(self) -> logging.LogRecord:
        await asyncio.wait_for(self.arrived.wait(), 5)
        assert len(self.records) == 1, [r.getMessage() for r in self.records]
        record = self.records[0]
        assert record.levelno == logging.WARNING and record.exc_info is None
        return record


@pytest.fixture
def warnings() -> Iterator[_Warnings]:
    handler = _Warnings()
    logger = logging.getLogger("shoal.transport")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every message a Connection of this test's thread decodes, in order (a local
    instance an earlier test left running decodes its own reports on its own thread)."""
    seen: list[Any] = []
    original = connection_module.decode
    ours = threading.get_ident()

    def spy(body: memoryview, nbuf: int) -> Any:
        msg = original(body, nbuf)
        if threading.get_ident() == ours:
            seen.append(msg)
        return msg

    monkeypatch.setattr(connection_module, "decode", spy)
    return seen


async def _talk(conn: Connection, tag: str = "tcp") -> None:
    """A request/reply (small, large, numpy) and a stream, all answered."""
    for value in (b"", b"x" * 300_000, numpy.arange(100_000.0)):
        reply = await conn.request(Request("echo", (value,), {}), 5)
        assert isinstance(reply, Result) and reply.value[0] == tag
        assert numpy.array_equal(reply.value[1], value)
    _corr, stream = conn.open_stream(Request("stream", (100,), {}))
    items = []
    while isinstance(msg := await asyncio.wait_for(stream.next(), 5), StreamItem):
        items.append(msg.value)
    assert items == list(range(100)) and isinstance(msg, StreamEnd)


def _nodelay(conn: Connection) -> int:
    sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_a_request_and_a_stream_after_mutual_authentication(tmp_path: Path) -> None:
    accepted: list[Connection] = []
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp", accepted), "echo")
    host, port = bound_address(server)
    conn = await connect_tcp(host, port, SECRET, None, "echo", timeout_s=5)
    await _talk(conn)
    # The transport is handed to the Connection itself: the same protocol object on
    # the same kind of transport as a Unix socket's, no wrapper on the hot path.
    unix = await serve_unix(str(tmp_path / "u.sock"), _echo("unix"), "u")
    local = await connect_unix(str(tmp_path / "u.sock"), None, "u")
    for end in (conn, accepted[0]):
        assert type(end) is Connection and end._transport is not None
        assert end._transport.get_protocol() is end
        assert type(end._transport) is type(local._transport)
        assert _nodelay(end)
    conn.close()
    local.close()
    server.close()
    unix.close()


async def test_a_client_with_another_secret_is_refused_before_anything_is_decoded(
    warnings: _Warnings, decoded: list[Any]
) -> None:
    calls: list[Connection] = []
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp", calls), "echo")
    host, port = bound_address(server)
    with pytest.raises(TransportError, match=r"authentication with echo at .* failed.*"
                       r"instance secret differs") as caught:  # fmt: skip
        await connect_tcp(host, port, new_instance_secret(), None, "echo", timeout_s=5)
    assert f"127.0.0.1:{port}" in str(caught.value)
    record = await warnings.one()
    assert "echo refused the TCP connection from 127.0.0.1:" in record.getMessage()
    assert calls == [] and decoded == []
    server.close()


async def test_a_server_with_another_secret_gets_nothing_decoded(decoded: list[Any]) -> None:
    server = await serve_tcp("127.0.0.1", 0, new_instance_secret(), _echo("tcp"), "impostor")
    host, port = bound_address(server)
    with pytest.raises(TransportError, match="proof of the instance secret is wrong"):
        await connect_tcp(host, port, SECRET, None, "impostor", timeout_s=5)
    server.close()
    assert decoded == []


async def test_a_server_that_sends_frames_without_a_proof_gets_nothing_decoded(
    decoded: list[Any],
) -> None:
    frame = b"".join(bytes(c) for c in encode(1, Result("decoded!")))

    ended = asyncio.Event()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(MAGIC) + NONCE_SIZE)
        writer.write(MAGIC + bytes(NONCE_SIZE + 32) + frame)  # a forged proof, then a frame
        await _close_at_eof(reader, writer, ended)

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    host, port = bound_address(server)
    with pytest.raises(TransportError, match=r"authentication with r1 at .* failed"):
        await connect_tcp(host, port, SECRET, None, "r1", timeout_s=5)
    server.close()
    await asyncio.wait_for(ended.wait(), 5)
    assert decoded == []


async def _close_at_eof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ended: asyncio.Event
) -> None:
    """A fake server's end: wait for the client to go, close, say so."""
    await reader.read()
    writer.close()
    await writer.wait_closed()
    ended.set()


async def test_a_peer_that_skips_the_handshake_is_dropped_before_any_decoding(
    warnings: _Warnings, decoded: list[Any]
) -> None:
    calls: list[Connection] = []
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp", calls), "echo")
    reader, writer = await asyncio.open_connection(*bound_address(server))
    for chunk in encode(1, Request("echo", ("pickled",), {})):  # a valid frame, no hello
        writer.write(bytes(chunk))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    record = await warnings.one()
    local_port = writer.get_extra_info("sockname")[1]
    assert f"from 127.0.0.1:{local_port}: it does not speak shoal's protocol" in (
        record.getMessage()
    )
    assert calls == [] and decoded == []
    writer.close()
    await writer.wait_closed()
    server.close()


async def test_a_reflected_proof_is_refused(warnings: _Warnings, decoded: list[Any]) -> None:
    """A peer without the secret returns the server's own proof: it does not verify."""
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "echo")
    reader, writer = await asyncio.open_connection(*bound_address(server))
    writer.write(MAGIC + bytes(NONCE_SIZE))
    challenge = await asyncio.wait_for(reader.readexactly(_CHALLENGE), 5)
    writer.write(challenge[-32:])
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert "its proof of the instance secret is wrong" in (await warnings.one()).getMessage()
    assert decoded == []
    writer.close()
    await writer.wait_closed()
    server.close()


async def test_a_silent_peer_is_dropped_after_the_handshake_timeout(warnings: _Warnings) -> None:
    assert TIMEOUTS.transport_handshake_s == 5.0  # the default
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "echo", handshake_timeout_s=0.2)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(*bound_address(server))
    writer.write(MAGIC[:3])  # a partial hello, then nothing
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started >= 0.2
    assert "did not authenticate within 0.2 s" in (await warnings.one()).getMessage()
    writer.close()
    await writer.wait_closed()
    server.close()


async def test_a_server_that_never_answers_times_the_client_out() -> None:
    ended = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _close_at_eof(reader, writer, ended)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    host, port = bound_address(server)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"cannot connect to r1 at .* within 0\.3 s"):
        await connect_tcp(host, port, SECRET, None, "r1", timeout_s=0.3)
    assert time.monotonic() - started < 2
    server.close()
    await asyncio.wait_for(ended.wait(), 5)  # the client dropped the connection


async def test_connecting_to_a_closed_port_is_a_clear_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(TransportError, match=f"cannot connect to r1 at 127.0.0.1:{port}"):
        await connect_tcp("127.0.0.1", port, SECRET, None, "r1", timeout_s=5)


def test_secrets_and_addresses_are_checked() -> None:
    assert len(new_instance_secret()) == 32 and new_instance_secret() != new_instance_secret()
    with pytest.raises(ValueError, match=r"secret must be at least 16 bytes .* got 3"):
        NetworkConnector("n1", b"abc")
    assert split_host_port(join_host_port("10.0.0.1", 80)) == ("10.0.0.1", 80)
    assert join_host_port("::1", 80) == "[::1]:80" and split_host_port("[::1]:80") == ("::1", 80)
    for bad in ("host", "host:", ":80", "host:http", "host:70000"):
        with pytest.raises(ValueError, match=f"tcp_address='{bad}' is not 'host:port'"):
            split_host_port(bad)


async def test_the_network_connector_uses_unix_on_its_node_and_tcp_across_nodes(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "r1.sock")
    unix = await serve_unix(path, _echo("unix"), "r1")
    tcp = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "r1")
    address = join_host_port(*bound_address(tcp))
    cases = [
        ("node-a", ReplicaInfo("r1", path, 10, "node-a", address), "unix"),
        ("node-b", ReplicaInfo("r1", path, 10, "node-a", address), "tcp"),
        ("node-b", ReplicaInfo("r1", path, 10, "node-a", ""), "unix"),  # no TCP address
    ]
    for node, info, expected in cases:
        client = await NetworkConnector(node, SECRET).connect(info)
        reply = await asyncio.wait_for(client.call(Request("echo", (1,), {})), 5)
        assert isinstance(reply, Result) and reply.value == (expected, 1), (node, info)
        client.close()
    unix.close()
    tcp.close()


class Adder:
    def __init__(self, base: int) -> None:
        self.base = base

    def __call__(self, x: int) -> int:
        return self.base + x

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)


async def test_a_replica_server_answers_over_tcp_from_another_node(tmp_path: Path) -> None:
    from shoal._replica.replica import Replica
    from shoal._replica.server import ReplicaServer

    spec = ReplicaSpec("app", "Adder", "app#Adder#x1", UserCode(Adder, (40,), {}),
                       DeploymentConfig())  # fmt: skip
    replica = Replica(spec)
    await replica.initialize()
    server = ReplicaServer(replica)
    path = str(tmp_path / "r.sock")
    await server.listen(path)
    host, port = await server.listen_tcp("127.0.0.1", 0, SECRET)
    info = ReplicaInfo(spec.replica_id, path, 5, "node-a", join_host_port(host, port))
    remote = await NetworkConnector("node-b", SECRET).connect(info)
    local = await NetworkConnector("node-a", SECRET).connect(info)  # both at the same time
    assert remote._conn._transport.get_extra_info("peername") == (host, port)  # type: ignore[union-attr]
    for client in (remote, local):
        reply = await asyncio.wait_for(client.call(Request("__call__", (2,), {})), 5)
        assert isinstance(reply, Result) and reply.value == 42
    stream = remote.stream(Request("count", (3,), {}, stream=True))
    items = [await asyncio.wait_for(stream.next(), 5) for _ in range(4)]
    assert [getattr(m, "value", None) for m in items[:3]] == [0, 1, 2]
    assert isinstance(items[3], StreamEnd)
    server.close()
    with pytest.raises(TransportError, match="cannot connect"):  # no longer listening
        await NetworkConnector("node-b", SECRET, timeout_s=5).connect(info)
    remote.close()
    local.close()


def _tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, a client trusting it."""
    crypto = pytest.importorskip("cryptography", reason="TLS test needs cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    return server_ctx, client_ctx


async def _tls_round_trip(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    accepted: list[Connection] = []
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp", accepted), "tls", ssl=server_ctx)
    host, port = bound_address(server)
    conn = await connect_tcp(host, port, SECRET, None, "tls", timeout_s=5, ssl=client_ctx)
    await _talk(conn)
    for end in (conn, accepted[0]):
        assert end._transport is not None
        assert end._transport.get_extra_info("ssl_object") is not None
        assert end._transport.get_protocol() is end
    with pytest.raises(TransportError, match="instance secret differs"):  # HMAC inside TLS
        await connect_tcp(host, port, new_instance_secret(), None, "tls", 5, ssl=client_ctx)
    conn.close()
    server.close()


async def test_tls_round_trip_with_the_handshake_inside(tmp_path: Path) -> None:
    await _tls_round_trip(*_tls_contexts(tmp_path))


@pytest.mark.parametrize("tls", [False, True])
def test_authenticated_tcp_on_uvloop(tmp_path: Path, tls: bool) -> None:
    """Replicas run on uvloop: its transports take the hand-over too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        if tls:
            await _tls_round_trip(*_tls_contexts(tmp_path))
            return
        server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "echo")
        conn = await connect_tcp(*bound_address(server), SECRET, None, "echo", timeout_s=5)
        assert conn._transport is not None and conn._transport.get_protocol() is conn
        assert _nodelay(conn)
        await _talk(conn)
        with pytest.raises(TransportError, match="instance secret differs"):
            await connect_tcp(*bound_address(server), b"x" * 32, None, "echo", timeout_s=5)
        conn.close()
        server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def test_tls_on_one_side_only_is_refused(tmp_path: Path, decoded: list[Any]) -> None:
    server_ctx, client_ctx = _tls_contexts(tmp_path)
    server = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "tls", ssl=server_ctx)
    with pytest.raises(TransportError, match="only one side uses TLS"):  # TLS layer drops it
        await connect_tcp(*bound_address(server), SECRET, None, "tls", timeout_s=5)
    plain = await serve_tcp("127.0.0.1", 0, SECRET, _echo("tcp"), "plain")
    with pytest.raises(TransportError, match=r"cannot connect to plain at .* over TLS"):
        await connect_tcp(*bound_address(plain), SECRET, None, "plain", 5, ssl=client_ctx)
    assert decoded == []
    server.close()
    plain.close()
