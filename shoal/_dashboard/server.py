"""The dashboard's routes and the sampler that feeds its history.

Routes (mounted on the admin REST API, so the same peer guard applies):

- ``GET /``: the page (``static/index.html``); ``GET /dashboard/{file}`` its script,
  style sheet and the licence notice;
- ``GET /api/shoal/dashboard/timeseries?since=T``: per deployment, the points newer
  than ``T`` (wall-clock seconds; all of the last ``window_s`` without it);
- ``GET /api/shoal/dashboard/errors?limit=N``: the newest ``N`` (default 50) errors
  the metrics store kept, newest first.

The sampler runs for as long as the admin API does (from :meth:`Dashboard.start` to
:meth:`Dashboard.close`), not only while a page is open: an operator who opens the
dashboard after an incident sees the ten minutes before it. It costs one read of
the metrics store and of the details per second on the instance's loop (about
1.5 ms of CPU with three deployments of four replicas, a third of it merging the
processes' reports) and ``window_s / interval_s`` points per deployment in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import time
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from shoal._dashboard.history import Family, MetricsHistory, replica_counts
from shoal._json import dumps
from shoal._observe import metrics as observed

logger = logging.getLogger("shoal")

TIMESERIES = "/api/shoal/dashboard/timeseries"
ERRORS = "/api/shoal/dashboard/errors"
DEFAULT_ERRORS = 50

# The page's files, and nothing else, are served; the page loads nothing from elsewhere
# (machines without internet access), which the policy makes the browser enforce too.
_STATIC = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


class MetricsSource(Protocol):
    """What the dashboard reads of an instance's metrics store."""

    def families(self) -> Iterable[Family]:
        """Every process's metric families, merged, as plain tuples (cheaper to read than
        prometheus_client's ``Metric`` objects of ``collect()``)."""
        ...

    def recent_errors(self) -> list[dict[str, Any]]:
        """Newest first: ``{time, application, deployment, replica, request_id, type,
        message, traceback}``."""
        ...


@cache
def _static(name: str) -> bytes:
    return (importlib.resources.files("shoal._dashboard") / "static" / name).read_bytes()


def _text(message: str, status: int) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status)


class Dashboard:
    """The page, its JSON endpoints, and the sampler keeping the history.

    ``details`` returns the instance in the shape of ``GET /api/serve/applications/``;
    ``metrics`` the metrics store (empty when this instance records no metrics: the
    history then has replica counts only). Both are called on the loop that runs the
    admin API, which is where :meth:`start` must be called too.
    """

    def __init__(
        self,
        details: Callable[[], dict[str, Any]],
        metrics: Callable[[], MetricsSource],
        *,
        interval_s: float = 1.0,
        window_s: float = 600.0,
    ) -> None:
        self._details = details
        self._metrics = metrics
        self.interval_s = interval_s
        self.history = MetricsHistory(window_s, interval_s)
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None  # the last sampling failure, logged once

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/dashboard/{name}", self.static, methods=["GET"]),
            Route(TIMESERIES, self.timeseries, methods=["GET"]),
            Route(ERRORS, self.errors, methods=["GET"]),
        ]

    # --- the sampler -----------------------------------------------------------------

    def start(self) -> None:
        """Start sampling every ``interval_s`` (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="shoal-dashboard-sampler"
            )

    async def close(self) -> None:
        """Stop sampling; returns once the sampler has stopped."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self.sample()
            # On a fixed grid, so the points stay evenly spaced; a late loop skips ahead.
            next_at = max(next_at + self.interval_s, loop.time())
            await asyncio.sleep(next_at - loop.time())

    def sample(self, now: float | None = None) -> None:
        """Record one point per deployment now; a failure is logged (once) and skipped."""
        try:
            counts = replica_counts(self._details())
            families = self._metrics().families() if observed.enabled() else ()
            self.history.record(time.time() if now is None else now, families, counts)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._failing:
                logger.warning("dashboard: sampling the metrics failed: %s", problem)
            self._failing = problem
        else:
            self._failing = None

    # --- routes ------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        return Response(_static("index.html"), media_type="text/html", headers=_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        media_type = _STATIC.get(name)
        if media_type is None:
            return _text(f"404 Not Found: the dashboard has no file {name!r}", 404)
        return Response(_static(name), media_type=media_type, headers=_HEADERS)

    async def timeseries(self, request: Request) -> Response:
        since: float | None = None
        if "since" in request.query_params:
            raw = request.query_params["since"]
            try:
                since = float(raw)
            except ValueError:
                return _text(f"since={raw!r} is not a number: pass seconds since the epoch", 400)
        body = {
            "now": time.time(),
            "interval_s": self.interval_s,
            "window_s": self.history.window_s,
            "metrics": observed.enabled(),
            "deployments": self.history.series(since),
        }
        return Response(dumps(body), media_type="application/json")

    async def errors(self, request: Request) -> Response:
        raw = request.query_params.get("limit", str(DEFAULT_ERRORS))
        try:
            limit = int(raw)
            if limit < 0:
                raise ValueError
        except ValueError:
            return _text(f"limit={raw!r} is not a count: pass a whole number >= 0", 400)
        errors = self._metrics().recent_errors()[:limit] if observed.enabled() else []
        return Response(dumps({"errors": errors}), media_type="application/json")
