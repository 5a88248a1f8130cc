"""The ``shoal`` command line.

Serving in this process: ``shoal run CONFIG|MODULE:APP [key=value ...] [--reload]``
and ``shoal demo`` (``embedded.py``). Operating an instance over its admin REST
API: ``shoal start``, ``deploy``, ``status``, ``config``, ``delete``,
``shutdown``, and ``shoal build`` to write a config file (``ops.py``); ``shoal
logs`` reads the running server's log files (``logs.py``).

Options come from the one config schema (:mod:`shoal._config`), so the CLI
never lists an option's default or bounds a second time. Every error is one
message naming what to fix, with a non-zero exit code and no traceback.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from shoal._cli import embedded, logs, ops
from shoal._cli.client import DEFAULT_ADDRESS
from shoal._config import AdminOptions, HTTPOptions, gRPCOptions

_ADDRESS_HELP = (
    f"admin API address (default: $SHOAL_ADDRESS, $RAY_DASHBOARD_ADDRESS or {DEFAULT_ADDRESS})"
)


def _add_http_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    for name in ("host", "port"):
        field = HTTPOptions.model_fields[name]
        parser.add_argument(
            f"--{name}", type=type(field.default), default=field.default if defaults else None,
            help=f"HTTP proxy {name} (default: {field.default})",
        )  # fmt: skip


def _add_admin_port(parser: argparse.ArgumentParser) -> None:
    default = AdminOptions().port
    parser.add_argument(
        "--admin-port", type=int, help=f"admin REST API port (default: {default}; 0: any free)"
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", "-a", default=None, help=_ADDRESS_HELP)


def _serving_commands(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="serve a config file or MODULE:APP in this process until Ctrl-C",
        description="Serve a config file's applications, or MODULE:APP (a bound application, "
        "or a builder function called with the key=value arguments), in this process.",
    )  # fmt: skip
    run.add_argument("target", help="a config file, or e.g. examples.pipeline:app")
    run.add_argument("args", nargs="*", metavar="key=value", help="builder arguments")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default="/", help="HTTP route prefix (default: /)")
    run.add_argument("--reload", action="store_true", help="redeploy when a file here changes")
    run.add_argument(
        "--direct-ingress-port", type=int, default=None, metavar="PORT",
        help="the ingress replicas also accept HTTP on PORT (docs/direct-ingress.md)",
    )  # fmt: skip
    _add_http_options(run, defaults=False)  # a config file's http_options apply otherwise
    _add_admin_port(run)
    run.set_defaults(func=embedded.run)
    demo = commands.add_parser("demo", help="serve the example applications")
    _add_http_options(demo)
    _add_admin_port(demo)
    demo.set_defaults(func=embedded.demo)


def _operating_commands(commands: Any) -> None:
    _add_start_command(commands)
    deploy = commands.add_parser("deploy", help="deploy a config file (YAML or JSON)")
    deploy.add_argument("config")
    _add_address(deploy)
    deploy.set_defaults(func=ops.deploy)
    status = commands.add_parser("status", help="applications, deployments, replicas (YAML)")
    _add_address(status)
    status.set_defaults(func=ops.status)
    config = commands.add_parser("config", help="the config each application was deployed with")
    config.add_argument("--name", "-n", help="only this application")
    _add_address(config)
    config.set_defaults(func=ops.config)
    delete = commands.add_parser("delete", help="delete one application")
    delete.add_argument("app")
    _add_address(delete)
    delete.set_defaults(func=ops.delete)
    shutdown = commands.add_parser("shutdown", help="stop the instance and its applications")
    shutdown.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")
    _add_address(shutdown)
    shutdown.set_defaults(func=ops.shutdown)
    build = commands.add_parser("build", help="write the config file for MODULE:APP")
    build.add_argument("targets", nargs="+", metavar="MODULE:APP")
    build.add_argument("--output", "-o", help="file to write (default: standard output)")
    build.add_argument("--name", default="default", help="application name (default: default)")
    build.add_argument("--route-prefix", default="/", help="route prefix (default: /)")
    build.set_defaults(func=ops.build)
    logs.add_command(commands)


def _add_start_command(commands: Any) -> None:
    """Add the ``shoal start`` command and its options (their help names the defaults)."""
    start = commands.add_parser("start", help="start a shoal server that outlives this shell")
    http, admin = HTTPOptions(), AdminOptions()
    start.add_argument("--http-host", help=f"HTTP proxy host (default: {http.host})")
    start.add_argument("--http-port", type=int, help=f"HTTP proxy port (default: {http.port})")
    start.add_argument("--admin-host", help=f"admin API host (default: {admin.host})")
    start.add_argument("--admin-port", type=int, help=f"admin API port (default: {admin.port})")
    start.add_argument("--proxy-location", choices=["Disabled", "HeadOnly", "EveryNode"])
    start.add_argument(
        "--grpc-port", type=int,
        help=f"gRPC proxy port (default: {gRPCOptions().port}; docs/grpc.md)",
    )  # fmt: skip
    start.add_argument(
        "--grpc-servicer-functions", action="append", metavar="IMPORT_PATH",
        help="a generated add_XServicer_to_server function to serve over gRPC (repeat for "
        "more; none: no gRPC server)",
    )  # fmt: skip
    start.add_argument("--resources", help="custom resources as JSON, e.g. '{\"GPU\": 1}'")
    start.add_argument(
        "--ray", action="store_true",
        help="run replicas as Ray actors on a Ray cluster (docs/ray.md; pip install shoal[ray])",
    )  # fmt: skip
    start.add_argument(
        "--address", metavar="RAY_ADDRESS",
        help="with --ray: the cluster's address (auto, host:port, or ray://HOST:PORT from "
        "off the cluster; default: RAY_ADDRESS, else auto: the cluster `ray start` runs "
        "on this machine)",
    )  # fmt: skip
    start.add_argument(
        "--tracing-options",
        help="OpenTelemetry tracing as JSON (docs/tracing.md), e.g. "
        '\'{"enabled": true, "exporter": "otlp"}\'',
    )
    start.add_argument(
        "--logging-config",
        help="the instance's logging_config as JSON (docs/logging.md), e.g. "
        '\'{"encoding": "JSON"}\'',
    )
    start.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    start.set_defaults(func=ops.start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal", description="Serve models with shoal.")
    commands = parser.add_subparsers(dest="command", required=True)
    _serving_commands(commands)
    _operating_commands(commands)
    args, extra = parser.parse_known_args(argv)
    # key=value builder arguments may follow options: `shoal run m:b --port 8001 size=2`.
    words = [w for w in extra if "=" in w and not w.startswith("-")]
    if extra and (args.command != "run" or len(words) != len(extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if words:
        args.args = [*args.args, *words]
    if args.command in ("run", "demo"):
        embedded.catch_stop_signals()  # they shut shoal down in order on SIGINT/SIGTERM
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(f"shoal {args.command}: interrupted") from None


if __name__ == "__main__":
    main()
