"""Access lines (docs/logging.md): one per request, for about a microsecond of the request's time.

A line is what a record of the ``"ray.serve"`` logger at INFO would print, Ray's
``METHOD ROUTE STATUS LATENCYms`` with the application, deployment, replica and request
id (TEXT), or the JSON object with those fields (``method``, ``route``,
``status_code``, ``latency_ms`` too) in a JSON file. Guarantees:

- a line is written only if the logger takes INFO records (its level, as the user or
  ``logging_config`` set it, when the request ends);
- while the logger has only the handlers shoal installed (no filter of the user's, no
  propagation, no ``additional_log_standard_attrs``), the request only appends its
  figures (time, request id, latency) to the process's access queue, once whatever the
  destinations; they are formatted when the lines are written (at least every 0.1 s),
  once per encoding, as a LogRecord would have been, its time from the request's, in
  order with the other lines (see ``shoal._observe.pending``); the parts that do not
  change from one request to the next (application, deployment, replica, file and
  line, method, route, status) are put together once per :class:`AccessLine`, the
  time stamp once per millisecond. Otherwise the line is a LogRecord, formatted by the
  handlers the logger has.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shoal._observe import logs
from shoal._observe.logs import SERVE_LOGGER_NAME

#: Ray's message: method, route, status, latency (:func:`latency_text`).
MESSAGE = "%s %s %s %sms"
# Prepared lines kept per AccessLog: enough for every route, method and status of a
# service; a component seeing more (handle calls of many methods) prepares the rest anew.
_MAX_LINES = 4096
_INFO = logging.INFO


def latency_text(latency_ms: float) -> str:
    """``12.3``: milliseconds to one decimal, halves rounded up. Integer arithmetic: a
    float's format specification costs several times the rest of the line."""
    tenths = int(latency_ms * 10.0 + 0.5)
    return f"{tenths // 10}.{tenths % 10}"


class AccessLine:
    """The parts of an access line that are the same for every request with these fields.

    A request's line waits, unformatted, as ``(perf_counter() time, this line, request
    id, latency in ms)``."""

    __slots__ = ("application", "closed_tail", "deployment", "head", "method", "replica",
                 "route", "status", "tail", "where")  # fmt: skip

    def __init__(
        self,
        where: tuple[str, int],
        application: str,
        deployment: str,
        replica: str,
        method: str,
        route: str,
        status: int | str,
    ) -> None:
        self.application, self.deployment, self.replica = application, deployment, replica
        self.method, self.route, self.status = method, route, status
        self.where = where
        self.head = f" {application} {deployment} {replica} "
        self.tail = f"{where[0]}:{where[1]} - {method} {route} {status} "
        self.closed_tail = f"] {self.tail}"  # after a request id: "[rid" + this

    def text(self, waiting: tuple[float, AccessLine, str | bytes, float], offset: float) -> str:
        """The TEXT line of a waiting request (``offset``: ``time.time()`` minus
        ``perf_counter()``), as ``logs.TextFormatter`` formats a record."""
        return texts([waiting], offset)

    @staticmethod
    def texts(waiting: list[tuple[float, AccessLine, str | bytes, float]], offset: float) -> str:
        """The TEXT lines of waiting requests (whatever their lines): :func:`texts`."""
        return texts(waiting, offset)

    def json(self, waiting: tuple[float, AccessLine, str | bytes, float], offset: float) -> str:
        """The JSON line of a waiting request, as ``logs.JsonFormatter`` formats a record."""
        created, request_id, latency_ms = waiting[0] + offset, waiting[2], waiting[3]
        if type(request_id) is bytes:
            request_id = request_id.decode("latin-1")
        record: dict[str, Any] = {
            "asctime": logs.format_time(created), "levelname": "INFO",
            "message": MESSAGE % (self.method, self.route, self.status, latency_text(latency_ms)),
            "application": self.application, "deployment": self.deployment,
            "replica": self.replica, "component_name": logs.process_component().kind,
            "logger": SERVE_LOGGER_NAME, "filename": self.where[0], "lineno": self.where[1],
            "timestamp_ns": int(created * 1e9),
        }  # fmt: skip
        if request_id:
            record["request_id"] = request_id
        record.update(method=self.method, route=self.route, status_code=self.status,
                      latency_ms=latency_ms)  # fmt: skip
        return _encode(record) + "\n"


_encode = json.JSONEncoder().encode
# "0.0ms\n" .. "99.9ms\n": a latency's text by its tenths of a millisecond, for most lines.
_LATENCIES = [f"{tenths // 10}.{tenths % 10}ms\n" for tenths in range(1000)]


def texts(waiting: list[tuple[float, AccessLine, str | bytes, float]], offset: float) -> str:
    """The TEXT lines of waiting requests, in order (``offset``: ``time.time()`` minus
    ``perf_counter()``), each as ``logs.TextFormatter`` formats its record. One pass
    that puts parts together: the time stamp and the line's head are made again only
    when the millisecond (``logs.format_time``'s) or the line changes."""
    parts: list[str] = []
    add = parts.extend
    start = end = 0.0
    stamp = prefix = ""
    last: AccessLine | None = None
    latencies = _LATENCIES
    for created, line, request_id, latency_ms in waiting:
        created += offset
        if not start <= created < end:  # another millisecond
            start, end, stamp = logs.time_span(created)
            last = None
        if line is not last:
            prefix, last = f"INFO {stamp}{line.head}", line
        tenths = int(latency_ms * 10.0 + 0.5)  # latency_text(), inlined: once per line
        latency = latencies[tenths] if tenths < 1000 else f"{tenths // 10}.{tenths % 10}ms\n"
        if not request_id:
            add((prefix, line.tail, latency))
        elif isinstance(request_id, bytes):  # the header's, as sent: latin-1
            add((prefix, "[", request_id.decode("latin-1"), line.closed_tail, latency))
        else:
            add((prefix, "[", request_id, line.closed_tail, latency))
    return "".join(parts)


class AccessLog:
    """Writes one component's access lines, logged at ``where`` (a file name and line,
    shown in the line as a LogRecord's would be); to the component's file only, not the
    terminal, unless ``to_terminal`` (as a record with ``extra={"log_to_stderr":
    False}``: Ray's proxy writes its access lines so)."""

    def __init__(self, where: tuple[str, int], to_terminal: bool = True) -> None:
        self.where = where
        self.to_terminal = to_terminal
        self._logger = logging.getLogger(SERVE_LOGGER_NAME)
        self._lines: dict[tuple[str, str, str, str, str, int | str], AccessLine] = {}

    def line(
        self,
        application: str,
        deployment: str,
        replica: str,
        method: str,
        route: str,
        status: int | str,
    ) -> AccessLine:
        """The prepared parts of the lines with these fields (made once, then cached)."""
        key = (application, deployment, replica, method, route, status)
        line = self._lines.get(key)
        if line is None:
            line = AccessLine(self.where, application, deployment, replica, method, route, status)
            if len(self._lines) < _MAX_LINES:
                self._lines[key] = line
        return line

    def write(
        self, line: AccessLine, request_id: str | bytes, latency_ms: float, ended: float
    ) -> None:
        """One access line: ``line``'s fields, answered ``latency_ms`` after it started,
        at ``ended`` (``perf_counter()``: the line's time); ``request_id`` as text or as
        the header's bytes (latin-1, decoded when the line is written)."""
        logger = self._logger
        # ``_cache[INFO]`` is what isEnabledFor(INFO) returns once it was asked (logging
        # empties every logger's cache on any level change or logging.disable): read
        # without a call while it holds.
        cached = not logger.disabled and logger._cache.get(_INFO) is True  # type: ignore[attr-defined]
        if not cached and not logger.isEnabledFor(_INFO):
            return
        out = logs.direct
        if out is None or logger.handlers != out.handlers or logger.filters or logger.propagate:
            self._record(line, request_id, latency_ms)
            return
        if self.to_terminal:
            out.append((ended, line, request_id, latency_ms))
        else:
            out.append_to_files((ended, line, request_id, latency_ms))

    def _record(self, line: AccessLine, request_id: str | bytes, latency_ms: float) -> None:
        """The line as a LogRecord, for the handlers and filters the logger has now."""
        if type(request_id) is bytes:
            request_id = request_id.decode("latin-1")
        fields = {
            "application": line.application, "deployment": line.deployment,
            "replica": line.replica, "request_id": request_id, "method": line.method,
            "route": line.route, "status_code": line.status, "latency_ms": latency_ms,
        }  # fmt: skip
        if not self.to_terminal:
            fields["log_to_stderr"] = False
        args = (line.method, line.route, line.status, latency_text(latency_ms))
        logger, (file, lineno) = self._logger, self.where
        record = logger.makeRecord(
            logger.name, _INFO, file, lineno, MESSAGE, args, None, extra=fields
        )
        logger.handle(record)
