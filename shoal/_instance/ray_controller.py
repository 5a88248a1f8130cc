"""The controller as a detached, named Ray actor: a ``shoal start --ray`` server that
outlives the shell and the driver that started it, and that Ray restarts.

:class:`ControllerActor` hosts the same server as ``shoal start`` (``python -m
shoal._instance.server``) as a child process, and lives exactly as long as it:

- the server exits cleanly (``shoal shutdown``): the actor ends, and Ray does not
  restart it;
- the server dies any other way (``kill -9``, a crash): the actor exits with it, and
  Ray restarts the actor (``max_restarts=-1``), which starts a new server;
- the actor's process dies (``kill -9``, ``ray.kill``): its server dies with it (the
  kernel's parent-death signal), and Ray restarts the actor.

A new server recovers its applications from its checkpoint (SQLite in the server's
directory on the actor's node: the actor is pinned to the node it was started from)
and adopts the replicas and the proxy, which keep serving meanwhile (see
``shoal._runtime.process.adopt``): traffic does not stop.

This module imports ``ray`` only inside functions.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

logger = logging.getLogger("shoal.runtime")

#: The controller actor's name in the ``shoal`` namespace: one per Ray cluster.
CONTROLLER_NAME = "shoal-controller"
#: Environment variables handed to the server: shoal's own settings, where to find the
#: user's modules, and Ray's local-cluster switch. Nothing else travels through Ray.
_FORWARDED_PREFIXES = ("SHOAL_", "RAY_ENABLE_", "PYTHONPATH", "PATH", "VIRTUAL_ENV", "HOME")
_PR_SET_PDEATHSIG = 1


def forwarded_environment() -> dict[str, str]:
    """The variables of this process that the server needs (see ``_FORWARDED_PREFIXES``)."""
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_PREFIXES)}


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGKILL when the thread that started it
    (the actor's supervising thread, which lives as long as the actor) ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _served(pid: int) -> bool:
    """Whether the server with ``pid`` got as far as serving (it published its info)."""
    from shoal._instance.home import read_server_info

    info = read_server_info(running=False)
    return info is not None and info.pid == pid


class ControllerActor:
    """Runs one ``shoal start`` server process and ends with it (see the module)."""

    def __init__(self, options_json: str, environment: dict[str, str], cwd: str) -> None:
        self._server: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(
            target=self._supervise,
            args=(options_json, environment, cwd),
            name="shoal-controller",
            daemon=True,
        )
        self._thread.start()
        self._started.wait()
        if self._failed is not None:
            raise self._failed

    def _supervise(self, options_json: str, environment: dict[str, str], cwd: str) -> None:
        from shoal._instance.home import LOG, server_dir

        env = {**os.environ, **environment}
        os.environ.update(environment)  # server_dir() reads SHOAL_HOME
        try:
            with open(os.path.join(server_dir(), LOG), "ab") as log:
                self._server = subprocess.Popen(
                    [sys.executable, "-m", "shoal._instance.server", options_json],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                    env=env, cwd=cwd, preexec_fn=_die_with_parent,
                    # Its own process group: the proxy it starts must outlive it.
                    start_new_session=True,
                )  # fmt: skip
        except BaseException as exc:  # reported by __init__: Ray fails the actor's creation
            self._failed = exc
            self._started.set()
            return
        self._started.set()
        code = self._server.wait()
        if code != 0 and _served(self._server.pid):
            logger.warning("the shoal server exited with code %s: Ray restarts its actor", code)
            os._exit(1)
        # Stopped as asked, or failed before it served (a restart would fail the same
        # way): end this actor for good.
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def server_pid(self) -> int:
        """The process id of the server this actor runs."""
        assert self._server is not None
        return self._server.pid

    def where(self) -> tuple[int, str]:
        """This actor's process id and Ray node id."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()


def start_controller_actor(options: dict[str, Any], address: str | None, timeout_s: float) -> int:
    """Start the controller actor on this node of the cluster at ``address`` (connecting
    this process to it for the time of the call); the server's process id.

    The server's ``runtime`` options get the cluster's GCS address, so that it joins
    the same cluster. A ShoalError if a controller already runs on the cluster.
    """
    from shoal._errors import ShoalError
    from shoal._runtime.ray.runtime import NAMESPACE, connect

    # RAY_ADDRESS, else "auto" (the cluster of this machine); never a new local cluster,
    # which would end with this call.
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray, started = connect(address, log_to_driver=False)
    except ConnectionError as exc:
        raise ShoalError(
            f"no Ray cluster to start the shoal controller on at address {address!r} "
            f"({exc}); start one with `ray start --head` on this "
            "machine, or pass its address (docs/ray.md)"
        ) from None
    try:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            pass
        else:
            raise ShoalError(
                f"a shoal controller already runs on this Ray cluster (actor "
                f"{CONTROLLER_NAME!r} in namespace {NAMESPACE!r}); stop it first with "
                "`shoal shutdown` on its node"
            )
        context = ray.get_runtime_context()
        options["start"]["address"] = context.gcs_address
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = (
            ray.remote(ControllerActor)
            .options(
                name=CONTROLLER_NAME,
                namespace=NAMESPACE,
                lifetime="detached",
                max_restarts=-1,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    context.get_node_id(), soft=False
                ),
            )
            .remote(json.dumps(options), forwarded_environment(), os.getcwd())
        )
        pid: int = ray.get(actor.server_pid.remote(), timeout=timeout_s)
        return pid
    finally:
        if started:
            ray.shutdown()
