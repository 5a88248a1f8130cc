"""The proxy's access lines (docs/logging.md): one per HTTP request, as Ray's proxy writes.

``METHOD ROUTE STATUS LATENCYms`` on the ``"ray.serve"`` logger at INFO, with the
application, the proxy's id and the request id as fields, once the request is answered
(or failed: status 500). Written by ``shoal._proxy.observe`` only when access lines are
on, so they cost nothing when off; when on, a line's unchanging parts are prepared once
per route, method and status (``shoal._observe.access_lines``). A proxy serving one
replica's HTTP itself (``shoal._proxy.direct``) writes that replica's lines instead.
"""

from __future__ import annotations

import os
from typing import Protocol

from shoal._observe.access_lines import AccessLine, AccessLog
from shoal._observe.logs import process_component

Route = tuple[str, str, str]  # (prefix, app, ingress)


class AccessLines(Protocol):
    """What an HTTP server of shoal writes for each request: its log, and the prepared
    line of a request for ``path`` that matched ``route`` (None: no route) and was
    answered ``status`` (0: none was: 500)."""

    log: AccessLog

    def line(self, path: str, method: str, route: Route | None, status: int) -> AccessLine: ...


class ProxyAccessLines:
    """The proxy's access lines (logged, as their file and line say, here): ``METHOD
    PREFIX STATUS``, to the proxy's log file only, as Ray's proxy writes them (the replica
    that served a request writes its own line to the terminal as well)."""

    def __init__(self) -> None:
        self.log = AccessLog(_WHERE, to_terminal=False)

    def line(self, path: str, method: str, route: Route | None, status: int) -> AccessLine:
        prefix, app = (route[0], route[1]) if route is not None else (path, "-")
        replica = process_component().replica
        return self.log.line(app, "proxy", replica, method, prefix, status or 500)


_WHERE = (os.path.basename(__file__), ProxyAccessLines.line.__code__.co_firstlineno)
