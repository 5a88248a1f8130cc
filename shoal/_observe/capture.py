"""``print()`` and stray writes to ``sys.stdout``/``sys.stderr`` of user code, captured as
log records (``shoal.stdout`` at INFO, ``shoal.stderr`` at ERROR) with the same prefix as
every other line (docs/logging.md)."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Callable
from typing import TextIO

#: Set while a capture hands a line to logging: a handler that writes to (or fails on)
#: the captured stream then writes straight out instead of looping back.
_busy = threading.local()


def print_loggers() -> list[tuple[logging.Logger, str]]:
    loggers = []
    for name in ("stdout", "stderr"):
        logger = logging.getLogger(f"shoal.{name}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)  # printed lines are kept whatever the level
        loggers.append((logger, name))
    return loggers


class _LineCapture(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` that turns each line written into a record."""

    def __init__(
        self, logger: logging.Logger, level: int, original: TextIO, on_flush: Callable[[], None]
    ) -> None:
        super().__init__()
        self._logger, self._level, self._original = logger, level, original
        self._on_flush = on_flush
        self._partial = ""

    def write(self, text: str) -> int:
        if getattr(_busy, "active", False):  # a handler writing (or failing): straight out
            return self._original.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._emit(line, 3)
        return len(text)

    def _emit(self, line: str, stacklevel: int) -> None:
        _busy.active = True
        try:
            # stacklevel: the code that called print() (or write()), not this module.
            self._logger.log(self._level, "%s", line, stacklevel=stacklevel)
        finally:
            _busy.active = False

    def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, ""
            self._emit(line, 3)
        self._original.flush()
        self._on_flush()  # a worker flushes its streams before it exits: its files too

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8") or "utf-8"


def capture_streams(originals: dict[str, TextIO], on_flush: Callable[[], None]) -> None:
    """Replace ``sys.stdout`` and ``sys.stderr`` by line captures (once per process; the
    streams replaced go in ``originals``; ``on_flush`` runs when a capture is flushed)."""
    if originals:
        return
    for name, level in (("stdout", logging.INFO), ("stderr", logging.ERROR)):
        original = getattr(sys, name)
        # Flushed by the handlers (every 0.1 s, WARNING+ at once), not at every newline:
        # stderr writes through to an unbuffered file, a system call per line otherwise.
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            original.reconfigure(line_buffering=False, write_through=False)
        originals[name] = original
        logger = logging.getLogger(f"shoal.{name}")
        setattr(sys, name, _LineCapture(logger, level, original, on_flush))
