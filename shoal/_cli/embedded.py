"""Commands that serve in this process: ``shoal run`` (an app or a config file) and ``shoal demo``.

Guarantees: nothing starts before the target imports (a bad target leaves
nothing to stop); SIGINT/SIGTERM, even one sent while starting, shut shoal down
through ``serve.shutdown()`` and exit 0; with ``--reload``, a change to a file
under the current directory redeploys, and a change that fails to import or
deploy is logged while the previous version keeps serving.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal._cli.target import load, parse_args
from shoal._runtime.loop import StopRequest

logger = logging.getLogger("shoal")

_stop = StopRequest()


def catch_stop_signals() -> None:
    """Catch SIGINT/SIGTERM from the start, so one sent while starting is not lost."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_stop_signal)


def _on_stop_signal(signum: int, frame: Any) -> None:
    api = sys.modules.get("shoal._instance.api")  # never an import in a signal handler
    if api is not None:  # else no instance runs yet
        api.stopping()
    _stop.from_signal()


def check_port(command: str, host: str, port: int) -> None:
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


def _admin_options(args: argparse.Namespace) -> dict[str, Any] | None:
    return None if args.admin_port is None else {"port": args.admin_port}


def _serve_admin(command: str) -> None:
    """Serve the admin API once the applications are deployed: their replicas start
    without waiting for it (about 0.1 s of the cold start). A busy admin port still
    fails the command, after shutting down what started."""
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    try:
        serve.serve_admin()
    except ShoalError as exc:
        serve.shutdown()
        raise SystemExit(f"{command}: {exc}") from None


def _shutdown() -> None:
    from shoal._instance import api as serve

    print("shoal: shutting down...", flush=True)
    serve.shutdown()


@dataclass
class _Target:
    """What ``shoal run`` serves: (name, route prefix, application) triples, and where."""

    apps: list[tuple[str, str | None, Any]]
    host: str
    port: int
    tracing: dict[str, Any] | None = None  # a config file's tracing_options
    logging: dict[str, Any] | None = None  # a config file's top-level logging_config
    grpc: dict[str, Any] | None = None  # a config file's grpc_options (docs/grpc.md)
    runtime: str = "process"  # a config file's runtime (docs/ray.md)
    address: str | None = None  # a config file's ray_address
    proxy_location: str | None = None  # a config file's (EveryNode, HeadOnly, Disabled)
    #: Application name -> its direct_ingress_port (docs/direct-ingress.md), if it has one.
    direct_ports: dict[str, int] = field(default_factory=dict)


#: The fields of a _Target that a running instance keeps (serve.start's options).
_INSTANCE_WIDE = (
    "host", "port", "tracing", "logging", "grpc", "runtime", "address", "proxy_location",
)  # fmt: skip


def _is_config(target: str) -> bool:
    if target.endswith(".py"):
        raise SystemExit(
            f"shoal run: {target} is a Python file; name its module and application instead, "
            f"e.g. shoal run {Path(target).stem}:app"
        )
    return target.endswith((".yaml", ".yml", ".json")) or Path(target).is_file()


def _resolve(args: argparse.Namespace) -> _Target:
    """Import the target (a config file's applications, or MODULE:ATTRIBUTE) and its address."""
    from shoal._config import HTTPOptions

    default = HTTPOptions()
    if not _is_config(args.target):
        app = load(args.target, "shoal run", parse_args("shoal run", args.args))
        host = args.host or default.host
        port = default.port if args.port is None else args.port
        direct = {} if args.direct_ingress_port is None else {args.name: args.direct_ingress_port}
        target = _Target([(args.name, args.route_prefix, app)], host, port)
        target.direct_ports = direct
        return target
    if args.direct_ingress_port is not None:
        raise SystemExit(
            "shoal run: --direct-ingress-port applies to MODULE:APP; for a config file, "
            "set direct_ingress_port under its application"
        )
    if args.args:
        raise SystemExit(
            f"shoal run: builder arguments ({' '.join(args.args)}) apply to MODULE:BUILDER; "
            f"for a config file, put them under its application's `args`"
        )
    from shoal._deploy_config import load_config_file
    from shoal._errors import ConfigError
    from shoal._instance.build import build_applications

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = load_config_file(args.target)
        built = build_applications(config)
    except ConfigError as exc:
        raise SystemExit(f"shoal run: {exc}") from None
    http = config.http_options
    host = args.host or getattr(http, "host", None) or default.host
    port = args.port if args.port is not None else getattr(http, "port", default.port)
    apps = [(b.name, b.route_prefix, b.app) for b in built]
    tracing = config.tracing_options
    logging = None if config.logging_config is None else config.logging_config.model_dump()
    grpc = None if config.grpc_options is None else config.grpc_options.model_dump()
    direct = {b.name: b.direct_ingress_port for b in built if b.direct_ingress_port is not None}
    return _Target(
        apps, host, port, None if tracing is None else tracing.model_dump(), logging, grpc,
        config.runtime or "process", config.ray_address, config.proxy_location, direct,
    )  # fmt: skip


def _deploy(target: _Target) -> None:
    from shoal._instance import api as serve

    for name, prefix, app in target.apps:
        port = target.direct_ports.get(name)
        serve.run(app, name=name, route_prefix=prefix, direct_ingress_port=port)


def _fork_server_early(modules: list[str] | None = None) -> None:
    """Fork the instance's fork server now, while this process has no thread: it imports
    what workers need while this one imports the target and starts the instance, and
    even the proxy and the first replica are forked (W1's cold start: about 0.45 s of
    CPU less, 0.93 -> 0.61 s on a loaded 2-core machine). :func:`_no_early_fork_server`
    ends it if no instance takes it."""
    from shoal._runtime.process.forks import start_early

    start_early(modules)


def _no_early_fork_server() -> None:
    from shoal._runtime.process.forks import discard_early

    discard_early()


def run(args: argparse.Namespace) -> None:
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    module, colon, _ = args.target.partition(":")
    _fork_server_early([module] if colon and not module.endswith(".py") else None)
    try:
        target = _resolve(args)  # before starting anything: a bad target leaves nothing
        check_port("shoal run", target.host, target.port)
    except BaseException:
        _no_early_fork_server()
        raise
    if target.runtime != "process":
        _no_early_fork_server()
    try:
        # The proxy process starts while the application's replicas start (cold start).
        serve.start(
            http_options={"host": target.host, "port": target.port},
            admin_options=_admin_options(args), tracing_options=target.tracing,
            logging_config=target.logging, grpc_options=target.grpc,
            runtime=target.runtime, address=target.address,
            proxy_location=target.proxy_location, _blocking=False, _attach=False,
            _admin_later=True,
        )  # fmt: skip
        _deploy(target)
        _serve_admin("shoal run")
    except ShoalError as exc:
        raise SystemExit(f"shoal run: {exc}") from None
    http = target.proxy_location != "Disabled"
    for name, prefix, _ in target.apps:
        where = f"http://{target.host}:{target.port}{prefix}" if prefix and http else "handles only"
        print(f"shoal: application '{name}' serving on {where}  (Ctrl-C to stop)", flush=True)
    if args.reload:
        _watch(args, target)
    else:
        from shoal._runtime.loop import wait_responsive

        wait_responsive(_stop)
    _shutdown()


def _watch(args: argparse.Namespace, target: _Target) -> None:
    """Redeploy on every change under the current directory until SIGINT/SIGTERM."""
    import watchfiles

    root = Path.cwd()
    extensions = (".yaml", ".yml", ".json")
    watch_filter = watchfiles.PythonFilter(extra_extensions=extensions)
    print(f"shoal run: watching {root} for changes (--reload)", flush=True)
    for changes in watchfiles.watch(root, watch_filter=watch_filter, stop_event=_stop):
        changed = sorted({os.path.relpath(path, root) for _, path in changes})
        logger.warning("shoal run: %s changed; redeploying", ", ".join(changed))
        target = _redeploy(args, target, root)


def _redeploy(args: argparse.Namespace, previous: _Target, root: Path) -> _Target:
    """Re-import the user's modules and deploy again; on failure keep serving the previous one."""
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    _forget_user_modules(root)
    try:
        target = _resolve(args)
        _deploy(target)
    except SystemExit as exc:
        logger.error("%s\n(still serving the previous version)", exc)
        return previous
    except ShoalError as exc:
        logger.error("shoal run: redeploying failed: %s\n(still serving the previous version)", exc)
        return previous
    changed = [name for name in _INSTANCE_WIDE if getattr(target, name) != getattr(previous, name)]
    if changed:
        logger.warning(
            "shoal run: %s changed in %s: instance-wide options apply when shoal run "
            "starts; restart it to apply them", ", ".join(changed), args.target,
        )  # fmt: skip
    gone = {name for name, _, _ in previous.apps} - {name for name, _, _ in target.apps}
    for name in sorted(gone):
        serve.delete(name)
    logger.warning("shoal run: redeployed %s", ", ".join(name for name, _, _ in target.apps))
    return target


def _forget_user_modules(root: Path) -> None:
    """Drop the modules loaded from under ``root`` (not shoal's, not installed ones)."""
    shoal_dir = Path(__file__).resolve().parent.parent
    keep = [shoal_dir, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if path.is_relative_to(root) and not any(path.is_relative_to(k) for k in keep):
            del sys.modules[name]
    importlib.invalidate_caches()


def demo(args: argparse.Namespace) -> None:
    from shoal._errors import ShoalError
    from shoal._instance import api as serve

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        demo_module = importlib.import_module("examples.demo")
    except ImportError as exc:
        raise SystemExit(f"shoal demo: run it from the shoal repository root ({exc})") from None
    check_port("shoal demo", args.host, args.port)
    from shoal._runtime.process.zygote import PRELOAD_ENV

    # The examples import scikit-learn in their constructors: once in the fork server,
    # not once per replica.
    os.environ.setdefault(PRELOAD_ENV, "sklearn.linear_model,sklearn.datasets")
    # Forked after the examples' imports, which every replica then shares (forked before
    # them, so that it imports scikit-learn meanwhile, the demo started later: the fork
    # server imported the examples a second time).
    _fork_server_early()
    try:
        serve.start(
            http_options={"host": args.host, "port": args.port},
            admin_options=_admin_options(args), _attach=False, _admin_later=True,
        )  # fmt: skip
        # Side by side: run_many returns once every application runs.
        apps = demo_module.APPS
        serve.run_many([serve.RunTarget(app, name, prefix) for name, prefix, app in apps])
        _serve_admin("shoal demo")
        for name, prefix, _ in apps:
            print(f"shoal demo: {name:<10} http://{args.host}:{args.port}{prefix}", flush=True)
    except ShoalError as exc:
        raise SystemExit(f"shoal demo: {exc}") from None
    print("shoal demo: serving; Ctrl-C to stop", flush=True)
    from shoal._runtime.loop import wait_responsive

    wait_responsive(_stop)
    _shutdown()
