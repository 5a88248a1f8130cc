"""Instance directories: where a multi-process instance keeps its Unix sockets.

Each instance gets ``<root>/<pid>-<start>-<random>/`` (mode 0700), named after
the process that created it (``start`` is that process's start time, so a
recycled pid is not mistaken for it). ``<root>`` is one per user:
``$SHOAL_HOME`` if set, else ``<tempdir>/shoal-<uid>``, created 0700; a root
owned by another user, or writable by group or others, is refused (its sockets
could be swapped under us). A driver killed with ``kill -9`` cannot remove its
directory: the next instance started by this user removes every sibling whose
process is gone. Entries not named this way (a server's ``server/``) are left
alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid

from shoal._errors import ShoalError

logger = logging.getLogger("shoal.runtime")

_NAME = re.compile(r"^(\d+)-(\d+)-[0-9a-f]+$")


def instance_root() -> str:
    """The per-user root of instance directories (created 0700 if missing).

    Raises ShoalError if it is not a directory of this user that only this user
    can write to.
    """
    root = os.environ.get("SHOAL_HOME") or os.path.join(
        tempfile.gettempdir(), f"shoal-{os.getuid()}"
    )
    with contextlib.suppress(FileExistsError):
        os.makedirs(root, mode=0o700)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode):
        raise ShoalError(f"shoal's directory {root} is not a directory (a symlink?); remove it")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ShoalError(
            f"shoal's directory {root} belongs to another user or is writable by others; "
            "remove it, or set SHOAL_HOME to a directory of your own"
        )
    return root


def new_instance_directory() -> str:
    """Create this process's instance directory (0700) under :func:`instance_root`, after
    removing the directories of instances whose process is gone."""
    root = instance_root()
    remove_stale(root)
    pid = os.getpid()
    path = os.path.join(root, f"{pid}-{_start_time(pid) or 0}-{uuid.uuid4().hex[:8]}")
    check_socket_directory(path)
    os.mkdir(path, mode=0o700)
    return path


#: The longest socket name shoal creates in an instance directory ("replica-1234abcd.sock").
_LONGEST_SOCKET = len("/replica-12345678.sock")
_MAX_SOCKET_PATH = 107  # Linux's sun_path holds 108 bytes, the last one a NUL


def check_socket_directory(path: str) -> None:
    """Raise ShoalError if Unix sockets in ``path`` would have paths longer than the
    kernel accepts (a long ``$SHOAL_HOME``), naming what to change."""
    room = _MAX_SOCKET_PATH - _LONGEST_SOCKET
    if len(os.fsencode(path)) > room:
        raise ShoalError(
            f"shoal's socket directory {path} is too long for Unix sockets (at most "
            f"{room} bytes); set SHOAL_HOME to a shorter directory (e.g. /tmp/shoal-home)"
        )


def remove_stale(root: str) -> list[str]:
    """Remove the instance directories in ``root`` whose creating process is gone;
    returns their paths."""
    removed = []
    with os.scandir(root) as entries:
        for entry in entries:
            match = _NAME.match(entry.name)
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            pid, start = int(match[1]), int(match[2])
            if _alive(pid, start):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        logger.info("removed %d directories of shoal instances that are gone", len(removed))
    return removed


def _alive(pid: int, start: int) -> bool:
    if start:
        current = _start_time(pid)
        if current is not None:
            return current == start  # 0 for a zombie: it is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, as another user: not ours, but not gone either
        return True
    return True


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return 0
    return int(fields[19])  # field 22 of stat(5); fields[0] is field 3 (state)


_SOCKET = re.compile(r"^(controller|(replica|proxy)-[0-9a-f]{8})\.sock$")


def remove_sockets(directory: str) -> None:
    """Remove the sockets an instance made in a directory it was given (not its own),
    leaving everything else there alone."""
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if _SOCKET.match(entry.name) and stat.S_ISSOCK(
                entry.stat(follow_symlinks=False).st_mode
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
