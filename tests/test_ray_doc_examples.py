"""Ray Serve's documentation examples run on shoal with only the import changed.

Each test runs one example from ``doc/source/serve/doc_code/`` in ray-project/ray
(named in its comment) as a separate driver script, after the change a user makes
(``from ray import serve`` -> ``from shoal import serve``, ``ray.serve.`` ->
``shoal.serve.``) and with the HTTP port moved from 8000 to a free one, then
checks what Ray's documentation says the example prints or asserts. The module's
examples run a few at a time in the background (``ran``): each test reads its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import free_port, in_background


def run_example(tmp_path: Path, source: str, timeout_s: float = 120) -> tuple[str, str]:
    """Run a Ray doc example against shoal; returns its (stdout, stderr). Fails if it fails."""
    port = free_port()
    code = textwrap.dedent(source).replace("from ray import serve", "from shoal import serve")
    code = re.sub(r"(localhost|127\.0\.0\.1):8000", f"127.0.0.1:{port}", code)
    code = code.replace("ray.serve.", "shoal.serve.")
    start = f"from shoal import serve\nserve.start(http_options={{'port': {port}}})\n"
    script = tmp_path / "example.py"
    script.write_text(start + code)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout_s, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout, result.stderr


#: Each test's example (``runs``), by test name.
EXAMPLES: dict[str, str] = {}
_Test = TypeVar("_Test", bound=Callable[..., None])


def runs(source: str) -> Callable[[_Test], _Test]:
    """The test checks what example ``source`` printed: its ``ran`` argument."""

    def register(test: _Test) -> _Test:
        EXAMPLES[test.__name__] = source
        return test

    return register


@pytest.fixture(scope="module")
def _runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[tuple[str, str]]]]:
    """The selected tests' examples, started with the module's first test."""
    jobs = {
        name: partial(run_example, tmp_path_factory.mktemp("example"), source)
        for name, source in EXAMPLES.items()
    }
    yield from in_background(request, jobs)


@pytest.fixture
def ran(
    request: pytest.FixtureRequest, _runs: dict[str, Future[tuple[str, str]]]
) -> tuple[str, str]:
    """(stdout, stderr) of the test's example (``@runs``); fails the test if it failed."""
    return _runs[request.node.originalname].result()


CHAINING_EXAMPLE = """
        from ray import serve
        from ray.serve.handle import DeploymentHandle, DeploymentResponse

        @serve.deployment
        class Adder:
            def __init__(self, increment: int):
                self._increment = increment
            def __call__(self, val: int) -> int:
                return val + self._increment

        @serve.deployment
        class Multiplier:
            def __init__(self, multiple: int):
                self._multiple = multiple
            def __call__(self, val: int) -> int:
                return val * self._multiple

        @serve.deployment
        class Ingress:
            def __init__(self, adder: DeploymentHandle, multiplier: DeploymentHandle):
                self._adder = adder
                self._multiplier = multiplier
            async def __call__(self, input: int) -> int:
                adder_response: DeploymentResponse = self._adder.remote(input)
                multiplier_response: DeploymentResponse = self._multiplier.remote(adder_response)
                return await multiplier_response

        app = Ingress.bind(Adder.bind(increment=1), Multiplier.bind(multiple=2))
        handle: DeploymentHandle = serve.run(app)
        response = handle.remote(5)
        assert response.result() == 12, "(5 + 1) * 2 = 12"
"""


@runs(CHAINING_EXAMPLE)
def test_model_composition_chaining(ran: tuple[str, str]) -> None:
    """doc_code/model_composition/chaining_example.py"""


LANGUAGE_EXAMPLE = """
        import requests
        from starlette.requests import Request
        from ray import serve
        from ray.serve.handle import DeploymentHandle

        @serve.deployment
        class EchoClass:
            def __init__(self, echo_str: str):
                self.echo_str = echo_str
            def __call__(self, request: Request) -> str:
                return self.echo_str

        for node, echo in [(EchoClass.bind(s), s) for s in ("foo", "bar", "baz")]:
            serve.run(node)
            assert requests.get("http://localhost:8000/").text == echo

        @serve.deployment
        class LanguageClassifer:
            def __init__(self, spanish_responder: DeploymentHandle, french_responder):
                self.spanish_responder = spanish_responder
                self.french_responder = french_responder
            async def __call__(self, http_request):
                request = await http_request.json()
                language, name = request["language"], request["name"]
                if language == "spanish":
                    response = self.spanish_responder.say_hello.remote(name)
                elif language == "french":
                    response = self.french_responder.say_hello.remote(name)
                else:
                    return "Please try again."
                return await response

        @serve.deployment
        class SpanishResponder:
            def say_hello(self, name: str):
                return f"Hola {name}"

        @serve.deployment
        class FrenchResponder:
            def say_hello(self, name: str):
                return f"Bonjour {name}"

        serve.run(LanguageClassifer.bind(SpanishResponder.bind(), FrenchResponder.bind()))
        body = {"language": "spanish", "name": "Dora"}
        response = requests.post("http://localhost:8000", json=body)
        print(response.text)
"""


@runs(LANGUAGE_EXAMPLE)
def test_redeploying_the_default_app_over_http(ran: tuple[str, str]) -> None:
    """doc_code/model_composition/language_example.py: the same application is deployed three times
    with new arguments, then replaced by a composed one, over HTTP."""
    stdout, _ = ran
    assert stdout.strip() == "Hola Dora"


LOCAL_DEV_EXAMPLE = """
        from starlette.requests import Request
        from ray import serve
        from ray.serve.handle import DeploymentHandle, DeploymentResponse

        @serve.deployment
        class Doubler:
            def double(self, s: str):
                return s + " " + s

        @serve.deployment
        class HelloDeployment:
            def __init__(self, doubler: DeploymentHandle):
                self.doubler = doubler
            async def say_hello_twice(self, name: str):
                return await self.doubler.double.remote(f"Hello, {name}!")
            async def __call__(self, request: Request):
                return await self.say_hello_twice(request.query_params["name"])

        app = HelloDeployment.bind(Doubler.bind())
        handle: DeploymentHandle = serve.run(app)
        response: DeploymentResponse = handle.say_hello_twice.remote(name="Ray")
        assert response.result() == "Hello, Ray! Hello, Ray!"
        local = serve.run(app, _local_testing_mode=True)
        assert local.say_hello_twice.remote(name="Ray").result() == "Hello, Ray! Hello, Ray!"

        import requests
        print(requests.put("http://localhost:8000/?name=Ray").text)
"""


@runs(LOCAL_DEV_EXAMPLE)
def test_local_development_and_local_testing_mode(ran: tuple[str, str]) -> None:
    """doc_code/local_dev.py; the curl call and its output are from
    advanced-guides/dev-workflow.md."""
    stdout, _ = ran
    assert stdout.strip() == "Hello, Ray! Hello, Ray!"


HTTP_STREAMING_EXAMPLE = """
        import asyncio, time
        import requests
        from starlette.responses import StreamingResponse
        from starlette.requests import Request
        from ray import serve

        @serve.deployment
        class StreamingResponder:
            def generate_numbers(self, max: int):
                for i in range(max):
                    yield str(i)
                    time.sleep(0.1)
            def __call__(self, request: Request) -> StreamingResponse:
                max = request.query_params.get("max", "25")
                gen = self.generate_numbers(int(max))
                return StreamingResponse(gen, status_code=200, media_type="text/plain")

        serve.run(StreamingResponder.bind())
        r = requests.get("http://localhost:8000?max=10", stream=True)
        start = time.time()
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=None, decode_unicode=True):
            print(f"Got result {round(time.time()-start, 1)}s after start: '{chunk}'")

        @serve.deployment
        class StreamingResponder:
            async def generate_forever(self):
                try:
                    i = 0
                    while True:
                        yield str(i)
                        i += 1
                        await asyncio.sleep(0.1)
                except asyncio.CancelledError:
                    print("Cancelled! Exiting.")
            def __call__(self, request: Request) -> StreamingResponse:
                gen = self.generate_forever()
                return StreamingResponse(gen, status_code=200, media_type="text/plain")

        serve.run(StreamingResponder.bind())
        r = requests.get("http://localhost:8000?max=10", stream=True)
        for i, chunk in enumerate(r.iter_content(chunk_size=None, decode_unicode=True)):
            if i == 10:
                print("Client disconnecting")
                break
"""


@runs(HTTP_STREAMING_EXAMPLE)
def test_http_streaming_and_client_disconnect(ran: tuple[str, str]) -> None:
    """doc_code/http_guide/streaming_example.py (both parts, in one script, as in Ray's file)."""
    stdout, _ = ran
    got = re.findall(r"Got result ([\d.]+)s after start: '(\d+)'", stdout)
    assert [chunk for _, chunk in got] == [str(i) for i in range(10)]
    assert float(got[-1][0]) - float(got[0][0]) >= 0.5, "chunks arrived together, not streamed"
    assert "Client disconnecting" in stdout
    assert "Cancelled! Exiting." in stdout  # printed by the replica, as in Ray's docs


HANDLE_STREAMING_EXAMPLE = """
        from typing import AsyncGenerator, Generator
        from ray import serve
        from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

        @serve.deployment
        class Streamer:
            def __call__(self, limit: int) -> Generator[int, None, None]:
                for i in range(limit):
                    yield i

        @serve.deployment
        class Caller:
            def __init__(self, streamer: DeploymentHandle):
                self._streamer = streamer.options(stream=True)
            async def __call__(self, limit: int) -> AsyncGenerator[int, None]:
                r: DeploymentResponseGenerator = self._streamer.remote(limit)
                async for i in r:
                    yield i

        app = Caller.bind(Streamer.bind())
        handle: DeploymentHandle = serve.run(app).options(stream=True)
        r: DeploymentResponseGenerator = handle.remote(10)
        assert list(r) == list(range(10))
"""


@runs(HANDLE_STREAMING_EXAMPLE)
def test_handle_streaming(ran: tuple[str, str]) -> None:
    """doc_code/model_composition/streaming_example.py"""


BATCHING_GUIDE = """
        import asyncio
        from concurrent.futures.thread import ThreadPoolExecutor
        from typing import AsyncGenerator, List, Union
        import numpy as np
        import requests
        from starlette.requests import Request
        from starlette.responses import StreamingResponse
        from ray import serve
        from ray.serve.handle import DeploymentHandle

        @serve.deployment
        class Model:
            @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
            async def __call__(self, multiple_samples: List[int]) -> List[int]:
                return np.array(multiple_samples) * 2

        handle: DeploymentHandle = serve.run(Model.bind())
        responses = [handle.remote(i) for i in range(8)]
        assert list(r.result() for r in responses) == [i * 2 for i in range(8)]

        @serve.deployment
        class StreamingResponder:
            @serve.batch(max_batch_size=5, batch_wait_timeout_s=0.1)
            async def generate_numbers(
                self, max_list: List[str]
            ) -> AsyncGenerator[List[Union[int, StopIteration]], None]:
                for i in range(max(max_list)):
                    next_numbers = []
                    for requested_max in max_list:
                        if requested_max > i:
                            next_numbers.append(str(i))
                        else:
                            next_numbers.append(StopIteration)
                    yield next_numbers
                    await asyncio.sleep(0.1)

            async def __call__(self, request: Request) -> StreamingResponse:
                max = int(request.query_params.get("max", "25"))
                gen = self.generate_numbers(max)
                return StreamingResponse(gen, status_code=200, media_type="text/plain")

        serve.run(StreamingResponder.bind())

        def issue_request(max) -> List[str]:
            response = requests.get("http://localhost:8000/?max=" + str(max), stream=True)
            return list(response.iter_content(chunk_size=None, decode_unicode=True))

        requested_maxes = [1, 2, 5, 6, 9]
        with ThreadPoolExecutor(max_workers=5) as pool:
            chunks_list = list(pool.map(issue_request, requested_maxes))
        for max, chunks in zip(requested_maxes, chunks_list):
            assert chunks == [str(i) for i in range(max)]
        print("batched streams ok")
"""


@runs(BATCHING_GUIDE)
def test_batching_guide_with_streaming_batches(ran: tuple[str, str]) -> None:
    """doc_code/batching_guide.py. Its streaming-batch part redeploys the app "default" with new
    code and then streams over HTTP: it hung before HTTP followed in-place redeploys."""
    stdout, _ = ran
    assert "batched streams ok" in stdout


FASTAPI_EXAMPLES = """
        import requests
        from fastapi import FastAPI
        from ray import serve

        app = FastAPI()

        @serve.deployment
        @serve.ingress(app)
        class MyFastAPIDeployment:
            @app.get("/")
            def root(self):
                return "Hello, world!"

        serve.run(MyFastAPIDeployment.bind(), route_prefix="/hello")
        assert requests.get("http://localhost:8000/hello").json() == "Hello, world!"

        app = FastAPI()

        @serve.deployment
        @serve.ingress(app)
        class MyFastAPIDeployment:
            @app.get("/")
            def root(self):
                return "Hello, world!"

            @app.post("/{subpath}")
            def root(self, subpath: str):
                return f"Hello from {subpath}!"

        serve.run(MyFastAPIDeployment.bind(), route_prefix="/hello")
        assert requests.post("http://localhost:8000/hello/Serve").json() == "Hello from Serve!"

        app = FastAPI()

        @app.get("/")
        def f():
            return "Hello from the root!"

        @serve.deployment
        @serve.ingress(app)
        class FastAPIWrapper:
            pass

        serve.run(FastAPIWrapper.bind(), route_prefix="/")
        assert requests.get("http://localhost:8000/").json() == "Hello from the root!"
"""


@runs(FASTAPI_EXAMPLES)
def test_fastapi_ingress_examples(ran: tuple[str, str]) -> None:
    """doc_code/http_guide/http_guide.py: the FastAPI, multiple-routes and own-app parts."""


IMPORT_STARLETTE_EXAMPLE = """
        import starlette
        import requests
        from ray import serve

        @serve.deployment
        class Counter:
            def __call__(self, request: starlette.requests.Request):
                return dict(request.query_params)

        serve.run(Counter.bind())
        print(requests.get("http://localhost:8000?a=b&c=d").json())
"""


@runs(IMPORT_STARLETTE_EXAMPLE)
def test_starlette_request_annotation_with_import_starlette(ran: tuple[str, str]) -> None:
    """The form of doc_code/http_guide/http_guide.py that imports the package only: Ray's serve
    loads starlette.requests, so the annotation resolves."""
    stdout, _ = ran
    assert stdout.strip() == "{'a': 'b', 'c': 'd'}"


STARLETTE_EXAMPLE = """
        import starlette.requests
        import requests
        from ray import serve

        @serve.deployment
        class Counter:
            def __call__(self, request: starlette.requests.Request):
                return request.query_params

        serve.run(Counter.bind())
        resp = requests.get("http://localhost:8000?a=b&c=d")
        assert resp.json() == {"a": "b", "c": "d"}
"""


@runs(STARLETTE_EXAMPLE)
def test_starlette_query_params_are_returned_as_json(ran: tuple[str, str]) -> None:
    """doc_code/http_guide/http_guide.py, the Starlette part."""


DEPLOYMENT_LOGGER_EXAMPLE = """
        from ray import serve
        import logging
        import requests

        logger = logging.getLogger("ray.serve")

        @serve.deployment
        class Counter:
            def __init__(self):
                self.count = 0
            def __call__(self, request):
                self.count += 1
                logger.info(f"count: {self.count}")
                return {"count": self.count}

        serve.run(Counter.bind())
        for i in range(10):
            requests.get("http://127.0.0.1:8000/")
        assert requests.get("http://127.0.0.1:8000/").json() == {"count": 11}
        serve.shutdown()
"""


@runs(DEPLOYMENT_LOGGER_EXAMPLE)
def test_replica_logger_output(ran: tuple[str, str]) -> None:
    """doc_code/monitoring/deployment_logger.py; monitoring.md: the replica's INFO lines reach the
    driver's terminal, tagged with the deployment name."""
    _, stderr = ran
    lines = [line for line in stderr.splitlines() if "count: " in line]
    assert len(lines) == 11 and "Counter" in lines[-1], stderr[-2000:]
