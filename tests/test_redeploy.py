"""In-place redeploys (``serve.run`` again on the same app) keep answering over HTTP.

Regression: after a redeploy that replaced replicas, the proxy's router
dropped its connection to the new replica (a later replica-set update brought
an equal, but not identical, description of it) and HTTP requests hung.
Every kind of redeploy is exercised here under concurrent HTTP load: no
request may fail, and the new version must answer right after ``serve.run``
returns.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from conftest import Driver, start_early

from shoal import serve


@serve.deployment
class Echo:
    def __init__(self, word: str) -> None:
        self.word = word
        self.suffix = ""

    def reconfigure(self, config: dict[str, str]) -> None:
        self.suffix = config.get("suffix", "")

    def __call__(self, request: object) -> str:
        return self.word + self.suffix


@serve.deployment(name="Echo")
class ShoutingEcho:  # new code under the same deployment name
    def __init__(self, word: str) -> None:
        self.word = word

    def __call__(self, request: object) -> str:
        return self.word.upper()


class _Load:
    """Closed-loop HTTP clients that record every answer until stopped."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url = url
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    if response.status_code == 200:
                        self.answers[response.text] += 1
                    else:
                        self.failures.append(f"{response.status_code}: {response.text}")

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def app_url(http_port: int) -> Iterator[str]:
    yield f"http://127.0.0.1:{http_port}/redeploy"
    serve.delete("redeploy")


def _run(app: serve.Application) -> None:
    serve.run(app, name="redeploy", route_prefix="/redeploy")


def test_redeploys_of_every_kind_keep_answering_over_http(app_url: str) -> None:
    _run(Echo.bind("foo"))
    assert httpx.get(app_url, timeout=10).text == "foo"
    steps = [
        (Echo.bind("bar"), "bar"),  # new arguments
        (ShoutingEcho.bind("bar"), "BAR"),  # new code
        (Echo.options(num_replicas=2).bind("baz"), "baz"),  # options (and arguments)
        (Echo.options(num_replicas=2, max_ongoing_requests=3).bind("baz"), "baz"),  # options
        (Echo.options(num_replicas=2, user_config={"suffix": "!"}).bind("baz"), "baz!"),
        (Echo.options(num_replicas=1, user_config={"suffix": "?"}).bind("baz"), "baz?"),
    ]
    for app, expected in steps:  # idle, as in the bug report
        _run(app)
        _assert_answers(app_url, expected)
    _run(Echo.bind("foo"))
    with _Load(app_url) as load:
        for app, expected in steps:
            _run(app)
            _assert_answers(app_url, expected)
    assert load.failures == []
    assert sum(load.answers.values()) > len(steps)
    assert set(load.answers) <= {"foo", "bar", "BAR", "baz", "baz!", "baz?"}


def _assert_answers(url: str, expected: str) -> None:
    """The update is complete when serve.run returns: the very next requests see it."""
    with httpx.Client(timeout=10) as client:
        assert [client.get(url).text for _ in range(5)] == [expected] * 5


ISSUE_SCRIPT = """
import httpx
from conftest import free_port
from shoal import serve

@serve.deployment
class Echo:
    def __init__(self, s): self.s = s
    def __call__(self, request): return self.s

port = free_port()
serve.start(http_options={"port": port})
for s in ["foo", "bar", "baz"]:
    serve.run(Echo.bind(s))
    print(httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text)
serve.shutdown()
"""


@pytest.fixture(scope="module")
def issue_script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Driver]:
    driver = Driver(tmp_path_factory.mktemp("issue"), ISSUE_SCRIPT)
    yield driver
    driver.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_the_script_first(request: pytest.FixtureRequest) -> None:
    start_early(request, "issue_script")  # it runs while the test above does


def test_the_script_from_the_issue(issue_script: Driver) -> None:
    """The reproduction from the bug report, as a driver of its own (default port 8000 aside)."""
    assert issue_script.result().stdout.split() == ["foo", "bar", "baz"]
