"""JSON in, JSON out for MLflow pyfunc models: parse a request body, check it, convert the answer.

Accepted bodies (MLflow's scoring-server formats, plus plain records and columns):

* ``[{"a": 1, "b": 2}, ...]``: records; ``{"a": 1, "b": 2}``: one record;
* ``{"a": [1, 3], "b": [2, 4]}``: columns;
* ``{"dataframe_records": [...]}``, ``{"dataframe_split": {"columns": ..., "data": ...}}``;
* ``{"inputs": ...}`` or ``{"instances": ...}``: tensors (a nested list, or named lists);
  for a model with a column signature, rows given as lists take the signature's
  column names in order.

Any of the wrapped forms may carry ``"params"`` (passed to ``predict(params=...)``).
pandas is imported when a function needs it, never at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal import _json
from shoal._errors import InvalidInputError

_WRAPPED = ("dataframe_records", "dataframe_split", "inputs", "instances")
_FLOATS = {"double", "float"}
_INTEGERS = {"long", "integer"}


def _error(loc: list[Any], msg: str, kind: str, expected: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": kind}
    if expected is not None:
        error["expected"] = expected
    return error


@dataclass
class ModelInput:
    data: Any  # a DataFrame, a numpy array, or a dict of numpy arrays
    params: dict[str, Any] | None = field(default=None)


def parse_payload(payload: Any, schema: Any = None) -> ModelInput:
    """A JSON value (already decoded) -> the model's input; raises InvalidInputError."""
    import pandas as pd

    if isinstance(payload, list):
        return ModelInput(_records(payload, ["body"]))
    if not isinstance(payload, dict) or not payload:
        raise InvalidInputError([_error([], "expected a JSON object or a list of records", "type")])
    wrapped = [key for key in _WRAPPED if key in payload]
    if len(wrapped) > 1:
        raise InvalidInputError([_error([], f"give one of {wrapped}, not several", "value")])
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidInputError([_error(["params"], "params must be an object", "type")])
    if not wrapped:
        if params is not None:
            payload = {key: value for key, value in payload.items() if key != "params"}
        if all(isinstance(value, list) for value in payload.values()):
            return ModelInput(_frame(lambda: pd.DataFrame(payload)), params)  # columns
        return ModelInput(_frame(lambda: pd.DataFrame([payload])), params)  # one record
    key = wrapped[0]
    value = payload[key]
    if key == "dataframe_records":
        return ModelInput(_records(value, [key]), params)
    if key == "dataframe_split":
        keys = set(value) if isinstance(value, dict) else set()
        if "data" not in keys or keys - {"columns", "data", "index"}:
            raise InvalidInputError([_error([key], "expected {columns, data[, index]}", "type")])
        return ModelInput(_frame(lambda: pd.DataFrame(**value)), params)
    return ModelInput(_tensor_input(value, key, schema), params)


def _records(value: Any, loc: list[Any]) -> Any:
    import pandas as pd

    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise InvalidInputError([_error(loc[1:], "expected a list of records (objects)", "type")])
    return _frame(lambda: pd.DataFrame(value))


def _frame(build: Any) -> Any:
    try:
        return build()
    except (ValueError, TypeError) as exc:
        raise InvalidInputError([_error([], f"not a table: {exc}", "value")]) from None


def _tensor_input(value: Any, key: str, schema: Any) -> Any:
    import pandas as pd

    columns = _column_names(schema)
    if columns is not None:  # a column signature: build a table whatever the shape
        if isinstance(value, dict):
            return _frame(lambda: pd.DataFrame(value))
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            return _frame(lambda: pd.DataFrame(value))
        rows = np.asarray(value, dtype=object)
        if rows.ndim == 1:
            rows = rows.reshape(1, -1)
        if rows.ndim != 2 or rows.shape[1] != len(columns):
            raise InvalidInputError(
                [_error([key], f"expected rows of {len(columns)} values", "shape", str(columns))]
            )
        return pd.DataFrame(rows.tolist(), columns=columns)
    try:
        if isinstance(value, dict):
            return {name: np.asarray(item) for name, item in value.items()}
        return np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InvalidInputError([_error([key], f"not a tensor: {exc}", "shape")]) from None


def _column_names(schema: Any) -> list[str] | None:
    if schema is None or schema.is_tensor_spec() or not schema.has_input_names():
        return None
    return [str(spec.name) for spec in schema.inputs]


# ------------------------------------------------------------------ validation


def validate(data: Any, schema: Any) -> Any:
    """Check ``data`` against an MLflow input schema; returns it with columns cast to it.

    Column signatures: every required column present, each value of the type the
    signature names (a number for double/float, a whole number for long/integer,
    a bool, a string). Tensor signatures: the shape and a numeric dtype. Types
    this does not know (binary, datetime, arrays, objects) are left to MLflow.
    """
    import pandas as pd

    if schema is None:
        return data
    if schema.is_tensor_spec():
        return _validate_tensors(data, schema)
    # A copy: columns are cast below, and the caller's frame (in-process) stays as it was.
    data = data.copy() if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    errors: list[dict[str, Any]] = []
    if not schema.has_input_names():
        if data.shape[1] < len(schema.inputs):
            errors.append(_error([], f"expected {len(schema.inputs)} columns", "missing"))
        if errors:
            raise InvalidInputError(errors)
        return data
    for spec in schema.inputs:
        name = str(spec.name)
        expected = getattr(spec.type, "name", str(spec.type))
        if name not in data.columns:
            if spec.required:
                errors.append(_error([name], "field required", "missing", expected))
            continue
        converted, problem = _convert(data[name], expected)
        if problem is not None:
            row, value = problem
            errors.append(
                _error([row, name], f"expected {expected}, got {value!r}", "type_error", expected)
            )
        elif converted is not None:
            data[name] = converted
    if errors:
        raise InvalidInputError(errors)
    return data


def _convert(column: Any, expected: str) -> tuple[Any, tuple[int, Any] | None]:
    """``(converted column or None, (row, value) of the first bad value or None)``."""
    values = column.tolist()
    for row, value in enumerate(values):
        if not _fits(value, expected):
            return None, (row, value)
    if expected in _INTEGERS and column.dtype.kind == "f":
        return column.astype(np.int64), None  # 1.0 -> 1: MLflow refuses floats for longs
    if expected in _FLOATS and column.dtype.kind in "iuO":
        return column.astype(np.float64), None
    return None, None


def _fits(value: Any, expected: str) -> bool:
    if value is None:
        return True  # missing values: the model's business (MLflow allows them in optional cols)
    if expected in _FLOATS:
        return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)
    if expected in _INTEGERS:
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
            return False
        return math.isfinite(value) and float(value).is_integer()
    if expected == "boolean":
        return isinstance(value, bool | np.bool_)
    if expected == "string":
        return isinstance(value, str)
    return True


def _validate_tensors(data: Any, schema: Any) -> Any:
    specs = schema.inputs
    arrays = data if isinstance(data, dict) else {specs[0].name: data}
    errors = []
    for spec in specs:
        where = [spec.name] if spec.name else ["inputs"]
        array = arrays.get(spec.name) if spec.name else next(iter(arrays.values()), None)
        if array is None:
            errors.append(_error(where, "tensor required", "missing", f"shape {spec.shape}"))
            continue
        array = np.asarray(array)
        shape = tuple(spec.shape)
        if len(shape) != array.ndim or any(
            want not in (-1, got) for want, got in zip(shape, array.shape, strict=True)
        ):
            errors.append(
                _error(where, f"expected shape {shape}, got {array.shape}", "shape", str(shape))
            )
        elif spec.type.kind in "fiu" and array.dtype.kind not in "fiub":
            errors.append(
                _error(where, f"expected {spec.type} values, got {array.dtype}", "type_error",
                       str(spec.type))
            )  # fmt: skip
        elif spec.type.kind in "fiu":
            arrays[spec.name] = array.astype(spec.type)
    if errors:
        raise InvalidInputError(errors)
    return arrays if isinstance(data, dict) else arrays[specs[0].name]


# ------------------------------------------------------------------ output


def to_jsonable(value: Any) -> Any:
    """A model's output as JSON-compatible Python, through shoal's one JSON conversion
    (docs/http.md), with MLflow's conventions: tables as records, NaN and infinities as
    None; raises TypeError naming any value JSON cannot hold."""
    return _json.to_jsonable(_frames_as_records(value), nan_as_null=True)


def _frames_as_records(value: Any) -> Any:
    """pandas tables as records and series as lists, as MLflow's scoring server sends them."""
    import json

    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return json.loads(value.to_json(orient="records", date_format="iso"))
    if isinstance(value, pd.Series):
        return json.loads(value.to_json(orient="values", date_format="iso"))
    if isinstance(value, dict):
        return {key: _frames_as_records(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_frames_as_records(item) for item in value]
    return value
