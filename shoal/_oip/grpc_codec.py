"""gRPC ``ModelInfer`` requests and responses, with ``raw_input_contents`` read in place.

``raw_input_contents`` (field 7 of ``ModelInferRequest``) holds the tensors' bytes. A
protobuf parse would copy each into a new ``bytes`` object; instead the top-level fields
of the serialized request are scanned (protobuf's wire format: a key varint, then a
varint, 8 or 4 bytes, or a length and that many bytes), field 7's entries are kept as
memoryviews of the payload (numpy arrays are made on them without a copy), and the rest,
a few hundred bytes, is parsed by protobuf. Responses carry ``raw_output_contents`` (field
6), written after the protobuf-serialized rest in the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoal._errors import InferenceRequestError
from shoal._oip import codec, tensors
from shoal._oip.model import ModelSpec
from shoal._oip.protos import grpc_predict_v2_pb2 as pb

_RAW_INPUT_FIELD = 7
_RAW_OUTPUT_KEY = bytes([(6 << 3) | 2])  # raw_output_contents, length-delimited
#: InferTensorContents' field for each datatype (FP16 travels only as raw contents).
CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view):
            raise InferenceRequestError("the ModelInferRequest is truncated")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def split_raw(payload: bytes | memoryview) -> tuple[bytes, list[memoryview]]:
    """The serialized request without its raw input contents, and those contents (views)."""
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
    kept: list[memoryview] = []
    raws: list[memoryview] = []
    pos, end = 0, len(view)
    while pos < end:
        start = pos
        key, pos = _varint(view, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(view, pos)
            stop = pos + length
        elif wire == 0:
            _, stop = _varint(view, pos)
        elif wire == 1:
            stop = pos + 8
        elif wire == 5:
            stop = pos + 4
        else:
            raise InferenceRequestError(f"the ModelInferRequest has a field of wire type {wire}")
        if stop > end:
            raise InferenceRequestError("the ModelInferRequest is truncated")
        if key >> 3 == _RAW_INPUT_FIELD and wire == 2:
            raws.append(view[pos:stop])
        else:
            kept.append(view[start:stop])
        pos = stop
    return b"".join(kept), raws


def parse_request(payload: bytes | memoryview) -> tuple[Any, list[memoryview]]:
    """``(ModelInferRequest without raw contents, raw contents)``."""
    rest, raws = split_raw(payload)
    try:
        return pb.ModelInferRequest.FromString(rest), raws
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise InferenceRequestError(f"the ModelInferRequest cannot be parsed: {exc}") from None


def parameter(value: Any) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def decode(spec: ModelSpec, version: str, request: Any, raws: list[memoryview]) -> codec.Call:
    """A parsed ModelInferRequest as a :class:`codec.Call`, checked against ``spec``."""
    if raws and len(raws) != len(request.inputs):
        raise InferenceRequestError(
            f"the request has {len(request.inputs)} inputs but {len(raws)} "
            "raw_input_contents; give one per input, in order, or none"
        )
    declared = spec.input_map
    inputs: dict[str, np.ndarray] = {}
    for index, item in enumerate(request.inputs):
        where = f"input '{item.name}'"
        if item.name in inputs:
            raise InferenceRequestError(f"{where} is given twice")
        datatype = tensors.check_datatype(where, item.datatype)
        shape = tensors.check_shape(item.name, list(item.shape))
        if declared:
            codec.check_declared(spec, declared, item.name, datatype, shape)
        if raws:
            inputs[item.name] = tensors.from_buffer(item.name, datatype, shape, raws[index])
        else:
            inputs[item.name] = _from_contents(item, datatype, shape)
    codec.check_complete(spec, declared, inputs)
    parameters = {key: parameter(value) for key, value in request.parameters.items()}
    call = codec.Call(inputs, version, request.id or None, parameters)
    if request.outputs:
        call.requested = {}
        for output in request.outputs:
            codec.check_requested(spec, output.name, {
                key: parameter(value) for key, value in output.parameters.items()
            })  # fmt: skip
            call.requested[output.name] = True
    return call


def _from_contents(item: Any, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    field = CONTENTS.get(datatype)
    if field is None:
        raise InferenceRequestError(
            f"input '{item.name}' is {datatype}, which travels only in raw_input_contents"
        )
    values = list(getattr(item.contents, field))
    return tensors.from_json(item.name, datatype, shape, values)


def encode(spec: ModelSpec, call: codec.Call, returned: Any) -> bytes:
    """The serialized ModelInferResponse: every output as raw_output_contents (as Triton)."""
    outputs = codec.selected_outputs(spec, call, returned)
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=call.version, id=call.id or ""
    )
    raws: list[Any] = []
    for name, array, datatype in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        raws.append(tensors.to_bytes(array, datatype))
    parts: list[Any] = [response.SerializeToString()]
    for raw in raws:
        parts += [_RAW_OUTPUT_KEY, _varint_bytes(len(raw)), raw]
    return b"".join(parts)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def peek_model(payload: bytes | memoryview) -> tuple[str, str]:
    """``(model_name, model_version)`` of a serialized ModelInferRequest (fields 1 and 2),
    read without parsing the rest (the proxy routes by them)."""
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes) else memoryview(payload)
    found = ["", ""]
    pos, end = 0, len(view)
    while pos < end:
        key, pos = _varint(view, pos)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(view, pos)
            if key >> 3 in (1, 2):
                found[(key >> 3) - 1] = bytes(view[pos : pos + length]).decode("utf-8", "replace")
            pos += length
        elif wire == 0:
            _, pos = _varint(view, pos)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            break
    return found[0], found[1]
