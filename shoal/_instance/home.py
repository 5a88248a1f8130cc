"""Where a ``shoal start`` server keeps its sockets and state, and how others find it.

One server per user and state root: ``<root>/server/`` (mode 0700) holds the
controller's socket (workers), ``admin.sock`` (attaching Python processes),
``server.json`` (how to reach it), ``state.sqlite`` (the checkpoint),
``admin.token`` and ``server.log``. The root is ``$SHOAL_HOME`` if set (read
when called, never at import), else ``<tempdir>/shoal-<uid>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass

from shoal._config import AdminOptions, validate
from shoal._errors import ConfigError
from shoal._runtime.process.directory import instance_root

SERVER_INFO = "server.json"
ADMIN_SOCKET = "admin.sock"
CHECKPOINT = "state.sqlite"
TOKEN = "admin.token"
LOG = "server.log"
LOGS = "logs"  # the directory of the log files of the server's components (docs/logging.md)


def state_root() -> str:
    """The per-user root (created 0700); refuses one another user could write to."""
    return instance_root()


def server_dir() -> str:
    """The server's directory (created 0700)."""
    path = os.path.join(state_root(), "server")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


@dataclass(frozen=True)
class ServerInfo:
    """How to reach a running ``shoal start`` server (its ``server.json``)."""

    pid: int
    directory: str
    admin_url: str | None
    http_host: str | None
    http_port: int | None

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.directory, ADMIN_SOCKET)

    @property
    def token_path(self) -> str:
        return os.path.join(self.directory, TOKEN)


def write_server_info(info: ServerInfo) -> None:
    """Publish ``info`` atomically (readers never see half a file)."""
    path = os.path.join(info.directory, SERVER_INFO)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        json.dump(asdict(info), file)
    os.replace(temporary, path)


def remove_server_info(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, SERVER_INFO))


def read_server_info(running: bool = True) -> ServerInfo | None:
    """The running server of this state root, or None (no file, or its process is gone);
    ``running=False``: the last server that published its info, running or not."""
    path = os.path.join(state_root(), "server", SERVER_INFO)
    try:
        with open(path) as file:
            info = ServerInfo(**json.load(file))
    except (OSError, ValueError, TypeError):
        return None
    return info if not running or pid_alive(info.pid) else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            state = stat_file.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return state not in ("Z", "X")


def log_directory(server_directory: str | None = None) -> str:
    """Where an instance writes its log files (created 0700): a ``shoal start`` server's
    ``<server dir>/logs``; an embedded instance's ``<root>/logs/<time>-<pid>``, also
    reachable as ``<root>/logs/latest``. Kept after the instance stops, for the operator;
    only the newest ``KEPT_LOG_DIRECTORIES`` of embedded instances are kept (older ones
    are removed when an instance starts, unless their process still runs)."""
    if server_directory is not None:
        path = os.path.join(server_directory, LOGS)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path
    parent = os.path.join(state_root(), LOGS)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    _prune_log_directories(parent)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path = os.path.join(parent, name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    latest = os.path.join(parent, "latest")
    temporary = f"{latest}.{os.getpid()}.tmp"
    with contextlib.suppress(OSError):
        os.symlink(name, temporary)
        os.replace(temporary, latest)
    return path


#: How many embedded instances' log directories are kept (a script run a thousand times
#: must not leave a thousand directories).
KEPT_LOG_DIRECTORIES = 20


def _prune_log_directories(parent: str) -> None:
    """Remove all but the newest ``KEPT_LOG_DIRECTORIES - 1`` of ``parent``'s instance
    directories (``<time>-<pid>``), except those whose process still runs."""
    import shutil

    with contextlib.suppress(OSError):
        names = sorted(
            name for name in os.listdir(parent)
            if name.rpartition("-")[2].isdigit() and not os.path.islink(os.path.join(parent, name))
        )  # fmt: skip
        for name in names[: max(0, len(names) - (KEPT_LOG_DIRECTORIES - 1))]:
            if not pid_alive(int(name.rpartition("-")[2])):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def default_admin_options() -> AdminOptions:
    """The admin options of an instance started without any: 127.0.0.1:8265, or the port
    in ``$SHOAL_ADMIN_PORT`` (read when called; ``0`` picks a free port, as tests do)."""
    port = os.environ.get("SHOAL_ADMIN_PORT")
    if port is None:
        return AdminOptions()
    try:
        options: AdminOptions = validate(AdminOptions, {"port": int(port)}, "SHOAL_ADMIN_PORT")
        return options
    except ValueError:
        raise ConfigError(
            f"SHOAL_ADMIN_PORT={port!r} is not a port number (0-65535); fix or unset it"
        ) from None
