"""Request ids: 32 hex digits, unique across processes, and cheap to make.

``uuid.uuid4().hex`` costs a system call for 16 random bytes and a UUID object
per request. An id here is a per-process counter started at a random value and
scrambled (multiplied by an odd constant modulo 2**48, a bijection: ids stay
distinct but do not look alike at a glance), followed by 80 random bits drawn
once per process, again in every forked child (``os.register_at_fork``): two
processes share a suffix with probability about n**2 / 2**81 for n processes.
"""

from __future__ import annotations

import itertools
import os

_MASK = (1 << 48) - 1
_SCRAMBLE = 0x9E3779B97F4B  # odd: multiplying by it permutes 0 .. 2**48 - 1


def _reset() -> None:
    global _suffix, _counter
    _suffix = os.urandom(10).hex()
    # From a random start: the first ids of two processes do not begin alike either.
    _counter = itertools.count(int.from_bytes(os.urandom(6), "little"))  # next(): atomic


_suffix = ""
_counter = itertools.count(1)
_reset()
os.register_at_fork(after_in_child=_reset)


def new_request_id() -> str:
    """A new request id: 32 lowercase hex digits, like ``uuid.uuid4().hex``."""
    return f"{next(_counter) * _SCRAMBLE & _MASK:012x}{_suffix}"
