"""Frame encoding: pickle protocol 5 with out-of-band buffers.

A frame is ``header | buffer lengths | main pickle | buffers...`` where the
header is ``<IQH`` = (body length, correlation id, number of buffers).
Large contiguous buffers (numpy arrays, bytearray, PickleBuffer) travel
out-of-band: they are written from their own memory and, on receipt, handed
to the unpickler as views of the receive buffer, so they are never copied by
shoal. Objects plain pickle cannot handle (lambdas, classes defined in
``__main__``) fall back to cloudpickle.

Only peers that passed the socket's filesystem permissions and peer-credential
check ever reach :func:`decode`: frames are trusted by construction.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from shoal._errors import SerializationError
from shoal._transport.messages import Message, from_wire

HEADER = struct.Struct("<IQH")
HEADER_SIZE = HEADER.size
_BUFLEN = struct.Struct("<Q")
MAX_FRAME = 1 << 34  # 16 GiB: larger is a corrupted stream, not a payload


def dumps(obj: Any, buffers: list[pickle.PickleBuffer] | None = None) -> bytes:
    """Pickle ``obj``; with ``buffers`` given, large buffers are collected out-of-band."""
    callback = buffers.append if buffers is not None else None
    try:
        data = pickle.dumps(obj, protocol=5, buffer_callback=callback)
        # Classes and functions of the driver's __main__ pickle by reference, but __main__
        # is another module in the receiving process: send those by value. (A false
        # positive, user data containing the text, only costs the slower pickler.)
        if b"__main__" not in data:
            return data
    except (pickle.PicklingError, AttributeError, TypeError):
        pass
    if buffers is not None:
        buffers.clear()
    import cloudpickle  # lazily: most payloads never need it

    try:
        return cloudpickle.dumps(obj, protocol=5, buffer_callback=callback)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {_describe(obj)} to send it to another process: {exc}. "
            "Pass plain data (numbers, strings, lists, dicts, numpy arrays, dataclasses) "
            "or objects that can be pickled."
        ) from exc


def _describe(obj: Any) -> str:
    if isinstance(obj, tuple) and obj and isinstance(obj[0], int):
        return "a message payload"
    return f"a value of type {type(obj).__qualname__}"


def encode(corr: int, msg: Message) -> list[Any]:
    """Return the frame for ``msg`` as a list of byte chunks (written with ``writelines``)."""
    buffers: list[pickle.PickleBuffer] = []
    main = dumps(msg.to_wire(), buffers)
    if not buffers:
        return [HEADER.pack(len(main), corr, 0) + main]
    views = [buf.raw() for buf in buffers]
    lengths = b"".join(_BUFLEN.pack(view.nbytes) for view in views)
    body_len = len(lengths) + len(main) + sum(view.nbytes for view in views)
    return [HEADER.pack(body_len, corr, len(views)) + lengths + main, *views]


def decode(body: memoryview, nbuf: int) -> Message:
    """Decode a frame body (without header). Out-of-band buffers stay views of ``body``."""
    if nbuf == 0:
        return from_wire(pickle.loads(body))
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
