"""The runtime's side of the fork server (:mod:`.zygote`): spawn workers by fork.

:class:`ForkServer` starts the fork server process and asks it for workers;
each comes back as a :class:`ForkedProcess`, which the runtime uses like a
``subprocess.Popen``. Faults: if the fork server does not get ready within
``ready_timeout_s``, does not answer a spawn within ``spawn_timeout_s``, or
dies, it is *broken*: :meth:`ForkServer.spawn` raises :class:`ForkServerUnavailable`
and the runtime starts its workers with ``python -m`` from then on (slower,
same behaviour). Workers forked before keep running; their ends are still
seen (through a pidfd each, with exit code -1 once nobody can tell it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from shoal._errors import ConfigError, ForkServerUnavailable
from shoal._runtime.process.zygote import (
    MAX_MESSAGE,
    Exited,
    Preload,
    Preloaded,
    Ready,
    Spawn,
    Spawned,
    SpawnFailed,
    decode,
    encode,
)

logger = logging.getLogger("shoal.runtime")

#: The environment variable that turns the fork server off ("0").
FORK_SERVER_ENV = "SHOAL_FORK_SERVER"


def fork_server_supported() -> bool:
    """Forking a pre-imported interpreter is safe here (Linux: pidfds, no fork caveats)."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open")


def exit_future(process: Any) -> asyncio.Future[int]:
    """A future resolved with the exit code once ``process`` (a child: ``Popen`` or
    :class:`~.adopt.AdoptedProcess`) ends and is reaped.

    Uses a pidfd watched by the event loop: no thread is parked per worker (a
    blocking ``wait()`` per worker in the default executor would exhaust it).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: one daemon thread per worker
        threading.Thread(target=lambda: _resolve(loop, future, process.wait()), daemon=True).start()
        return future

    def on_exit() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        _resolve(loop, future, process.wait())

    loop.add_reader(pidfd, on_exit)
    return future


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[int], code: int) -> None:
    def set_code() -> None:
        if not future.done():
            future.set_result(code)

    loop.call_soon_threadsafe(set_code)


def fork_server_wanted() -> bool:
    """``SHOAL_FORK_SERVER``: ``1`` (the default) or ``0`` (every worker starts with
    ``python -m``: to compare, or to rule the fork server out); ConfigError otherwise."""
    value = os.environ.get(FORK_SERVER_ENV, "1")
    if value not in ("0", "1"):
        raise ConfigError(f"{FORK_SERVER_ENV}={value!r}: use 1 (fork workers) or 0 (python -m)")
    return value == "1"


#: The fork server :func:`start_early` forked, until a runtime takes it: (pid, socket,
#: whether it was asked to import modules: the request :data:`EARLY_PRELOAD`).
_early: tuple[int, socket.socket, bool] | None = None
#: The request number of the modules :func:`start_early` has the fork server import
#: (a runtime's requests start at 1).
EARLY_PRELOAD = 0


def start_early(modules: list[str] | None = None) -> bool:
    """Fork this process into a fork server now, for the next :class:`ForkServer` to
    start (:meth:`ForkServer.start` takes it instead of starting ``python -m``); it
    imports ``modules`` (the user's: ``shoal run``'s target) as soon as it can fork.

    For the CLI (``shoal run``, ``shoal demo``), right after its own imports: the fork
    server then shares them (pydantic, shoal's configuration: about half of a worker's)
    and imports the rest while the CLI imports the user's code and starts the instance,
    so that even the proxy and the first replica are forked. Only from a process with
    no other thread (a child would inherit the locks they hold), and only if the fork
    server is wanted and supported here; False if none was forked. Its guarantees are
    :func:`~.zygote.serve_forked`'s; it exits when this process does, or when
    :func:`discard_early` closes its socket.
    """
    global _early
    try:
        wanted = fork_server_supported() and fork_server_wanted()
    except ConfigError:  # the runtime refuses it, naming the variable
        return False
    if _early is not None or not wanted or threading.active_count() > 1:
        return False
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()  # else the child's copy of the buffers is written a second time
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns (its coverage is not seen)
        ours.close()
        from shoal._runtime.process.zygote import serve_forked

        serve_forked(theirs)
    theirs.close()
    sent = False
    if modules:  # spawns wait for it as for a runtime's (ForkServer.start)
        preload = Preload(EARLY_PRELOAD, modules, list(sys.path), os.getcwd(), dict(os.environ))
        with contextlib.suppress(OSError):
            sent = ours.send(encode(preload)) > 0
    _early = (pid, ours, sent)
    return True


def discard_early() -> None:
    """End the fork server :func:`start_early` forked if no runtime took it (the instance
    did not start, or runs elsewhere: on Ray)."""
    global _early
    if _early is None:
        return
    pid, sock, _ = _early
    _early = None
    sock.close()  # it exits when its socket closes
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class _EarlyProcess:
    """What :class:`ForkServer` needs of a ``Popen`` for a fork server forked by
    :func:`start_early` (a child of this process: waited for by pid)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped already (by whom? not ours to say)
                self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class ForkedProcess:
    """A worker the fork server forked: what the runtime needs of a ``Popen``, by pid.

    Signals go through a pidfd, so they can never reach another process that
    later got the same pid.
    """

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.exited = exited
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # it ended already: its Exited message follows
            self._pidfd = None
        exited.add_done_callback(self._ended)

    def _ended(self, future: asyncio.Future[int]) -> None:
        self.returncode = -1 if future.cancelled() else future.result()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self._pidfd is not None and self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def watch_pidfd(self) -> None:
        """The fork server is gone and will not say when this process ends: watch it
        ourselves (its exit status went to init: -1)."""
        if self._pidfd is None or self.exited.done():
            return

        def gone() -> None:
            if not self.exited.done():
                self.exited.set_result(-1)

        asyncio.get_running_loop().add_reader(self._pidfd, gone)


class ForkServer:
    """One fork server process for one runtime, on the runtime's event loop."""

    def __init__(
        self, ready_timeout_s: float, spawn_timeout_s: float, preload_timeout_s: float
    ) -> None:
        """The time limits are :class:`~shoal._config.Timeouts`' ``fork_*`` ones."""
        self.ready_timeout_s = ready_timeout_s
        self.spawn_timeout_s = spawn_timeout_s
        self.preload_timeout_s = preload_timeout_s
        self.broken: str | None = None  # why it cannot be used, once it cannot
        #: It was forked by :func:`start_early` (ready about when the instance starts).
        self.early = False
        self._process: subprocess.Popen[bytes] | _EarlyProcess | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future[Ready] | None = None
        self._requests = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}  # request -> pid, or Preloaded
        self._preloading: set[asyncio.Future[Any]] = set()  # spawns wait for these
        self._children: dict[int, ForkedProcess] = {}
        self._early_exits: dict[int, int] = {}  # Exited before its Spawned was handled
        self._installed: set[str] = set()  # installed modules it was asked to preload
        self._waiting_to_send: set[asyncio.Future[None]] = set()  # for a full socket to drain

    @property
    def ready(self) -> bool:
        """It has imported everything and can fork (a spawn would not wait)."""
        ready = self._ready
        return (
            self.broken is None and ready is not None and ready.done()
            and not ready.cancelled() and ready.exception() is None
        )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def started(self) -> bool:
        return self._process is not None

    def start(self, early_only: bool = False) -> None:
        """Start the fork server process (once): the one :func:`start_early` forked if
        there is one, else ``python -m`` (not if ``early_only``). It imports in the
        background (:meth:`spawn` waits for it; :attr:`ready` says when it is done)."""
        global _early
        if self._process is not None or self.broken is not None:
            return
        loop = asyncio.get_running_loop()
        preloading = False
        if _early is not None:
            pid, ours, preloading = _early
            _early = None
            self._process, self.early = _EarlyProcess(pid), True
        elif early_only:
            return
        else:
            ours = self._popen()
        ours.setblocking(False)
        self._sock = ours
        self._ready = loop.create_future()
        self._ready.add_done_callback(_retrieve)
        loop.add_reader(ours.fileno(), self._on_readable)
        if preloading:
            self._wait_early_preload(loop)

    def _wait_early_preload(self, loop: asyncio.AbstractEventLoop) -> None:
        """Spawns wait for the modules :func:`start_early` asked for, as for those of
        :meth:`preload` (its time is not a spawn's), at most ``preload_timeout_s``."""
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_retrieve)
        future.add_done_callback(self._preloading.discard)
        future.add_done_callback(lambda _: self._pending.pop(EARLY_PRELOAD, None))
        self._pending[EARLY_PRELOAD] = future
        self._preloading.add(future)

        limit_s = self.ready_timeout_s + self.preload_timeout_s

        def late() -> None:
            if not future.done():
                self._break(f"it did not get ready and import the target within {limit_s:g} s")

        timer = loop.call_later(limit_s, late)
        future.add_done_callback(lambda _: timer.cancel())

    def _popen(self) -> socket.socket:
        """Start ``python -m`` the fork server; this side's socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "shoal._runtime.process.zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                close_fds=True,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        return ours

    async def preload(
        self, modules: list[str], sys_path: list[str], cwd: str, installed: Sequence[str] = ()
    ) -> None:
        """Have the fork server import a deployment's ``modules`` (with its ``sys_path``
        and ``cwd``) before it forks its replicas: they then share them instead of each
        importing them; and the ``installed`` modules its replicas imported as they started
        (``learned.py``). Those are never edited: each is sent once, which keeps the
        messages small (sent with every preload, the ~1,200 of scikit-learn filled the
        socket during a redeploy of examples/demo.yaml). Imports that
        fail are left to the replica (it reports them); ForkServerUnavailable if the fork
        server cannot fork any more."""
        await self._wait_ready()
        fresh = [name for name in installed if name not in self._installed]
        self._installed.update(fresh)
        environ = dict(os.environ)
        message = Preload(next(self._requests), [*modules, *fresh], sys_path, cwd, environ)
        future = self._expect(message.request)
        self._preloading.add(future)  # before sending: a spawn meanwhile waits for it
        try:
            await self._send(message, [], self.preload_timeout_s)
            preloaded = await self._reply(future, self.preload_timeout_s, "an import")
        finally:
            self._preloading.discard(future)
        assert isinstance(preloaded, Preloaded)
        if preloaded.error:
            logger.debug("the fork server could not import %s: %s", modules, preloaded.error)

    async def spawn(self, entry: str, argv: list[str], listen_fd: int | None = None,
                    fd_env: str = "") -> ForkedProcess:  # fmt: skip
        """Fork a worker running ``entry``'s main with ``argv``; ForkServerUnavailable if the
        fork server cannot (the caller starts it another way)."""
        await self._wait_ready()
        if self._preloading:  # a deployment's imports come first: they may take a while
            await asyncio.wait(set(self._preloading))
        message = Spawn(next(self._requests), entry, argv, dict(os.environ), os.getcwd(), fd_env)
        future = self._expect(message.request)
        fds = [listen_fd] if listen_fd is not None else []
        await self._send(message, fds, self.spawn_timeout_s)
        pid = await self._reply(future, self.spawn_timeout_s, "a spawn request")
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        child = self._children[pid] = ForkedProcess(pid, exited)
        if pid in self._early_exits:
            exited.set_result(self._early_exits.pop(pid))
        return child

    async def _wait_ready(self) -> None:
        if self.broken is not None or self._sock is None or self._ready is None:
            raise ForkServerUnavailable(self.broken or "the fork server was not started")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.ready_timeout_s)
        except TimeoutError:
            self._break(f"it did not get ready within {self.ready_timeout_s:g} s")
        except Exception as exc:
            self._break(f"it failed to start: {exc}")
        if self.broken is not None:
            raise ForkServerUnavailable(self.broken)

    def _expect(self, request: int) -> asyncio.Future[Any]:
        """The future of request ``request``'s reply (ForkServerUnavailable if it breaks)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._pending[request] = future
        return future

    async def _send(self, message: Spawn | Preload, fds: list[int], timeout_s: float) -> None:
        """Send ``message`` (whole: the socket keeps message boundaries). A full socket
        means the fork server is busy (importing a deployment's modules while the runtime
        asks for more): wait until it reads, at most ``timeout_s``. A socket closed,
        failing, or still full then breaks it, and every reply's future says so."""
        loop = asyncio.get_running_loop()
        data, deadline = encode(message), loop.time() + timeout_s
        while self._sock is not None and self.broken is None:
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:
                if not await self._writable(self._sock, deadline - loop.time()):
                    self._break(f"its socket stayed full for {timeout_s:g} s")
            except OSError as exc:  # closed, or a message larger than the socket holds
                self._break(f"its socket failed: {exc!r}")
        self._break(self.broken or "its socket is closed")  # fails the reply's future too

    async def _writable(self, sock: socket.socket, timeout_s: float) -> bool:
        """Whether ``sock`` can take a message within ``timeout_s``; True at once if it
        closes meanwhile (the fork server broke or was stopped: the caller sees it).
        The loop has one writer callback per socket: it wakes every sender that waits."""
        loop = asyncio.get_running_loop()
        writable: asyncio.Future[None] = loop.create_future()
        if not self._waiting_to_send:
            loop.add_writer(sock.fileno(), self._wake_senders)
        self._waiting_to_send.add(writable)
        try:
            await asyncio.wait_for(writable, max(0.0, timeout_s))
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting_to_send.discard(writable)
            if not self._waiting_to_send and self._sock is sock:  # else _close_socket did
                loop.remove_writer(sock.fileno())

    def _wake_senders(self) -> None:
        for sender in self._waiting_to_send:
            _set_once(sender)

    async def _reply(self, future: asyncio.Future[Any], timeout_s: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            self._break(f"it did not answer {what} within {timeout_s:g} s")
            raise ForkServerUnavailable(self.broken) from None
        finally:
            for request, pending in list(self._pending.items()):
                if pending is future:
                    del self._pending[request]

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as exc:
                data = b""
                logger.debug("fork server socket: %r", exc)
            if not data:
                self._break("it exited")
                return
            try:
                self._handle(decode(data))
            except (ValueError, TypeError) as exc:
                self._break(f"it sent a bad message: {exc}")
                return

    def _handle(self, message: Any) -> None:
        match message:
            case Ready():
                assert self._ready is not None
                if not self._ready.done():
                    self._ready.set_result(message)
            case Preloaded(request=request, unsafe=unsafe):
                waiter = self._pending.get(request)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
                if unsafe:  # forking a process with threads could deadlock its children
                    self._break(unsafe)
            case Spawned(request=request, pid=pid):
                waiter = self._pending.get(request)
                if waiter is not None and not waiter.done():
                    waiter.set_result(pid)
                else:  # the caller gave up: nobody will use this worker
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            case SpawnFailed(request=request, error=error):
                waiter = self._pending.get(request)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(ForkServerUnavailable(error))
            case Exited(pid=pid, code=code):
                child = self._children.pop(pid, None)
                if child is None:
                    self._early_exits[pid] = code
                elif not child.exited.done():
                    child.exited.set_result(code)

    def _break(self, why: str) -> None:
        if self.broken is None:
            self.broken = why
            logger.warning("the fork server is not usable (%s): workers start with python -m", why)
        self._close_socket()
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(ForkServerUnavailable(why))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ForkServerUnavailable(why))
        for child in self._children.values():
            child.watch_pidfd()
        self._children.clear()

    def _close_socket(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._sock.fileno())
                loop.remove_writer(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._wake_senders()  # a sender waiting for room sees it closed (it stops trying)

    async def stop(self, timeout_s: float) -> None:
        """Close the fork server (it exits when its socket closes); kill it after
        ``timeout_s``. The workers it forked are the runtime's to stop."""
        self.broken = self.broken or "it was stopped"
        self._close_socket()
        for child in self._children.values():
            child.watch_pidfd()
        if self._process is None:
            return
        exited = exit_future(self._process)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout_s)
        except TimeoutError:
            self._process.kill()
            await exited


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
