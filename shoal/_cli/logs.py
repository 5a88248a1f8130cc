"""``shoal logs [APP [DEPLOYMENT]] [-n LINES] [-f] [--address URL]``: an instance's log files.

Without an address, reads the files the local ``shoal start`` server writes in
``<server dir>/logs`` (docs/logging.md): ``controller.log``, ``proxy_<id>.log`` and
one ``replica_<app>_<deployment>_<id>.log`` per replica. With ``--address`` (or
``SHOAL_ADDRESS``), reads them through that instance's admin API
(``GET /api/shoal/logs``): any instance, an embedded one included, on this machine
or another. Both read the files with :mod:`shoal._observe.log_files`.

With APP (and DEPLOYMENT), only that application's (deployment's) replicas, checked
against the instance's applications first. Prints the last lines of each file
(oldest file first); ``-f`` then prints lines as they are written, from new
replicas' files too, until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import urllib.parse
from typing import Any, Protocol

from shoal._cli.client import AdminClient
from shoal._instance.home import LOGS, read_server_info
from shoal._observe.log_files import last_lines, log_files, read_from, replica_prefix

_POLL_S = 0.2  # how often -f looks for new lines and new files
_COMMAND = "shoal logs"


def add_command(commands: Any) -> None:
    """Declare ``shoal logs``."""
    logs = commands.add_parser(
        "logs", help="print (and follow) the log files of a shoal instance",
        description="Print the last lines of an instance's log files: every "
        "component's, or one application's (one deployment's) replicas'. Without "
        "--address, the local `shoal start` server's files.",
    )  # fmt: skip
    logs.add_argument("app", nargs="?", help="only this application's replicas")
    logs.add_argument("deployment", nargs="?", help="only this deployment's replicas")
    logs.add_argument("--lines", "-n", type=int, default=50, help="lines per file (default 50)")
    logs.add_argument("--follow", "-f", action="store_true", help="print new lines as written")
    logs.add_argument(
        "--address",
        "-a",
        help="read through this instance's admin API (default: SHOAL_ADDRESS, else the "
        "local `shoal start` server's files), e.g. http://127.0.0.1:8265",
    )
    logs.set_defaults(func=run)


class _Files(Protocol):
    """Where the log files are read: a local directory or an admin API."""

    def names(self, prefix: str) -> list[str]: ...

    def last(self, name: str, lines: int) -> tuple[bytes, int] | None: ...

    def since(self, name: str, offset: int) -> tuple[bytes, int] | None: ...


class _Directory:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def names(self, prefix: str) -> list[str]:
        return [name for name, _ in log_files(self.directory, prefix)]

    def last(self, name: str, lines: int) -> tuple[bytes, int] | None:
        with contextlib.suppress(FileNotFoundError):
            return last_lines(os.path.join(self.directory, name), lines)
        return None

    def since(self, name: str, offset: int) -> tuple[bytes, int] | None:
        with contextlib.suppress(FileNotFoundError):
            return read_from(os.path.join(self.directory, name), offset)
        return None


class _AdminApi:
    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def names(self, prefix: str) -> list[str]:
        listing = self.client.request("GET", "/api/shoal/logs") or {}
        return [f["name"] for f in listing.get("files", []) if f["name"].startswith(prefix)]

    def last(self, name: str, lines: int) -> tuple[bytes, int] | None:
        return self._read(name, f"lines={lines}")

    def since(self, name: str, offset: int) -> tuple[bytes, int] | None:
        return self._read(name, f"offset={offset}")

    def _read(self, name: str, query: str) -> tuple[bytes, int] | None:
        answer = self.client.read(f"/api/shoal/logs/{urllib.parse.quote(name, safe='')}?{query}")
        if answer is None:
            return None  # gone since listed
        data, headers = answer
        return data, int(headers["x-shoal-log-offset"])


def run(args: argparse.Namespace) -> None:
    files, admin = _source(args.address or os.environ.get("SHOAL_ADDRESS"))
    prefix = ""
    if args.app is not None:
        if admin is not None:
            _check_names(admin, args.app, args.deployment)
        prefix = replica_prefix(args.app, args.deployment)
    positions: dict[str, int] = {}
    for name in files.names(prefix):
        read = files.last(name, max(args.lines, 0))
        if read is not None:
            _write(read[0])
            positions[name] = read[1]
    sys.stdout.flush()
    if args.follow:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            _follow(files, prefix, positions)


def _source(address: str | None) -> tuple[_Files, AdminClient | None]:
    """Where to read (and the admin API to check names with, if there is one)."""
    if address:
        client = AdminClient(_COMMAND, address)
        return _AdminApi(client), client
    info = read_server_info()
    if info is None:
        raise SystemExit(
            f"{_COMMAND}: no shoal server is running for this user (start one with "
            "`shoal start`); for an instance embedded in a Python process pass its admin "
            "address, --address http://127.0.0.1:8265 (its files are in "
            "$SHOAL_HOME/logs/latest)"
        )
    admin = AdminClient(_COMMAND, info.admin_url) if info.admin_url else None
    return _Directory(os.path.join(info.directory, LOGS)), admin


def _check_names(admin: AdminClient, app: str, deployment: str | None) -> None:
    details = admin.request("GET", "/api/serve/applications/")
    apps = (details or {}).get("applications") or {}
    if app not in apps:
        found = ", ".join(sorted(apps)) or "none"
        raise SystemExit(
            f"{_COMMAND}: no application named {app!r} (deployed: {found}); "
            "check the name with `shoal status`"
        )
    deployments = apps[app].get("deployments") or {}
    if deployment is not None and deployment not in deployments:
        found = ", ".join(sorted(deployments)) or "none"
        raise SystemExit(
            f"{_COMMAND}: application {app!r} has no deployment {deployment!r} "
            f"(its deployments: {found})"
        )


def _write(data: bytes) -> None:
    if data:
        sys.stdout.write(data.decode("utf-8", "replace"))


def _follow(files: _Files, prefix: str, positions: dict[str, int]) -> None:
    while True:
        for name in files.names(prefix):
            read = files.since(name, positions.get(name, 0))
            if read is not None and read[0]:
                _write(read[0])
                sys.stdout.flush()
            if read is not None:
                positions[name] = read[1]
        time.sleep(_POLL_S)
