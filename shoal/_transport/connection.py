"""A framed, multiplexed connection between two shoal processes over a Unix socket
(or a TCP connection once both ends proved the instance secret: :mod:`shoal._transport.auth`).

Guarantees:
- every outgoing request gets a correlation id; its reply resolves exactly that
  request's future, however replies interleave;
- when the peer dies or the socket closes, every pending request and stream
  fails at once with :class:`TransportError` (never a hang);
- an idle connection writes a message at once; messages issued after it in the
  same event-loop iteration, or while busy, are coalesced into one ``writev``;
- servers accept only peers running as the same user (``SO_PEERCRED``), on top
  of the socket directory's 0700 mode.
"""

from __future__ import annotations

import asyncio
import collections
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from shoal._errors import RequestCancelledError, RequestTimeoutError, TransportError
from shoal._transport.codec import HEADER, HEADER_SIZE, MAX_FRAME, Encoded, decode, encode
from shoal._transport.messages import (
    Failure,
    Message,
    Result,
    StreamCredit,
    StreamEnd,
    StreamItem,
)

MessageHandler = Callable[["Connection", int, Message], None]
_INITIAL_BUFFER = 256 * 1024
_REPLY = (Result, Failure)
_STREAM = (StreamItem, StreamEnd, Failure, Result)  # Result: a one-shot HTTP reply
STREAM_WINDOW = 64


class StreamReceiver:
    """Receives the items of one stream; grants the producer credit as items are consumed."""

    __slots__ = ("_conn", "_corr", "_end", "_items", "_on_end", "_unacked", "_waiter")

    def __init__(self, conn: Connection, corr: int) -> None:
        self._conn = conn
        self._corr = corr
        self._items: collections.deque[Message | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._end = False
        self._unacked = 0
        self._on_end: Callable[[], None] | None = None

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, as soon as the last message arrives (or the stream
        fails or is closed), before anyone reads it."""
        self._on_end = callback

    def push(self, msg: Message | BaseException) -> None:
        self._items.append(msg)
        if not isinstance(msg, StreamItem):
            self._end = True
            callback, self._on_end = self._on_end, None
            if callback is not None:
                callback()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Message:
        """The next StreamItem, StreamEnd or Failure; raises TransportError if the peer died."""
        while not self._items:
            self._waiter = self._conn.loop.create_future()
            await self._waiter
        msg: Any = self._items.popleft()
        if isinstance(msg, BaseException):
            raise msg
        if isinstance(msg, StreamItem):
            self._unacked += 1
            if self._unacked >= STREAM_WINDOW // 2:
                self._conn.send(self._corr, StreamCredit(self._unacked))
                self._unacked = 0
        return msg

    def close(self) -> None:
        """Stop receiving; a reader blocked in :meth:`next` gets RequestCancelledError."""
        self._conn.pending.pop(self._corr, None)
        if not self._end:
            self.push(RequestCancelledError("the stream was closed"))


#: Queued chunks (a message is one or two) written at once rather than at the end of the
#: loop turn. Without a bound, a busy proxy sent its 64 requests of one turn together and
#: the replica idled until then, and the replies came back the same way: the two
#: processes took turns instead of working at once. Writing every 8-16 messages lets the
#: peer start on the first ones: W1 at c=64 went from ~7,500 to ~10,300 req/s (wrk, 3
#: rounds interleaved; 4-32 all helped, 16 was as good as any).
_FLUSH_CHUNKS = 16


def _receive_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of anonymous memory that take RAM only where data reaches them (a
    ``bytearray`` is zeroed, so all of it at once): the ~50 connections of the demo's
    driver held 13 MB of buffers that no read ever got past the first pages of."""
    return mmap.mmap(-1, size)


class Connection(asyncio.BufferedProtocol):
    """One end of a framed connection. ``on_message`` receives every non-reply message."""

    def __init__(
        self,
        on_message: MessageHandler | None = None,
        *,
        name: str = "peer",
        check_peer: bool = False,
    ) -> None:
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, Any] = {}
        self.closed = False
        self.close_callbacks: list[Callable[[Connection], None]] = []
        self._on_message = on_message
        self._check_peer = check_peer
        self._transport: asyncio.Transport | None = None
        self._next_corr = 0
        self._out: list[Any] = []
        self._flush_scheduled = False
        self._queued = 0  # messages sent in this loop iteration
        self._busy = False  # the last iteration sent more than one: queue them all
        self._paused: asyncio.Future[None] | None = None
        self._buf = _receive_buffer(_INITIAL_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._frame: bytearray | None = None  # dedicated memory for a frame with buffers
        self._frame_view: memoryview | None = None
        self._frame_filled = 0
        self._frame_corr = 0
        self._frame_nbuf = 0

    # --- sending -----------------------------------------------------------------

    def send(self, corr: int, msg: Message | Encoded) -> None:
        """Write ``msg`` (or a message already pickled for several connections, see
        :class:`~.codec.Encoded`); raises SerializationError if it cannot be encoded.

        An idle connection writes a message at once, without waiting for the loop's
        next turn; messages sent after it in the same loop iteration are queued and
        written together, in order, with one ``writev`` on the next turn, or as soon as
        ``_FLUSH_CHUNKS`` chunks are queued. A connection that sent more than one message
        in its last iteration is busy: it queues every message the same way until an
        iteration sends only one.
        """
        chunks = msg.frame(corr) if isinstance(msg, Encoded) else encode(corr, msg)
        if self.closed:
            return
        self._queued += 1
        if self._flush_scheduled or self._busy or self._transport is None:
            out = self._out
            out.extend(chunks)
            if len(out) >= _FLUSH_CHUNKS and self._transport is not None:
                self._out = []
                self._transport.writelines(out)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self._flush)
            return
        self._flush_scheduled = True  # what follows in this iteration waits for _flush
        self.loop.call_soon(self._flush)
        if len(chunks) == 1:
            self._transport.write(chunks[0])
        else:
            self._transport.writelines(chunks)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._busy = self._queued > 1
        self._queued = 0
        if not self._out:
            return
        out, self._out = self._out, []
        if self._transport is not None and not self.closed:
            self._transport.writelines(out)

    def call(self, msg: Message | Encoded) -> asyncio.Future[Message]:
        """Send a request; the future resolves to its Result or Failure message."""
        self._next_corr += 1  # _new_corr, inline: every handle call comes here
        corr = self._next_corr
        self.send(corr, msg)
        future: asyncio.Future[Message] = self.loop.create_future()
        if self.closed:
            future.set_exception(self._lost_error())
        else:
            self.pending[corr] = future
        return future

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Send a request and wait for its reply at most ``timeout_s`` seconds."""
        future = self.call(msg)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(
                f"{type(msg).__name__} to {self.name} got no reply within {timeout_s:g} s"
            ) from None

    def open_stream(self, msg: Message) -> tuple[int, StreamReceiver]:
        corr = self._new_corr()
        self.send(corr, msg)
        receiver = StreamReceiver(self, corr)
        if self.closed:
            receiver.push(self._lost_error())
        else:
            self.pending[corr] = receiver
        return corr, receiver

    def _new_corr(self) -> int:
        self._next_corr += 1
        return self._next_corr

    async def drain(self, timeout_s: float) -> None:
        """Wait until the peer has read enough of what we wrote (write back-pressure)."""
        if self._paused is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._paused), timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(
                f"{self.name} has not read its data for {timeout_s:g} s"
            ) from None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, without flushing what is not written yet: its peer is
        known to be gone (a TCP peer on a lost node never closes its end)."""
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._check_peer and not _same_user(transport):
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = self._lost_error()
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            if isinstance(waiter, StreamReceiver):
                waiter.push(error)
            elif not waiter.done():
                waiter.set_exception(error)
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        for callback in self.close_callbacks:
            callback(self)

    def _lost_error(self) -> TransportError:
        return TransportError(f"connection to {self.name} was lost")

    def pause_writing(self) -> None:
        self._paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._paused is not None and not self._paused.done():
            self._paused.set_result(None)
        self._paused = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame_view is not None:
            return self._frame_view[self._frame_filled :]
        if self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Dispatch every complete frame received (the parser, in this one method: it
        runs for every read)."""
        if self._frame_view is not None:
            self._frame_filled += nbytes
            if self._frame_filled == len(self._frame_view):
                body, self._frame_view, self._frame = self._frame_view, None, None
                self._dispatch(self._frame_corr, body, self._frame_nbuf)
            return
        self._end += nbytes
        view = self._view
        while self._end - self._start >= HEADER_SIZE:
            body_len, corr, nbuf = HEADER.unpack_from(view, self._start)
            if body_len > MAX_FRAME:
                self._protocol_error(f"frame of {body_len} bytes")
                return
            body_start = self._start + HEADER_SIZE
            total = HEADER_SIZE + body_len
            if self._end - self._start < total:
                if nbuf:
                    self._begin_dedicated_frame(body_len, corr, nbuf, body_start)
                elif total > len(self._buf):
                    self._grow(total)
                return
            body = view[body_start : body_start + body_len]
            if nbuf:  # out-of-band buffers must not alias our reusable buffer
                body = memoryview(bytearray(body))
            self._start += total
            self._dispatch(corr, body, nbuf)
        if self._start == self._end:
            self._start = self._end = 0

    def _begin_dedicated_frame(self, body_len: int, corr: int, nbuf: int, body_start: int) -> None:
        self._frame = bytearray(body_len)
        self._frame_view = memoryview(self._frame)
        have = self._end - body_start
        self._frame_view[:have] = self._view[body_start : self._end]
        self._frame_filled = have
        self._frame_corr, self._frame_nbuf = corr, nbuf
        self._start = self._end = 0

    def _compact(self) -> None:
        residual = bytes(self._view[self._start : self._end])
        self._buf[: len(residual)] = residual
        self._start, self._end = 0, len(residual)

    def _grow(self, needed: int) -> None:
        residual = bytes(self._view[self._start : self._end])
        self._view.release()
        self._buf = _receive_buffer(max(needed, 2 * len(self._buf)))
        self._view = memoryview(self._buf)
        self._buf[: len(residual)] = residual
        self._start, self._end = 0, len(residual)

    def _dispatch(self, corr: int, body: memoryview, nbuf: int) -> None:
        try:
            msg = decode(body, nbuf)
        except Exception as exc:
            self._undecodable(corr, exc)
            return
        waiter = self.pending.get(corr)
        if waiter is not None:
            if type(waiter) is StreamReceiver:
                if isinstance(msg, _STREAM):
                    if not isinstance(msg, StreamItem):
                        del self.pending[corr]
                    waiter.push(msg)
                    return
            elif isinstance(msg, _REPLY):
                del self.pending[corr]
                if not waiter.done():
                    waiter.set_result(msg)
                return
        if self._on_message is not None:
            self._on_message(self, corr, msg)

    def _undecodable(self, corr: int, exc: Exception) -> None:
        error = TransportError(f"could not decode a message from {self.name}: {exc!r}")
        waiter = self.pending.pop(corr, None)
        if isinstance(waiter, StreamReceiver):
            waiter.push(error)
        elif waiter is not None and not waiter.done():
            waiter.set_exception(error)
        elif self._on_message is not None:
            self.send(corr, Failure("SerializationError", str(error), "", None, "TransportError"))

    def _protocol_error(self, what: str) -> None:
        if self._transport is not None:
            self._transport.abort()
        self.connection_lost(TransportError(f"corrupt stream from {self.name}: {what}"))


_PEERCRED = struct.Struct("3i")


def _same_user(transport: asyncio.BaseTransport) -> bool:
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True  # not a Linux Unix socket: rely on the directory permissions
    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return bool(uid == os.getuid())


async def serve_unix(path: str, on_message: MessageHandler, name: str) -> asyncio.AbstractServer:
    """Listen on ``path`` (created 0600) for connections from same-user peers."""
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(
        lambda: Connection(on_message, name=name, check_peer=True), path
    )
    os.chmod(path, 0o600)
    return server


async def connect_unix(
    path: str, on_message: MessageHandler | None, name: str, timeout_s: float = 10.0
) -> Connection:
    """Connect to a shoal process listening on ``path``."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_unix_connection(lambda: Connection(on_message, name=name), path),
            timeout_s,
        )
    except (OSError, TimeoutError) as exc:
        raise TransportError(f"cannot connect to {name} at {path}: {exc!r}") from exc
    return conn
