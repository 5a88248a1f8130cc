"""Lines waiting to be written to a log stream or file (docs/logging.md: at least every
0.1 s, at once for WARNING and above, and at exit; see ``shoal._observe.logs``).

Two kinds of line wait. A record a handler took waits formatted, in its destination's
:class:`Pending`. An access line (``shoal._observe.access_lines``) waits unformatted in
one of this process's two access queues: a request appends one tuple there, however many
destinations write it: :data:`ACCESS` (the terminal and the component's file: a
replica's lines) or :data:`FILE_ACCESS` (the file only: the proxy's, as in Ray).

Guarantees:

- every destination writes its lines in the order they were logged, access lines
  included: before a destination takes a formatted line, and before it is written, the
  access lines queued so far move, as one :class:`AccessBlock` per queue, to the end of
  every destination that writes that queue's lines (``route_to``);
- a block's lines are formatted once per encoding (TEXT, JSON) whatever the number of
  destinations writing it, when the first of them is written, each line's time stamp
  from the time its request ended;
- access lines queued while no destination writes them are dropped when next moved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from shoal._observe.appended import take

__all__ = ["ACCESS", "FILE_ACCESS", "AccessBlock", "AccessQueue", "Pending"]


class AccessBlock:
    """Access lines moved together to their destinations. A line is ``(ended, line,
    request id, latency in ms)``: ``ended`` a ``perf_counter()`` time, ``line`` an
    object with ``texts(items, offset)`` (the TEXT of a block of such lines, whatever
    their ``line``) and ``json(item, offset)`` (``AccessLine``)."""

    __slots__ = ("_json", "_text", "items")

    def __init__(self, items: list[tuple[float, Any, str | bytes, float]]) -> None:
        self.items = items
        self._text: str | None = None
        self._json: str | None = None

    def text(self, offset: float) -> str:
        """The lines as TEXT (``offset``: ``time.time()`` minus ``perf_counter()``)."""
        if self._text is None:
            self._text = self.items[0][1].texts(self.items, offset)  # (never empty)
        return self._text

    def json(self, offset: float) -> str:
        """The lines as JSON objects, one a line."""
        if self._json is None:
            self._json = "".join([item[1].json(item, offset) for item in self.items])
        return self._json


class AccessQueue:
    """This process's access lines not yet moved to their destinations: ``append`` one
    tuple per request (appends are atomic under the GIL; moves take ``_lock``)."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any, str | bytes, float]] = []
        self.append = self.items.append
        self._destinations: tuple[Pending, ...] = ()
        self._lock = threading.Lock()

    def seal(self) -> None:
        """Move the lines queued so far to the end of every destination, as one block."""
        with self._lock:
            items = take(self.items)
            if not items:
                return
            block = AccessBlock(items)
            for pending in self._destinations:
                pending.lines.append(block)

    def route_to(self, destinations: Iterable[Pending]) -> None:
        """From now on, access lines go to ``destinations`` (each once); those queued
        until now go where they were going."""
        self.seal()
        unique: dict[int, Pending] = {id(pending): pending for pending in destinations}
        with self._lock:
            self._destinations = tuple(unique.values())


#: The process's access lines for every destination (a request appends once).
ACCESS = AccessQueue()
#: The process's access lines for its files only (not the terminal).
FILE_ACCESS = AccessQueue()


class Pending:
    """Lines waiting to be written to one stream or file: added (under the GIL, in order)
    by any handler writing there, with the access lines moved in before each; taken and
    written under ``lock``. Lines of an :class:`AccessBlock` are formatted when taken, as
    TEXT, or as JSON when ``json``."""

    __slots__ = ("json", "lines", "lock")

    def __init__(self, lock: Any, json: bool = False) -> None:
        self.lines: list[Any] = []
        self.lock = lock
        self.json = json

    def add(self, text: str) -> None:
        """Queue a formatted line (after the access lines logged before it)."""
        if ACCESS.items:
            ACCESS.seal()
        if FILE_ACCESS.items:
            FILE_ACCESS.seal()
        self.lines.append(text)

    def take(self) -> str:
        """The text of the lines added so far (forgotten here); hold ``lock``."""
        if ACCESS.items:
            ACCESS.seal()
        if FILE_ACCESS.items:
            FILE_ACCESS.seal()
        taken = take(self.lines)
        if not taken:
            return ""
        try:
            return "".join(taken)
        except TypeError:  # access lines to format
            offset = time.time() - time.perf_counter()
            if self.json:
                return "".join([t if type(t) is str else t.json(offset) for t in taken])
            return "".join([t if type(t) is str else t.text(offset) for t in taken])
