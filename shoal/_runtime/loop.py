"""The driver's background event loop, on which the controller and the driver's routers run."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from shoal._errors import RequestTimeoutError

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where available (it roughly halves per-message overhead), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop running in a daemon thread, with a bounded way to run coroutines on it."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it (at most ``timeout_s``)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run() called from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeoutError(f"operation did not finish within {timeout_s} s") from None

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; its future (not waited for here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel leftover tasks, stop the loop and join the thread."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=timeout_s) if tasks else None

        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):  # best effort: we are stopping anyway
            self.run(cancel_all(), timeout_s + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()


class StopRequest:
    """A stop asked for by a signal handler (``from_signal``) or by another thread (``set``).

    A handler must not call ``threading.Event.set``: it runs in the main thread between
    two bytecodes, possibly inside that event's ``wait`` while it holds the event's lock,
    which is not reentrant, and the process would hang for good. ``from_signal`` only
    sets a flag, which :func:`wait_responsive` reads within its tick.
    """

    __slots__ = ("_event", "_signalled")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signalled = False

    def from_signal(self) -> None:
        self._signalled = True

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._signalled or self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Whether a stop was asked for within ``timeout_s`` (a signal's seen at its end)."""
        return self._event.wait(timeout_s) or self._signalled


def wait_responsive(stop: StopRequest | None = None, tick_s: float = 0.25) -> None:
    """Block the main thread until ``stop`` is asked for (forever without one), running
    signal handlers within ``tick_s`` of a signal.

    A bare ``Event.wait()`` can miss Ctrl-C for good: the kernel may deliver SIGINT to
    another thread (the loop thread, a log flusher), and then nothing wakes the main
    thread's lock wait, the only place Python runs its handlers. Waking every ``tick_s``
    lets it run them (KeyboardInterrupt is raised from here).
    """
    waited = stop if stop is not None else StopRequest()
    while not waited.wait(tick_s):
        pass
