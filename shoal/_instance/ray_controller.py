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

``shoal start --ray --address ray://HOST:PORT`` starts it from off the cluster,
through Ray Client: the actor is pinned to the node of the Ray Client server (the
node where Ray Client runs this process's driver, usually the head), and says itself
when its server serves and where (:meth:`ControllerActor.serving`), since neither
the server's directory nor its admin API are on this machine. :meth:`ControllerActor.stop`
stops the server as ``shoal shutdown`` does, from anywhere Ray reaches the actor.

This module imports ``ray`` only inside functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from shoal._instance.home import ServerInfo

logger = logging.getLogger("shoal.runtime")

#: The controller actor's name in the ``shoal`` namespace: one per Ray cluster.
CONTROLLER_NAME = "shoal-controller"
#: Environment variables handed to the server: shoal's own settings, where to find the
#: user's modules, and Ray's local-cluster switch. Nothing else travels through Ray.
_FORWARDED_PREFIXES = ("SHOAL_", "RAY_ENABLE_", "PYTHONPATH", "PATH", "VIRTUAL_ENV", "HOME")
#: Through Ray Client (this process off the cluster): shoal's own settings only; the
#: paths of this machine (PATH, HOME, its working directory...) mean nothing there.
_CLIENT_PREFIXES = ("SHOAL_", "RAY_ENABLE_")
_PR_SET_PDEATHSIG = 1
#: How long an actor whose server failed before serving waits for :meth:`serving` to
#: report the failure (with the end of the log) before it ends itself.
_REPORT_S = 10.0


@dataclass(frozen=True)
class ClusterServerInfo(ServerInfo):
    """A ``shoal start --ray`` server's info as its actor reports it: the addresses
    are on the node ``node_ip`` (Ray node ``node_id``), which may not be this machine."""

    node_ip: str = ""
    node_id: str = ""
    #: Whether it was started through Ray Client (``ray://``), from off the cluster.
    through_client: bool = False


def forwarded_environment(client: bool = False) -> dict[str, str]:
    """The variables of this process that the server needs (see ``_FORWARDED_PREFIXES``;
    ``client``: ``_CLIENT_PREFIXES``)."""
    prefixes = _CLIENT_PREFIXES if client else _FORWARDED_PREFIXES
    return {k: v for k, v in os.environ.items() if k.startswith(prefixes)}


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

    def __init__(self, options_json: str, environment: dict[str, str], cwd: str | None) -> None:
        """``cwd`` None: the actor's own working directory (started through Ray Client)."""
        self._server: subprocess.Popen[bytes] | None = None
        self._started = threading.Event()
        self._reported = threading.Event()  # serving() has told its caller the outcome
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

    def _supervise(self, options_json: str, environment: dict[str, str], cwd: str | None) -> None:
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
        served = _served(self._server.pid)
        if code != 0 and served:
            logger.warning("the shoal server exited with code %s: Ray restarts its actor", code)
            os._exit(1)
        import ray

        context = ray.get_runtime_context()
        # The caller of serving() (maybe off the cluster) gets the log's end. Only a first
        # start has one: nobody asks a restarted actor (and its server, which served and
        # stopped as asked, has removed its info: ``served`` is False then too).
        if not served and not context.was_current_actor_reconstructed:
            self._reported.wait(_REPORT_S)
        # Stopped as asked, or failed before it served (a restart would fail the same
        # way): end this actor for good.
        ray.kill(context.current_actor, no_restart=True)

    def serving(self, timeout_s: float) -> dict[str, Any]:
        """Once the server serves: its :class:`ClusterServerInfo`'s fields (where it
        listens, on this actor's node). ``{"error": why}`` if it exits first or does not
        serve within ``timeout_s``, with the end of its log (on this node)."""
        import ray

        from shoal._errors import ShoalError
        from shoal._instance.home import LOG, server_dir
        from shoal._instance.server import _wait_serving

        assert self._server is not None
        log_path = os.path.join(server_dir(), LOG)
        try:
            info = _wait_serving(
                self._server.pid, self._server.poll, time.monotonic() + timeout_s, log_path
            )
        except ShoalError as exc:
            return {"error": str(exc)}
        finally:
            self._reported.set()
        node = {"node_ip": ray.util.get_node_ip_address()}
        return {**asdict(info), **node, "node_id": ray.get_runtime_context().get_node_id()}

    def stop(self) -> None:
        """Stop the server in order, as ``shoal shutdown`` does (it deletes its
        applications); this actor then ends for good. Returns at once: the actor is gone
        once ``ray.get_actor`` no longer finds it."""
        assert self._server is not None
        with contextlib.suppress(ProcessLookupError):
            self._server.send_signal(signal.SIGTERM)

    def server_pid(self) -> int:
        """The process id of the server this actor runs."""
        assert self._server is not None
        return self._server.pid

    def where(self) -> tuple[int, str]:
        """This actor's process id and Ray node id."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()


def start_controller_actor(
    options: dict[str, Any], address: str | None, timeout_s: float
) -> ClusterServerInfo:
    """Start the controller actor on the cluster at ``address`` (connecting this process
    to it for the time of the call); once its server serves, where it listens.

    ``address``, else ``RAY_ADDRESS``, else ``auto``: a cluster's, and the actor runs on
    this node; or a Ray Client address (``ray://HOST:PORT``): this process may be off the
    cluster, and the actor runs on the Ray Client server's node, with shoal's own
    variables (``SHOAL_*``) but not this machine's paths (see ``_CLIENT_PREFIXES``). The
    server's ``runtime`` options get the cluster's GCS address, so that it joins the same
    cluster. A ShoalError if a controller already runs on the cluster, or if the server
    fails or does not serve within ``timeout_s`` (with the end of its log).
    """
    from shoal._errors import ShoalError
    from shoal._runtime.ray.runtime import NAMESPACE, connect, ray_client_address

    # RAY_ADDRESS, else "auto" (the cluster of this machine); never a new local cluster,
    # which would end with this call.
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    client = ray_client_address(address) is not None
    try:
        ray, started = connect(address, log_to_driver=False, client=client)
    except ConnectionError as exc:
        raise ShoalError(
            f"no Ray cluster to start the shoal controller on at address {address!r} "
            f"({exc}); start one with `ray start --head` on this machine, or pass its "
            "address (a Ray Client one, ray://HOST:10001, from off the cluster: docs/ray.md)"
        ) from None
    try:
        _refuse_second(ray, NAMESPACE)
        actor = _create_actor(ray, options, client)
        # Once it serves, as the actor sees it: its directory may be on another machine.
        try:
            answer = ray.get(actor.serving.remote(timeout_s), timeout=timeout_s + 30)
        except ray.exceptions.RayError as exc:
            raise ShoalError(f"the shoal controller actor failed while starting: {exc}") from None
    finally:
        if started:
            ray.shutdown()
    if "error" in answer:
        raise ShoalError(answer["error"])
    return ClusterServerInfo(**answer, through_client=client)


def _create_actor(ray: Any, options: dict[str, Any], client: bool) -> Any:
    """The controller actor, created on the node of this process's driver (through Ray
    Client: the one Ray Client runs for it, on the Ray Client server's node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shoal._runtime.ray.runtime import NAMESPACE

    context = ray.get_runtime_context()
    options["start"]["address"] = context.gcs_address  # the server joins this cluster
    return (
        ray.remote(ControllerActor)
        .options(
            name=CONTROLLER_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            max_restarts=-1,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(context.get_node_id(), soft=False),
        )
        .remote(json.dumps(options), forwarded_environment(client), None if client else os.getcwd())
    )


def _refuse_second(ray: Any, namespace: str) -> None:
    """A ShoalError if a controller actor already runs on the cluster ``ray`` is on."""
    from shoal._errors import ShoalError

    try:
        ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        return
    raise ShoalError(
        f"a shoal controller already runs on this Ray cluster (actor {CONTROLLER_NAME!r} "
        f"in namespace {namespace!r}); stop it first with `shoal shutdown` on its node "
        "(or its actor's stop(): docs/ray.md)"
    )


def where_note(info: ServerInfo) -> str:
    """What ``shoal start --ray`` prints after the server's addresses: the actor it runs
    in, and, started through Ray Client, on which node its addresses are and how to
    reach and stop it from off the cluster."""
    note = (
        f"  the server runs in the detached Ray actor {CONTROLLER_NAME!r} (namespace 'shoal') on "
    )
    if not isinstance(info, ClusterServerInfo) or not info.through_client:
        return note + "this node: Ray restarts it if it dies"
    note += (
        f"the node at {info.node_ip} (Ray node {info.node_id}, the Ray Client server's): "
        "Ray restarts it if it dies.\n  Its addresses above, and its directory, are that "
        "node's"
    )
    host = urlsplit(info.admin_url).hostname if info.admin_url else None
    if host is None:
        note += " (its admin API is off)"
    elif host in ("localhost", "::1") or host.startswith("127."):
        note += (
            ": they listen on loopback. Run `shoal deploy`, `shoal status` and `shoal "
            "shutdown` on that node, or start the server with --admin-host/--http-host set "
            "to an address of that node you reach (a private network: docs/ray.md)"
        )
    else:
        admin = urlsplit(str(info.admin_url))
        if host in ("0.0.0.0", "::"):  # every address of that node: name one
            admin = admin._replace(netloc=f"{info.node_ip}:{admin.port}")
        note += (
            f". From here: `shoal deploy|status|shutdown --address {admin.geturl()}`, with "
            "SHOAL_ADMIN_TOKEN set to the token in admin.token of its directory"
        )
    return note + (
        ".\n  To stop it from anywhere Ray Client reaches: ray.get_actor('shoal-controller', "
        "namespace='shoal').stop.remote() (docs/ray.md)"
    )
