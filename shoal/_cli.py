"""The ``shoal`` command line: ``shoal run module:app`` and ``shoal demo``.

Options come from the one config schema (:class:`shoal._config.HTTPOptions`),
so the CLI never lists an option's default or bounds a second time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Any

from shoal._config import HTTPOptions

logger = logging.getLogger("shoal")


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    for name in ("host", "port"):
        field = HTTPOptions.model_fields[name]
        parser.add_argument(
            f"--{name}", type=type(field.default), default=field.default,
            help=f"HTTP proxy {name} (default: {field.default})",
        )  # fmt: skip


def _load(target: str) -> Any:
    """Import ``module:attribute``; a callable that is not an Application is called to build it."""
    from shoal._api.deployment import Application

    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise SystemExit(
            f"shoal run: expected MODULE:ATTRIBUTE (e.g. examples.pipeline:app), got {target!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"shoal run: cannot import module {module_name!r}: {exc}") from None
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise SystemExit(
            f"shoal run: module {module_name!r} has no attribute {attribute!r}"
        ) from None
    if not isinstance(app, Application) and callable(app):
        app = app()
    if not isinstance(app, Application):
        raise SystemExit(f"shoal run: {target} is not an application (build one with .bind())")
    return app


_stop = threading.Event()


def _catch_stop_signals() -> None:
    """Catch SIGINT/SIGTERM from the start, so one sent while starting is not lost."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: _stop.set())


def _serve_until_signalled() -> None:
    """Block the main thread until SIGINT or SIGTERM, then shut shoal down."""
    from shoal._api import serve

    _stop.wait()
    print("shoal: shutting down...", flush=True)
    serve.shutdown()


def _run(args: argparse.Namespace) -> None:
    from shoal._api import serve

    # The proxy process starts while we import the application (cold start).
    serve.start(http_options={"host": args.host, "port": args.port}, _blocking=False)
    app = _load(args.target)
    serve.run(app, name=args.name, route_prefix=args.route_prefix)
    print(f"shoal: application '{args.name}' serving on http://{args.host}:{args.port}"
          f"{args.route_prefix}  (Ctrl-C to stop)", flush=True)  # fmt: skip
    _serve_until_signalled()


def _demo(args: argparse.Namespace) -> None:
    from shoal._api import serve

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        demo = importlib.import_module("examples.demo")
    except ImportError as exc:
        raise SystemExit(f"shoal demo: run it from the shoal repository root ({exc})") from None
    serve.start(http_options={"host": args.host, "port": args.port})
    for name, prefix, app in demo.APPS:
        serve.run(app, name=name, route_prefix=prefix)
        print(f"shoal demo: {name:<10} http://{args.host}:{args.port}{prefix}", flush=True)
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
