"""The fork server: a process that has imported what workers need and forks them.

``python -m shoal._runtime.process.zygote FD``, or forked by the CLI
(:func:`serve_forked`: ``shoal run``, ``shoal demo``) right after its imports.

A worker started by ``python -m`` spends about half a second of CPU importing
shoal, numpy, uvloop, Starlette and uvicorn before it can say hello; forty of
them (the demo) take most of a two-core machine for ten seconds. The fork server
imports all of that once; a worker is then a ``fork()`` away (a few
milliseconds), and every worker shares those pages with it copy-on-write.

It talks to the one runtime that started it over a ``SOCK_SEQPACKET`` socket
pair (FD), with JSON messages (never pickle): :class:`Spawn` in (with the
listening socket of a proxy, if any, passed as SCM_RIGHTS); :class:`Spawned` or
:class:`SpawnFailed` back, and :class:`Exited` when a child it forked ends (it
is the parent: it reaps them). It exits when that socket closes: the runtime
stopped or died. Its children live on (a server's workers may outlive their
controller); nothing but that runtime can reach it.

It says it is ready once it has imported what a worker needs before its hello
(:data:`PRELOAD`); it imports what replicas often need (:data:`PRELOAD_LATER`)
between requests, and ``SHOAL_FORK_PRELOAD``'s modules before its first replica.

A forked child gets the runtime's environment, working directory and import
path of the moment it is spawned (not the fork server's, which may be older),
its own random seeds, and runs the worker's ``main`` as ``python -m`` would.
Environment variables read when a module is imported (``OMP_NUM_THREADS`` by
numpy, say) cannot apply to modules already imported: the runtime starts a
replica whose ``runtime_env`` sets ``env_vars`` with ``python -m`` instead.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import importlib.abc
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

#: Largest message either side sends (a spawn request carries the environment).
MAX_MESSAGE = 1 << 20


@dataclass(frozen=True)
class Spawn:
    """Fork a worker: ``argv`` as ``python -m`` would get it; ``environ`` and ``cwd``
    replace the fork server's; ``fd_env`` names the variable that receives the number
    of the file descriptor passed with this message (a proxy's listening socket)."""

    request: int
    entry: str  # a key of ENTRY_MODULES
    argv: list[str]
    environ: dict[str, str]
    cwd: str
    fd_env: str = ""


@dataclass(frozen=True)
class Preload:
    """Import ``modules`` (a deployment's) with ``sys_path``, ``cwd`` and ``environ`` (as
    its replicas would) before the next fork, so that they share them instead of each
    importing them."""

    request: int
    modules: list[str]
    sys_path: list[str]
    cwd: str
    environ: dict[str, str]


@dataclass(frozen=True)
class Preloaded:
    """``error``: why a module could not be imported (the replica will say it too);
    ``unsafe``: why the fork server no longer forks (a module started a thread)."""

    request: int
    error: str = ""
    unsafe: str = ""


@dataclass(frozen=True)
class Ready:
    """The fork server has imported everything and waits for requests."""

    pid: int
    preloaded: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Spawned:
    request: int
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    request: int
    error: str


@dataclass(frozen=True)
class Exited:
    """A forked worker ended: ``code`` as ``Popen.returncode`` gives it (-N: signal N)."""

    pid: int
    code: int


MESSAGES: dict[str, type] = {
    cls.__name__: cls for cls in (Spawn, Preload, Preloaded, Ready, Spawned, SpawnFailed, Exited)
}


def encode(message: Any) -> bytes:
    return json.dumps({"type": type(message).__name__, **asdict(message)}).encode()


def decode(data: bytes) -> Any:
    """The message in ``data``; ValueError if it is not one of :data:`MESSAGES`."""
    fields = json.loads(data)
    cls = MESSAGES.get(fields.pop("type", None))
    if cls is None:
        raise ValueError(f"unknown fork server message: {data[:80]!r}")
    return cls(**fields)


# --- the fork server's process ---------------------------------------------------------

#: The module each kind of child runs as ``python -m`` would: its ``main()``. A replica's
#: and a proxy's is the worker's; ``build`` is a server's config build (imports the
#: user's modules and calls their builders in a child: see ``shoal._instance.plane``).
ENTRY_MODULES = {
    "replica": "shoal._runtime.process.worker",
    "proxy": "shoal._runtime.process.proxy_worker",
    "build": "shoal._instance.build_child",
}

#: Imported before the fork server says it is ready: what every worker, replica or
#: proxy, imports before its hello (the proxy's modules and uvicorn: :func:`_preload`).
PRELOAD = (
    "shoal._runtime.process.worker",
    "shoal._replica.replica",
    "shoal._replica.server",
    "setproctitle",
    # Every worker's event loop (shoal._runtime.loop, uvicorn's "auto"): imported by each
    # worker after its fork, it cost each ~3.5 MB of private memory and ~15 ms of CPU.
    "uvloop",
)

#: Imported once it is ready, one at a time while no request waits: what replicas often
#: import. A worker forked before imports them itself if it needs them: a cold start
#: waits for the imports its own replica and proxy need, not for these (~0.3 s of CPU).
PRELOAD_LATER = ("starlette.applications", "numpy", "fastapi")

#: Extra modules the fork server imports before it forks a replica (comma-separated; the
#: proxy does not wait for them): what deployments import inside ``__init__`` (``shoal
#: demo`` names scikit-learn, which five of its replicas imported one by one: ~3 s of
#: its start on 2 cores).
PRELOAD_ENV = "SHOAL_FORK_PRELOAD"

#: How long the socket must be quiet before the next of the later imports: the requests
#: of a starting instance come in bursts; its workers should not wait for an import.
LATER_IDLE_S = 0.2


def _preload() -> list[str]:
    loaded = [name for name in PRELOAD if _import(name)]
    from shoal._proxy.proxy import preload as preload_proxy

    preload_proxy()  # uvicorn and the protocol classes it loads lazily
    return loaded


def _extra() -> list[str]:
    """``SHOAL_FORK_PRELOAD``'s modules."""
    return [name.strip() for name in os.environ.get(PRELOAD_ENV, "").split(",") if name.strip()]


def _import(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:  # an optional module missing: the worker imports what it uses
        return False
    return True


class _Server:
    """The fork server's state: its socket, its children, the user modules it imported."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)
        self.children: set[int] = set()
        self.user_modules = UserModules()
        self.unsafe = ""  # why forking is no longer safe, once it is not
        self.extra = _extra()  # to import before the first replica's fork
        self.later = list(PRELOAD_LATER)  # to import while idle

    def serve(self) -> None:
        """Answer requests until the socket closes; reap the children meanwhile. While
        no request waits, import :attr:`later`'s modules one by one."""
        while True:
            events = self.selector.select(self._idle_s())
            if not events:
                self._import_later()
            for key, _ in events:
                if key.fileobj is self.sock:
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
                    except ConnectionResetError:
                        data, fds = b"", []
                    if not data:
                        return  # the runtime closed its end: stop, leave the children be
                    self._handle(data, fds)
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_r, 512)
            self._reap()

    def _idle_s(self) -> float | None:
        """How long to wait for a request before importing the next module: none is
        left (forever); :attr:`extra` once a worker was forked (the first, the proxy,
        is not delayed; a replica would wait for them anyway): not at all."""
        if self.extra and self.children:
            return 0.0
        return LATER_IDLE_S if self.extra or self.later else None

    def _import_later(self) -> None:
        """The next module of :attr:`extra` or :attr:`later`."""
        self._import((self.extra or self.later).pop(0))

    def _import_extra(self) -> None:
        while self.extra:
            self._import(self.extra.pop(0))

    def _import(self, name: str) -> None:
        """Import ``name`` as :data:`PRELOAD`'s were (not once a module started a thread:
        nothing is forked then); a module that fails is left to the workers that need it."""
        if self.unsafe or name in sys.modules:
            return
        sys.meta_path.insert(0, _REFUSE_FORK_UNSAFE)
        try:
            with contextlib.suppress(Exception):  # a broken module: its workers report it
                _import(name)
        finally:
            sys.meta_path.remove(_REFUSE_FORK_UNSAFE)
        if threading.active_count() > 1:
            self.unsafe = f"importing {name} started a thread"
            _send(self.sock, Preloaded(0, "", self.unsafe))  # the runtime stops asking
        gc.freeze()

    def _handle(self, data: bytes, fds: list[int]) -> None:
        try:
            request = decode(data)
        except (ValueError, TypeError) as exc:
            request = exc
        match request:
            case Spawn() if request.entry != "proxy" and self.extra:
                self._import_extra()  # SHOAL_FORK_PRELOAD's: before the first replica
                self._handle(data, fds)
            case Spawn() if self.unsafe:
                _close(fds)
                _send(self.sock, SpawnFailed(request.request, self.unsafe))
            case Spawn():
                self._spawn(request, fds)
            case Preload():
                _close(fds)
                if request.request:  # not the CLI's target (request 0: forks.start_early)
                    self._import_extra()
                error = self.user_modules.load(request)
                if not self.unsafe and threading.active_count() > 1:
                    self.unsafe = f"importing {', '.join(request.modules)} started a thread"
                _send(self.sock, Preloaded(request.request, error, self.unsafe))
            case _:
                _close(fds)
                _send(self.sock, SpawnFailed(-1, f"bad request: {request!r}"))

    def _spawn(self, request: Spawn, fds: list[int]) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            _close(fds)
            _send(self.sock, SpawnFailed(request.request, f"fork failed: {exc}"))
            return
        if pid == 0:
            self._become_worker(request, fds)  # never returns
        _close(fds)  # the child has them
        self.children.add(pid)
        _send(self.sock, Spawned(request.request, pid))

    def _reap(self) -> None:
        """Report every child that ended (SIGCHLD woke the loop, or a request did)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # none left (cannot happen while children is not empty)
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            _send(self.sock, Exited(pid, os.waitstatus_to_exitcode(status)))

    def _become_worker(self, request: Spawn, fds: list[int]) -> None:
        """In the child: shed the fork server, take the runtime's environment, run main."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.selector.close()
            _close([self.wakeup_r, self.wakeup_w])
            self.sock.close()
            self.user_modules.forget_if_edited()
            gc.enable()
            module = ENTRY_MODULES[request.entry]
            _set_title(module, request.argv)
            _take_environment(request, fds)
            sys.argv = [module, *request.argv]
            _reseed()
            importlib.import_module(module).main()  # a worker's ends with os._exit
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


class UserModules:
    """The user's modules the fork server imported (:class:`Preload`), and their files
    as they were then: a module edited since (a redeploy of new code) must be imported
    afresh, by the fork server and by any worker forked from it."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[str, int, int]] = {}  # module -> (path, mtime_ns, size)

    def load(self, request: Preload) -> str:
        """Import ``request.modules``; the first error, or ""."""
        self.forget_if_edited()
        os.environ.clear()
        os.environ.update(request.environ)
        sys.path[:] = request.sys_path
        with contextlib.suppress(OSError):
            os.chdir(request.cwd)
        before = set(sys.modules)
        error = ""
        sys.meta_path.insert(0, _REFUSE_FORK_UNSAFE)
        try:
            for name in request.modules:
                try:
                    importlib.import_module(name)
                except BaseException as exc:  # the replica imports it again and reports it
                    error = error or f"{name}: {type(exc).__name__}: {exc}"
        finally:
            sys.meta_path.remove(_REFUSE_FORK_UNSAFE)
        for name in set(sys.modules) - before:
            stamp = _file_stamp(sys.modules[name])
            if stamp is not None:
                self.files[name] = stamp
        gc.freeze()
        return error

    def forget_if_edited(self) -> None:
        """If any of these modules' files changed, drop them all from ``sys.modules`` (they
        may refer to each other): they are imported again when next needed."""
        if all(_stamp(path) == (path, mtime, size) for path, mtime, size in self.files.values()):
            return
        for name in self.files:
            sys.modules.pop(name, None)
        self.files.clear()
        importlib.invalidate_caches()


class _RefuseForkUnsafe(importlib.abc.MetaPathFinder):
    """Keeps packages that must not be imported before a fork out of the fork server:
    a module importing one fails to import here, and each worker imports it itself."""

    #: grpc: its core is not fork-safe once loaded unless GRPC_ENABLE_FORK_SUPPORT is set.
    PACKAGES = frozenset({"grpc"})

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in self.PACKAGES:
            raise ImportError(f"{name} is not imported before a fork", name=name)


_REFUSE_FORK_UNSAFE = _RefuseForkUnsafe()

#: Installed packages: never edited while shoal runs, not worth a stat per fork. And
#: shoal itself, installed or not (an editable install, a checkout): forgotten with the
#: user's modules, it would be imported a second time beside the copy the rest of shoal
#: holds, and its classes would no longer be themselves (``isinstance`` fails).
_NOT_USERS = tuple(
    {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)}
    | {os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "..")) + os.sep}
)


def _file_stamp(module: Any) -> tuple[str, int, int] | None:
    """The file of a user's module as it is now; None for any other module."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or os.path.realpath(path).startswith(_NOT_USERS):
        return None
    return _stamp(path)


def _stamp(path: str) -> tuple[str, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return path, info.st_mtime_ns, info.st_size


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _send(sock: socket.socket, message: Any) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(encode(message))


def _set_title(module: str, argv: list[str]) -> None:
    """The command line ``ps`` and ``pgrep -f`` show: that of the same worker started
    with ``python -m`` (not the fork server's)."""
    from setproctitle import setproctitle

    setproctitle(" ".join([sys.executable, "-m", module, *argv]))


def _take_environment(request: Spawn, fds: list[int]) -> None:
    """The runtime's environment, working directory and import path as ``python -m``
    started now would see them (the fork server's may date from minutes ago)."""
    old_cwd = sys.path[0] if sys.path else ""
    old_extra = _pythonpath(os.environ)
    os.environ.clear()
    os.environ.update(request.environ)
    if request.fd_env and fds:
        os.environ[request.fd_env] = str(fds[0])
    os.chdir(request.cwd)
    kept = [entry for entry in sys.path[1:] if entry not in old_extra and entry != old_cwd]
    sys.path[:] = [request.cwd, *_pythonpath(request.environ), *kept]


def _pythonpath(environ: Any) -> list[str]:
    value = environ.get("PYTHONPATH", "")
    return [os.path.abspath(entry) for entry in value.split(os.pathsep) if entry]


def _reseed() -> None:
    """Forked children would share numpy's global random state: give each its own, as a
    new process has (Python's ``random`` reseeds itself after a fork). Not imported yet
    (numpy imports it lazily), it seeds itself from the OS when a child first uses it:
    importing it here would cost every child its ~12 modules."""
    random = sys.modules.get("numpy.random")
    if random is not None:
        random.seed()


def main() -> None:
    """``python -m shoal._runtime.process.zygote FD``: a fork server started on its own."""
    _run(socket.socket(fileno=int(sys.argv[1])), sys.argv[1:])


def serve_forked(sock: socket.socket) -> None:
    """The fork server in a child of the process that forked it (see
    :func:`~.forks.start_early`: the CLI, single-threaded, right after its own imports,
    which its workers then share): it sheds what that process holds (descriptors but
    the standard ones and ``sock``, stdin, signal handlers, logging handlers), then
    runs as :func:`main` would. Never returns."""
    code = 0
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for handler in logging.root.handlers[:]:  # a worker configures its own
            logging.root.removeHandler(handler)
        _run(sock, [str(keep)])
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)  # never the atexit handlers of the process it was forked from


def _run(sock: socket.socket, title_args: list[str]) -> None:
    # The runtime coordinates Ctrl-C, and a SIGTERM to the whole group (systemd,
    # `timeout`, kill -- -PGID) stops shoal through its driver, which then closes this
    # process's socket: it exits then. Its workers take the default back (_become_worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.disable()  # no collection may touch (and so copy) the preloaded pages before fork
    preloaded = _preload()
    # setproctitle takes over the memory of argv and the environment on its first call:
    # now, while both are still those the kernel gave this process (Preload changes it).
    _set_title("shoal._runtime.process.zygote", title_args)
    gc.freeze()  # what is imported now stays shared with every child
    _send(sock, Ready(os.getpid(), preloaded))
    try:
        _Server(sock).serve()
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.ECONNRESET):
            raise


if __name__ == "__main__":
    main()
