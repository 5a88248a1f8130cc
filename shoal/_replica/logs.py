"""Log lines of replicas and the proxy: one setup for every runtime.

* The ``"ray.serve"`` logger, which Ray Serve applications log to, writes to stderr
  at INFO (unless the program set a level) in Ray Serve's replica format: level,
  time, deployment, replica id (as ``serve.status()`` shows it), the request id in
  brackets while one is served, file:line and the message::

      INFO 2026-01-05 10:00:00,123 SayHello default#SayHello#a1b2c3 [rid-7] app.py:12 - Hello world!

  Local testing mode (in the driver) and worker processes use the same handler.
* In a worker process every other record (shoal's, the user's own loggers) goes to
  the root handler, at WARNING: ``(shoal replica-1a2b3c4d) WARNING my.model [rid-7]: ...``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from shoal._api.context import replica_context, request_context

SERVE_LOGGER_NAME = "ray.serve"

#: Ray Serve's replica log format; ``request`` is "[<request id>] " while serving one, else "".
SERVE_LOG_FORMAT = (
    "%(levelname)s %(asctime)s %(deployment)s %(replica)s "
    "%(request)s%(filename)s:%(lineno)d - %(message)s"
)

# Who logs when no replica context is set (a thread the user started, or the proxy):
# the worker process's replica or proxy; in the driver, local testing mode's name.
_process_component = ("local_test", "-")


def set_process_component(deployment: str, replica_id: str) -> None:
    """Name this process's replica (or proxy) on lines logged outside its context."""
    global _process_component
    _process_component = (deployment, replica_id)


class ServeContextFilter(logging.Filter):
    """Adds ``deployment``, ``replica`` and ``request`` (see SERVE_LOG_FORMAT) to a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = replica_context.get()
        if context is not None:
            record.deployment, record.replica = context.deployment, context.replica_id
        else:
            record.deployment, record.replica = _process_component
        request_id = request_context.get().request_id
        record.request = f"[{request_id}] " if request_id else ""
        return True


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the request being served, or "-") to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_context.get().request_id or "-"
        return True


class _ServeLogHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (which test runners replace), tagging each record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(SERVE_LOG_FORMAT))
        self.addFilter(ServeContextFilter())

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_serve_logger() -> None:
    """Set up the ``"ray.serve"`` logger as Ray Serve sets it up in replicas.

    Its records go to stderr only (``propagate`` off) at INFO, unless the program
    already set a level. Idempotent.
    """
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    if any(isinstance(handler, _ServeLogHandler) for handler in logger.handlers):
        return
    logger.addHandler(_ServeLogHandler())
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def configure_worker_logging(worker_id: str) -> None:
    """Logging of a worker process (``worker_id`` is "replica-…" or "proxy-…")."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"(shoal {worker_id}) %(levelname)s %(name)s [%(request_id)s]: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
    # Until a replica starts (its module-level code), or for good in the proxy.
    set_process_component(worker_id.partition("-")[0], worker_id)
    configure_serve_logger()
