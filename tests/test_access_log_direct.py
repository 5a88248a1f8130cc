"""Access lines taken the direct way (no LogRecord) still follow the ``"ray.serve"``
logger as it is when each request ends: its level (changed at runtime, or by
``logging.disable``), its being disabled, and handlers the user added."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shoal._observe import logs
from shoal._observe.access_lines import AccessLog
from shoal._observe.logs import SERVE_LOGGER_NAME


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serve_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[logging.Logger, list[Any]]]:
    """The ``"ray.serve"`` logger at INFO with no handler, its direct way into ``lines``."""
    logger = logging.getLogger(SERVE_LOGGER_NAME)
    saved = (logger.level, list(logger.handlers), logger.propagate, logger.disabled)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate, logger.disabled = False, False
    lines: list[Any] = []
    monkeypatch.setattr(logs, "direct", None)  # set by the test (pytest adds handlers)
    try:
        yield logger, lines
    finally:
        logging.disable(logging.NOTSET)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        level, handlers, logger.propagate, logger.disabled = saved
        logger.setLevel(level)
        for handler in handlers:
            logger.addHandler(handler)


def test_direct_access_lines_follow_the_loggers_level_and_handlers(
    serve_logger: tuple[logging.Logger, list[Any]],
) -> None:
    logger, lines = serve_logger
    logs.direct = logs.Direct(list(logger.handlers), lines.append)  # as shoal sets it
    log = AccessLog(("server.py", 1))
    line = log.line("app", "D", "app#D#x", "CALL", "__call__", "OK")

    def write() -> None:
        log.write(line, "rid", 1.5, time.perf_counter())

    write()
    write()
    assert len(lines) == 2 and lines[1][2] == "rid" and lines[1][3] == 1.5
    logger.setLevel(logging.WARNING)  # at runtime (a deployment's log_level)
    write()
    assert len(lines) == 2
    logger.setLevel(logging.INFO)
    write()
    assert len(lines) == 3
    logging.disable(logging.INFO)
    write()
    assert len(lines) == 3
    logging.disable(logging.NOTSET)
    logger.disabled = True  # logging.config's disable_existing_loggers
    write()
    assert len(lines) == 3
    logger.disabled = False
    keep = _Keep()
    logger.addHandler(keep)  # the user's own handler: a LogRecord, for it
    write()
    assert len(lines) == 3
    assert [r.getMessage() for r in keep.records] == ["CALL __call__ OK 1.5ms"]
    logger.removeHandler(keep)
    write()
    assert len(lines) == 4
