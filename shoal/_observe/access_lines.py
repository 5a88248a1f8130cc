"""Access lines (docs/logging.md): one per request, for about a microsecond of the request's time.

A line is what a record of the ``"ray.serve"`` logger at INFO would print, Ray's
``METHOD ROUTE STATUS LATENCYms`` with the application, deployment, replica and request
id (TEXT), or the JSON object with those fields (``method``, ``route``,
``status_code``, ``latency_ms`` too) in a JSON file. Guarantees:

- a line is written only if the logger takes INFO records (its level, as the user or
  ``logging_config`` set it, when the request ends);
- while the logger has only the handlers shoal installed (no filter of the user's, no
  propagation, no ``additional_log_standard_attrs``), the request only appends its
  figures (time, request id, latency) to those handlers' pending lines, in order with
  the other lines; they are formatted when the lines are written (at least every 0.1 s,
  see ``shoal._observe.logs``), as a LogRecord would have been, its time from the
  request's; the parts that do not change from one request to the next (application,
  deployment, replica, file and line, method, route, status) are put together once
  per :class:`AccessLine`, the time stamp once per millisecond. Otherwise the line is
  a LogRecord, formatted by the handlers the logger has.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from shoal._observe import logs
from shoal._observe.logs import SERVE_LOGGER_NAME

#: Ray's message: method, route, status, latency.
MESSAGE = "%s %s %s %.1fms"
# Prepared lines kept per AccessLog: enough for every route, method and status of a
# service; a component seeing more (handle calls of many methods) prepares the rest anew.
_MAX_LINES = 4096
_INFO = logging.INFO


class AccessLine:
    """The parts of an access line that are the same for every request with these fields.

    A request's line waits, unformatted, as ``[perf_counter() time, this line, request
    id, latency in ms, its TEXT once formatted (else None)]``."""

    __slots__ = ("application", "deployment", "head", "method", "replica", "route", "status",
                 "tail", "where")  # fmt: skip

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

    def text(self, waiting: list[Any], offset: float) -> str:
        """The TEXT line of a waiting request (``offset``: ``time.time()`` minus
        ``perf_counter()``), as ``logs.TextFormatter`` formats a record."""
        text: str | None = waiting[4]
        if text is None:
            stamp = logs.format_time(waiting[0] + offset)
            request_id = waiting[2]
            if request_id:
                text = f"INFO {stamp}{self.head}[{request_id}] {self.tail}{waiting[3]:.1f}ms\n"
            else:
                text = f"INFO {stamp}{self.head}{self.tail}{waiting[3]:.1f}ms\n"
            waiting[4] = text  # a second TEXT destination (stderr, a file) uses it again
        return text

    def json(self, waiting: list[Any], offset: float) -> str:
        """The JSON line of a waiting request, as ``logs.JsonFormatter`` formats a record."""
        created, request_id, latency_ms = waiting[0] + offset, waiting[2], waiting[3]
        record: dict[str, Any] = {
            "asctime": logs.format_time(created), "levelname": "INFO",
            "message": MESSAGE % (self.method, self.route, self.status, latency_ms),
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


class AccessLog:
    """Writes one component's access lines, logged at ``where`` (a file name and line,
    shown in the line as a LogRecord's would be)."""

    def __init__(self, where: tuple[str, int]) -> None:
        self.where = where
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

    def write(self, line: AccessLine, request_id: str, latency_ms: float, ended: float) -> None:
        """One access line: ``line``'s fields, answered ``latency_ms`` after it started,
        at ``ended`` (``perf_counter()``: the line's time)."""
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
        waiting = [ended, line, request_id, latency_ms, None]
        for append in out.appends:
            append(waiting)

    def _record(self, line: AccessLine, request_id: str, latency_ms: float) -> None:
        """The line as a LogRecord, for the handlers and filters the logger has now."""
        fields = {
            "application": line.application, "deployment": line.deployment,
            "replica": line.replica, "request_id": request_id, "method": line.method,
            "route": line.route, "status_code": line.status, "latency_ms": latency_ms,
        }  # fmt: skip
        args = (line.method, line.route, line.status, latency_ms)
        logger, (file, lineno) = self._logger, self.where
        record = logger.makeRecord(
            logger.name, _INFO, file, lineno, MESSAGE, args, None, extra=fields
        )
        logger.handle(record)
