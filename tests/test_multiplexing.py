"""Model multiplexing (docs/multiplexing.md): ``@serve.multiplexed``, the model id from
the HTTP header or the handle option, model-aware routing, batching per model id.

The served tests share one application of two replica processes behind the session's
HTTP proxy (module-scoped); each test uses model ids of its own.
"""

from __future__ import annotations

import asyncio
import collections
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Deploy, wait_until

from shoal import serve
from shoal._router.models import SENT_GRACE_S, ModelRouting
from shoal._transport.messages import ReplicaInfo

#: How long a model takes to load in the served application.
LOAD_S = 0.05
HEADER = "serve_multiplexed_model_id"


class FakeModel:
    """A loaded model; its ``__del__`` records the release (once: Python may call it again)."""

    def __init__(self, model_id: str, released: list[str]) -> None:
        self.model_id = model_id
        self._released = released
        self._done = False

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._released.append(self.model_id)


@serve.deployment(num_replicas=2, max_ongoing_requests=4)
class Models:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.released: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> FakeModel:
        self.loads.append(model_id)
        await asyncio.sleep(LOAD_S)
        return FakeModel(model_id, self.released)

    async def _serve(self, work_s: float) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            assert (await self.get_model(model_id)).model_id == model_id
        await asyncio.sleep(work_s)
        return {"model_id": model_id, "replica": serve.get_replica_context().replica_id}

    async def __call__(self, request: Any) -> dict[str, Any]:
        return await self._serve(float(request.query_params.get("work_s", "0")))

    async def predict(self, work_s: float = 0.0) -> dict[str, Any]:
        return await self._serve(work_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def batched(self, xs: list[int]) -> list[dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()  # one model per batch
        await self.get_model(model_id)
        return [{"model_id": model_id, "x": x, "batch": len(xs)} for x in xs]

    def stats(self) -> dict[str, list[str]]:
        held = collections.Counter(self.loads)
        held.subtract(self.released)
        return {
            "loads": list(self.loads),
            "released": list(self.released),
            "held": sorted(m for m, n in held.items() if n > 0),
        }


@pytest.fixture(scope="module")
def served(http_port: int) -> Iterator[tuple[Any, str]]:
    handle = serve.run(Models.bind(), name="multiplexing", route_prefix="/mux")
    yield handle, f"http://127.0.0.1:{http_port}/mux"
    serve.delete("multiplexing")


def _stats(handle: Any) -> dict[str, dict[str, list[str]]]:
    return handle.stats.broadcast().result(timeout_s=10)


def _loads(handle: Any, model_id: str) -> dict[str, int]:
    """How many times each replica loaded ``model_id``."""
    return {r: s["loads"].count(model_id) for r, s in _stats(handle).items()}


async def _get_all(url: str, model_ids: list[str], work_s: float = 0.0) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        replies = await asyncio.gather(
            *(client.get(url, params={"work_s": work_s}, headers={HEADER: m}) for m in model_ids)
        )
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    return [r.json() for r in replies]


# --- the served application (two replica processes, real HTTP) -------------------------


def test_header_sets_the_model_id_and_routes(served: tuple[Any, str]) -> None:
    handle, url = served
    reply = httpx.get(url, headers={HEADER: "h1"}, timeout=10).json()
    assert reply["model_id"] == "h1"
    assert sum(_loads(handle, "h1").values()) == 1
    assert httpx.get(url, timeout=10).json()["model_id"] == ""  # no header: no model


def test_handle_option_sets_the_model_id(served: tuple[Any, str]) -> None:
    handle, _url = served
    reply = handle.options(multiplexed_model_id="o1").predict.remote().result(timeout_s=10)
    assert reply["model_id"] == "o1"
    assert handle.predict.remote().result(timeout_s=10)["model_id"] == ""


def test_same_model_keeps_hitting_the_replica_that_has_it(served: tuple[Any, str]) -> None:
    handle, url = served
    replicas = {httpx.get(url, headers={HEADER: "a1"}, timeout=10).json()["replica"]
                for _ in range(8)}  # fmt: skip
    assert len(replicas) == 1
    assert sum(_loads(handle, "a1").values()) == 1


def test_concurrent_requests_for_a_new_model_load_it_once(served: tuple[Any, str]) -> None:
    handle, url = served
    # As many as one replica takes at once (max_ongoing_requests=4): all go where the
    # first went, which loads the model once for all of them.
    replies = asyncio.run(_get_all(url, ["c1"] * 4))
    assert len({r["replica"] for r in replies}) == 1
    assert sum(_loads(handle, "c1").values()) == 1


def test_routers_learn_from_the_replicas_reports(served: tuple[Any, str]) -> None:
    """A model loaded through the driver's router: the proxy's router, which never sent
    it, finds the replica holding it from that replica's report."""
    handle, url = served
    httpx.get(url, headers={HEADER: "r0"}, timeout=10)  # the proxy's router now watches
    holder = handle.options(multiplexed_model_id="r1").predict.remote().result(timeout_s=10)
    replies = [httpx.get(url, headers={HEADER: "r1"}, timeout=10).json() for _ in range(4)]
    assert {r["replica"] for r in replies} == {holder["replica"]}
    assert sum(_loads(handle, "r1").values()) == 1


def test_a_hot_model_spreads_to_both_replicas(served: tuple[Any, str]) -> None:
    handle, url = served
    # 12 concurrent requests of 0.1 s: more than the first replica takes (4 at once), so
    # the model is loaded on the second one too, then served by both.
    replicas: set[str] = set()
    for _ in range(2):
        replicas |= {r["replica"] for r in asyncio.run(_get_all(url, ["hot"] * 12, 0.1))}
    assert len(replicas) == 2
    assert sorted(_loads(handle, "hot").values()) == [1, 1]


def test_least_recently_used_models_are_evicted_and_released(served: tuple[Any, str]) -> None:
    handle, url = served
    before = _stats(handle)
    for index in range(6):  # 6 new models; the replicas hold 2 each
        httpx.get(url, headers={HEADER: f"e{index}"}, timeout=10)
    stats = _stats(handle)
    released = sum(len(s["released"]) - len(before[r]["released"]) for r, s in stats.items())
    assert released >= 2  # __del__ ran for each evicted model
    for replica in stats.values():
        assert len(replica["held"]) <= 2
        assert set(replica["released"]) <= set(replica["loads"])


def test_batches_hold_one_model_each(served: tuple[Any, str]) -> None:
    handle, _url = served

    async def send() -> list[tuple[str, dict[str, Any]]]:
        calls = [(m, handle.options(multiplexed_model_id=m).batched.remote(i))
                 for i, m in enumerate(["bx", "by"] * 4)]  # fmt: skip
        return [(m, await response) for m, response in calls]

    results = asyncio.run(send())
    assert all(reply["model_id"] == model for model, reply in results)
    assert max(reply["batch"] for _, reply in results) > 1


def test_metrics_count_models_loads_and_hits(served: tuple[Any, str]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from shoal._instance.api import _instances

    handle, url = served
    for _ in range(2):  # a miss, then a hit
        httpx.get(url, headers={HEADER: "metrics"}, timeout=10)
    loads = sum(len(s["loads"]) for s in _stats(handle).values())
    admin_url = _instances["process"].services.admin_url

    def reported() -> dict[tuple[str, str], float] | None:
        """The app's samples once the replicas reported every load (each second)."""
        found: dict[tuple[str, str], float] = collections.defaultdict(float)
        text = httpx.get(admin_url + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("application") == "multiplexing":
                    found[(sample.name, sample.labels.get("result", ""))] += sample.value
        done = found[("ray_serve_multiplexed_models_load_counter_total", "")] == loads
        return found if done else None

    found = wait_until(reported, 10, "the replicas' multiplexing metrics")
    assert found[("ray_serve_multiplexed_model_load_latency_ms_count", "")] == loads
    assert found[("shoal_multiplexed_model_requests_total", "miss")] == loads
    assert found[("shoal_multiplexed_model_requests_total", "hit")] >= 1
    assert 1 <= found[("ray_serve_num_multiplexed_models", "")] <= 4  # 2 replicas, 2 each
    assert found[("ray_serve_multiplexed_get_model_requests_counter_total", "")] > loads


# --- both runtimes, through handles --------------------------------------------------
# --- both runtimes, through handles --------------------------------------------------


def test_multiplexing_on_both_runtimes(deploy: Deploy) -> None:
    @serve.deployment(num_replicas=2)
    class Small:
        def __init__(self) -> None:
            self.loads: list[str] = []

        @serve.multiplexed(max_num_models_per_replica=1)
        async def load(self, model_id: str) -> str:
            self.loads.append(model_id)
            return model_id.upper()

        async def __call__(self) -> tuple[str, str, str]:
            model = await self.load(serve.get_multiplexed_model_id())
            return model, serve.get_replica_context().replica_id, serve.get_multiplexed_model_id()

        def stats(self) -> list[str]:
            return self.loads

    handle = deploy(Small.bind())
    first = handle.options(multiplexed_model_id="m").remote().result(timeout_s=10)
    assert first[0] == "M" and first[2] == "m"
    again = [handle.options(multiplexed_model_id="m").remote().result(timeout_s=10)
             for _ in range(4)]  # fmt: skip
    assert {reply[1] for reply in again} == {first[1]}
    loads = handle.stats.broadcast().result(timeout_s=10)
    assert sum(x.count("m") for x in loads.values()) == 1


# --- the cache on its own (no replica) -----------------------------------------------


class _Owner:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.released: list[str] = []
        self.concurrent = self.most = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def load(self, model_id: str) -> FakeModel:
        self.loads.append(model_id)
        return FakeModel(model_id, self.released)


def test_lru_eviction_order_and_destructor() -> None:
    owner = _Owner()

    async def scenario() -> None:
        await owner.load("a")
        await owner.load("b")
        await owner.load("a")  # a is now the most recently used
        await owner.load("c")  # evicts b

    asyncio.run(scenario())
    assert owner.loads == ["a", "b", "c"]
    assert owner.released == ["b"]


def test_concurrent_calls_share_one_load_and_loads_are_bounded() -> None:
    class Loader:
        def __init__(self) -> None:
            self.loads: list[str] = []
            self.running = self.most = 0

        @serve.multiplexed(max_num_models_per_replica=4, max_concurrent_loads=2)
        async def load(self, model_id: str) -> str:
            self.loads.append(model_id)
            self.running += 1
            self.most = max(self.most, self.running)
            await asyncio.sleep(0.01)
            self.running -= 1
            return model_id

    loader = Loader()

    async def scenario() -> list[str]:
        return await asyncio.gather(*(loader.load(m) for m in ["a", "a", "b", "c", "d", "a"]))

    assert asyncio.run(scenario()) == ["a", "a", "b", "c", "d", "a"]
    assert sorted(loader.loads) == ["a", "b", "c", "d"]
    assert loader.most == 2


def test_aclose_is_awaited_when_a_model_has_no_destructor() -> None:
    closed: list[str] = []

    class Session:
        def __init__(self, name: str) -> None:
            self.name = name

        async def aclose(self) -> None:
            closed.append(self.name)

    class Loader:
        @serve.multiplexed(max_num_models_per_replica=1)
        async def load(self, model_id: str) -> Session:
            return Session(model_id)

    loader = Loader()

    async def scenario() -> None:
        await loader.load("a")
        await loader.load("b")

    asyncio.run(scenario())
    assert closed == ["a"]


def test_a_failed_load_is_not_cached() -> None:
    attempts: list[str] = []

    class Loader:
        @serve.multiplexed
        async def load(self, model_id: str) -> str:
            attempts.append(model_id)
            if len(attempts) == 1:
                raise OSError("storage unavailable")
            return model_id

    loader = Loader()
    with pytest.raises(OSError, match="storage unavailable"):
        asyncio.run(loader.load("a"))
    assert asyncio.run(loader.load("a")) == "a"
    assert attempts == ["a", "a"]


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"max_num_models_per_replica": 0}, ValueError, "got 0"),
        ({"max_num_models_per_replica": -2}, ValueError, "got -2"),
        ({"max_num_models_per_replica": "3"}, TypeError, "got '3'"),
        ({"max_num_models_per_replica": True}, TypeError, "got True"),
        ({"max_concurrent_loads": 0}, ValueError, "max_concurrent_loads must be a positive"),
        ({"max_num_models_per_replica": 2, "max_concurrent_loads": 3}, ValueError,
         "max_concurrent_loads=3 exceeds max_num_models_per_replica=2"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs: dict[str, Any], error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        serve.multiplexed(**kwargs)


def test_bad_loaders_and_model_ids_are_refused() -> None:
    def sync_loader(self: Any, model_id: str) -> str:
        return model_id

    with pytest.raises(TypeError, match=r"only decorate async .*'.*sync_loader' is not"):
        serve.multiplexed(sync_loader)

    async def no_argument() -> None:
        return None

    with pytest.raises(TypeError, match=r"'.*no_argument' takes 0"):
        serve.multiplexed(max_num_models_per_replica=2)(no_argument)

    loader = _Owner()
    with pytest.raises(TypeError, match="the model id must be a str, got 3"):
        asyncio.run(loader.load(3))
    with pytest.raises(ValueError, match="cannot be empty"):
        asyncio.run(loader.load(""))


def test_get_multiplexed_model_id_outside_a_request_is_empty() -> None:
    assert serve.get_multiplexed_model_id() == ""


# --- the router's choice (no replica) ------------------------------------------------


def _slot(replica_id: str, in_flight: int = 0, limit: int = 4) -> Any:
    return types.SimpleNamespace(
        info=ReplicaInfo(replica_id, "", limit), client=_NoStream(), in_flight=in_flight,
        limit=limit,
    )  # fmt: skip


class _NoStream:
    def stream(self, request: Any) -> Any:
        raise OSError("no replica behind this slot")


def test_router_keeps_a_new_model_on_one_replica_until_it_is_full() -> None:
    async def scenario() -> None:
        routing = ModelRouting(asyncio.get_running_loop())
        a, b = _slot("a"), _slot("b")
        first = routing.choose([a, b], "m")
        first.in_flight += 1
        for _ in range(3):  # concurrent requests: the first choice is recorded at once
            assert routing.choose([a, b], "m") is first
            first.in_flight += 1
        spilled = routing.choose([a, b], "m")  # the holder is full: the model spreads
        assert spilled is not first and spilled is not None
        assert routing.holders("m") == ["a", "b"]
        a.in_flight = b.in_flight = 4
        assert routing.choose([a, b], "m") is None  # all full: the request waits
        routing.forget("a")
        assert routing.holders("m") == ["b"]

    asyncio.run(scenario())


def test_router_spreads_a_hot_model_before_its_holders_are_full() -> None:
    async def scenario() -> None:
        routing = ModelRouting(asyncio.get_running_loop())
        a, b = _slot("a", in_flight=3, limit=100), _slot("b", in_flight=1, limit=100)
        routing._reported["a"] = frozenset({"hot", "cold"})  # both loaded on a
        for index in range(50):  # recent traffic: hot 80%, cold 20%
            routing._count("cold" if index % 5 == 0 else "hot")
        assert routing.choose([a, b], "cold") is a  # 20% of the traffic, 1 of 2 replicas
        assert routing.choose([a, b], "hot") is b  # 80% on 1 of 2, a busier: spreads
        b.in_flight = 5
        assert routing.choose([a, b], "hot") is a  # on both now: the least loaded holder
        # A model still loading is not spread by its share (a burst loads it once).
        routing._reported["a"] |= {"new"}
        routing._loading["a"] = frozenset({"new"})
        for _ in range(200):
            routing._count("new")
        b.in_flight = 0
        assert routing.choose([a, b], "new") is a

    asyncio.run(scenario())


def test_router_prefers_reported_holders_and_forgets_its_own_records() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        routing = ModelRouting(loop)
        a, b = _slot("a", in_flight=3), _slot("b")
        routing._reported["a"] = frozenset({"m"})  # a report from replica a
        assert routing.choose([a, b], "m") is a  # holds it, though more loaded
        assert routing.choose([a, b], "n") is b  # nobody holds n: the least loaded
        assert routing.holders("n") == ["b"]
        routing._sent["b"]["n"] = loop.time() - SENT_GRACE_S  # no report confirmed it
        assert routing.holders("n") == []

    asyncio.run(scenario())


def test_status_details_list_the_models_held() -> None:
    from shoal._replica.details import DetailsReporter

    owner = _Owner()

    async def scenario() -> dict[str, Any] | None:
        for model_id in ["a", "b", "c"]:
            await owner.load(model_id)

        async def call(method: Any) -> Any:
            return method()

        return await DetailsReporter(call).collect(owner, 1.0)

    details = asyncio.run(scenario())
    assert details == {"multiplexed": {"load": {
        "loaded": ["b", "c"], "loading": [], "max_num_models_per_replica": 2,
    }}}  # fmt: skip


def test_bench_smoke(http_port: int) -> None:
    """bench/multiplexing.py's measurement, short: the figures are there and sane."""
    from bench import multiplexing as bench

    handle = serve.run(bench.app(0.02, 0.005), name="mux-bench", route_prefix="/mux-bench")
    try:
        figures = bench.measure(
            handle, f"http://127.0.0.1:{http_port}/mux-bench", requests=700, warmup=200,
            concurrency=16, s=2.7,
        )  # fmt: skip
    finally:
        serve.delete("mux-bench")
    assert figures["requests_measured"] == 500
    assert figures["hit_rate"] >= 0.8, figures
    assert len([n for n in figures["hot_model_requests_by_replica"].values() if n]) == 2
    assert "hit rate after warm-up" in bench.report(figures)


def test_a_model_id_that_is_not_a_str_is_refused_by_the_handle() -> None:
    handle = serve.DeploymentHandle("Models", "nowhere")
    with pytest.raises(serve.ConfigError, match=r"takes a str .* got 7"):
        handle.options(multiplexed_model_id=7)


_RELEASED_AT_STOP: list[str] = []


def test_a_stopping_replica_releases_its_models() -> None:
    @serve.deployment
    class Holder:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def load(self, model_id: str) -> FakeModel:
            return FakeModel(model_id, _RELEASED_AT_STOP)

        async def __call__(self) -> str:
            return (await self.load(serve.get_multiplexed_model_id())).model_id

    handle = serve.run(Holder.bind(), name="mux-stop", route_prefix=None,
                       _local_testing_mode=True)  # fmt: skip
    for model_id in ["a", "b"]:
        assert handle.options(multiplexed_model_id=model_id).remote().result() == model_id
    serve.delete("mux-stop")
    assert sorted(_RELEASED_AT_STOP) == ["a", "b"]


def test_composition_sets_the_model_id_on_the_downstream_call() -> None:
    """A deployment calling another names the model on its handle; the downstream
    replica reads it (the upstream request's own id is not inherited)."""

    @serve.deployment
    class Reader:
        def __call__(self) -> str:
            return serve.get_multiplexed_model_id()

    @serve.deployment
    class Caller:
        def __init__(self, reader: Any) -> None:
            self.reader = reader

        async def __call__(self) -> tuple[str, str]:
            named = await self.reader.options(multiplexed_model_id="bar").remote()
            plain = await self.reader.remote()
            return named, plain

    handle = serve.run(Caller.bind(Reader.bind()), name="mux-compose", route_prefix=None,
                       _local_testing_mode=True)  # fmt: skip
    try:
        assert handle.options(multiplexed_model_id="foo").remote().result() == ("bar", "")
    finally:
        serve.delete("mux-compose")
