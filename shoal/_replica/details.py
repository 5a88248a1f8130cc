"""A replica's own details for status: the user's ``status_details()`` and its batchers.

The controller receives them in the reply to every periodic health check (no extra
round trip); ``serve.status()``, ``shoal status`` and the admin REST API show the
latest ones per replica (docs/status-details.md).

Guarantees:

- a deployment class that defines ``status_details(self)`` (sync or async) returning a
  dict reports that dict, converted to plain JSON values (``shoal._json``; NaN and
  infinities become null), at most :data:`MAX_DETAILS_BYTES` of JSON;
- a replica whose deployment uses ``@serve.batch`` also reports each batcher
  (``batching``: counters, recent size and wait percentiles, the latency plan);
  a ``batching`` key of the user's own replaces it;
- the hook can never fail or delay a health check by more than its timeout
  (:func:`hook_timeout_s`): if it raises, returns something else, or does not return in
  time, the details say so in ``status_details_error`` and the check passes. A hook
  still running from an earlier check is not called again until it returns (a hung sync
  hook holds one thread, never more).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal._api.batch_metrics import describe
from shoal._api.batching import batchers_of
from shoal._api.multiplex import models_of
from shoal._config import TIMEOUTS
from shoal._json import to_jsonable

#: The method a deployment class defines to report its own details.
HOOK = "status_details"
#: The key under which errors of the hook are reported.
ERROR_KEY = "status_details_error"
#: The largest JSON a replica's details may take (beyond: an error is reported instead).
MAX_DETAILS_BYTES = 16_384
#: The hook's share of the health check's timeout (its longest: TIMEOUTS.status_hook_s).
_HOOK_SHARE = 0.25


def hook_timeout_s(health_check_timeout_s: float) -> float:
    """How long ``status_details()`` may run: 1 s, or a quarter of the health check's
    timeout when that is shorter, so a slow hook never fails a health check."""
    return min(TIMEOUTS.status_hook_s, _HOOK_SHARE * health_check_timeout_s)


class DetailsReporter:
    """Collects one replica's details; owns the hook's call still running, if any."""

    def __init__(self, call_user: Callable[[Callable[..., Any]], Awaitable[Any]]) -> None:
        self._call_user = call_user
        self._running: asyncio.Future[Any] | None = None
        self._started = 0.0

    async def collect(self, instance: Any, timeout_s: float) -> dict[str, Any] | None:
        """The replica's details now; None when it has neither the hook nor a batcher."""
        details: dict[str, Any] = {}
        hook = getattr(instance, HOOK, None)
        if callable(hook):
            try:
                details = await self._run_hook(hook, timeout_s)
            except Exception as exc:
                details = {ERROR_KEY: str(exc)}
        batchers = batchers_of(instance)
        if batchers and "batching" not in details:
            details["batching"] = {name: describe(stats) for name, stats in batchers.items()}
        models = models_of(instance)
        if models and "multiplexed" not in details:
            details["multiplexed"] = models
        return details or None

    def close(self) -> None:
        """Cancel a hook call still running (the replica is stopping)."""
        if self._running is not None:
            self._running.cancel()
            self._running = None

    async def _run_hook(self, hook: Callable[..., Any], timeout_s: float) -> dict[str, Any]:
        running = self._running
        if running is not None and not running.done():
            raise TimeoutError(
                f"{HOOK}() has not returned for {time.monotonic() - self._started:.1f} s; "
                "it is not called again until it does"
            )
        self._started = time.monotonic()
        running = self._running = asyncio.ensure_future(self._call_user(hook))
        done, _ = await asyncio.wait({running}, timeout=timeout_s)
        if not done:  # left running (a thread cannot be stopped); never more than one
            raise TimeoutError(f"{HOOK}() did not return within {timeout_s:g} s")
        self._running = None
        try:
            value = running.result()
        except Exception as exc:
            first_line = (str(exc).splitlines() or [""])[0][:300]
            raise RuntimeError(f"{HOOK}() raised {type(exc).__name__}: {first_line}") from None
        return _plain(value)


def _plain(value: Any) -> dict[str, Any]:
    """The hook's dict as plain JSON values, checked for type and size."""
    if not isinstance(value, dict):
        raise TypeError(f"{HOOK}() must return a dict of JSON values, got {type(value).__name__}")
    try:
        encoded = json.dumps(to_jsonable(value, nan_as_null=True), separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{HOOK}() returned a value that is not JSON: {exc}") from None
    if len(encoded) > MAX_DETAILS_BYTES:
        raise ValueError(
            f"{HOOK}() returned {len(encoded)} bytes of JSON, more than {MAX_DETAILS_BYTES}: "
            "report summaries, not raw data"
        )
    plain: dict[str, Any] = json.loads(encoded)
    return plain
