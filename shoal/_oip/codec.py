"""Decoding v2 inference requests and encoding their responses (REST, JSON and binary).

A request body is JSON, or (Triton's binary tensor extension) a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs' binary data, each
input naming its ``binary_data_size``. Binary inputs are numpy views of the body (no
copy). Outputs are JSON ``data`` unless requested as binary (the output's
``binary_data`` parameter, or the request's ``binary_data_output``).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal._errors import InferenceRequestError
from shoal._oip import tensors
from shoal._oip.model import ModelSpec

HEADER_LENGTH = "inference-header-content-length"
_HEADER_LENGTH = HEADER_LENGTH.encode()
_ENCODING = b"content-encoding"


@dataclass(slots=True)
class Call:
    """One decoded inference request."""

    inputs: dict[str, np.ndarray]
    version: str
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Requested outputs: name -> binary (None: every output, binary by ``binary_default``).
    requested: dict[str, bool] | None = None
    binary_default: bool = False


_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)
_DECODER = json.JSONDecoder()


def dump_json(value: Any) -> bytes:
    """Compact JSON (NaN and infinities as Triton writes them: ``NaN``, ``Infinity``)."""
    return _ENCODER.encode(value).encode()


def decode(spec: ModelSpec, version: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Call:
    """An inference request's body (and headers) as a :class:`Call`, checked against ``spec``."""
    header_length: int | None = None
    for key, value in headers:
        if key == _HEADER_LENGTH:
            header_length = _header_length(value, len(body))
        elif key == _ENCODING:
            body = _decompressed(value, body)
            if header_length is not None:
                header_length = _header_length(str(header_length).encode(), len(body))
    view = memoryview(body)
    document = _parse(body if header_length is None else bytes(view[:header_length]))
    binary = view[len(body) if header_length is None else header_length :]
    inputs = _inputs(spec, document.get("inputs"), binary)
    call = Call(inputs, version, document.get("id"))
    parameters = document.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise InferenceRequestError(
                f"the request's 'parameters' is {parameters!r}; expected an object"
            )
        call.parameters = parameters
        call.binary_default = parameters.get("binary_data_output") is True
    requested = document.get("outputs")
    if requested is not None:
        call.requested = _requested(spec, requested, call.binary_default)
    if call.id is not None and not isinstance(call.id, str):
        raise InferenceRequestError(f"the request's 'id' is {call.id!r}; expected a string")
    return call


def _header_length(value: bytes, body_length: int) -> int:
    if not value.isdigit() or int(value) > body_length:
        raise InferenceRequestError(
            f"the Inference-Header-Content-Length header is {value.decode('latin-1')!r}; "
            f"expected the JSON header's length in bytes (the body has {body_length})"
        )
    return int(value)


def _decompressed(encoding: bytes, body: bytes) -> bytes:
    try:
        if encoding == b"gzip":
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == b"deflate":
            return zlib.decompress(body)
    except zlib.error as exc:
        message = f"the {encoding.decode()} request body is invalid: {exc}"
        raise InferenceRequestError(message) from None
    if encoding == b"identity":
        return body
    raise InferenceRequestError(
        f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; use gzip, deflate "
        "or none"
    )


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        document = _DECODER.decode(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InferenceRequestError(
            f"the request body is {type(document).__name__} JSON; expected an object with 'inputs'"
        )
    return document


def _inputs(spec: ModelSpec, raw: Any, binary: memoryview) -> dict[str, np.ndarray]:
    if not isinstance(raw, list) or not raw:
        raise InferenceRequestError(
            f"the request's 'inputs' is {raw!r}; expected a non-empty list of tensors"
        )
    declared = spec.input_map
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(raw):
        name = item.get("name") if type(item) is dict else None
        if type(name) is not str:
            raise InferenceRequestError(
                f"inputs[{index}] is {item!r}; expected an object with 'name', 'shape', "
                "'datatype' and 'data'"
            )
        if name in inputs:
            raise InferenceRequestError(f"input '{name}' is given twice")
        datatype = item.get("datatype")
        if datatype not in tensors.DTYPES:
            tensors.check_datatype(f"input '{name}'", datatype)
        shape = tensors.check_shape(name, item.get("shape"))
        if declared:
            check_declared(spec, declared, name, datatype, shape)
        parameters = item.get("parameters")
        size = None if parameters is None else _binary_size(f"input '{name}'", parameters)
        if size is None:
            if "data" not in item:
                raise InferenceRequestError(
                    f"input '{name}' has no 'data' (nor a binary_data_size parameter)"
                )
            inputs[name] = tensors.from_json(name, datatype, shape, item["data"])
        else:
            if offset + size > len(binary):
                raise InferenceRequestError(
                    f"input '{name}' has binary_data_size {size} but only {len(binary) - offset} "
                    "bytes of binary data are left in the body"
                )
            inputs[name] = tensors.from_buffer(
                name, datatype, shape, binary[offset : offset + size]
            )
            offset += size
    if offset != len(binary):
        raise InferenceRequestError(
            f"the body has {len(binary) - offset} bytes of binary data no input claims"
        )
    check_complete(spec, declared, inputs)
    return inputs


def check_complete(spec: ModelSpec, declared: dict[str, Any], inputs: dict[str, Any]) -> None:
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise InferenceRequestError(
            f"model '{spec.name}' needs input(s) {', '.join(map(repr, missing))}; the request "
            f"gave {', '.join(map(repr, inputs))}"
        )


def check_declared(
    spec: ModelSpec, declared: dict[str, Any], name: str, datatype: str, shape: tuple[int, ...]
) -> None:
    tensor = declared.get(name)
    if tensor is None:
        raise InferenceRequestError(
            f"model '{spec.name}' has no input '{name}'; its inputs are "
            f"{', '.join(map(repr, declared))}"
        )
    if datatype != tensor.datatype:
        raise InferenceRequestError(
            f"input '{name}' has datatype {datatype}; model '{spec.name}' expects {tensor.datatype}"
        )
    if tensor.shape and not tensors.shape_matches(tensor.shape, shape):
        raise InferenceRequestError(
            f"input '{name}' has shape {list(shape)}; model '{spec.name}' expects "
            f"{list(tensor.shape)} (-1: any size)"
        )


def _binary_size(where: str, parameters: Any) -> int | None:
    if not isinstance(parameters, dict):
        raise InferenceRequestError(f"{where} has parameters {parameters!r}; expected an object")
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InferenceRequestError(
            f"{where} has binary_data_size {size!r}; expected a non-negative integer"
        )
    return int(size)


def _requested(spec: ModelSpec, raw: Any, binary_default: bool) -> dict[str, bool]:
    if not isinstance(raw, list):
        raise InferenceRequestError(f"the request's 'outputs' is {raw!r}; expected a list")
    requested: dict[str, bool] = {}
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InferenceRequestError(
                f"outputs[{index}] is {item!r}; expected an object with a 'name'"
            )
        name = item["name"]
        parameters = item.get("parameters") or {}
        check_requested(spec, name, parameters)
        requested[name] = bool(parameters.get("binary_data", binary_default))
    return requested


def check_requested(spec: ModelSpec, name: str, parameters: Any) -> None:
    """A requested output the model declares (when it declares any), without extensions
    shoal does not implement."""
    declared = [tensor.name for tensor in spec.outputs]
    if declared and name not in declared:
        raise InferenceRequestError(
            f"model '{spec.name}' has no output '{name}'; its outputs are "
            f"{', '.join(map(repr, declared))}"
        )
    if not isinstance(parameters, dict):
        raise InferenceRequestError(
            f"output '{name}' has parameters {parameters!r}; expected an object"
        )
    if parameters.get("classification"):
        raise InferenceRequestError(
            f"output '{name}' asks for the classification extension, which shoal does "
            "not implement; return the class labels as an output instead"
        )


def outputs_of(spec: ModelSpec, returned: Any) -> list[tuple[str, np.ndarray, str]]:
    """What the model returned, as ``(name, array, datatype)`` in the declared order."""
    declared = spec.output_types
    if not isinstance(returned, dict):
        if len(declared) != 1:
            raise TypeError(
                f"model '{spec.name}' returned {type(returned).__name__}; return a dict of "
                "{output name: array} (one array alone only when one output is declared)"
            )
        returned = {next(iter(declared)): returned}
    for name in returned:
        if declared and name not in declared:
            raise TypeError(
                f"model '{spec.name}' returned output '{name}', which it does not declare "
                f"(outputs: {', '.join(map(repr, declared))})"
            )
    return [
        (name, *tensors.as_output(name, value, declared.get(name)))
        for name, value in returned.items()
    ]


def selected_outputs(
    spec: ModelSpec, call: Call, returned: Any
) -> list[tuple[str, np.ndarray, str]]:
    """The outputs to send: those requested (all when none were), as ``outputs_of``."""
    outputs = outputs_of(spec, returned)
    requested = call.requested
    if requested is None:
        return outputs
    produced = {name for name, _, _ in outputs}
    missing = [name for name in requested if name not in produced]
    if missing:
        raise InferenceRequestError(
            f"model '{spec.name}' did not produce the requested output(s) "
            f"{', '.join(map(repr, missing))}"
        )
    return [output for output in outputs if output[0] in requested]


def encode(spec: ModelSpec, call: Call, returned: Any) -> tuple[bytes, list[Any]]:
    """The response: its JSON header, and the binary outputs' bytes that follow it."""
    requested = call.requested
    described: list[dict[str, Any]] = []
    binary: list[Any] = []
    for name, array, datatype in selected_outputs(spec, call, returned):
        wanted = call.binary_default if requested is None else requested[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if wanted:
            raw = tensors.to_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = tensors.to_json_data(name, array, datatype)
        described.append(entry)
    response: dict[str, Any] = {
        "model_name": spec.name,
        "model_version": call.version,
        "outputs": described,
    }
    if call.id is not None:
        response["id"] = call.id
    return dump_json(response), binary
