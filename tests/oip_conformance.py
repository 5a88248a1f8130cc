"""A reusable conformance check of an Open Inference Protocol (KServe / Triton v2) server.

No public conformance suite exists for the protocol, so this module is ours. It needs no
shoal: point it at any v2 server (Triton, KServe, MLServer, shoal) that serves

* ``model``: any model declaring its inputs (name, datatype, shape; -1 for any size) in its
  metadata. Valid requests are built from that metadata (zeros), and invalid ones from
  it too (wrong datatype, wrong shape, unknown or missing input);
* ``echo_model`` (optional): a model without declared inputs that returns every input as
  an output of the same name, datatype and shape: used to round-trip every datatype
  through JSON and through binary data (Triton's binary tensor extension).

Usage::

    from oip_conformance import RestConformance, GrpcConformance
    RestConformance("http://127.0.0.1:8000", model="iris", echo_model="echo").run()
    GrpcConformance("127.0.0.1:9000", model="iris", echo_model="echo").run()

``run()`` runs every check and raises one AssertionError listing every failure;
``CHECKS`` lists the check methods, so a test can run them one by one (as
tests/test_oip.py does). Only httpx, numpy and grpcio are needed; the gRPC messages come
from ``shoal._oip.protos`` (a private protobuf pool: importing it next to tritonclient or
kserve is safe) or any module with the same messages, passed as ``messages``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

DATATYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"


def sample(datatype: str, shape: list[int]) -> np.ndarray:
    """A small array of ``datatype`` with distinct, extreme-ish values."""
    size = math.prod(shape)
    if datatype == "BOOL":
        return (np.arange(size) % 2 == 0).reshape(shape)
    if datatype == "BYTES":
        return np.array([f"v{i}é".encode() for i in range(size)], dtype=object).reshape(shape)
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = [info.min, info.max, 0, 1, 7, 42][: max(size, 1)]
        values += [i % 100 for i in range(size - len(values))]
        return np.array(values[:size], dtype=dtype).reshape(shape)
    return (np.arange(size, dtype=np.float64) * 0.5 - 1.25).astype(dtype).reshape(shape)


def json_data(array: np.ndarray) -> list[Any]:
    if array.dtype == object:
        return [item.decode() for item in array.ravel()]
    return list(array.ravel().tolist())


def raw_bytes(array: np.ndarray) -> bytes:
    """A tensor's binary form: row-major little-endian; BYTES elements length-prefixed."""
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()


def from_raw(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype != "BYTES":
        return np.frombuffer(raw, dtype=np.dtype(DATATYPES[datatype]).newbyteorder("<")).reshape(
            shape
        )
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return np.array(items, dtype=object).reshape(shape)


def _concrete(shape: list[int]) -> list[int]:
    return [1 if dim == -1 else dim for dim in shape]


def _equal(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and bool(np.all(got == want))


class RestConformance:
    """The REST API's checks; each ``check_*`` method raises AssertionError on a failure."""

    CHECKS = (
        "check_server_metadata", "check_health", "check_model_metadata", "check_model_ready",
        "check_infer_json", "check_request_id_echoed", "check_requested_outputs",
        "check_binary_input_and_output", "check_unknown_model_is_404",
        "check_wrong_datatype_is_400", "check_wrong_shape_is_400",
        "check_unknown_and_missing_inputs_are_400", "check_malformed_bodies_are_400",
        "check_every_datatype_round_trips_as_json",
        "check_every_datatype_round_trips_as_binary", "check_nested_json_data",
        "check_binary_data_size_mismatch_is_400",
    )  # fmt: skip

    def __init__(
        self, base_url: str, *, model: str, echo_model: str | None = None,
        client: httpx.Client | None = None, unknown_model_status: int = 404,
    ) -> None:  # fmt: skip
        """``unknown_model_status``: what the server answers for a model it does not serve
        (the spec only says 4xx: shoal and KServe answer 404, Triton 400)."""
        self.base = base_url.rstrip("/")
        self.unknown_model_status = unknown_model_status
        self.model = model
        self.echo_model = echo_model
        self.http = client or httpx.Client(timeout=30)

    def run(self) -> None:
        failures = []
        for name in self.CHECKS:
            try:
                getattr(self, name)()
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
        assert not failures, "\n".join(failures)

    # --- helpers -----------------------------------------------------------------------

    def get(self, path: str) -> httpx.Response:
        return self.http.get(self.base + path)

    def infer(self, model: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        kind = {"content-type": "application/json", **(headers or {})}
        return self.http.post(f"{self.base}/v2/models/{model}/infer", content=content,
                              headers=kind)  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        response = self.get(f"/v2/models/{self.model}")
        assert response.status_code == 200, (response.status_code, response.text)
        return dict(response.json())

    def valid_inputs(self) -> list[dict[str, Any]]:
        inputs = []
        for tensor in self.metadata()["inputs"]:
            shape = _concrete(tensor["shape"])
            array = sample(tensor["datatype"], shape)
            inputs.append({"name": tensor["name"], "datatype": tensor["datatype"],
                           "shape": shape, "data": json_data(array)})  # fmt: skip
        assert inputs, f"model {self.model} declares no inputs: pick one that does"
        return inputs

    def expect_error(self, response: httpx.Response, status: int, *words: str) -> str:
        assert response.status_code == status, (status, response.status_code, response.text)
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
        for word in words:
            assert word in body["error"], (word, body["error"])
        return str(body["error"])

    def echo(self, inputs: list[dict[str, Any]], **request: Any) -> httpx.Response:
        assert self.echo_model, "this check needs an echo_model"
        return self.infer(self.echo_model, {"inputs": inputs, **request})

    # --- server ------------------------------------------------------------------------

    def check_server_metadata(self) -> None:
        response = self.get("/v2")
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["name"], str) and isinstance(body["version"], str), body
        assert isinstance(body["extensions"], list), body

    def check_health(self) -> None:
        for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
            response = self.get(path)
            assert response.status_code == 200, (path, response.status_code, response.text)
            if response.content:
                assert response.json().get(key) is True, (path, response.text)

    # --- one model ---------------------------------------------------------------------

    def check_model_metadata(self) -> None:
        body = self.metadata()
        assert body["name"] == self.model, body
        assert isinstance(body["versions"], list) and isinstance(body["platform"], str), body
        for tensor in [*body["inputs"], *body["outputs"]]:
            assert set(tensor) >= {"name", "datatype", "shape"}, tensor
            assert tensor["datatype"] in DATATYPES, tensor
            assert all(isinstance(dim, int) and dim >= -1 for dim in tensor["shape"]), tensor

    def check_model_ready(self) -> None:
        response = self.get(f"/v2/models/{self.model}/ready")
        assert response.status_code == 200, response.text
        assert 400 <= self.get("/v2/models/no-such-model-xyz/ready").status_code < 500

    def check_infer_json(self) -> None:
        response = self.infer(self.model, {"inputs": self.valid_inputs()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == self.model, body
        declared = {t["name"]: t for t in self.metadata()["outputs"]}
        for output in body["outputs"]:
            assert len(output["data"]) == math.prod(output["shape"]), output
            if declared:
                assert output["name"] in declared, (output, declared)
                assert output["datatype"] == declared[output["name"]]["datatype"], output

    def check_request_id_echoed(self) -> None:
        body = self.infer(self.model, {"id": "conformance-42", "inputs": self.valid_inputs()})
        assert body.json().get("id") == "conformance-42", body.text

    def check_requested_outputs(self) -> None:
        first = self.infer(self.model, {"inputs": self.valid_inputs()}).json()["outputs"][0]
        body = {"inputs": self.valid_inputs(), "outputs": [{"name": first["name"]}]}
        response = self.infer(self.model, body)
        assert [o["name"] for o in response.json()["outputs"]] == [first["name"]], response.text
        body["outputs"] = [{"name": "no-such-output"}]
        self.expect_error(self.infer(self.model, body), 400, "no-such-output")

    def check_binary_input_and_output(self) -> None:
        """The same request as JSON and as binary data gives the same outputs."""
        inputs = self.valid_inputs()
        reference = self.infer(self.model, {"inputs": inputs}).json()["outputs"]
        header: dict[str, Any] = {"inputs": [], "parameters": {"binary_data_output": True}}
        blobs = []
        for tensor in inputs:
            array = np.array(tensor["data"], dtype=DATATYPES[tensor["datatype"]])
            if tensor["datatype"] == "BYTES":
                array = np.array([s.encode() for s in tensor["data"]], dtype=object)
            raw = raw_bytes(array)
            blobs.append(raw)
            header["inputs"].append({key: tensor[key] for key in ("name", "datatype", "shape")}
                                    | {"parameters": {"binary_data_size": len(raw)}})  # fmt: skip
        head = json.dumps(header).encode()
        response = self.infer(self.model, head + b"".join(blobs), {
            HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"})  # fmt: skip
        assert response.status_code == 200, response.text
        outputs = self.binary_outputs(response)
        for want in reference:
            got = outputs[want["name"]]
            expected = np.array(want["data"], dtype=got.dtype if got.dtype != object else None)
            if got.dtype == object:
                expected = np.array([s.encode() for s in want["data"]], dtype=object)
            assert _equal(got, expected.reshape(want["shape"])), (want, got)

    def binary_outputs(self, response: httpx.Response) -> dict[str, np.ndarray]:
        length = int(response.headers[HEADER_LENGTH])
        header = json.loads(response.content[:length])
        offset, outputs = length, {}
        for output in header["outputs"]:
            size = output["parameters"]["binary_data_size"]
            raw = response.content[offset : offset + size]
            offset += size
            outputs[output["name"]] = from_raw(raw, output["datatype"], output["shape"])
        assert offset == len(response.content), (offset, len(response.content))
        return outputs

    def check_unknown_model_is_404(self) -> None:
        response = self.infer("no-such-model-xyz", {"inputs": self.valid_inputs()})
        self.expect_error(response, self.unknown_model_status, "no-such-model-xyz")
        self.expect_error(self.get("/v2/models/no-such-model-xyz"), self.unknown_model_status)

    def check_wrong_datatype_is_400(self) -> None:
        inputs = self.valid_inputs()
        wrong = "INT8" if inputs[0]["datatype"] != "INT8" else "FP32"
        inputs[0] = {**inputs[0], "datatype": wrong}
        self.expect_error(self.infer(self.model, {"inputs": inputs}), 400, inputs[0]["name"])

    def check_wrong_shape_is_400(self) -> None:
        inputs = self.valid_inputs()
        shape = [*inputs[0]["shape"], 2]
        data = inputs[0]["data"] * 2
        inputs[0] = {**inputs[0], "shape": shape, "data": data}
        self.expect_error(self.infer(self.model, {"inputs": inputs}), 400, inputs[0]["name"])
        inputs = self.valid_inputs()
        inputs[0] = {**inputs[0], "data": inputs[0]["data"] + inputs[0]["data"][:1]}
        self.expect_error(self.infer(self.model, {"inputs": inputs}), 400, inputs[0]["name"])

    def check_unknown_and_missing_inputs_are_400(self) -> None:
        inputs = self.valid_inputs()
        extra = {"name": "no-such-input", "datatype": "FP32", "shape": [1], "data": [1.0]}
        self.expect_error(self.infer(self.model, {"inputs": [*inputs, extra]}), 400,
                          "no-such-input")  # fmt: skip
        if len(inputs) > 1:
            self.expect_error(self.infer(self.model, {"inputs": inputs[1:]}), 400,
                              inputs[0]["name"])  # fmt: skip

    def check_malformed_bodies_are_400(self) -> None:
        for body in (b"{not json", b"[1, 2]", b'{"inputs": 3}', b'{"inputs": []}',
                     b'{"inputs": [{"name": "x"}]}'):  # fmt: skip
            self.expect_error(self.infer(self.model, body), 400)

    # --- every datatype (echo model) -------------------------------------------------

    def check_every_datatype_round_trips_as_json(self) -> None:
        for datatype in DATATYPES:
            array = sample(datatype, [2, 3])
            tensor = {"name": "t", "datatype": datatype, "shape": [2, 3], "data": json_data(array)}
            response = self.echo([tensor])
            assert response.status_code == 200, (datatype, response.text)
            (output,) = response.json()["outputs"]
            assert output["datatype"] == datatype and output["shape"] == [2, 3], output
            assert output["data"] == tensor["data"], (datatype, output["data"], tensor["data"])

    def check_every_datatype_round_trips_as_binary(self) -> None:
        for datatype in DATATYPES:
            array = sample(datatype, [3, 2])
            raw = raw_bytes(array)
            head = json.dumps({"inputs": [{
                "name": "t", "datatype": datatype, "shape": [3, 2],
                "parameters": {"binary_data_size": len(raw)}}],
                "outputs": [{"name": "t", "parameters": {"binary_data": True}}],
            }).encode()  # fmt: skip
            assert self.echo_model, "this check needs an echo_model"
            response = self.infer(self.echo_model, head + raw, {HEADER_LENGTH: str(len(head))})
            assert response.status_code == 200, (datatype, response.text)
            got = self.binary_outputs(response)["t"]
            assert _equal(got, array), (datatype, got, array)

    def check_nested_json_data(self) -> None:
        array = sample("INT32", [2, 2])
        nested = {"name": "t", "datatype": "INT32", "shape": [2, 2], "data": array.tolist()}
        (output,) = self.echo([nested]).json()["outputs"]
        assert output["data"] == json_data(array), output

    def check_binary_data_size_mismatch_is_400(self) -> None:
        head = json.dumps({"inputs": [{"name": "t", "datatype": "FP32", "shape": [4],
                           "parameters": {"binary_data_size": 16}}]}).encode()  # fmt: skip
        assert self.echo_model, "this check needs an echo_model"
        response = self.infer(self.echo_model, head + b"\0" * 12, {HEADER_LENGTH: str(len(head))})
        self.expect_error(response, 400, "'t'")


class GrpcConformance:
    """The gRPC API's checks (``inference.GRPCInferenceService``)."""

    CHECKS = (
        "check_server_live_ready_metadata", "check_model_metadata_and_ready",
        "check_infer_raw", "check_infer_typed_contents", "check_unknown_model_is_not_found",
        "check_wrong_shape_is_invalid_argument", "check_every_datatype_round_trips_raw",
    )  # fmt: skip

    def __init__(
        self, address: str, *, model: str, echo_model: str | None = None,
        messages: Any = None,
    ) -> None:  # fmt: skip
        import grpc

        if messages is None:
            from shoal._oip.protos import grpc_predict_v2_pb2 as messages
        self.pb = messages
        self.grpc = grpc
        self.channel = grpc.insecure_channel(address)
        self.model = model
        self.echo_model = echo_model

    def run(self) -> None:
        failures = []
        for name in self.CHECKS:
            try:
                getattr(self, name)()
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
        assert not failures, "\n".join(failures)

    def call(self, method: str, request: Any, response_type: Any) -> Any:
        stub: Callable[..., Any] = self.channel.unary_unary(
            f"/inference.GRPCInferenceService/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return stub(request, timeout=30)

    def error(self, method: str, request: Any, response_type: Any) -> Any:
        try:
            self.call(method, request, response_type)
        except self.grpc.RpcError as exc:
            return exc
        raise AssertionError(f"{method} succeeded; expected an error")

    def check_server_live_ready_metadata(self) -> None:
        pb = self.pb
        assert self.call("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live
        assert self.call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready
        meta = self.call("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse)
        assert meta.name and meta.version, meta

    def check_model_metadata_and_ready(self) -> None:
        pb = self.pb
        meta = self.call("ModelMetadata", pb.ModelMetadataRequest(name=self.model),
                         pb.ModelMetadataResponse)  # fmt: skip
        assert meta.name == self.model and meta.inputs, meta
        ready = self.call("ModelReady", pb.ModelReadyRequest(name=self.model),
                          pb.ModelReadyResponse)  # fmt: skip
        assert ready.ready

    def request(self, model: str, arrays: dict[str, tuple[str, np.ndarray]]) -> Any:
        request = self.pb.ModelInferRequest(model_name=model, id="conformance-7")
        for name, (datatype, array) in arrays.items():
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(raw_bytes(array))
        return request

    def declared(self) -> dict[str, tuple[str, np.ndarray]]:
        meta = self.call("ModelMetadata", self.pb.ModelMetadataRequest(name=self.model),
                         self.pb.ModelMetadataResponse)  # fmt: skip
        return {t.name: (t.datatype, sample(t.datatype, _concrete(list(t.shape))))
                for t in meta.inputs}  # fmt: skip

    def check_infer_raw(self) -> None:
        response = self.call("ModelInfer", self.request(self.model, self.declared()),
                             self.pb.ModelInferResponse)  # fmt: skip
        assert response.id == "conformance-7" and response.model_name == self.model, response
        assert len(response.raw_output_contents) == len(response.outputs) > 0, response

    def check_infer_typed_contents(self) -> None:
        request = self.pb.ModelInferRequest(model_name=self.model)
        fields = {
            "BOOL": "bool_contents",
            "INT64": "int64_contents",
            "FP32": "fp32_contents",
            "FP64": "fp64_contents",
            "INT32": "int_contents",
            "BYTES": "bytes_contents",
        }
        for name, (datatype, array) in self.declared().items():
            if datatype not in fields:
                return  # this model's inputs have no typed contents field in this check
            tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            getattr(tensor.contents, fields[datatype]).extend(array.ravel().tolist())
        raw = self.call("ModelInfer", self.request(self.model, self.declared()),
                        self.pb.ModelInferResponse)  # fmt: skip
        typed = self.call("ModelInfer", request, self.pb.ModelInferResponse)
        assert list(typed.raw_output_contents) == list(raw.raw_output_contents)

    def check_unknown_model_is_not_found(self) -> None:
        exc = self.error("ModelInfer", self.request("no-such-model-xyz", self.declared()),
                         self.pb.ModelInferResponse)  # fmt: skip
        assert exc.code() == self.grpc.StatusCode.NOT_FOUND, exc
        assert "no-such-model-xyz" in exc.details(), exc.details()

    def check_wrong_shape_is_invalid_argument(self) -> None:
        arrays = self.declared()
        name, (datatype, array) = next(iter(arrays.items()))
        arrays[name] = (datatype, np.concatenate([array.ravel(), array.ravel()]))
        exc = self.error("ModelInfer", self.request(self.model, arrays),
                         self.pb.ModelInferResponse)  # fmt: skip
        assert exc.code() == self.grpc.StatusCode.INVALID_ARGUMENT, exc
        assert name in exc.details(), exc.details()

    def check_every_datatype_round_trips_raw(self) -> None:
        assert self.echo_model, "this check needs an echo_model"
        for datatype in DATATYPES:
            array = sample(datatype, [2, 2])
            request = self.request(self.echo_model, {"t": (datatype, array)})
            response = self.call("ModelInfer", request, self.pb.ModelInferResponse)
            (output,) = response.outputs
            assert output.datatype == datatype and list(output.shape) == [2, 2], output
            got = from_raw(response.raw_output_contents[0], datatype, [2, 2])
            assert _equal(got, array), (datatype, got, array)
