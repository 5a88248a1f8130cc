"""``shoal start``: a long-lived local server hosting one instance.

It outlives the shell that started it (its own session, output in
``server.log``), serves the HTTP proxy, the admin REST API and the attach
socket, and stops in order on SIGTERM, SIGINT or an admin shutdown request.

``python -m shoal._instance.server OPTIONS_JSON`` is its entry point;
:func:`start_server` starts it and waits until it answers.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shoal._config import (
    TIMEOUTS,
    AdminOptions,
    HTTPOptions,
    LoggingConfig,
    ServeStartOptions,
    TracingOptions,
    gRPCOptions,
)
from shoal._errors import ShoalError
from shoal._instance.home import (
    ADMIN_SOCKET,
    CHECKPOINT,
    LOG,
    TOKEN,
    ServerInfo,
    pid_alive,
    read_server_info,
    remove_server_info,
    server_dir,
    write_server_info,
)
from shoal._runtime.loop import StopRequest, wait_responsive

if TYPE_CHECKING:
    from shoal._instance.instance import Instance, ServerRole

logger = logging.getLogger("shoal")

_POLL_S = 0.05


def start_server(
    http: HTTPOptions,
    admin: AdminOptions,
    proxy_location: str | None = None,
    resources: dict[str, float] | None = None,
    timeout_s: float = TIMEOUTS.server_start_s,
    tracing: TracingOptions | None = None,
    logging_config: LoggingConfig | None = None,
    grpc: gRPCOptions | None = None,
    runtime: str = "process",
    address: str | None = None,
) -> ServerInfo:
    """Start a server in the background; returns once it serves (HTTP, admin, attach).

    ``runtime="ray"``: its replicas are Ray actors on the cluster at ``address``.

    Raises ShoalError if one already runs for this state root, or if the server
    exits or does not answer within ``timeout_s`` (with the end of its log).
    """
    client = runtime == "ray" and _ray_client(address)  # the server runs elsewhere
    running = None if client else read_server_info()
    if running is not None:
        raise ShoalError(
            f"a shoal server is already running (pid {running.pid}, admin API "
            f"{running.admin_url}); stop it first with `shoal shutdown`"
        )
    if not client:
        from shoal._runtime.process.directory import check_socket_directory

        check_socket_directory(os.path.join(server_dir(), "run"))  # fail here, not in the log
    options = {
        "http": http.model_dump(mode="json"),
        "admin": admin.model_dump(mode="json"),
        "start": {
            "proxy_location": proxy_location,
            "resources": resources or {},
            "runtime": runtime,
            "address": address,
        },
        "tracing": None if tracing is None else tracing.model_dump(mode="json"),
        "logging": None if logging_config is None else logging_config.model_dump(mode="json"),
        "grpc": None if grpc is None else grpc.model_dump(mode="json"),
    }
    if runtime == "ray":  # the server runs in a detached actor, which Ray restarts
        from shoal._instance.ray_controller import start_controller_actor

        return start_controller_actor(options, address, timeout_s)  # once it serves
    log_path = os.path.join(server_dir(), LOG)
    deadline = time.monotonic() + timeout_s
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal._instance.server", json.dumps(options)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
            start_new_session=True,  # not killed with the shell that started it
        )  # fmt: skip
    try:
        return _wait_serving(process.pid, process.poll, deadline, log_path)
    except ShoalError:
        process.kill()
        raise


def _ray_client(address: str | None) -> bool:
    """Whether ``address`` (else RAY_ADDRESS) is a Ray Client one (``ray://``)."""
    from shoal._runtime.ray.runtime import ray_client_address

    return ray_client_address(address) is not None


def _wait_serving(
    pid: int, exit_code: Callable[[], Any], deadline: float, log_path: str
) -> ServerInfo:
    """The info the server with ``pid`` publishes once it serves; a ShoalError if it
    exits first (``exit_code()`` is not None) or does not serve by ``deadline``."""
    while time.monotonic() < deadline:
        info = read_server_info()
        if info is not None and info.pid == pid:
            return info
        if (code := exit_code()) is not None:
            raise ShoalError(
                f"the shoal server exited with code {code} while starting:\n{_tail(log_path)}"
            )
        time.sleep(_POLL_S)
    raise ShoalError(f"the shoal server did not start in time:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 20) -> str:
    """The end of the server's log, without INFO lines: an adopted replica keeps writing
    its access lines to the log of the server that started it, and they would bury the
    new server's traceback."""
    try:
        with open(path, errors="replace") as file:
            recent = collections.deque(file, maxlen=5000)
    except OSError:
        return "(no log)"
    return "".join([line for line in recent if not line.startswith("INFO ")][-lines:])


def serve_forever(options: dict[str, Any]) -> None:
    """The server's main thread: start the instance, publish how to reach it, wait for a
    stop request, then shut down in order (admin, routes, applications, proxy)."""
    from shoal._instance.checkpoint import DesiredState

    directory = server_dir()
    stop = StopRequest()
    instance: Instance | None = None

    def on_signal(signum: int, frame: Any) -> None:
        if instance is not None:  # its processes that end from now on are not replaced
            instance.controller.stopping = True
        stop.from_signal()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    http = HTTPOptions(**options["http"])
    start = ServeStartOptions(**options["start"])
    role = _server_role(directory)
    instance = _server_instance(options, http, start, role)
    instance.on_shutdown_requested = stop.set
    _publish_server_info(directory, instance)
    wait_responsive(stop)
    logger.warning("shoal server %d shutting down", os.getpid())
    remove_server_info(directory)
    instance.stop()
    # A shutdown asked for deletes the applications, as Ray's `serve shutdown` does;
    # only a crash leaves them in the checkpoint for the next start to take back.
    role.checkpoint.save(DesiredState())


def _server_role(directory: str) -> ServerRole:
    """The server's role under ``directory``: a new token, a checked private run directory."""
    from shoal._instance.checkpoint import Checkpoint
    from shoal._instance.instance import ServerRole
    from shoal._instance.services import new_token
    from shoal._runtime.process.directory import check_socket_directory

    token = new_token(os.path.join(directory, TOKEN))
    run_dir = os.path.join(directory, "run")  # the runtime's sockets; removed at shutdown
    check_socket_directory(run_dir)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    return ServerRole(
        directory=run_dir,
        token=token,
        attach_socket=os.path.join(directory, ADMIN_SOCKET),
        checkpoint=Checkpoint(os.path.join(directory, CHECKPOINT)),
    )


def _server_instance(
    options: dict[str, Any], http: HTTPOptions, start: ServeStartOptions, role: ServerRole
) -> Instance:
    """The server's instance, started with the admin, telemetry and gRPC of ``options``."""
    from shoal._instance.instance import Instance
    from shoal._observe.options import LoggingOptions, Telemetry

    return Instance(
        "process",
        None if start.proxy_location == "Disabled" else http,
        options=start,
        admin=AdminOptions(**options["admin"]),
        server=role,
        telemetry=Telemetry(
            tracing=TracingOptions(**(options.get("tracing") or {})),
            logging=LoggingOptions(**(options.get("logging") or {})),
        ),
        grpc=None if options.get("grpc") is None else gRPCOptions(**options["grpc"]),
    )


def _publish_server_info(directory: str, instance: Instance) -> None:
    """Write how clients reach the server (pid, admin API, proxy) and log that it serves."""
    proxy = instance.controller.proxy
    write_server_info(
        ServerInfo(
            pid=os.getpid(),
            directory=directory,
            admin_url=instance.services.admin_url if instance.services else None,
            http_host=proxy.host if proxy is not None else None,
            http_port=proxy.port if proxy is not None else None,
        )
    )
    logger.warning("shoal server %d serving; admin API %s", os.getpid(),
                   instance.services.admin_url if instance.services else "off")  # fmt: skip


def wait_stopped(info: ServerInfo, timeout_s: float) -> bool:
    """Wait until the server process of ``info`` has exited; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while pid_alive(info.pid):
        with contextlib.suppress(ChildProcessError):  # our own child: reap it
            if os.waitpid(info.pid, os.WNOHANG)[0] == info.pid:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_forever(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
