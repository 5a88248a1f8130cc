"""Return values over HTTP (the table in docs/http.md), strict JSON, and input mix-ups.

Multi-process runtime and real HTTP: every row of the conversion table, values JSON
cannot hold (a 500 without internals, a replica log line naming the type and the
field), numpy results of a composed model, and the hints a method gets when it is
given a Request where it expected data, or the other way round.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Deploy, Driver, start_early, started_drivers
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from shoal import serve


class FakeTensor:
    """What a torch tensor offers the conversion: a dtype and tolist() (torch is not installed)."""

    dtype = "float32"

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def tolist(self) -> list[float]:
        return list(self.values)


class Score(BaseModel):
    label: str
    value: float


@dataclasses.dataclass
class Point:
    x: int
    seen: datetime.date


class Color(enum.Enum):
    RED = "red"


class Credentials:
    """An object whose attributes must never reach a client."""

    def __init__(self) -> None:
        self.user, self.password = "admin", "hunter2"


def returned(kind: str) -> Any:
    """The value the ``Returns`` ingress gives back for ``?kind=``."""
    return {
        "str": lambda: "hello",
        "bytes": lambda: b"\x00\x01",
        "response": lambda: PlainTextResponse("teapot", status_code=418),
        "none": lambda: None,
        "bool": lambda: True,
        "int": lambda: 7,
        "float": lambda: 1.5,
        "tuple": lambda: (1, "a"),
        "keys": lambda: {1: "a", 2.5: "b", np.int64(3): "c"},
        "numpy": lambda: {
            "m": np.array([[1, 2], [3, 4]]),
            "s": [np.float32(0.5), np.int64(3)],
            "b": np.bool_(True),
        },
        "tensor": lambda: {"logits": FakeTensor([0.25, 0.75])},
        "pydantic": lambda: Score(label="spam", value=0.9),
        "dataclass": lambda: Point(1, datetime.date(2024, 5, 6)),
        "times": lambda: [
            datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
            datetime.date(2024, 5, 6),
            datetime.time(7, 8, 9),
        ],
        "uuid": lambda: uuid.UUID(int=1),
        "decimal": lambda: decimal.Decimal("1.10"),
        "enum": lambda: Color.RED,
        "set": lambda: {"only"},
        # refused:
        "nan": lambda: float("nan"),
        "inf": lambda: {"score": float("inf")},
        "numpy_nan": lambda: {"scores": np.array([0.5, np.nan])},
        "pydantic_nan": lambda: Score(label="spam", value=float("nan")),
        "object": lambda: {"result": Credentials()},
        "lock": lambda: {"result": {"model": threading.Lock()}},
        "nested_bytes": lambda: {"raw": b"\x00"},
    }[kind]()


@serve.deployment
class Returns:
    def __call__(self, request: Request) -> Any:
        return returned(request.query_params["kind"])


@serve.deployment
class Lines:
    """A generator ingress: each item is a JSON line (or, for ``?first=nan``, refused)."""

    def __call__(self, request: Request) -> Iterator[Any]:
        if request.query_params.get("first") == "nan":
            yield {"score": float("nan")}
        yield {"i": np.int64(0), "when": datetime.date(2024, 1, 2)}
        yield {"i": 1, "logits": FakeTensor([0.5])}


@pytest.fixture(scope="module")
def base(http_port: int) -> Iterator[str]:
    serve.run(Returns.bind(), name="returns", route_prefix="/returns")
    serve.run(Lines.bind(), name="lines", route_prefix="/lines")
    yield f"http://127.0.0.1:{http_port}"
    serve.delete("returns")
    serve.delete("lines")


JSON = "application/json"
ROWS = [
    ("str", 200, "text/plain; charset=utf-8", b"hello"),
    ("bytes", 200, "application/octet-stream", b"\x00\x01"),
    ("response", 418, "text/plain; charset=utf-8", b"teapot"),
    ("none", 200, JSON, b"null"),
    ("bool", 200, JSON, b"true"),
    ("int", 200, JSON, b"7"),
    ("float", 200, JSON, b"1.5"),
    ("tuple", 200, JSON, b'[1,"a"]'),
    ("keys", 200, JSON, b'{"1":"a","2.5":"b","3":"c"}'),
    ("numpy", 200, JSON, b'{"m":[[1,2],[3,4]],"s":[0.5,3],"b":true}'),
    ("tensor", 200, JSON, b'{"logits":[0.25,0.75]}'),
    ("pydantic", 200, JSON, b'{"label":"spam","value":0.9}'),
    ("dataclass", 200, JSON, b'{"x":1,"seen":"2024-05-06"}'),
    ("times", 200, JSON, b'["2024-05-06T07:08:09+00:00","2024-05-06","07:08:09"]'),
    ("uuid", 200, JSON, b'"00000000-0000-0000-0000-000000000001"'),
    ("decimal", 200, JSON, b'"1.10"'),
    ("enum", 200, JSON, b'"red"'),
    ("set", 200, JSON, b'["only"]'),
]


@pytest.mark.parametrize(("kind", "status", "content_type", "body"), ROWS)
def test_each_row_of_the_table(
    base: str, kind: str, status: int, content_type: str, body: bytes
) -> None:
    reply = httpx.get(f"{base}/returns", params={"kind": kind}, timeout=30)
    assert (reply.status_code, reply.headers["content-type"]) == (status, content_type)
    assert reply.content == body
    assert reply.headers["content-length"] == str(len(body))


REFUSED = ["nan", "inf", "numpy_nan", "pydantic_nan", "object", "lock", "nested_bytes"]


@pytest.mark.parametrize("kind", REFUSED)
def test_what_json_cannot_hold_is_a_500_without_internals(base: str, kind: str) -> None:
    reply = httpx.get(f"{base}/returns", params={"kind": kind}, timeout=30)
    assert (reply.status_code, reply.text) == (500, "Internal Server Error")
    assert reply.headers["x-request-id"]  # finds the log line
    assert httpx.get(f"{base}/returns?kind=int", timeout=30).text == "7"  # still serving


def test_json_lines_use_the_same_conversion(base: str) -> None:
    reply = httpx.get(f"{base}/lines", timeout=30)
    assert (reply.status_code, reply.headers["content-type"]) == (200, "application/x-ndjson")
    assert reply.text == '{"i":0,"when":"2024-01-02"}\n{"i":1,"logits":[0.5]}\n'
    refused = httpx.get(f"{base}/lines?first=nan", timeout=30)
    assert (refused.status_code, refused.text) == (500, "Internal Server Error")


@serve.deployment
class Double:
    def __call__(self, values: np.ndarray) -> np.ndarray:
        return values * 2


@serve.deployment
class Summarize:
    def __call__(self, values: np.ndarray) -> dict[str, Any]:
        return {"scores": values.astype(np.float32), "best": values.argmax(), "mean": values.mean()}


@serve.deployment
class Pipeline:
    def __init__(self, double: Any, summarize: Any) -> None:
        self.double, self.summarize = double, summarize

    async def __call__(self, request: Request) -> Any:
        values = np.asarray((await request.json())["values"], dtype=np.float64)
        return await self.summarize.remote(self.double.remote(values))


def test_numpy_from_the_last_stage_of_a_pipeline_is_json(http_port: int) -> None:
    serve.run(Pipeline.bind(Double.bind(), Summarize.bind()), name="np", route_prefix="/np")
    try:
        reply = httpx.post(f"http://127.0.0.1:{http_port}/np", json={"values": [1, 3, 2]})
        assert (reply.status_code, reply.headers["content-type"]) == (200, JSON)
        assert reply.json() == {"scores": [2.0, 6.0, 4.0], "best": 1, "mean": 4.0}
    finally:
        serve.delete("np")


@serve.deployment
class ExpectsData:
    def __call__(self, data: dict[str, Any]) -> Any:
        return data["x"]


@serve.deployment
class ExpectsRequest:
    async def __call__(self, request: Request) -> Any:
        return (await request.json())["x"]


LOG_DRIVER = """
import httpx
from conftest import free_port
from shoal import serve
from test_responses import ExpectsData, Returns

port = free_port()
serve.start(http_options={"port": port})
serve.run(Returns.bind(), name="returns", route_prefix="/returns")
serve.run(ExpectsData.bind(), name="data", route_prefix="/data")
base = f"http://127.0.0.1:{port}"
for kind in ["lock", "object", "numpy_nan"]:
    reply = httpx.get(f"{base}/returns?kind={kind}", headers={"x-request-id": f"rid-{kind}"})
    print(reply.status_code)
print(httpx.post(f"{base}/data", json={"x": 1}, headers={"x-request-id": "rid-data"}).status_code)
serve.shutdown()
"""


def _failure_log(stderr: str, request_id: str) -> str:
    """The replica's error line for ``request_id`` and the traceback under it."""
    start = stderr.index(f"request {request_id} to deployment")
    end = stderr.find("request rid-", start + 1)
    return stderr[start : end if end != -1 else len(stderr)]


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Driver]]:
    yield from started_drivers(tmp_path_factory, log=(LOG_DRIVER,))


@pytest.fixture(scope="module", autouse=True)
def _start_early(request: pytest.FixtureRequest) -> None:
    start_early(request, "drivers")  # it runs while the tests above do


def test_replica_log_names_the_type_the_field_and_the_fix(drivers: dict[str, Driver]) -> None:
    result = drivers["log"].result()
    assert result.stdout.split() == ["500", "500", "500", "500"]
    lock = _failure_log(result.stderr, "rid-lock").splitlines()[0]  # one line, no traceback
    assert "request rid-lock to deployment 'Returns' failed: the value at $.result.model" in lock
    assert "cannot be sent as JSON: its type is _thread.lock. Return JSON values" in lock
    credentials = _failure_log(result.stderr, "rid-object").splitlines()[0]
    assert "$.result cannot be sent as JSON: its type is test_responses.Credentials" in credentials
    assert "Return a dict of the fields you mean to send" in credentials
    assert "hunter2" not in result.stderr  # not even the log shows the attributes
    nan = _failure_log(result.stderr, "rid-numpy_nan").splitlines()[0]
    assert "$.scores[1] cannot be sent as JSON: it is nan. JSON has no NaN or Infinity" in nan
    data = _failure_log(result.stderr, "rid-data")
    assert "KeyError: 'x'" in data
    assert "'__call__' was called over HTTP, so it received a starlette Request" in data
    assert "`await request.json()`" in data


def test_a_request_method_called_with_a_dict_says_so(deploy: Deploy) -> None:
    handle = deploy(ExpectsRequest.bind())
    with pytest.raises(AttributeError, match="'dict' object has no attribute 'json'") as info:
        handle.remote({"x": 1}).result(timeout_s=30)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert (
        "'__call__' reads a starlette Request, but it was called through a handle with a dict"
        in notes
    )


def test_a_data_method_called_through_a_handle_works_and_has_no_hint(deploy: Deploy) -> None:
    handle = deploy(ExpectsData.bind())
    assert handle.remote({"x": 1}).result(timeout_s=30) == 1
    with pytest.raises(KeyError) as info:
        handle.remote({}).result(timeout_s=30)  # a genuine missing key: no misleading note
    assert not any("starlette" in note for note in getattr(info.value, "__notes__", []))
