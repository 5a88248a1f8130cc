"""Reading an instance's log files (docs/logging.md): which there are, their last lines,
and what was added since an offset. One implementation for ``shoal logs`` reading a
local server's directory and for the admin API serving any instance's
(``GET /api/shoal/logs``).

Only complete lines are returned (a line still being written comes with the next
read), and an offset is always the end of a complete line, so following a file with
:func:`read_from` neither loses nor repeats a line. A rotated file starts again at 0:
an offset beyond its size reads it from its start.
"""

from __future__ import annotations

import os
import re

from shoal._observe.logs import Component, file_name

#: What a log file's name may be (the names :func:`shoal._observe.logs.file_name`
#: makes; not their rotated copies, ``.log.1``...): never a path.
_NAME = re.compile(r"[A-Za-z0-9_.#-]+\.log")
_CHUNK = 64 * 1024
#: Most bytes one :func:`read_from` returns (the next read goes on from there).
READ_LIMIT = 4 * 1024 * 1024


def is_log_name(name: str) -> bool:
    """Whether ``name`` is a log file's name (and so safe to join to the directory)."""
    return _NAME.fullmatch(name) is not None and not name.startswith(".")


def replica_prefix(app: str, deployment: str | None) -> str:
    """The start of the file names of ``app``'s (``deployment``'s) replicas."""
    name = file_name(Component("replica", app, deployment or "", "#"))
    return name[: -len("_.log")] + ("_" if deployment else "")


def log_files(directory: str, prefix: str = "") -> list[tuple[str, int]]:
    """``(name, size)`` of the log files in ``directory`` whose names start with
    ``prefix``, oldest first (by modification time); none if it does not exist."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not (is_log_name(name) and name.startswith(prefix)):
            continue
        try:
            stat = os.stat(os.path.join(directory, name))
        except FileNotFoundError:
            continue  # removed (rotated) since listed
        found.append((stat.st_mtime, name, stat.st_size))
    return [(name, size) for _, name, size in sorted(found)]


def last_lines(path: str, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` complete lines of ``path``, and the offset where they end
    (reading back from the end, so a large file costs only what is returned)."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        data = b""
        position = end
        # One newline more than lines are wanted: the one before the first line kept.
        while position > 0 and data.count(b"\n") <= lines:
            step = min(_CHUNK, position)
            position -= step
            file.seek(position)
            data = file.read(step) + data
    complete = data.rfind(b"\n") + 1  # a line being written is for the next read
    if lines <= 0 or complete == 0:
        return b"", position + complete
    start = complete - 1  # then the newline before each line kept, going back
    for _ in range(lines):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            break
    return data[start + 1 : complete], position + complete


def read_from(path: str, offset: int, limit: int = READ_LIMIT) -> tuple[bytes, int]:
    """The complete lines of ``path`` from ``offset`` (at most about ``limit`` bytes),
    and the offset to read from next; from 0 if the file is now shorter (rotated)."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        start = offset if offset <= size else 0
        file.seek(start)
        data = file.read(limit)
    complete = data.rfind(b"\n") + 1
    return data[:complete], start + complete
