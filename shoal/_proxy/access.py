"""The proxy's access lines (docs/logging.md): one per HTTP request, as Ray's proxy writes.

``METHOD ROUTE STATUS LATENCYms`` on the ``"ray.serve"`` logger at INFO, with the
application, the proxy's id and the request id as fields, once the request is answered
(or failed: status 500). Written by ``shoal._proxy.observe`` only when access lines are
on, so they cost nothing when off; when on, a line's unchanging parts are prepared once
per route, method and status (``shoal._observe.access_lines``).
"""

from __future__ import annotations

import os

from shoal._observe.access_lines import AccessLine, AccessLog
from shoal._observe.logs import process_component

Route = tuple[str, str, str]  # (prefix, app, ingress)


def access_line(
    log: AccessLog, path: str, method: str, route: Route | None, status: int
) -> AccessLine:
    """The prepared line of a request for ``path`` that matched ``route`` (None: no
    route) and was answered ``status`` (0: none was: 500)."""
    prefix, app = (route[0], route[1]) if route is not None else (path, "-")
    return log.line(app, "proxy", process_component().replica, method, prefix, status or 500)


def proxy_access_log() -> AccessLog:
    """The proxy's access lines (logged, as their file and line say, here), to the
    proxy's log file only, as Ray's proxy writes them: the replica that served a request
    writes its own line to the terminal as well."""
    return AccessLog(_WHERE, to_terminal=False)


_WHERE = (os.path.basename(__file__), access_line.__code__.co_firstlineno)
