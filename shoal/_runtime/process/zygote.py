"""The fork server: a process that has imported what workers need and forks them.

``python -m shoal._runtime.process.zygote FD``

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

#: The module each kind of worker runs as ``python -m`` (its main is the same).
ENTRY_MODULES = {
    "replica": "shoal._runtime.process.worker",
    "proxy": "shoal._runtime.process.proxy_worker",
}

#: Imported before the first fork: what every worker, replica or proxy, imports.
PRELOAD = (
    "shoal._runtime.process.worker",
    "shoal._replica.replica",
    "shoal._replica.server",
    "numpy",
    "starlette.applications",
    "fastapi",
    "setproctitle",
)


#: Extra modules the fork server imports before forking (comma-separated): what
#: deployments import inside ``__init__`` (``shoal demo`` names scikit-learn, which five
#: of its replicas imported one by one: ~3 s of its start on 2 cores).
PRELOAD_ENV = "SHOAL_FORK_PRELOAD"


def _preload() -> list[str]:
    loaded = []
    extra = [name.strip() for name in os.environ.get(PRELOAD_ENV, "").split(",") if name.strip()]
    for name in (*PRELOAD, *extra):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional module missing: the worker imports what it uses
            continue
        loaded.append(name)
    from shoal._proxy.proxy import preload as preload_proxy

    preload_proxy()  # uvicorn and the protocol classes it loads lazily
    return loaded


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

    def serve(self) -> None:
        """Answer requests until the socket closes; reap the children meanwhile."""
        while True:
            for key, _ in self.selector.select():
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

    def _handle(self, data: bytes, fds: list[int]) -> None:
        try:
            request = decode(data)
        except (ValueError, TypeError) as exc:
            request = exc
        match request:
            case Spawn() if self.unsafe:
                _close(fds)
                _send(self.sock, SpawnFailed(request.request, self.unsafe))
            case Spawn():
                self._spawn(request, fds)
            case Preload():
                _close(fds)
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
            from shoal._runtime.process.worker import main  # a proxy's imports are preloaded

            main()  # ends with os._exit
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

#: Installed packages: never edited while shoal runs, not worth a stat per fork.
_INSTALLED = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix)})


def _file_stamp(module: Any) -> tuple[str, int, int] | None:
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or os.path.realpath(path).startswith(_INSTALLED):
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
    new process has (Python's ``random`` reseeds itself after a fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runtime coordinates Ctrl-C
    gc.disable()  # no collection may touch (and so copy) the preloaded pages before fork
    preloaded = _preload()
    # setproctitle takes over the memory of argv and the environment on its first call:
    # now, while both are still those the kernel gave this process (Preload changes it).
    _set_title("shoal._runtime.process.zygote", sys.argv[1:])
    gc.freeze()  # what is imported now stays shared with every child
    _send(sock, Ready(os.getpid(), preloaded))
    try:
        _Server(sock).serve()
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.ECONNRESET):
            raise


if __name__ == "__main__":
    main()
