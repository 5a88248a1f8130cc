"""Frame encoding: pickle protocol 5 with out-of-band buffers.

A frame is ``header | buffer lengths | main pickle | buffers...`` where the
header is ``<IQH`` = (body length, correlation id, number of buffers).
Large contiguous buffers (numpy arrays, bytearray, PickleBuffer) travel
out-of-band: they are written from their own memory and, on receipt, handed
to the unpickler as views of the receive buffer, so they are never copied by
shoal. The main pickle is written as the chunks the pickler produced: a bytes
object of 64 KiB or more (an HTTP body) is one of them, the object itself,
never copied into the pickle nor into the frame. Objects plain pickle cannot
handle (lambdas, classes defined in ``__main__``) fall back to cloudpickle.

Only peers that passed the socket's filesystem permissions and peer-credential
check, or over TCP proved the instance secret (:mod:`shoal._transport.auth`), ever
reach :func:`decode`: frames are trusted by construction.
"""

from __future__ import annotations

import pickle
import struct
from types import FunctionType
from typing import Any

from shoal._errors import SerializationError
from shoal._transport.messages import MESSAGE_TYPES, Message, from_wire

HEADER = struct.Struct("<IQH")
HEADER_SIZE = HEADER.size
_BUFLEN = struct.Struct("<Q")
MAX_FRAME = 1 << 34  # 16 GiB: larger is a corrupted stream, not a payload
_JOIN_BELOW = 16 * 1024  # a smaller pickle is joined to its header: one chunk to write
_loads = pickle.loads


class _MainReference(Exception):
    """The object refers to the driver's ``__main__``: it must be sent by value."""


class _MainCheckingPickler(pickle.Pickler):
    """Protocol 5, refusing references to ``__main__`` (for pickles too large to scan).

    Classes and functions of the driver's ``__main__`` pickle by reference, but
    ``__main__`` is another module in the receiving process: those must travel by
    value (cloudpickle). Pickle asks :meth:`reducer_override` about every object it
    has no built-in code for (never about str, bytes, numbers, None, lists, tuples,
    dicts, sets): the classes and functions it would name, and the instances whose
    class it would name, all pass here before anything refers to them.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls.__module__ == "__main__":
            raise _MainReference
        if (cls is FunctionType or isinstance(obj, type)) and obj.__module__ == "__main__":
            raise _MainReference
        return NotImplemented


class _Output:
    __slots__ = ("write",)

    def __init__(self, write: Any) -> None:
        self.write = write


_Encoder = tuple[pickle.Pickler, pickle.Pickler, list[Any], list[pickle.PickleBuffer]]


def _new_encoder() -> _Encoder:
    """Two picklers writing their chunks into one list: a plain one and a checking one."""
    chunks: list[Any] = []
    buffers: list[pickle.PickleBuffer] = []
    output = _Output(chunks.append)
    plain = pickle.Pickler(output, protocol=5, buffer_callback=buffers.append)
    checking = _MainCheckingPickler(output, protocol=5, buffer_callback=buffers.append)
    return plain, checking, chunks, buffers


# Reusable picklers (pickle.dumps builds a new one per call). pop() and append() are
# atomic: a thread, or a pickling that sends again, takes one no one else is using.
_ENCODERS = [_new_encoder()]


_FALLBACK = (_MainReference, pickle.PicklingError, AttributeError, TypeError)
# A pickler's memo table keeps the size its largest pickle needed, and clear_memo() goes
# over all of it: after a pickle this large (a metrics report) the table is replaced by
# a small one, else every later small message pays for it (~60 us a message after a
# 5,000-object pickle, against ~1 us).
_SMALL_PICKLE = 2048
_NO_BUFFERS: list[pickle.PickleBuffer] = []  # never appended to


def dumps(obj: Any) -> tuple[bytes | list[Any], list[pickle.PickleBuffer]]:
    """Pickle ``obj``: the pickle (one bytes object, or its chunks) and the large
    buffers collected out-of-band.

    A pickle under 64 KiB comes as one chunk, which the plain pickler makes fastest
    and a scan for ``__main__`` checks in a few hundred instructions. A larger one is
    several chunks, among them bytes objects of 64 KiB or more written as they are
    (never copied); scanning them would cost a pass over the data, so such a pickle,
    or one the scan matched, is made again by the pickler that checks each object's
    module instead (a Python call per object other than plain data). An encoder whose
    pickling raised something unexpected is dropped, not reused.
    """
    try:
        encoder = _ENCODERS.pop()
    except IndexError:
        encoder = _new_encoder()
    try:
        encoder[0].dump(obj)
    except _FALLBACK:
        return _cloud_dumps(obj, encoder)
    return _dumped(obj, encoder)


def _dumped(obj: Any, encoder: _Encoder) -> tuple[bytes | list[Any], list[pickle.PickleBuffer]]:
    """The rest of :func:`dumps` once the plain pickler has pickled ``obj``."""
    plain, checking, chunks, buffers = encoder
    if len(chunks) == 1 and len(chunks[0]) <= _SMALL_PICKLE:
        plain.clear_memo()
    else:
        plain.memo = {}
    # find(), not ``in``: ``bytes in bytes`` first tries the operand as an int and
    # raises and clears a TypeError (~1,800 instructions a message).
    if len(chunks) == 1 and chunks[0].find(b"__main__") < 0:
        main = chunks.pop()
        if not buffers:
            _ENCODERS.append(encoder)
            return main, _NO_BUFFERS
        collected = buffers[:]
        buffers.clear()
        _ENCODERS.append(encoder)
        return main, collected
    chunks.clear()
    buffers.clear()
    try:
        checking.dump(obj)
    except _FALLBACK:
        return _cloud_dumps(obj, encoder)
    checking.memo = {}  # a large pickle: a small table again
    result = chunks[:], buffers[:]
    chunks.clear()
    buffers.clear()
    _ENCODERS.append(encoder)
    return result


def _cloud_dumps(obj: Any, encoder: _Encoder) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` by value with cloudpickle (after recycling ``encoder``)."""
    plain, checking, chunks, buffers = encoder
    plain.clear_memo()
    checking.clear_memo()
    chunks.clear()
    buffers.clear()
    _ENCODERS.append(encoder)
    import cloudpickle  # lazily: most payloads never need it

    cloud_buffers: list[pickle.PickleBuffer] = []
    try:
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=cloud_buffers.append)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {_describe(obj)} to send it to another process: {exc}. "
            "Pass plain data (numbers, strings, lists, dicts, numpy arrays, dataclasses) "
            "or objects that can be pickled."
        ) from exc
    return data, cloud_buffers


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple) and obj and isinstance(obj[0], int):
        return "a message payload"
    return f"a value of type {type(obj).__qualname__}"


class Encoded:
    """A message pickled once, framed for any number of connections (a broadcast): only
    the header, which carries the connection's correlation id, differs."""

    __slots__ = ("buffers", "main", "message")

    def __init__(self, msg: Message) -> None:
        self.message = msg
        self.main, self.buffers = dumps(msg.to_wire())

    def frame(self, corr: int) -> list[Any]:
        return _frame(corr, self.main, self.buffers)


def encode(corr: int, msg: Message) -> list[Any]:
    """Return the frame for ``msg`` as a list of byte chunks (written with ``writelines``).

    What :func:`dumps` then framing do, with the common case (a small pickle of plain
    data and no out-of-band buffer: every handle call and its reply) in this one
    function: one chunk, the header joined to the pickle."""
    wire = msg._wire(msg)  # msg.to_wire(), without its call
    try:
        encoder = _ENCODERS.pop()
    except IndexError:
        encoder = _new_encoder()
    plain, _checking, chunks, buffers = encoder
    try:
        plain.dump(wire)
    except _FALLBACK:
        return _frame(corr, *_cloud_dumps(wire, encoder))
    if len(chunks) == 1 and not buffers:
        main = chunks[0]
        size = len(main)
        if size <= _SMALL_PICKLE and main.find(b"__main__") < 0:  # find: see _dumped
            chunks.clear()
            plain.clear_memo()
            _ENCODERS.append(encoder)
            return [HEADER.pack(size, corr, 0) + main]  # _SMALL_PICKLE < _JOIN_BELOW
    return _frame(corr, *_dumped(wire, encoder))


def _frame(corr: int, main: Any, buffers: list[Any]) -> list[Any]:
    if type(main) is bytes:
        main_len = len(main)
        if not buffers:
            header = HEADER.pack(main_len, corr, 0)
            return [header + main] if main_len < _JOIN_BELOW else [header, main]
        chunks: list[Any] = [main]
    else:
        chunks = main
        main_len = sum(map(len, chunks))
        if not buffers:
            return [HEADER.pack(main_len, corr, 0), *chunks]
    views = [buf.raw() for buf in buffers]
    lengths = b"".join(_BUFLEN.pack(view.nbytes) for view in views)
    body_len = len(lengths) + main_len + sum(view.nbytes for view in views)
    header = HEADER.pack(body_len, corr, len(views)) + lengths
    if len(chunks) == 1 and main_len < _JOIN_BELOW:
        return [header + chunks[0], *views]
    return [header, *chunks, *views]


def decode(body: memoryview, nbuf: int) -> Message:
    """Decode a frame body (without header). Out-of-band buffers stay views of ``body``."""
    if nbuf == 0:
        wire = _loads(body)
        return MESSAGE_TYPES[wire[0]](*wire[1:])  # from_wire, without its call
    offset = nbuf * _BUFLEN.size
    lengths = [_BUFLEN.unpack_from(body, i * _BUFLEN.size)[0] for i in range(nbuf)]
    main_len = len(body) - offset - sum(lengths)
    main = body[offset : offset + main_len]
    position = offset + main_len
    buffers = []
    for length in lengths:
        buffers.append(body[position : position + length])
        position += length
    return from_wire(pickle.loads(main, buffers=buffers))
