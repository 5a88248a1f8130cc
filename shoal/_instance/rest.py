"""The admin REST API: Ray's dashboard Serve paths and shapes, on a Starlette app.

Ray's API, so Ray's ``serve deploy/status/config/shutdown`` and other tooling work:

- ``GET /api/ray/version``: what Ray's CLI checks before anything else;
- ``GET /api/serve/applications/``: the instance (``ServeInstanceDetails``);
- ``PUT /api/serve/applications/``: deploy a config (``ServeDeploySchema`` JSON);
  200 once accepted, applications then deploy in the background;
- ``DELETE /api/serve/applications/``: delete every application.

Shoal's extensions:

- ``DELETE /api/serve/applications/{name}``: delete one application;
- ``POST /api/shoal/shutdown``: stop the instance (answers first, then stops);
- ``GET /metrics``: every process's metrics in the Prometheus text format
  (docs/metrics.md);
- ``GET /api/shoal/logs``: the instance's log files, ``{"directory": ...,
  "files": [{"name", "size"}...]}``, oldest first; ``GET /api/shoal/logs/{name}``
  with ``?lines=N`` (50): one's last complete lines, with ``?offset=B``: its complete
  lines from byte ``B`` (what ``shoal logs -f`` polls); the ``x-shoal-log-offset``
  header says where the next read starts. A name that is not a log file's (a path)
  is refused before anything is opened (``shoal._observe.log_files``, which
  ``shoal logs`` also reads a local server's files with);
- ``GET /``: the dashboard, and its ``/api/shoal/dashboard/...`` time series and
  recent errors (``shoal._dashboard``, docs/dashboard.md).

Errors are ``text/plain`` messages saying what to fix: 400 for a body that is
not JSON or a config that does not validate (the field path and value), 403
(``peer.py``), 404, 405, and 500 when the control plane fails or does not answer
within ``timeout_s`` (the operation is not cancelled: it goes on in the background).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import shoal
from shoal._config import TIMEOUTS
from shoal._dashboard.server import Dashboard
from shoal._errors import ConfigError
from shoal._instance.control import ControlPlane
from shoal._instance.peer import PeerGuard
from shoal._json import dumps
from shoal._observe.log_files import is_log_name, last_lines, log_files, read_from

logger = logging.getLogger("shoal")

APPLICATIONS = "/api/serve/applications/"
SHUTDOWN = "/api/shoal/shutdown"
METRICS = "/metrics"
#: The Ray Serve REST API level shoal speaks; Ray's CLI refuses a cluster below 1.12.
RAY_API_VERSION = "2.9.0"


def _json(value: Any, status: int = 200) -> Response:
    return Response(dumps(value), status, media_type="application/json")


def _text(message: str, status: int) -> PlainTextResponse:
    return PlainTextResponse(message.rstrip("\n") + "\n", status)


class _Api:
    """The route handlers around one control plane."""

    def __init__(self, control: ControlPlane, timeout_s: float) -> None:
        self.control = control
        self.timeout_s = timeout_s
        self._background: set[asyncio.Task[Any]] = set()  # strong references

    async def _call(self, what: str, call: Awaitable[Any]) -> Response | None:
        """Await ``call`` at most ``timeout_s``; None on success, else the error response.

        The call is shielded: a timeout answers the client but never interrupts a
        half-applied change.
        """
        task = asyncio.ensure_future(call)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.timeout_s)
        except TimeoutError:
            return _text(
                f"{what} did not finish within {self.timeout_s:g} s; it goes on in the "
                "background: check GET /api/serve/applications/ (shoal status)",
                500,
            )
        except ConfigError as exc:
            return _text(str(exc), 400)
        except Exception as exc:
            logger.exception("admin API: %s failed", what)
            return _text(f"{what} failed: {type(exc).__name__}: {exc}", 500)
        return None

    async def applications(self, request: Request) -> Response:
        if request.method == "PUT":
            return await self.deploy(request)
        if request.method == "DELETE":
            return await self.delete_all(request)
        return await self.details(request)

    async def version(self, request: Request) -> Response:
        return _json({
            "version": "4", "ray_version": RAY_API_VERSION, "ray_commit": "",
            "session_name": "shoal", "shoal_version": shoal.__version__,
        })  # fmt: skip

    async def details(self, request: Request) -> Response:
        try:
            return _json(self.control.details())
        except Exception as exc:
            logger.exception("admin API: reading the instance's details failed")
            return _text(f"reading the instance's details failed: {type(exc).__name__}: {exc}", 500)

    async def deploy(self, request: Request) -> Response:
        from shoal._deploy_config import parse_config

        body = await request.body()
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _text(
                f"the request body is not JSON ({exc}); send the config as JSON "
                "(Ray Serve's ServeDeploySchema, e.g. from `shoal build`)", 400
            )  # fmt: skip
        try:
            config = parse_config(data, "the request body")
        except ConfigError as exc:
            return _text(str(exc), 400)
        return (
            await self._call("deploying the config", self.control.apply_config(config))
            or Response()
        )

    async def delete_all(self, request: Request) -> Response:
        return (
            await self._call("deleting every application", self.control.delete_all()) or Response()
        )

    async def delete_app(self, request: Request) -> Response:
        name = request.path_params["name"]
        what = f"deleting application {name!r}"
        return await self._call(what, self.control.delete_app(name)) or Response()

    async def shutdown(self, request: Request) -> Response:
        # A refusal (an embedded instance) comes at once and is answered; a shutdown in
        # progress is answered without waiting for it, since it ends this very server.
        task = asyncio.ensure_future(self.control.shutdown())
        self._background.add(task)
        task.add_done_callback(self._shutdown_done)
        await asyncio.wait({task}, timeout=TIMEOUTS.shutdown_answer_s)
        if task.done() and not task.cancelled() and task.exception() is not None:
            error = task.exception()
            status = 400 if isinstance(error, ConfigError) else 500
            return _text(f"shutting the instance down failed: {error}", status)
        return _json({"message": "shutting down"})

    async def metrics(self, request: Request) -> Response:
        from shoal._observe.metrics.store import content_type

        store = self.control.metrics()
        try:
            body = store.exposition()
        except Exception as exc:
            logger.exception("admin API: exporting the metrics failed")
            return _text(f"exporting the metrics failed: {type(exc).__name__}: {exc}", 500)
        return Response(body, 200, media_type=content_type())

    def _shutdown_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("admin API: shutting the instance down failed: %s", task.exception())


async def _not_found(request: Request, exc: Exception) -> Response:
    return _text(
        f"404 Not Found: no admin route {request.method} {request.url.path}; the Serve API "
        f"is at {APPLICATIONS}", 404
    )  # fmt: skip


async def _not_allowed(request: Request, exc: Exception) -> Response:
    allow = getattr(exc, "headers", None) or {}
    allowed = allow.get("Allow", "")
    response = _text(
        f"405 Method Not Allowed: {request.method} {request.url.path}; allowed: {allowed}", 405
    )
    if allowed:
        response.headers["Allow"] = allowed
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else str(exc)
    return _text(f"{status}: {detail}", status)


LOGS = "/api/shoal/logs"
#: The response header naming the offset the next ``?offset=`` read starts from.
OFFSET_HEADER = "x-shoal-log-offset"
DEFAULT_LINES = 50


def log_routes(directory: Callable[[], str | None]) -> list[Route]:
    """The routes serving the files in ``directory()`` (the instance's log directory)."""

    async def listing(request: Request) -> Response:
        where = directory()
        files = [] if where is None else log_files(where)
        body = {"directory": where, "files": [{"name": n, "size": s} for n, s in files]}
        return Response(dumps(body), media_type="application/json")

    async def one_file(request: Request) -> Response:
        name = request.path_params["name"]
        if not is_log_name(name):
            return _text(f"name: {name!r} is not a log file's name (list them: GET {LOGS})", 400)
        where = directory()
        if where is None:
            return _text("this instance writes no log files (local testing mode)", 404)
        read = _reader(request)
        if isinstance(read, str):
            return _text(read, 400)
        try:  # (in a thread: a read of up to 4 MiB must not hold the control plane's loop)
            data, end = await run_in_threadpool(read, os.path.join(where, name))
        except FileNotFoundError:
            return _text(f"no log file named {name!r} (list them: GET {LOGS})", 404)
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={OFFSET_HEADER: str(end)})  # fmt: skip

    return [
        Route(LOGS, listing, methods=["GET"]),
        Route(LOGS + "/{name:path}", one_file, methods=["GET"]),  # a path: refused with 400
    ]


def _reader(request: Request) -> Callable[[str], tuple[bytes, int]] | str:
    """How ``request`` asks to read a file (last lines, or from an offset), or what is
    wrong with its query."""
    query = request.query_params
    if "lines" in query and "offset" in query:
        return "give lines or offset, not both"
    for key in ("lines", "offset"):
        value = query.get(key)
        if value is not None and not (value.isascii() and value.isdigit()):
            return f"{key}: {value!r} is not a count (a whole number >= 0)"
    if "offset" in query:
        offset = int(query["offset"])
        return lambda path: read_from(path, offset)
    lines = int(query.get("lines", DEFAULT_LINES))
    return lambda path: last_lines(path, lines)


def admin_app(
    control: ControlPlane, token: str | None = None, *, timeout_s: float | None = None
) -> Starlette:
    """The admin API for ``control``, guarded by :class:`~shoal._instance.peer.PeerGuard`.

    ``app.state.dashboard`` is its :class:`~shoal._dashboard.server.Dashboard`: the
    caller serving the app starts its sampler (``start()``) and stops it (``close()``).
    """
    api = _Api(control, TIMEOUTS.admin_op_s if timeout_s is None else timeout_s)
    routes = []
    # Both spellings: a redirect would make clients resend a PUT body.
    for path in (APPLICATIONS, APPLICATIONS.rstrip("/")):
        routes.append(Route(path, api.applications, methods=["GET", "PUT", "DELETE"]))
    routes += [
        # :path: a name may hold "/" (sent as %2F, which the server decodes first)
        Route(APPLICATIONS + "{name:path}", api.delete_app, methods=["DELETE"]),
        Route("/api/ray/version", api.version, methods=["GET"]),
        Route(SHUTDOWN, api.shutdown, methods=["POST"]),
        Route(METRICS, api.metrics, methods=["GET"]),
        *log_routes(control.log_directory),
    ]
    # The sampler is started and stopped by whoever serves the app (AdminServices).
    dashboard = Dashboard(control.details, lambda: control.metrics())
    routes += dashboard.routes()
    app = Starlette(
        routes=routes,
        middleware=[Middleware(PeerGuard, token=token)],
        exception_handlers={404: _not_found, 405: _not_allowed, HTTPException: _http_error},
    )
    app.router.redirect_slashes = False
    app.state.dashboard = dashboard
    return app
