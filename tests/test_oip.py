"""The Open Inference Protocol (docs/oip.md): the conformance module (tests/oip_conformance.py)
against shoal serving a scikit-learn and a numpy model, and the official clients unchanged:
``tritonclient.http``, ``tritonclient.grpc``, and the ``kserve`` package's REST and gRPC
clients.

One served instance for the module: ``tests/oip_models.py`` run as a driver (its own shoal,
HTTP and gRPC on free ports). The kserve client runs in a subprocess: kserve and
tritonclient.grpc both register ``inference.*`` protobuf messages in protobuf's default
pool, so they cannot be imported in one process (shoal's copy lives in a private pool).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from oip_conformance import GrpcConformance, RestConformance
from oip_models import X_TRAIN, Y_TRAIN

from shoal import oip
from shoal._errors import ConfigError

TESTS = Path(__file__).parent


class Served:
    def __init__(self, http_port: int, grpc_port: int) -> None:
        self.url = f"http://127.0.0.1:{http_port}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.http_port, self.grpc_port = http_port, grpc_port
        # The kserve clients' process starts at once (importing kserve takes seconds) and
        # runs while the other tests do; test_kserve_clients_in_their_own_process reads it.
        self.kserve = subprocess.Popen(
            [sys.executable, "-c", _KSERVE, str(http_port), str(grpc_port),
             json.dumps(X_TRAIN.tolist())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # The driver's and its workers' log lines go to a file: a pipe nobody reads while the
    # tests run would fill up and block every process writing to it.
    log = tmp_path_factory.mktemp("oip") / "driver.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(TESTS / "oip_models.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log_file, text=True,
            env={**os.environ,
                 "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        )  # fmt: skip
    served = None
    try:
        ports = _first_line(process, log, timeout_s=60)
        served = Served(ports["http"], ports["grpc"])
        yield served
    finally:
        if served is not None and served.kserve.poll() is None:
            served.kserve.kill()
            served.kserve.wait(timeout=10)
        assert process.stdin is not None
        process.stdin.close()  # the driver shuts shoal down
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _first_line(process: subprocess.Popen[str], log: Path, timeout_s: float) -> dict[str, int]:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            process.kill()
            raise AssertionError(f"the OIP driver printed nothing in {timeout_s} s")
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=10)
        raise AssertionError(f"the OIP driver exited: {log.read_text()[-4000:]}")
    return dict(json.loads(line))


# --- the conformance module -------------------------------------------------------------


@pytest.fixture(scope="module", params=["iris", "linear"])
def rest(request: pytest.FixtureRequest, served: Served) -> Iterator[RestConformance]:
    with httpx.Client(timeout=30) as client:
        yield RestConformance(served.url, model=request.param, echo_model="echo", client=client)


@pytest.mark.parametrize("check", RestConformance.CHECKS)
def test_rest_conformance(rest: RestConformance, check: str) -> None:
    getattr(rest, check)()


@pytest.fixture(scope="module", params=["iris", "linear"])
def grpc_checks(request: pytest.FixtureRequest, served: Served) -> GrpcConformance:
    return GrpcConformance(served.grpc, model=request.param, echo_model="echo")


@pytest.mark.parametrize("check", GrpcConformance.CHECKS)
def test_grpc_conformance(grpc_checks: GrpcConformance, check: str) -> None:
    getattr(grpc_checks, check)()


# --- shoal's own behaviour --------------------------------------------------------------


def test_sklearn_predictions_match_the_local_model(served: Served) -> None:
    body = {"inputs": [{"name": "features", "datatype": "FP64", "shape": list(X_TRAIN.shape),
                        "data": X_TRAIN.tolist()}]}  # fmt: skip
    outputs = {o["name"]: o for o in httpx.post(f"{served.url}/v2/models/iris/infer",
                                                json=body).json()["outputs"]}  # fmt: skip
    assert outputs["label"]["data"] == Y_TRAIN.tolist()
    proba = np.array(outputs["proba"]["data"]).reshape(outputs["proba"]["shape"])
    assert proba.shape == (len(X_TRAIN), 2) and np.allclose(proba.sum(axis=1), 1)
    assert (proba.argmax(axis=1) == Y_TRAIN).all()


def test_a_version_served_by_its_own_deployment(served: Served) -> None:
    body = {"inputs": [{"name": "features", "datatype": "FP64", "shape": [1, 2],
                        "data": [0.0, 0.0]}]}  # fmt: skip
    v2 = httpx.post(f"{served.url}/v2/models/iris/versions/2/infer", json=body).json()
    assert v2["model_version"] == "2" and v2["outputs"][0]["data"] == [7]
    v1 = httpx.post(f"{served.url}/v2/models/iris/versions/1/infer", json=body).json()
    assert v1["model_version"] == "1" and v1["outputs"][0]["data"] == [0]
    missing = httpx.post(f"{served.url}/v2/models/iris/versions/3/infer", json=body)
    assert missing.status_code == 404
    assert missing.json()["error"] == (
        "Request for unknown model: 'iris' version 3 is not found (versions served: 1)"
    )


def test_versions_and_the_method_parameter(served: Served) -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}
    body = {"inputs": [x, {"name": "scale", "datatype": "FP32", "shape": [1], "data": [2]}]}
    for path, version in (("", "2"), ("/versions/1", "1"), ("/versions/2", "2")):
        answer = httpx.post(f"{served.url}/v2/models/linear{path}/infer", json=body).json()
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        assert outputs == {"y": [5.0], "version": [version]}, answer
        assert answer["model_version"] == version


def test_multiplexed_versions_become_model_ids(served: Served) -> None:
    body = {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1]}]}
    for version in ("a", "b", "c"):  # "c" is not declared: multiplexed models load any
        answer = httpx.post(f"{served.url}/v2/models/versions/versions/{version}/infer", json=body)
        assert answer.json()["outputs"][0]["data"] == [version], answer.text
    default = httpx.post(f"{served.url}/v2/models/versions/infer", json=body).json()
    assert default["outputs"][0]["data"] == ["b"]  # the last declared version


def test_errors_the_model_raises(served: Served) -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, "NaN"]}
    bad = {"inputs": [x, {"name": "scale", "datatype": "FP32", "shape": [1], "data": [1]}]}
    answer = httpx.post(f"{served.url}/v2/models/linear/infer", json=bad)
    assert answer.status_code == 400
    assert answer.json() == {"error": "input 'x' has datatype FP32 but its data holds 'NaN' "
                             "(string); expected numbers"}, answer.text  # fmt: skip
    inf = {**bad, "inputs": [{**bad["inputs"][0], "data": [1, 2, 3, 1e39]}, bad["inputs"][1]]}
    answer = httpx.post(f"{served.url}/v2/models/linear/infer", json=inf)
    assert answer.json() == {"error": "input 'x' holds NaN or infinity; expected numbers"}
    crash = {"inputs": [{"name": "t", "datatype": "INT8", "shape": [1], "data": [1]}],
             "parameters": {"fail": True}}  # fmt: skip
    answer = httpx.post(f"{served.url}/v2/models/echo/infer", json=crash)
    assert answer.status_code == 500 and "asked to fail" not in answer.text


def test_datatype_and_range_errors_name_the_value(served: Served) -> None:
    def error(tensor: dict[str, Any]) -> str:
        answer = httpx.post(f"{served.url}/v2/models/echo/infer", json={"inputs": [tensor]})
        assert answer.status_code == 400, answer.text
        return str(answer.json()["error"])

    base = {"name": "t", "shape": [2]}
    assert error({**base, "datatype": "INT8", "data": [1, 300]}) == (
        "input 't' has datatype INT8 but its data holds 300, out of range [-128, 127]"
    )
    assert error({**base, "datatype": "INT32", "data": [1.5, 2]}) == (
        "input 't' has datatype INT32 but its data holds 1.5 (number); expected integers"
    )
    assert error({**base, "datatype": "FP99", "data": [1, 2]}) == (
        "input 't' has datatype 'FP99'; expected one of BOOL, INT8, INT16, INT32, INT64, "
        "UINT8, UINT16, UINT32, UINT64, FP16, FP32, FP64, BYTES"
    )
    assert error({**base, "datatype": "FP32", "data": [1, 2, 3]}) == (
        "input 't' has 3 values in 'data' but shape [2] needs 2"
    )
    assert error({**base, "shape": [-2], "datatype": "FP32", "data": [1]}) == (
        "input 't' has shape [-2]; expected a list of non-negative integers")  # fmt: skip


def test_server_paths_and_the_repository_extension(served: Served) -> None:
    assert httpx.get(f"{served.url}/v2").json()["extensions"] == ["binary_tensor_data"]
    load = httpx.post(f"{served.url}/v2/repository/models/iris/load")
    assert load.status_code == 501 and "model repository extension" in load.json()["error"]
    wrong = httpx.get(f"{served.url}/v2/models/iris/infer")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert httpx.get(f"{served.url}/v2/models/iris/stats").status_code == 404


def test_gzip_request_body(served: Served) -> None:
    import gzip

    body = {"inputs": [{"name": "t", "datatype": "UINT8", "shape": [3], "data": [1, 2, 3]}]}
    answer = httpx.post(f"{served.url}/v2/models/echo/infer",
                        content=gzip.compress(json.dumps(body).encode()),
                        headers={"content-encoding": "gzip"})  # fmt: skip
    assert answer.json()["outputs"][0]["data"] == [1, 2, 3]


def test_a_4_mb_tensor_reaches_the_model_without_a_copy(served: Served) -> None:
    """gRPC raw contents and REST binary data: the model's array views the received
    message (a buffer larger than the tensor), it does not own a copy."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.arange(1024 * 1024, dtype=np.float32)  # 4 MiB
    for module, url in ((grpcclient, served.grpc), (httpclient, f"127.0.0.1:{served.http_port}")):
        client = module.InferenceServerClient(url)
        tensor = module.InferInput("x", list(x.shape), "FP32")
        if module is httpclient:
            tensor.set_data_from_numpy(x, binary_data=True)
        else:
            tensor.set_data_from_numpy(x)
        result = client.infer("probe", [tensor])
        assert result.as_numpy("owns_data").tolist() == [False], module
        assert result.as_numpy("buffer_bytes")[0] > x.nbytes, module  # the whole message
        client.close()


# --- the official clients, unchanged ----------------------------------------------------


def test_tritonclient_http(served: Served) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris") and not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "shoal"
    assert client.get_model_metadata("iris")["inputs"][0]["shape"] == [-1, 2]
    features = httpclient.InferInput("features", list(X_TRAIN.shape), "FP64")
    for binary in (False, True):
        features.set_data_from_numpy(X_TRAIN, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("label", binary_data=binary)]
        result = client.infer("iris", [features], outputs=wanted, request_id="r-1")
        assert result.as_numpy("label").tolist() == Y_TRAIN.tolist()
        assert result.get_response()["id"] == "r-1" and result.as_numpy("proba") is None
    text = httpclient.InferInput("t", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"\xff\x00"], dtype=object), binary_data=True)
    result = client.infer("echo", [text], outputs=[httpclient.InferRequestedOutput("t")])
    assert result.as_numpy("t").tolist() == [b"hello", b"\xff\x00"]
    wrong = httpclient.InferInput("features", [1, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 3)))
    with pytest.raises(InferenceServerException, match=r"input 'features' has shape \[1, 3\]"):
        client.infer("iris", [wrong])
    with pytest.raises(InferenceServerException, match="unknown model: 'nope'"):
        client.infer("nope", [features])
    with pytest.raises(InferenceServerException, match="model repository extension"):
        client.load_model("iris")
    client.close()


def test_tritonclient_grpc(served: Served) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(served.grpc)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.get_server_metadata().name == "shoal"
    assert list(client.get_model_metadata("iris").inputs[0].shape) == [-1, 2]
    features = grpcclient.InferInput("features", list(X_TRAIN.shape), "FP64")
    features.set_data_from_numpy(X_TRAIN)
    result = client.infer("iris", [features], request_id="g-1",
                          outputs=[grpcclient.InferRequestedOutput("label")])  # fmt: skip
    assert result.as_numpy("label").tolist() == Y_TRAIN.tolist()
    assert result.get_response().id == "g-1"
    half = grpcclient.InferInput("t", [2, 2], "FP16")
    half.set_data_from_numpy(np.array([[1.5, -2], [0, 65504]], dtype=np.float16))
    assert client.infer("echo", [half]).as_numpy("t").tolist() == [[1.5, -2], [0, 65504]]
    wrong = grpcclient.InferInput("features", [1, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 3)))
    with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*'features'"):
        client.infer("iris", [wrong])
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.infer("nope", [features])
    with pytest.raises(InferenceServerException, match=r"UNIMPLEMENTED.*repository extension"):
        client.unload_model("iris")
    client.close()


_KSERVE = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kserve import InferInput, InferRequest, InferenceGRPCClient, InferenceRESTClient
    from kserve.inference_client import RESTConfig

    X = np.array(json.loads(sys.argv[3]))

    def request():
        features = InferInput("features", list(X.shape), "FP64")
        features.set_data_from_numpy(X, binary_data=False)
        return InferRequest(model_name="iris", infer_inputs=[features], request_id="k-1")

    async def main():
        rest = InferenceRESTClient(RESTConfig(protocol="v2"))
        base = "http://127.0.0.1:" + sys.argv[1]
        assert await rest.is_server_live(base) and await rest.is_server_ready(base)
        assert await rest.is_model_ready(base, "iris")
        answer = await rest.infer(base, request(), model_name="iris")
        out = {"rest": answer.outputs[0].as_numpy().tolist(), "rest_id": answer.id}
        await rest.close()
        grpc = InferenceGRPCClient("127.0.0.1:" + sys.argv[2])
        assert await grpc.is_server_ready()
        answer = await grpc.infer(request())
        out["grpc"] = answer.outputs[0].as_numpy().tolist()
        out["grpc_id"] = answer.id
        await grpc.close()
        print(json.dumps(out))

    asyncio.run(main())
""")


def test_kserve_clients_in_their_own_process(served: Served) -> None:
    stdout, stderr = served.kserve.communicate(timeout=60)
    assert served.kserve.returncode == 0, stderr
    answers = json.loads(stdout.strip().splitlines()[-1])
    labels = Y_TRAIN.tolist()
    assert answers == {"rest": labels, "rest_id": "k-1", "grpc": labels, "grpc_id": "k-1"}


# --- the decorator (no server) ----------------------------------------------------------


def test_model_refuses_bad_declarations() -> None:
    with pytest.raises(ConfigError, match="datatype 'FLOAT'; use one of BOOL"):
        oip.TensorSpec("x", "FLOAT", [1])
    with pytest.raises(ConfigError, match=r"shape \[-2\]"):
        oip.TensorSpec("x", "FP32", [-2])
    with pytest.raises(ConfigError, match="name must be a non-empty string without '/'"):
        oip.model(name="a/b")
    with pytest.raises(ConfigError, match="versions must be a list"):
        oip.model(name="a", versions="1")

    class NoInfer:
        pass

    with pytest.raises(ConfigError, match="has no method 'infer'"):
        oip.model(name="a")(NoInfer)

    class OwnCall:
        def infer(self, inputs: Any) -> Any:
            return inputs

        def __call__(self) -> None:
            pass

    with pytest.raises(ConfigError, match="defines __call__"):
        oip.model(name="a")(OwnCall)


def test_handles_call_the_model_method_directly() -> None:
    from oip_models import NumpyModel

    from shoal import serve

    handle = serve.run(
        NumpyModel.bind(), name="oip-local", route_prefix=None, _local_testing_mode=True
    )
    x = np.ones((2, 4), dtype=np.float32)
    answer = handle.infer.remote({"x": x, "scale": np.array([1], np.float32)}, version="1")
    assert answer.result()["y"].tolist() == [2.5, 2.5]


def test_the_bench_measures_both_replica_paths() -> None:
    from bench.oip import replica_work_us

    work = replica_work_us(repeats=1, calls=20)
    assert set(work) == {"W1", "OIP"} and all(us > 0 for us in work.values())
