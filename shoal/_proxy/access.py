"""The proxy's access lines (docs/logging.md): one per HTTP request, as Ray's proxy writes.

``METHOD ROUTE STATUS LATENCYms`` on the ``"ray.serve"`` logger at INFO, with the
application, the proxy's id and the request id as fields, once the request is answered
(or failed: status 500). Written by ``shoal._proxy.observe`` only when access lines are
on, so they cost nothing when off.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from shoal._observe.logs import SERVE_LOGGER_NAME, log_access, process_component

_access = logging.getLogger(SERVE_LOGGER_NAME)
_LINE = "%s %s %s %.1fms"  # Ray's: method, route, status, latency


def write_access_line(
    scope: dict[str, Any],
    route: tuple[str, str, str] | None,
    status: int,
    started: float,
    request_id: bytes,
) -> None:
    """The access line of the request ``scope`` that matched ``route`` (prefix, app,
    ingress; None: no route), answered ``status``, started at ``perf_counter()``
    ``started``."""
    latency_ms = (time.perf_counter() - started) * 1000
    prefix, app = (route[0], route[1]) if route is not None else (scope["path"], "-")
    method = scope["method"]
    fields = {
        "application": app, "deployment": "proxy", "replica": process_component().replica,
        "request_id": request_id.decode("latin-1"), "method": method, "route": prefix,
        "status_code": status, "latency_ms": latency_ms,
    }  # fmt: skip
    log_access(_access, _WHERE, _LINE, (method, prefix, status, latency_ms), fields)


_WHERE = (os.path.basename(__file__), write_access_line.__code__.co_firstlineno)
