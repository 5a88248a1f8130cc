"""``shoal logs [APP [DEPLOYMENT]] [-n LINES] [-f]``: the running server's log files.

Reads the files a ``shoal start`` server writes in ``<server dir>/logs``
(docs/logging.md): ``controller.log``, ``proxy_<id>.log`` and one
``replica_<app>_<deployment>_<id>.log`` per replica. With APP (and DEPLOYMENT),
only that application's (deployment's) replicas, checked against the server's
applications first. Prints the last lines of each file (oldest file first);
``-f`` then prints lines as they are written, from new replicas' files too,
until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import Any, TextIO

from shoal._cli.client import AdminClient
from shoal._instance.home import LOGS, read_server_info
from shoal._observe.logs import Component, file_name

_POLL_S = 0.2  # how often -f looks for new lines and new files


def add_command(commands: Any) -> None:
    """Declare ``shoal logs``."""
    logs = commands.add_parser(
        "logs", help="print (and follow) the log files of the running shoal server",
        description="Print the last lines of the running server's log files: every "
        "component's, or one application's (one deployment's) replicas'.",
    )  # fmt: skip
    logs.add_argument("app", nargs="?", help="only this application's replicas")
    logs.add_argument("deployment", nargs="?", help="only this deployment's replicas")
    logs.add_argument("--lines", "-n", type=int, default=50, help="lines per file (default 50)")
    logs.add_argument("--follow", "-f", action="store_true", help="print new lines as written")
    logs.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    info = read_server_info()
    if info is None:
        raise SystemExit(
            "shoal logs: no shoal server is running for this user (start one with "
            "`shoal start`; an embedded instance's logs are in $SHOAL_HOME/logs/latest)"
        )
    directory = os.path.join(info.directory, LOGS)
    prefix = ""
    if args.app is not None:
        _check_names(info.admin_url, args.app, args.deployment)
        prefix = _prefix(args.app, args.deployment)
    positions: dict[str, int] = {}
    for path in _files(directory, prefix):
        positions[path] = _print_tail(path, args.lines, sys.stdout)
    sys.stdout.flush()
    if args.follow:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            _follow(directory, prefix, positions)


def _prefix(app: str, deployment: str | None) -> str:
    """The start of the file names of ``app``'s (``deployment``'s) replicas."""
    name = file_name(Component("replica", app, deployment or "", "#"))
    return name[: -len("_.log")] + ("_" if deployment else "")


def _check_names(admin_url: str | None, app: str, deployment: str | None) -> None:
    if admin_url is None:
        return  # no admin API to ask: the files say what there is
    details = AdminClient("shoal logs", admin_url).request("GET", "/api/serve/applications/")
    apps = (details or {}).get("applications") or {}
    if app not in apps:
        found = ", ".join(sorted(apps)) or "none"
        raise SystemExit(
            f"shoal logs: no application named {app!r} (deployed: {found}); "
            "check the name with `shoal status`"
        )
    deployments = apps[app].get("deployments") or {}
    if deployment is not None and deployment not in deployments:
        found = ", ".join(sorted(deployments)) or "none"
        raise SystemExit(
            f"shoal logs: application {app!r} has no deployment {deployment!r} "
            f"(its deployments: {found})"
        )


def _files(directory: str, prefix: str) -> list[str]:
    """The log files to show, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    paths = [
        os.path.join(directory, name)
        for name in names
        if name.endswith(".log") and name.startswith(prefix)
    ]
    return sorted(paths, key=lambda path: (os.path.getmtime(path), path))


def _print_tail(path: str, lines: int, out: TextIO) -> int:
    """Print the last ``lines`` complete lines of ``path``; returns where they end."""
    with open(path, "rb") as file:
        data = file.read()
    end = data.rfind(b"\n") + 1  # a line being written is printed when complete
    if lines > 0:
        for line in data[:end].splitlines()[-lines:]:
            out.write(line.decode("utf-8", "replace") + "\n")
    return end


def _follow(directory: str, prefix: str, positions: dict[str, int]) -> None:
    while True:
        for path in _files(directory, prefix):
            start = positions.get(path, 0)
            try:
                with open(path, "rb") as file:
                    file.seek(start)
                    data = file.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            if end:
                sys.stdout.write(data[:end].decode("utf-8", "replace"))
                sys.stdout.flush()
                positions[path] = start + end
        time.sleep(_POLL_S)
