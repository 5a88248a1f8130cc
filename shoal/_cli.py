"""The ``shoal`` command line: ``shoal run module:app`` and ``shoal demo``.

Options come from the one config schema (:class:`shoal._config.HTTPOptions`),
so the CLI never lists an option's default or bounds a second time.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from shoal._config import HTTPOptions
from shoal._transport.failures import is_internal

logger = logging.getLogger("shoal")


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    for name in ("host", "port"):
        field = HTTPOptions.model_fields[name]
        parser.add_argument(
            f"--{name}", type=type(field.default), default=field.default,
            help=f"HTTP proxy {name} (default: {field.default})",
        )  # fmt: skip


def _load(target: str) -> Any:
    """Import ``module:attribute``; a callable that is not an Application is called to build it.

    Every failure exits with one message naming what to fix (file and line for
    errors in the module) and no traceback.
    """
    from shoal._api.deployment import Application

    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise SystemExit(
            f"shoal run: expected MODULE:ATTRIBUTE (e.g. examples.pipeline:app), got {target!r}; "
            "name the application after a colon"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:  # IndentationError included
        source = f"\n    {exc.text.strip()}" if exc.text and exc.text.strip() else ""
        raise SystemExit(
            f"shoal run: syntax error in {exc.filename}, line {exc.lineno}: {exc.msg}{source}"
        ) from None
    except Exception as exc:
        if _not_found(exc, module_name):
            fix = "check the name, or run shoal from the directory that contains it"
            if module_name.endswith(".py"):
                fix = f"name the module, not its file: {module_name[:-3]}:{attribute}"
            raise SystemExit(
                f"shoal run: no module named {module_name!r} in the current directory "
                f"({os.getcwd()}) or on sys.path; {fix}"
            ) from None
        raise SystemExit(f"shoal run: importing {module_name!r} failed{_where(exc)}") from None
    try:
        app = getattr(module, attribute)
    except AttributeError:
        apps = sorted(n for n, v in vars(module).items() if isinstance(v, Application))
        found = f"its applications: {', '.join(apps)}" if apps else "it defines no application"
        raise SystemExit(
            f"shoal run: module {module_name!r} has no attribute {attribute!r}; {found}"
        ) from None
    if not isinstance(app, Application) and callable(app):
        try:
            app = app()
        except Exception as exc:
            where = _where(exc)
            raise SystemExit(
                f"shoal run: building the application {target}() failed{where}"
            ) from None
    if not isinstance(app, Application):
        raise SystemExit(f"shoal run: {target} is not an application (build one with .bind())")
    return app


def _not_found(exc: Exception, module_name: str) -> bool:
    """Whether ``exc`` says the target module itself (or its package) does not exist."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return False
    if module_name != name and not module_name.startswith(f"{name}."):
        return False  # the module exists but imports something missing
    return not any(not is_internal(f.filename) for f in traceback.extract_tb(exc.__traceback__))


def _where(exc: BaseException) -> str:
    """`` at FILE, line N: Type: message`` and the source line, from the innermost user frame."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not is_internal(f.filename)]
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ModuleNotFoundError):
        text += " (is it installed in this Python environment?)"
    if not frames:
        return f": {text}"
    frame = frames[-1]
    source = f"\n    {frame.line.strip()}" if frame.line and frame.line.strip() else ""
    return f" at {frame.filename}, line {frame.lineno}: {text}{source}"


def _check_port(command: str, host: str, port: int) -> None:
    """Exit with a message naming ``--port`` (or ``--host``) if the proxy could not listen there.

    The proxy binds the same way when it starts; checking first fails fast, before
    any worker process starts.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"{command}: port {port} on {host} is already in use (another server is "
                "listening there); pass a free port with --port, e.g. --port "
                f"{port + 1 if port < 65535 else 8000}"
            ) from None
        raise SystemExit(
            f"{command}: cannot listen on {host}:{port} ({exc.strerror}); check --host and --port"
        ) from None


_stop = threading.Event()


def _catch_stop_signals() -> None:
    """Catch SIGINT/SIGTERM from the start, so one sent while starting is not lost."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: _stop.set())


def _serve_until_signalled() -> None:
    """Block the main thread until SIGINT or SIGTERM, then shut shoal down."""
    from shoal._instance import api as serve

    _stop.wait()
    print("shoal: shutting down...", flush=True)
    serve.shutdown()


def _run(args: argparse.Namespace) -> None:
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    _check_port("shoal run", args.host, args.port)
    app = _load(args.target)  # before starting anything: a bad target leaves nothing to stop
    try:
        # The proxy process starts while the application's replicas start (cold start).
        serve.start(http_options={"host": args.host, "port": args.port}, _blocking=False)
        serve.run(app, name=args.name, route_prefix=args.route_prefix)
    except ShoalError as exc:
        raise SystemExit(f"shoal run: {exc}") from None
    print(f"shoal: application '{args.name}' serving on http://{args.host}:{args.port}"
          f"{args.route_prefix}  (Ctrl-C to stop)", flush=True)  # fmt: skip
    _serve_until_signalled()


def _demo(args: argparse.Namespace) -> None:
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        demo = importlib.import_module("examples.demo")
    except ImportError as exc:
        raise SystemExit(f"shoal demo: run it from the shoal repository root ({exc})") from None
    _check_port("shoal demo", args.host, args.port)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        for name, prefix, app in demo.APPS:
            serve.run(app, name=name, route_prefix=prefix)
            print(f"shoal demo: {name:<10} http://{args.host}:{args.port}{prefix}", flush=True)
    except ShoalError as exc:
        raise SystemExit(f"shoal demo: {exc}") from None
    print("shoal demo: serving; Ctrl-C to stop", flush=True)
    _serve_until_signalled()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal", description="Serve models with shoal.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve an application from MODULE:ATTRIBUTE")
    run.add_argument("target", help="e.g. examples.pipeline:app")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default="/", help="HTTP route prefix (default: /)")
    _add_http_options(run)
    run.set_defaults(func=_run)
    demo = commands.add_parser("demo", help="serve the example applications")
    _add_http_options(demo)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    _catch_stop_signals()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
