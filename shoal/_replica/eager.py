"""Running a request's coroutine at once, with a task only if it has to wait.

On Python 3.12 and later, :func:`start` makes an *eager* task (``eager_start=True``,
asyncio's own mechanism): the coroutine's first step runs right away, inside that task
(``asyncio.current_task()``, ``asyncio.timeout``, ``TaskGroup`` and anyio work from the
first line), and a call that finishes without waiting costs no loop turn. On Python
3.11, which has no eager tasks, it is ``create_task``: the first step runs on the loop's
next turn. Either way the coroutine runs in ``context``, cancelling the task cancels it,
and the task is returned only while it runs (None once it has finished).

Why not eager on 3.11 too: it can be done by starting a task's first step before the
task is initialised, which reaches into the C task's internals. It was built and
measured (bench, W1 at c=64, 4 interleaved rounds): no gain beyond the noise, so the
internals stay untouched.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any

#: Whether asyncio has eager tasks (Python 3.12+).
EAGER = sys.version_info >= (3, 12)
#: The name of a request's task on 3.11: given, because the default one ("Task-<n>") is
#: formatted for every task there (~1,400 instructions; 3.12 makes it only when asked).
TASK_NAME = "shoal-request"


def start(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], context: contextvars.Context
) -> asyncio.Task[Any] | None:
    """Run ``coro`` in a task of ``loop`` in ``context``, its first step at once where
    asyncio can (see the module); returns the task, or None if it already finished.
    For a loop without a task factory (as ``loop.create_task`` would make it)."""
    if not EAGER:
        return asyncio.Task(coro, loop=loop, context=context, name=TASK_NAME)
    task: asyncio.Task[Any] = asyncio.Task(  # type: ignore[call-arg]
        coro, loop=loop, context=context, eager_start=True
    )
    return None if task.done() else task
