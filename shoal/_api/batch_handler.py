"""The user's ``@serve.batch`` handler: its signature, its per-batch arguments, its results.

Arguments follow Ray Serve: each caller's arguments are checked against the
handler's signature when it calls (``TypeError`` if they do not fit), and the
handler receives one list per argument, element *i* from caller *i*:

- a named parameter that some caller in the batch passed gets a list; a caller
  that left it out (it has a default) gets the default in its slot;
- a named parameter no caller in the batch passed is not passed: the
  handler's own default applies, as in Ray Serve;
- ``*args`` receives one list per extra positional argument and ``**kwargs``
  one list per extra keyword; every call in a batch must pass the same number
  of extra positional arguments and the same extra keywords (else each of them
  gets a ``TypeError``).

Results: a list (or another sized sequence) with one result per request.
Anything without a length, a ``str``, ``bytes`` or ``dict`` is refused with
:class:`BatchResultTypeError` (a ``TypeError``, as Ray Serve's); a wrong
length with :class:`BatchSizeMismatchError` (a ``RayServeException``), both
with Ray Serve's message first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sized
from typing import Any

from shoal._api.batch_options import Options
from shoal._errors import BatchResultTypeError, BatchSizeMismatchError, ConfigTypeError

_NAMES = ("__module__", "__name__", "__qualname__", "__doc__")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def take_names(target: Any, fn: Callable[..., Any]) -> None:
    # Names and docs only; a __wrapped__ would make inspect report the handler's signature.
    for name in _NAMES:
        setattr(target, name, getattr(fn, name, None))


def _defined_in_class(fn: Callable[..., Any]) -> bool:
    # A function written in a class body has "Class.name" (or "f.<locals>.Class.name") as
    # its qualified name; a free function has "name" or "f.<locals>.name".
    parts = fn.__qualname__.split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


class Handler:
    """The user's batch function and how to call it with one list per argument."""

    def __init__(self, fn: Callable[..., Any], options: Options) -> None:
        self.name = getattr(fn, "__qualname__", repr(fn))
        if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise ConfigTypeError(
                f"Functions decorated with @serve.batch must be 'async def'; {self.name} is "
                "not. Make it `async def` (run blocking work with `await asyncio.to_thread(...)`)"
            )
        self.fn = fn
        self.options = options
        self.streaming = inspect.isasyncgenfunction(fn)
        self.is_method = _defined_in_class(fn)
        params = list(inspect.signature(fn).parameters.values())
        self.params = params[1:] if self.is_method else params
        self.signature = inspect.Signature(self.params)
        # The common case, positional arguments for named positional parameters only, is
        # bound without inspect (a dict built from the names).
        simple = all(p.kind in _POSITIONAL for p in self.params)
        self._simple = [p.name for p in self.params] if simple else None

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """One caller's arguments by parameter name (no defaults); TypeError if they do not fit."""
        if not kwargs and self._simple is not None and len(args) == len(self._simple):
            return dict(zip(self._simple, args, strict=True))
        try:
            return self.signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise TypeError(f"{self.name}() {exc}") from None

    def first(self, arguments: dict[str, Any]) -> Any:
        """The value ``batch_size_fn`` measures: the caller's first argument (None if none)."""
        if not self.params:
            return None
        param = self.params[0]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            extra = arguments.get(param.name, ())
            return extra[0] if extra else None
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return next(iter(arguments.get(param.name, {}).values()), None)
        return arguments.get(param.name, param.default)

    def call(self, owner: Any, calls: list[dict[str, Any]]) -> Any:
        """Call the handler for a batch (``calls``: each caller's bound arguments, in order)."""
        args, kwargs = self._columns(calls)
        if owner is None:  # a free function: no ``self`` to pass
            return self.fn(*args, **kwargs)
        return self.fn(owner, *args, **kwargs)

    def _columns(self, calls: list[dict[str, Any]]) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        gap = False  # a positional parameter nobody passed: later ones go by keyword
        for param in self.params:
            name, kind = param.name, param.kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                args.extend(self._extra_positional(name, calls))
            elif kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(self._extra_keywords(name, calls))
            elif not any(name in call for call in calls):
                gap = gap or kind in _POSITIONAL  # the handler's default applies
            else:
                column = [call.get(name, param.default) for call in calls]
                if kind in _POSITIONAL and not gap:
                    args.append(column)
                else:  # keyword-only, or after a gap (then it is positional-or-keyword)
                    kwargs[name] = column
        return args, kwargs

    def _extra_positional(self, name: str, calls: list[dict[str, Any]]) -> list[list[Any]]:
        extras = [call.get(name, ()) for call in calls]
        counts = sorted({len(extra) for extra in extras})
        if len(counts) > 1:
            raise TypeError(
                f"@serve.batch handler {self.name} takes *{name}: every call in a batch must "
                f"pass the same number of extra positional arguments (this batch: {counts})"
            )
        return [[extra[i] for extra in extras] for i in range(counts[0])]

    def _extra_keywords(self, name: str, calls: list[dict[str, Any]]) -> dict[str, list[Any]]:
        extras: list[dict[str, Any]] = [call.get(name, {}) for call in calls]
        keys = list(extras[0])
        if any(extra.keys() != extras[0].keys() for extra in extras):
            names = sorted({key for extra in extras for key in extra})
            raise TypeError(
                f"@serve.batch handler {self.name} takes **{name}: every call in a batch must "
                f"pass the same extra keywords (this batch mixes {names})"
            )
        return {key: [extra[key] for extra in extras] for key in keys}


def as_list(output: Any, n: int, name: str) -> list[Any]:
    """The handler's results for a batch of ``n``, checked as Ray Serve checks them."""
    if isinstance(output, list):
        results = output
    elif not isinstance(output, Sized):
        raise BatchResultTypeError(
            f"object of type '{type(output).__name__}' has no len(): "  # Ray Serve's text
            f"batch handler {name} must return a list with one result per request "
            f"({n} in this batch), in request order"
        )
    elif isinstance(output, str | bytes | dict):  # sized, but surely not one result per request
        raise BatchResultTypeError(
            f"batch handler {name} returned a {type(output).__name__}, not a list: return a "
            f"list with one result per request ({n} in this batch), in request order"
        )
    else:  # a tuple, an array...: Ray Serve takes any sized sequence
        results = list(output)  # type: ignore[call-overload]
    if len(results) != n:
        raise BatchSizeMismatchError(
            "Batched function doesn't preserve batch size. "  # Ray Serve's text
            f"The input list has length {n} but the returned list has length {len(results)}: "
            f"batch handler {name} returned {len(results)} results for a batch of {n} "
            "requests; return exactly one result per request, in request order"
        )
    return results
