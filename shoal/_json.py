"""The one JSON encoder: return values over HTTP, streamed JSON lines, built-in routes.

Guarantees (the table in docs/http.md, "What a return value becomes"):
- the output is strict JSON (RFC 8259): NaN and infinities are refused, never written;
- besides what ``json`` writes itself, it converts numpy arrays and scalars, array-likes
  with ``dtype`` and ``tolist()`` (torch tensors), pydantic models, dataclasses, enums,
  datetimes, UUIDs, decimals and sets, at any depth;
- anything else raises ``TypeError`` (a non-finite number ``ValueError``) whose message
  names the type, where it is (``$.result.model``, also its ``json_path`` attribute)
  and what to return instead; an object's ``__dict__`` is never sent.

Plain values take the stdlib's C encoder directly; the conversion walk runs only
when that fails.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import json
import math
import sys
import uuid
from collections.abc import Mapping
from typing import Any

# One encoder for every call: json.dumps() with options builds a new one each time.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_PLAIN = (str, int, bool, type(None))  # never converted (float: checked for finiteness)
_KEY = (str, int, float, bool, type(None))  # keys json writes as strings: 1 -> "1"
_GUIDE = 'docs/http.md, "What a return value becomes"'


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON; raises TypeError/ValueError saying what to fix."""
    try:
        return _ENCODER.encode(value).encode()
    except (TypeError, ValueError):
        pass  # not plain JSON: convert below (this also locates the offending field)
    return _ENCODER.encode(to_jsonable(value)).encode()


def to_jsonable(value: Any, *, nan_as_null: bool = False) -> Any:
    """``value`` converted to what ``json`` writes (dict, list, str, int, finite float, ...).

    With ``nan_as_null``, NaN and infinities become None instead of being refused
    (MLflow's scoring convention).
    """
    try:
        return _convert(value, _Walk(nan_as_null))
    except _Refused as refused:
        raise refused.error() from None


class _Walk:
    """The state of one conversion."""

    __slots__ = ("active", "nan_as_null")

    def __init__(self, nan_as_null: bool) -> None:
        self.active: set[int] = set()  # the containers being walked: a cycle is refused
        self.nan_as_null = nan_as_null


class _Refused(Exception):
    """A value that cannot be sent; each level of the walk adds its key on the way up."""

    def __init__(self, problem: str, hint: str, kind: type[Exception]) -> None:
        self.problem, self.hint, self.kind = problem, hint, kind
        self.path: list[tuple[bool, Any]] = []  # (is an index, key), innermost first

    def error(self) -> Exception:
        where = "$" + "".join(_segment(*step) for step in reversed(self.path))
        text = f"the value at {where} cannot be sent as JSON: {self.problem}. {self.hint}"
        error = self.kind(text)
        error.json_path = where  # type: ignore[attr-defined]  # marks it as a refusal
        return error


def _segment(index: bool, key: Any) -> str:
    if index:
        return f"[{key}]"
    text = str(key)
    return f".{text}" if text.isidentifier() else f"[{json.dumps(text, ensure_ascii=False)}]"


def _convert(value: Any, walk: _Walk) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            if walk.nan_as_null:
                return None
            raise _Refused(f"it is {float(value)!r}", _NON_FINITE, ValueError)
        return float(value)
    if isinstance(value, dict | list | tuple):
        if id(value) in walk.active:
            raise _Refused("it contains itself", "Return a tree of values.", ValueError)
        walk.active.add(id(value))
        try:
            if isinstance(value, dict):
                return {_key(key): _item(item, False, key, walk) for key, item in value.items()}
            return [_item(item, True, index, walk) for index, item in enumerate(value)]
        finally:
            walk.active.discard(id(value))
    if hasattr(value, "dtype") and callable(getattr(value, "tolist", None)):
        numbers = _numeric_numpy(value, walk.nan_as_null)
        if numbers is not None:
            return numbers  # only ints, bools, finite floats (and None): no walk needed
        return _convert(value.tolist(), walk)  # tensors, object arrays...
    if walk.nan_as_null and isinstance(value, decimal.Decimal) and not value.is_finite():
        return None
    return _convert(_known(value), walk)


def _item(value: Any, index: bool, key: Any, walk: _Walk) -> Any:
    if type(value) in _PLAIN:  # most items: no call
        return value
    try:
        return _convert(value, walk)
    except _Refused as refused:
        refused.path.append((index, key))
        raise


def _key(key: Any) -> Any:
    """A dict key json accepts (it writes 1 as "1"); numpy scalars and enums by their value."""
    if type(key) is str:
        return key
    if isinstance(key, enum.Enum):
        key = key.value
    elif hasattr(key, "dtype") and callable(getattr(key, "item", None)):
        key = key.item()
    if not isinstance(key, _KEY):
        raise _Refused(f"it has a key of type {_type_name(key)}", _KEYS, TypeError)
    if isinstance(key, float) and not math.isfinite(key):
        raise _Refused(f"it has the key {key!r}", _NON_FINITE, ValueError)
    return key


def _known(value: Any) -> Any:
    """One conversion step for the other types of the table; refuses anything else."""
    if isinstance(value, enum.Enum):  # before str/int: IntEnum, StrEnum
        return value.value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if callable(getattr(value, "model_dump", None)) and hasattr(type(value), "model_fields"):
        return value.model_dump(mode="json")  # pydantic, with the model's own serializers
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _Refused(f"it is Decimal({str(value)!r})", _NON_FINITE, ValueError)
        return str(value)  # a string keeps every digit (as pydantic does)
    if isinstance(value, Mapping):  # e.g. starlette's QueryParams, as FastAPI's encoder does
        return dict(value.items())
    if isinstance(value, set | frozenset):
        return list(value)
    problem, hint = _refusal(value)
    raise _Refused(problem, hint, TypeError)


def _numeric_numpy(value: Any, nan_as_null: bool) -> Any:
    """A numeric numpy array's or scalar's ``tolist()``, refusing non-finite numbers; else None."""
    numpy = sys.modules.get("numpy")
    if numpy is None or not isinstance(value, numpy.ndarray | numpy.generic):
        return None
    if value.dtype.kind not in "biuf":
        return None
    if value.dtype.kind == "f":
        finite = numpy.isfinite(value)
        if not finite.all() and nan_as_null:
            return numpy.where(finite, value, None).tolist()
        if not finite.all():  # locate the first one for the message
            where = tuple(int(i) for i in numpy.argwhere(~numpy.atleast_1d(finite))[0])
            bad = float(numpy.atleast_1d(value)[where])
            refused = _Refused(f"it is {bad!r}", _NON_FINITE, ValueError)
            if numpy.ndim(value):
                refused.path.extend((True, i) for i in reversed(where))
            raise refused
    return value.tolist()


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


_NON_FINITE = (
    "JSON has no NaN or Infinity: return None (null) or a string for a missing or unbounded number."
)
_KEYS = "JSON object keys are strings: use str, int or float keys."
_OTHER = (
    "Return JSON values (dict, list, str, int, float, bool, None), numpy arrays, pydantic "
    f"models, dataclasses or datetimes ({_GUIDE}), or a starlette Response."
)


def _refusal(value: Any) -> tuple[str, str]:
    """What is wrong with ``value`` and what to return instead."""
    kind = f"its type is {_type_name(value)}"
    if isinstance(value, bytes | bytearray | memoryview):
        return kind, ("Decode it to str (or base64-encode it); bytes returned on their own "
                      "are sent as application/octet-stream.")  # fmt: skip
    if hasattr(value, "__await__"):
        return f"{kind}, not the value it resolves to", "Did you forget `await`?"
    if hasattr(value, "__next__") or hasattr(value, "__anext__"):
        return f"{kind}, an iterator", "Return a list, or `yield` items to stream them."
    if hasattr(value, "to_dict") and hasattr(value, "columns"):  # pandas DataFrame
        return kind, 'Return df.to_dict(orient="records") or similar.'
    if isinstance(value, datetime.timedelta):
        return kind, "Return td.total_seconds() or a string."
    if hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
        return (f"{kind}, and objects are not sent attribute by attribute",
                "Return a dict of the fields you mean to send, a dataclass or a pydantic "
                f"model ({_GUIDE}).")  # fmt: skip
    return kind, _OTHER
