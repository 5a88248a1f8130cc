"""The options of ``@serve.batch``: Ray Serve's names, defaults and validation.

Every invalid option raises :class:`ConfigError` naming it and its value. Where
Ray Serve raises ``TypeError`` (a value of the wrong type, an unknown option, a
handler that is not ``async def``) the error is also a ``TypeError``; where it
raises ``ValueError`` (a value out of range) it is one, as every ConfigError is.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal._errors import ConfigError, ConfigTypeError

NAMES = (
    "max_batch_size",
    "batch_wait_timeout_s",
    "max_concurrent_batches",
    "batch_size_fn",
    "target_latency_s",
)


def check_known(unknown: dict[str, Any]) -> None:
    """Refuse options ``@serve.batch`` does not have, suggesting the close ones."""
    for name in unknown:
        matches = difflib.get_close_matches(name, NAMES, n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(map(repr, matches))}?)" if matches else ""
        raise ConfigTypeError(
            f"unknown option {name!r} for @serve.batch{hint}; valid options: {', '.join(NAMES)}"
        )


def check_max_batch_size(value: Any) -> int:
    """An integer >= 1; a whole float (``4.0``) is taken as that integer, as in Ray Serve."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    message = f"@serve.batch: max_batch_size must be an integer >= 1, got max_batch_size={value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(message)
    if value < 1:
        raise ConfigError(message)
    return value


def check_wait(value: Any) -> float:
    """A number of seconds >= 0; ``inf`` (as in Ray Serve) waits until the batch is full."""
    message = (
        f"@serve.batch: batch_wait_timeout_s must be a float >= 0, "
        f"got batch_wait_timeout_s={value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(message)
    if math.isnan(value):
        raise ConfigError(f"{message}: it must be a number")
    if value < 0:
        raise ConfigError(message)
    return float(value)


def _check_concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigTypeError(
            f"@serve.batch: max_concurrent_batches must be an integer >= 1, "
            f"got max_concurrent_batches={value!r}"
        )
    return value


def _check_target(value: Any) -> float | None:
    if value is None:
        return None
    message = (
        f"@serve.batch: target_latency_s must be a number of seconds > 0 or None, "
        f"got target_latency_s={value!r}"
    )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigTypeError(message)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(message)
    return float(value)


@dataclass
class Options:
    """Validated ``@serve.batch`` options (``validate`` returns a checked copy)."""

    max_batch_size: int = 10
    batch_wait_timeout_s: float = 0.01
    max_concurrent_batches: int = 1
    batch_size_fn: Callable[[list[Any]], int] | None = None
    target_latency_s: float | None = None

    def validate(self) -> Options:
        batch_size_fn = self.batch_size_fn
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ConfigTypeError(
                f"@serve.batch: batch_size_fn must be a callable or None, "
                f"got batch_size_fn={batch_size_fn!r}: pass a function from a list of items "
                "to their total size"
            )
        return Options(
            check_max_batch_size(self.max_batch_size),
            check_wait(self.batch_wait_timeout_s),
            _check_concurrency(self.max_concurrent_batches),
            batch_size_fn,
            _check_target(self.target_latency_s),
        )
