"""Refusing what cannot be pickled when a deployment is bound, with Ray Serve's wording.

Replicas receive their class (or function) and constructor arguments pickled, so
Ray Serve pickles them in ``.bind()`` and raises ``TypeError("Could not serialize
the deployment ...")`` there; shoal does the same on both runtimes, so a unit test
in local testing mode fails where production would. The message names the
variables that cannot be pickled (a lock held as a class attribute or captured
from the enclosing scope, a client, an open file...).
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from shoal._errors import SerializationError


class _Sink:
    """A file that discards what is written: checking costs no copy of the data."""

    def write(self, data: Any) -> int:
        return len(data)


def _dump(obj: Any) -> None:
    import cloudpickle

    # Large buffers (numpy arrays) go out-of-band to a callback that drops them.
    pickler = cloudpickle.CloudPickler(_Sink(), protocol=5, buffer_callback=lambda _b: None)
    pickler.dump(obj)


def check_picklable(obj: Any, what: str, parts: dict[str, Any]) -> None:
    """Raise SerializationError (a TypeError) if ``obj`` cannot be pickled.

    ``what`` starts the message ("the deployment <class 'X'>"); ``parts`` are
    named pieces of ``obj`` to blame, by default its class attributes or the
    variables its functions use.
    """
    try:
        _dump(obj)
    except Exception as exc:
        culprits = _culprits(parts or _references(obj))
        lines = [f"  {name} ({_kind(value)}) was found to be non-serializable: {error}"
                 for name, value, error in culprits]  # fmt: skip
        if not lines:
            lines = [f"  {what} was found to be non-serializable: {exc}"]
        raise SerializationError(
            f"Could not serialize {what}:\n" + "\n".join(lines) + "\nCreate such objects in "
            "the constructor (each replica then makes its own) or pass plain data instead."
        ) from exc


def _culprits(parts: dict[str, Any]) -> list[tuple[str, Any, str]]:
    found = []
    for name, value in parts.items():
        try:
            _dump(value)
        except Exception as exc:
            found.append((name, value, f"{type(exc).__name__}: {exc}"))
    return found


def _references(obj: Any) -> dict[str, Any]:
    """The variables a class or function carries along when pickled by value."""
    if inspect.isclass(obj):
        refs: dict[str, Any] = {}
        for attr, value in vars(obj).items():
            if attr.startswith("__") and attr.endswith("__"):
                continue
            function = getattr(value, "__func__", value)
            if isinstance(function, types.FunctionType):
                refs.update(_function_references(function, f"{obj.__name__}.{attr}"))
            else:
                refs[f"'{attr}'"] = value
        return refs
    if isinstance(obj, types.FunctionType):
        return _function_references(obj, obj.__name__)
    return {}


def _function_references(function: types.FunctionType, where: str) -> dict[str, Any]:
    code = function.__code__
    refs = {
        f"'{name}' used by {where}": function.__globals__[name]
        for name in code.co_names
        if name in function.__globals__
        and not isinstance(function.__globals__[name], types.ModuleType)
    }
    for name, cell in zip(code.co_freevars, function.__closure__ or (), strict=False):
        try:
            refs[f"'{name}' used by {where}"] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return refs


def _kind(value: Any) -> str:
    return f"a {type(value).__module__}.{type(value).__qualname__}"
