"""Log lines of replicas and the proxy: which replica and request a record belongs to.

The lines themselves (format, levels, files, captured ``print()``) are set up by
:mod:`shoal._observe.logs` from the instance's and the deployment's
``logging_config`` (docs/logging.md). This module, which knows the replica and
request contexts, tells it whose record it is. In local testing mode (replicas in
the driver) only the ``"ray.serve"`` logger is set up, to stderr at INFO (unless the
program set a level; a deployment's ``log_level`` applies to its replicas' records),
in the same format::

    INFO 2026-01-05 10:00:00,123 default SayHello default#SayHello#a1b2c3 [rid-7] app.py:12 - Hello!
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from shoal._api.context import replica_context, request_context
from shoal._config import LoggingConfig
from shoal._observe import logs
from shoal._observe.access_lines import AccessLine, AccessLog
from shoal._observe.logs import SERVE_LOGGER_NAME, Component
from shoal._seam.specs import ReplicaSpec
from shoal._transport.http import HttpRequestData, HttpResponseData, HttpResponseStart
from shoal._transport.messages import Message, Result, StreamItem

__all__ = [
    "SERVE_LOGGER_NAME",
    "ReplicaAccessLog",
    "configure_serve_logger",
    "configure_worker_logging",
    "set_local_replica_level",
]


def _context() -> tuple[str, str, str, str] | None:
    context = replica_context.get()
    if context is None:
        return None
    return (
        context.app_name,
        context.deployment,
        context.replica_id,
        request_context.get().request_id,
    )


logs.set_context_provider(_context)


# Local testing mode: each replica's log_level (its deployment's logging_config), and
# the level of every other record (INFO, or the program's level for "ray.serve").
_local_levels: dict[str, int] = {}
_driver_level = [logging.INFO]


def configure_serve_logger() -> None:
    """Set up the ``"ray.serve"`` logger in the driver for local testing mode: its records
    go to stderr only (``propagate`` off) at INFO, unless the program already set a
    level. Idempotent."""
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if any(isinstance(handler, _DriverHandler) for handler in logger.handlers):
        return
    logger.addHandler(_DriverHandler())
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    _driver_level[0] = logger.level


def set_local_replica_level(replica_id: str, config: LoggingConfig | None) -> None:
    """Local testing mode: the ``"ray.serve"`` records of ``replica_id`` are kept from its
    deployment's ``log_level`` (no files, no access lines: nothing else applies)."""
    if config is None:
        return
    _local_levels[replica_id] = config.level
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if config.level < logger.getEffectiveLevel():
        logger.setLevel(config.level)  # the handler drops what other replicas do not keep


def _keep(record: logging.LogRecord) -> bool:
    return record.levelno >= _local_levels.get(getattr(record, "replica", ""), _driver_level[0])


class _DriverHandler(logging.StreamHandler[Any]):
    """Writes to the current ``sys.stderr`` (which test runners replace)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.TextFormatter())
        self.addFilter(logs.ContextFilter())
        self.addFilter(_keep)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure_worker_logging(worker_id: str) -> None:
    """Logging of a worker process (``worker_id`` is "replica-…" or "proxy-…") until the
    instance's settings arrive (``ConfigureProcess``): Ray's defaults, no file."""
    kind = worker_id.partition("-")[0]
    logs.set_process_component(Component(kind, "-", kind, worker_id))
    logs.configure(logs.effective(None), None, worker_id)


_perf_counter = time.perf_counter
# Prepared lines a replica keeps, by method, route and status (see AccessLog).
_MAX_LINES = 4096


class ReplicaAccessLog:
    """A replica's access lines (``enable_access_log``), Ray's: ``METHOD ROUTE STATUS
    LATENCYms`` for an HTTP request (500 when it failed), ``CALL method OK`` (or
    ``ERROR``) for a handle call; logged at ``where`` (the replica server's file, line)."""

    def __init__(self, spec: ReplicaSpec, where: tuple[str, int]) -> None:
        self._log = AccessLog(where)
        self._replica = (spec.app, spec.deployment, spec.replica_id)
        self._lines: dict[tuple[str, str, Any], AccessLine] = {}

    def write(self, request: Any, reply: Message | None, started: float) -> None:
        """The line of ``request`` (a ``Request``), whose reply (or first stream message)
        was ``reply`` (None: none was sent), now; it arrived at ``started``
        (``perf_counter()``)."""
        ended = _perf_counter()
        args = request.args
        value = reply.value if type(reply) is Result or type(reply) is StreamItem else None
        if args and type(args[0]) is HttpRequestData:
            method, route = args[0].method, args[0].path
            ok = type(value) is HttpResponseData or type(value) is HttpResponseStart
            status: Any = value.status if ok else 500  # type: ignore[union-attr]
        else:
            method, route = "CALL", request.method
            status = "OK" if type(reply) is Result or type(reply) is StreamItem else "ERROR"
        key = (method, route, status)
        line = self._lines.get(key)
        if line is None:
            line = self._log.line(*self._replica, method, route, status)
            if len(self._lines) < _MAX_LINES:
                self._lines[key] = line
        self._log.write(line, request.request_id, (ended - started) * 1000, ended)
