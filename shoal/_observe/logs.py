"""Log lines of shoal's processes: one format, the same fields, one file per component.

Guarantees (docs/logging.md):

* In a worker process every record (the ``"ray.serve"`` logger, the user's own
  loggers, shoal's) carries ``application``, ``deployment``, ``replica`` (the id
  ``serve.status()`` shows) and ``request_id`` (empty outside a request), and is
  written at the configured ``log_level`` to stderr in the TEXT format::

      INFO 2026-01-05 10:00:00,123 default SayHello default#SayHello#a1b2c3 [rid-7] app.py:12 - Hi

  and to the component's file in the instance's log directory (``logs_dir``
  overrides it), in the configured ``encoding`` (TEXT, or one JSON object a line).
* ``print()`` and other writes to ``sys.stdout``/``sys.stderr`` in a worker become
  records (INFO and ERROR) with the same fields, written to the same stream as
  before and to the file, whatever the level.
* The controller's process (a driver's, or a ``shoal start`` server's) writes
  shoal's own records to ``controller.log``; the program's loggers are left alone.

Which replica or request a record belongs to is asked of the layer that knows
(:func:`set_context_provider`, set by ``shoal._replica.logs``): this module sits
below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from shoal._config import LoggingConfig
from shoal._observe.capture import capture_streams, print_loggers
from shoal._observe.pending import ACCESS, FILE_ACCESS, Pending

SERVE_LOGGER_NAME = "ray.serve"
#: Record attributes a line shows, set by :class:`ContextFilter` (or by ``extra=``).
CONTEXT_FIELDS = ("application", "deployment", "replica", "request_id")
# Attributes of an access line (``extra=``), shown as JSON fields.
_ACCESS_FIELDS = ("method", "route", "status_code", "latency_ms")


@dataclass(frozen=True)
class Component:
    """What this process hosts: ``kind`` is "replica", "proxy", "controller" or "worker"."""

    kind: str
    application: str = "-"
    deployment: str = "-"
    replica: str = "-"


_process = Component("local_test", "-", "local_test", "-")


# (application, deployment, replica id, request id) of the code running now, or None.
def _no_context() -> tuple[str, str, str, str] | None:
    return None


_context_of: Callable[[], tuple[str, str, str, str] | None] = _no_context


def set_context_provider(provider: Callable[[], tuple[str, str, str, str] | None]) -> None:
    """Tell records which replica and request they belong to (called by the replica layer)."""
    global _context_of
    _context_of = provider


def set_process_component(component: Component) -> None:
    """Name this process's replica or proxy on records logged outside any replica context
    (a thread the user started, module-level code, the proxy)."""
    global _process
    _process = component


def process_component() -> Component:
    return _process


def _fill_context(fields: dict[str, Any]) -> None:
    """Set the application, deployment and replica of the current replica context (or
    of this process's component) in ``fields``, and its request id unless given."""
    context = _context_of()
    if context is None:
        process = _process
        context = (process.application, process.deployment, process.replica, "")
    fields["application"], fields["deployment"], fields["replica"] = context[:3]
    fields.setdefault("request_id", context[3])


class ContextFilter(logging.Filter):
    """Adds the :data:`CONTEXT_FIELDS` a record was not given with ``extra=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if "replica" not in fields:
            _fill_context(fields)
        else:
            fields.setdefault("request_id", "")
        return True


# The last second formatted and its text; the last millisecond's [start, end) (of
# time.time() values) and its text. Tuples, replaced whole: threads may format at once.
_second: tuple[int, str] = (-1, "")
_millisecond: tuple[float, float, str] = (0.0, 0.0, "")


def format_time(created: float) -> str:
    """``2026-01-05 10:00:00,123`` (local time, as Ray's lines): strftime once a second,
    the text once a millisecond (lines written in the same millisecond share it)."""
    return time_span(created)[2]


def time_span(created: float) -> tuple[float, float, str]:
    """``(start, end, format_time(created))``: the times in [start, end) have the same
    text (start == end: none is known to)."""
    span = _millisecond
    if span[0] <= created < span[1]:
        return span
    return _format_millisecond(created)


def _format_millisecond(created: float) -> tuple[float, float, str]:
    global _second, _millisecond
    second = int(created)
    known, day_time = _second
    if second != known:
        day_time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        _second = (second, day_time)
    millis = int((created - second) * 1000)
    text = f"{day_time},{millis:03d}"
    start = second + millis / 1000
    span = (start, start + 0.001, text) if start <= created else (0.0, 0.0, text)
    _millisecond = span
    return span


class TextFormatter(logging.Formatter):
    """``LEVEL TIME APP DEPLOYMENT REPLICA [REQUEST] [ATTRS...] FILE:LINE - MESSAGE``."""

    def __init__(self, attrs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.attrs = attrs
        self._key = f"_shoal_text{id(self)}"  # handlers sharing this formatter format once

    def format(self, record: logging.LogRecord) -> str:
        cached: str | None = record.__dict__.get(self._key)
        if cached is not None:
            return cached
        record.message = record.getMessage()
        record.asctime = format_time(record.created)
        request_id = getattr(record, "request_id", "")
        request = f"[{request_id}] " if request_id else ""
        extra = "".join(f"{getattr(record, name, '')} " for name in self.attrs)
        line = (
            f"{record.levelname} {record.asctime} {getattr(record, 'application', '-')} "
            f"{getattr(record, 'deployment', '-')} {getattr(record, 'replica', '-')} "
            f"{request}{extra}{record.filename}:{record.lineno} - {record.message}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        record.__dict__[self._key] = line
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: Ray Serve's field names (``levelname``, ``asctime``,
    ``message``, ``application``, ``deployment``, ``replica``, ``request_id``...)."""

    def __init__(self, attrs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.attrs = attrs

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "asctime": format_time(record.created),
            "levelname": record.levelname,
            "message": record.getMessage(),
            "application": getattr(record, "application", "-"),
            "deployment": getattr(record, "deployment", "-"),
            "replica": getattr(record, "replica", "-"),
            "component_name": _process.kind,
            "logger": record.name,
            "filename": record.filename,
            "lineno": record.lineno,
            "timestamp_ns": int(record.created * 1e9),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            fields["request_id"] = request_id
        for name in (*_ACCESS_FIELDS, *self.attrs):
            if name in record.__dict__ or name in self.attrs:
                fields[name] = getattr(record, name, None)
        if record.exc_info:
            fields["exc_text"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


# "stderr"/"stdout" -> its lines: one list per stream, however many handlers write there.
_stream_pending: dict[str, Pending] = {}


class _Queued(logging.Handler):
    """A handler that queues formatted lines (:attr:`pending`) and writes them in blocks
    (:meth:`flush_now`): at once for WARNING and above, else every ``_FLUSH_S``."""

    pending: Pending
    terminator: str

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.add(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush_now()

    def flush_now(self) -> None:
        raise NotImplementedError


class _StreamHandler(_Queued, logging.StreamHandler[TextIO]):
    """Writes to the process's ``sys.stderr`` or ``sys.stdout`` (``name``) as it is when
    flushed (test runners replace ``sys.stderr``).

    Not written per record (a system call per line would cost more than the line): a
    line waits in its stream's :class:`Pending`, written with the files, at least every
    ``_FLUSH_S``, and at once for WARNING and above."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._stream_of = _stream(name)
        pending = _stream_pending.get(name)
        if pending is None:
            pending = _stream_pending[name] = Pending(threading.Lock())
        self.pending = pending
        self.addFilter(to_terminal)
        _streams.append(self)
        _start_flusher()

    def flush(self) -> None:
        pass  # flush_now(): every _FLUSH_S, for WARNING and above, and at exit

    def flush_now(self) -> None:
        pending = self.pending
        # A stream a test runner closed, or a broken pipe: nothing left to write into.
        with pending.lock, contextlib.suppress(ValueError, OSError):
            text = pending.take()
            stream = self.stream
            if text:
                stream.write(text)
            stream.flush()

    def close(self) -> None:
        # Still flushed afterwards (_uninstall forgets it): uvicorn's logging setup closes
        # every handler, and this one goes on writing to the process's stream.
        self.flush_now()
        super().close()

    @property
    def stream(self) -> TextIO:
        return self._stream_of()

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


# --- the process's handlers ------------------------------------------------------------

_lock = threading.Lock()
_installed: list[tuple[logging.Logger, logging.Handler]] = []
_original: dict[str, TextIO] = {}  # "stdout"/"stderr" before capture
_defaults = LoggingConfig()  # the instance-wide logging_config
_directory: str | None = None  # the instance's log directory
_access_enabled = False
_took_over_root = False


def _stream(name: str) -> Callable[[], TextIO]:
    def current() -> TextIO:
        stream = _original.get(name)
        return stream if stream is not None else getattr(sys, name)

    return current


def _uninstall() -> None:
    for logger, handler in _installed:
        logger.removeHandler(handler)
        handler.close()
        if handler in _files:
            _files.remove(handler)
        if handler in _streams:
            _streams.remove(handler)
    _installed.clear()


def _install(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.addFilter(ContextFilter())
    logger.addHandler(handler)
    _installed.append((logger, handler))


_FLUSH_S = 0.1  # the longest a line waits in a file's buffer (an ERROR line: none)
#: A file that reaches this size is rotated (``x.log`` -> ``x.log.1`` ... ``.5``, the
#: oldest dropped): Ray's defaults, so a long-running instance never fills the disk.
MAX_FILE_BYTES = 512 * 2**20
BACKUP_COUNT = 5


class _BufferedFileHandler(_Queued, logging.handlers.RotatingFileHandler):
    """A log file written through a buffer: a write system call per flush, not per line.
    A line waits in the file's :class:`Pending`, written at least every ``_FLUSH_S`` (by
    one daemon thread), at once for WARNING and above, and whenever the process flushes
    ``sys.stdout``/``sys.stderr``; rotated when a flush leaves it at ``maxBytes`` or
    more (checked per flush, not per line)."""

    def __init__(self, filename: str, maxBytes: int, backupCount: int, encoding: str) -> None:
        super().__init__(filename, maxBytes=maxBytes, backupCount=backupCount, encoding=encoding)
        self.pending = Pending(self.lock)  # taken under the handler's lock (emit holds it)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return False  # checked in flush_now(): a tell() per line would cost a system call

    def flush(self) -> None:
        pass  # not per record: flush_files() writes the lines (0.1 s, WARNING+, exit)

    def flush_now(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            text = self.pending.take()
            if self.stream is None:  # closed by logging.config (uvicorn calls it): reopen
                if not text:
                    return
                self.stream = self._open()
            if text:
                self.stream.write(text)
            self.stream.flush()
            if self.maxBytes > 0 and self.stream.tell() >= self.maxBytes:
                self.doRollover()

    def close(self) -> None:
        self.flush_now()
        super().close()


_files: list[_BufferedFileHandler] = []
_streams: list[_StreamHandler] = []
_flusher: threading.Thread | None = None


def flush_files() -> None:
    """Write every log file's and stream's buffered lines (the daemon thread does it
    every 0.1 s)."""
    for handler in list(_files):
        handler.flush_now()
    for stream in list(_streams):
        stream.flush_now()


def _start_flusher() -> None:
    global _flusher
    if _flusher is None:
        _flusher = threading.Thread(target=_flush_forever, name="shoal-log-files", daemon=True)
        _flusher.start()


def _flush_forever() -> None:
    while True:
        time.sleep(_FLUSH_S)
        flush_files()


def _file_handler(path: str, config: LoggingConfig, text: TextFormatter) -> logging.Handler:
    """The component's file; ``text`` is shared with stderr's handler (a line formatted once)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = _BufferedFileHandler(
        path, maxBytes=MAX_FILE_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8"
    )
    attrs = tuple(config.additional_log_standard_attrs)
    handler.setFormatter(JsonFormatter(attrs) if config.encoding == "JSON" else text)
    handler.pending.json = config.encoding == "JSON"
    _files.append(handler)
    _start_flusher()
    return handler


def configure(defaults: LoggingConfig, directory: str | None, source: str) -> None:
    """Apply the instance's logging to this process (``source``: "controller" or a worker
    id). A worker logs as :func:`configure_component` then refines; the controller's
    process gets ``controller.log`` for shoal's own loggers only. The last call wins."""
    global _defaults, _directory
    with _lock:
        _defaults = LoggingConfig(**defaults.model_dump(include=set(LoggingConfig.model_fields)))
        _directory = directory
        if source == "controller":
            _configure_controller(_defaults, directory)
        else:
            _apply(_process, _defaults, None)


def _configure_controller(config: LoggingConfig, directory: str | None) -> None:
    shoal = logging.getLogger("shoal")
    for logger, handler in list(_installed):
        if logger is shoal:
            logger.removeHandler(handler)
            handler.close()
            _installed.remove((logger, handler))
            if handler in _files:
                _files.remove(handler)
    if directory is None:
        return
    set_process_component(Component("controller", "-", "controller", f"controller-{os.getpid()}"))
    path = os.path.join(config.logs_dir or directory, "controller.log")
    _install(
        shoal,
        _file_handler(path, config, TextFormatter(tuple(config.additional_log_standard_attrs))),
    )
    shoal.setLevel(config.level)


def effective(own: LoggingConfig | None) -> LoggingConfig:
    """A deployment's logging: its own ``logging_config``, else the instance's."""
    return own if own is not None else _defaults


def configure_component(component: Component, own: LoggingConfig | None) -> LoggingConfig:
    """This worker now hosts ``component``: its records carry it, go to its file, and
    are kept from the level of ``own`` (a deployment's ``logging_config``) or else the
    instance's. Returns the logging config in effect."""
    config = effective(own)
    with _lock:
        set_process_component(component)
        _apply(component, config, file_name(component))
    return config


def file_name(component: Component) -> str:
    """``replica_<app>_<deployment>_<id>.log``, ``proxy_<id>.log`` or ``controller.log``."""
    if component.kind == "replica":
        suffix = component.replica.rpartition("#")[2]
        return f"replica_{_safe(component.application)}_{_safe(component.deployment)}_{suffix}.log"
    return f"{component.kind}_{_safe(component.replica.partition('-')[2] or component.replica)}.log"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def _apply(component: Component, config: LoggingConfig, file: str | None) -> None:
    """(Re)install a worker's handlers: root and ``"ray.serve"`` at the config's level,
    stdout/stderr captured; plus the component's file when ``file`` is named."""
    global _access_enabled, _took_over_root
    _uninstall()
    capture_streams(_original, flush_files)
    root, serve = logging.getLogger(), logging.getLogger(SERVE_LOGGER_NAME)
    if not _took_over_root:  # the worker's first handlers (basicConfig's): ours replace them
        _took_over_root = True
        for handler in list(root.handlers):
            root.removeHandler(handler)
    attrs = tuple(config.additional_log_standard_attrs)
    console = TextFormatter(attrs)
    directory = config.logs_dir or _directory
    path = os.path.join(directory, file) if file is not None and directory else None
    to_file = _file_handler(path, config, console) if path is not None else None
    for logger, stream in ((root, "stderr"), (serve, "stderr"), *print_loggers()):
        handler = _StreamHandler(stream)
        handler.setFormatter(console)
        _install(logger, handler)
        if to_file is not None:
            _install(logger, to_file)
    root.setLevel(config.level)
    serve.setLevel(config.level)
    serve.propagate = False
    _access_enabled = config.enable_access_log and component.kind in ("replica", "proxy")
    _set_direct(serve, attrs)


class Direct:
    """Where an access line goes without a LogRecord (``shoal._observe.access_lines``):
    one ``(ended, line, request id, latency)`` appended to one of the process's access
    queues (``shoal._observe.pending``): ``append`` for the pending lines of every
    ``"ray.serve"`` handler shoal installed, ``append_to_files`` for its files only.
    Valid while those are the logger's only handlers (``handlers``)."""

    __slots__ = ("append", "append_to_files", "handlers")

    def __init__(
        self,
        handlers: list[logging.Handler],
        append: Callable[[Any], None],
        append_to_files: Callable[[Any], None] | None = None,
    ) -> None:
        self.handlers = handlers
        self.append = append
        self.append_to_files = append if append_to_files is None else append_to_files


#: The direct way for access lines, or None (extra attributes shown: the formatters' way).
direct: Direct | None = None


def _set_direct(serve: logging.Logger, attrs: tuple[str, ...]) -> None:
    global direct
    handlers = list(serve.handlers)
    ours = all(isinstance(h, _StreamHandler | _BufferedFileHandler) for h in handlers)
    everywhere = [h.pending for h in handlers] if ours else []  # type: ignore[attr-defined]
    files = [h.pending for h in handlers if ours and isinstance(h, _BufferedFileHandler)]
    ACCESS.route_to(everywhere)
    FILE_ACCESS.route_to(files)
    usable = bool(everywhere) and not attrs
    direct = Direct(handlers, ACCESS.append, FILE_ACCESS.append) if usable else None


def to_terminal(record: logging.LogRecord) -> bool:
    """Whether a record goes to the terminal: not with ``extra={"log_to_stderr":
    False}`` (Ray's attribute; the proxy's access lines), to the files only."""
    return getattr(record, "log_to_stderr", True) is not False


def access_log_enabled() -> bool:
    """Whether this worker's component writes access lines (``enable_access_log``)."""
    return _access_enabled
