"""Tensors of the Open Inference Protocol: datatypes, decoding inputs, encoding outputs.

Inputs become numpy arrays: JSON ``data`` (flat or nested) through ``np.asarray``, binary
data (Triton's extension, gRPC ``raw_input_contents``) through ``np.frombuffer`` on the
body's memory, without a copy. BYTES tensors are object arrays of ``bytes``; in binary
form each element is a 4-byte little-endian length followed by its bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal._errors import InferenceRequestError

#: OIP datatype -> numpy dtype (BYTES: object arrays of bytes).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
DATATYPES = tuple(DTYPES)
_BY_DTYPE = {dtype: name for name, dtype in DTYPES.items() if name != "BYTES"}
#: What JSON numbers each datatype accepts (numpy kinds of the parsed values).
_JSON_KINDS = {"b": "b", "i": "iub", "u": "iub", "f": "iubf"}
_LENGTH = struct.Struct("<I")


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of a numpy array (bytes and str arrays are BYTES)."""
    name = _BY_DTYPE.get(array.dtype)
    if name is not None:
        return name
    if array.dtype.kind in "OSU":
        return "BYTES"
    raise InferenceRequestError(
        f"an output of dtype {array.dtype} has no Open Inference Protocol datatype; "
        f"use one of {', '.join(DATATYPES)} (numpy: bool, int8..uint64, float16..float64, "
        "bytes or str objects)"
    )


def check_datatype(where: str, datatype: Any) -> str:
    if datatype not in DTYPES:
        raise InferenceRequestError(
            f"{where} has datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        )
    return str(datatype)


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    """Input ``name``'s shape, a list of non-negative integers, as a tuple."""
    if type(shape) is list:
        for dim in shape:
            if type(dim) is not int or dim < 0:
                break
        else:
            return tuple(shape)
    raise InferenceRequestError(
        f"input '{name}' has shape {shape!r}; expected a list of non-negative integers"
    )


def from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """An input's JSON ``data`` (flat or nested lists, or one scalar) as an array of ``shape``."""
    where = f"input '{name}'"
    size = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        array = np.empty(len(flat), dtype=object)
        for index, item in enumerate(flat):
            if isinstance(item, str):
                item = item.encode()
            elif not isinstance(item, bytes):
                raise InferenceRequestError(
                    f"{where} (BYTES) holds {item!r}; expected strings in 'data'"
                )
            array[index] = item
    else:
        try:
            parsed = np.asarray(data)
        except ValueError:  # ragged nesting
            raise InferenceRequestError(
                f"{where} has ragged nested 'data'; expected {size} values for shape {list(shape)}"
            ) from None
        target = DTYPES[datatype]
        expected = _JSON_KINDS[target.kind]
        if parsed.size and parsed.dtype.kind not in expected:
            parsed = _huge_integers(where, datatype, data, parsed)
            if parsed.dtype.kind not in expected:
                sample = _first_not(expected, _flatten(data))
                raise InferenceRequestError(
                    f"{where} has datatype {datatype} but its data holds {sample!r} "
                    f"({_type_name(sample)}); expected {_kind_name(target.kind)}s"
                )
        array = _cast(where, datatype, parsed)
    if array.size != size:
        raise InferenceRequestError(
            f"{where} has {array.size} values in 'data' but shape {list(shape)} needs {size}"
        )
    return array.reshape(shape)


def _huge_integers(where: str, datatype: str, data: Any, parsed: np.ndarray) -> np.ndarray:
    """Integers beyond int64 next to others parse as float64 (or objects): read them again
    as ``datatype`` when every value is an integer; else ``parsed`` as it was."""
    target = DTYPES[datatype]
    values = _flatten(data)
    if target.kind not in "iu" or not all(type(v) is int for v in values):
        return parsed
    try:
        return np.array(values, dtype=target)
    except OverflowError:
        info = np.iinfo(target)
        bad = next(v for v in values if not info.min <= v <= info.max)
        raise InferenceRequestError(
            f"{where} has datatype {datatype} but its data holds {bad}, out of range "
            f"[{info.min}, {info.max}]"
        ) from None


def _first_not(kinds: str, values: list[Any]) -> Any:
    """The first of ``values`` (JSON values) that is not of the numpy ``kinds``."""
    for value in values:
        if np.asarray(value).dtype.kind not in kinds:
            return value
    return values[0] if values else None


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "integer" if isinstance(value, int) else "number"
    return "string" if isinstance(value, str) else type(value).__name__


def _kind_name(kind: str) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "number"}.get(kind, "string")


def _cast(where: str, datatype: str, parsed: np.ndarray) -> np.ndarray:
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and parsed.size and parsed.dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = parsed.min(), parsed.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InferenceRequestError(
                f"{where} has datatype {datatype} but its data holds {int(bad)}, out of "
                f"range [{info.min}, {info.max}]"
            )
    return parsed.astype(dtype, copy=False).ravel()


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def from_buffer(name: str, datatype: str, shape: tuple[int, ...], buffer: memoryview) -> np.ndarray:
    """An input's binary data: a read-only view of ``buffer`` (no copy), BYTES decoded."""
    where = f"input '{name}'"
    size = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(where, buffer, size).reshape(shape)
    dtype = DTYPES[datatype]
    if len(buffer) != size * dtype.itemsize:
        raise InferenceRequestError(
            f"{where} has {len(buffer)} bytes of binary data but shape {list(shape)} of "
            f"{datatype} needs {size * dtype.itemsize}"
        )
    return np.frombuffer(buffer, dtype=dtype.newbyteorder("<")).reshape(shape)


def _bytes_elements(where: str, buffer: memoryview, size: int) -> np.ndarray:
    array = np.empty(size, dtype=object)
    offset, end = 0, len(buffer)
    for index in range(size):
        if offset + 4 > end:
            raise InferenceRequestError(
                f"{where} (BYTES) binary data ends after {index} of {size} elements"
            )
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > end:
            raise InferenceRequestError(
                f"{where} (BYTES) element {index} claims {length} bytes; only "
                f"{end - offset} are left"
            )
        array[index] = bytes(buffer[offset : offset + length])
        offset += length
    if offset != end:
        raise InferenceRequestError(
            f"{where} (BYTES) binary data has {end - offset} bytes after its {size} elements"
        )
    return array


def as_output(name: str, value: Any, datatype: str | None) -> tuple[np.ndarray, str]:
    """What the model returned for output ``name``, as an array and its datatype."""
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if datatype is None:
        return array, datatype_of(array)
    if datatype == "BYTES":
        if array.dtype.kind not in "OSU":
            raise InferenceRequestError(
                f"output '{name}' is declared BYTES but the model returned {array.dtype} values"
            )
        return array, datatype
    return array.astype(DTYPES[datatype], copy=False), datatype


def to_json_data(name: str, array: np.ndarray, datatype: str) -> list[Any]:
    """An output's values, flattened, as JSON values (BYTES as UTF-8 strings)."""
    if datatype != "BYTES":
        return list(array.ravel().tolist())
    data = []
    for item in array.ravel():
        if isinstance(item, bytes | bytearray):
            try:
                item = bytes(item).decode()
            except UnicodeDecodeError:
                raise InferenceRequestError(
                    f"output '{name}' holds bytes that are not UTF-8 text; request it as "
                    "binary data (output parameter binary_data: true)"
                ) from None
        data.append(str(item))
    return data


def to_bytes(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """An output's binary form: the array's own memory when it is contiguous little-endian."""
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            raw = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).data.cast("B")


def shape_matches(declared: Sequence[int], shape: tuple[int, ...]) -> bool:
    """``shape`` fits ``declared`` (same rank; -1 matches any size)."""
    if len(declared) != len(shape):
        return False
    for want, got in zip(declared, shape, strict=True):  # noqa: SIM110 - a loop is faster here
        if want != -1 and want != got:
            return False
    return True
