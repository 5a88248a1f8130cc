"""shoal.online: the weight store, versioned weights, publish to every replica, restarts.

Store and helper tests run in this process on ``tmp_path``. Publication tests
deploy three replicas on both runtimes (the ``deploy`` fixture); the restart
and example tests use the session's multi-process shoal (``http_port``).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Deploy, wait_until

from shoal import serve
from shoal.online import (
    GenerationNotFoundError,
    PublishError,
    VersionedWeights,
    WeightStore,
    publish,
    publish_sync,
)

ROOT = Path(__file__).resolve().parents[1]

from examples import online_learning  # noqa: E402

TIMEOUT_S = 30.0


# ------------------------------------------------------------------ WeightStore


def test_store_numbers_generations_keeps_the_last_ones_and_loads_them(tmp_path: Path) -> None:
    store = WeightStore(tmp_path / "weights", keep=3)
    assert not (tmp_path / "weights").exists()  # constructing touches nothing
    assert store.latest_generation() == 0 and store.generations() == []
    with pytest.raises(GenerationNotFoundError, match="no weights"):
        store.load()
    assert [store.save({"w": i}) for i in range(1, 8)] == [1, 2, 3, 4, 5, 6, 7]
    assert store.generations() == [5, 6, 7]
    assert store.load() == (7, {"w": 7}) and store.load(5) == (5, {"w": 5})
    with pytest.raises(GenerationNotFoundError, match="kept: \\[5, 6, 7\\]"):
        store.load(2)
    clone = pickle.loads(pickle.dumps(store))  # deployments receive it pickled
    assert (clone.path, clone.keep, clone.latest_generation()) == (store.path, 3, 7)
    with pytest.raises(ValueError, match="keep"):
        WeightStore(tmp_path, keep=0)


def test_a_failed_write_leaves_no_generation_and_stale_temp_files_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WeightStore(tmp_path)
    assert store.save("one") == 1
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", _raise_oserror)  # the rename never happens: a crash
        with pytest.raises(OSError, match="disk on fire"):
            store.save("two")
    assert store.load() == (1, "one") and store.generations() == [1]
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary file was removed
    stale = tmp_path / ".tmp-from-a-dead-writer"
    stale.write_bytes(b"half")
    os.utime(stale, (0, 0))
    assert store.save("three") == 2  # numbering continues after the failure
    assert not stale.exists()


def _raise_oserror(*args: Any) -> None:
    raise OSError("disk on fire")


WRITER = """
import sys
from shoal.online import WeightStore
store = WeightStore(sys.argv[1], keep=1000)
print(" ".join(str(store.save({"writer": sys.argv[2], "i": i})) for i in range(40)))
"""


def test_two_writer_processes_get_distinct_increasing_generations(tmp_path: Path) -> None:
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), name],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for name in ("a", "b")
    ]
    numbers = [[int(n) for n in w.communicate(timeout=TIMEOUT_S)[0].split()] for w in writers]
    assert all(w.returncode == 0 for w in writers)
    for mine in numbers:
        assert mine == sorted(mine) and len(set(mine)) == 40  # each writer: strictly increasing
    assert sorted(numbers[0] + numbers[1]) == list(range(1, 81))  # together: no gap, no twice
    store = WeightStore(tmp_path)
    assert store.latest_generation() == 80
    for generation in store.generations():  # every generation is complete and says who wrote it
        writer = store.load(generation)[1]["writer"]
        assert generation in numbers["ab".index(writer)]


# ------------------------------------------------------------------ VersionedWeights


def test_versioned_weights_move_forward_only_and_swap_atomically(tmp_path: Path) -> None:
    store = WeightStore(tmp_path, keep=1)
    weights = VersionedWeights(
        store, lambda w: ("model", w), initial=("none", 0), sync_interval_s=None
    )
    assert weights.snapshot() == (0, ("none", 0))  # an empty store: the initial model
    for value in (10, 20, 30):
        store.save(value)
    assert weights.reload(2) == 3  # generation 2 was pruned (keep=1): the newest includes it
    assert weights.reload(1) == 3 and weights.reload() == 3  # never backwards; idempotent
    assert weights.snapshot() == (3, ("model", 30))
    with pytest.raises(GenerationNotFoundError):
        weights.reload(9)  # a generation the store never had
    restarted = VersionedWeights(store, lambda w: ("model", w), sync_interval_s=None)
    assert restarted.snapshot() == (3, ("model", 30))  # a new replica starts on the latest


def test_readers_never_see_a_half_applied_update(tmp_path: Path) -> None:
    store = WeightStore(tmp_path, keep=100)
    weights = VersionedWeights(store, lambda w: {"g": w, "double": 2 * w}, sync_interval_s=None)
    done, mismatches = threading.Event(), []

    def read() -> None:
        while not done.is_set():
            generation, model = weights.snapshot()
            if model is not None and (
                model["g"] != generation or model["double"] != 2 * generation
            ):
                mismatches.append((generation, model))
            time.sleep(0)  # yields the GIL (no wait): the writer runs between reads

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for generation in range(1, 40):
        assert store.save(generation) == generation
        threading.Thread(target=weights.reload, args=(generation,)).start()
    wait_until(lambda: weights.generation == 39, TIMEOUT_S, "the last reload")
    done.set()
    for reader in readers:
        reader.join()
    assert mismatches == []


def test_the_sync_thread_catches_up_with_the_store(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    weights: VersionedWeights[str] = VersionedWeights(store, sync_interval_s=0.02)
    store.save("from elsewhere")  # no reload call: as if the broadcast was missed
    wait_until(lambda: weights.generation == 1, TIMEOUT_S, "the sync thread")
    assert weights.model == "from elsewhere"
    weights.close()


# ------------------------------------------------------------------ publish to replicas


@serve.deployment(num_replicas=3)
class Linear:
    def __init__(self, store: WeightStore) -> None:
        self.weights: VersionedWeights[float] = VersionedWeights(store, initial=0.0)

    def reload_weights(self, generation: int) -> int:
        return self.weights.reload(generation)

    def generation(self) -> int:
        return self.weights.generation

    def pid(self) -> int:
        return os.getpid()

    def predict(self, x: float) -> dict[str, float]:
        generation, slope = self.weights.snapshot()
        return {"y": slope * x, "generation": generation}


@serve.deployment
class Learner:
    """Publishes from inside a replica, the way a feedback route does."""

    def __init__(self, model: Any, store: WeightStore) -> None:
        self.model, self.store = model, store

    async def learn(self, slope: float) -> int:
        return await publish(self.model, slope, self.store)


def test_after_publish_every_replica_serves_the_new_generation(
    deploy: Deploy, tmp_path: Path
) -> None:
    store = WeightStore(tmp_path)
    learner = deploy(Learner.bind(Linear.bind(store), store))
    model = serve.get_deployment_handle("Linear", learner.app_name)
    assert set(model.generation.broadcast().result(timeout_s=TIMEOUT_S).values()) == {0}
    for slope in (1.0, 2.0, 3.0):  # from the driver
        generation = publish_sync(model, slope, store)
        replies = model.generation.broadcast().result(timeout_s=TIMEOUT_S)
        assert len(replies) == 3 and set(replies.values()) == {generation}
    generation = learner.learn.remote(5.0).result(timeout_s=TIMEOUT_S)  # from a replica
    assert generation == 4
    assert set(model.generation.broadcast().result(timeout_s=TIMEOUT_S).values()) == {4}
    answers = [model.predict.remote(2.0).result(timeout_s=TIMEOUT_S) for _ in range(20)]
    assert answers == [{"y": 10.0, "generation": 4}] * 20


@serve.deployment
class Stale:
    def reload_weights(self, generation: int) -> int:
        return 0  # a broken implementation: claims to stay on generation 0


def test_publish_fails_loudly_when_a_replica_does_not_apply(deploy: Deploy, tmp_path: Path) -> None:
    theirs = deploy(Linear.options(num_replicas=1).bind(WeightStore(tmp_path / "theirs")))
    with pytest.raises(GenerationNotFoundError, match="theirs"):  # the replica's error, as is
        publish_sync(theirs, 1.0, WeightStore(tmp_path / "ours"))
    stale = deploy(Stale.bind())
    with pytest.raises(PublishError, match="older generations") as caught:
        publish_sync(stale, 1.0, WeightStore(tmp_path / "stale"))
    assert caught.value.generation == 1  # persisted all the same


def test_a_killed_replica_comes_back_on_the_latest_generation(
    http_port: int, tmp_path: Path
) -> None:
    store = WeightStore(tmp_path)
    model = serve.run(Linear.bind(store), name="online-kill", route_prefix=None)
    try:
        publish_sync(model, 1.0, store)
        pids = set(model.pid.broadcast().result(timeout_s=TIMEOUT_S).values())
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        started = time.monotonic()
        generation = publish_sync(model, 2.0, store)  # while the replica is dead or restarting
        publish_took = time.monotonic() - started

        def replaced() -> bool:
            replicas = serve.status().applications["online-kill"].deployments["Linear"].replicas
            live = {r.pid for r in replicas if r.state == "RUNNING"}
            return len(live) == 3 and victim not in live

        wait_until(replaced, TIMEOUT_S, "the controller to replace the killed replica")
        replies = model.generation.broadcast().result(timeout_s=TIMEOUT_S)
        new_pids = set(model.pid.broadcast().result(timeout_s=TIMEOUT_S).values())
        assert victim not in new_pids and len(new_pids - pids) == 1
        assert set(replies.values()) == {generation} == {2}
        print(f"publish during the restart took {publish_took:.3f} s")
    finally:
        serve.delete("online-kill")


# ------------------------------------------------------------------ user_config


@serve.deployment(num_replicas=3, user_config={"learning_rate": 0.1})
class Tunable:
    def __init__(self) -> None:
        self.applied: list[float] = []

    def reconfigure(self, config: dict[str, float]) -> None:
        self.applied.append(config["learning_rate"])

    def history(self) -> tuple[int, list[float]]:
        return os.getpid(), self.applied


def test_user_config_updates_apply_in_order_without_restarts(deploy: Deploy) -> None:
    handle = deploy(Tunable.bind(), name="tunable")
    first = handle.history.broadcast().result(timeout_s=TIMEOUT_S)
    for rate in (0.2, 0.3, 0.4):
        handle = deploy(Tunable.options(user_config={"learning_rate": rate}).bind(), name="tunable")
    replies = handle.history.broadcast().result(timeout_s=TIMEOUT_S)
    assert replies.keys() == first.keys()  # the same replicas: nothing restarted
    assert all(replies[r] == (first[r][0], [0.1, 0.2, 0.3, 0.4]) for r in replies)
    deployment = serve.status().applications["tunable"].deployments["Tunable"]
    assert deployment.config_version == 3
    assert {r.replica_id: r.config_version for r in deployment.replicas} == dict.fromkeys(
        replies, 3
    )


# ------------------------------------------------------------------ the example


TRAINER = """
import sys
import numpy as np
from examples.online_learning import DriftingStream
from shoal.online import WeightStore
store = WeightStore(sys.argv[1])
_, weights = store.load()
x, y = DriftingStream(seed=7).batch(0, 200)
weights["model"].partial_fit(x, y)
weights["examples_seen"] += len(y)
print(store.save(weights))
"""


def test_online_learning_example_learns_recovers_and_accepts_an_external_trainer(
    http_port: int, tmp_path: Path
) -> None:
    serve.run(online_learning.build_app(tmp_path), name="online-example", route_prefix="/ol")
    base = f"http://127.0.0.1:{http_port}/ol"
    try:
        accuracy = online_learning.simulate(base, steps=40, batch=25, window=5)
        before, after_drift, last = accuracy[3], accuracy[4], accuracy[-1]
        assert before > 0.8 and after_drift < before - 0.1 and last > 0.8, accuracy
        generations = httpx.get(f"{base}/generations").json()
        assert len(generations) == 3 and set(generations.values()) == {40}
        # A trainer outside shoal writes to the store, then tells the app over HTTP.
        trainer = subprocess.run(
            [sys.executable, "-c", TRAINER, str(tmp_path)],
            capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT_S, check=True,
        )  # fmt: skip
        assert trainer.stdout.strip() == "41"
        reload = httpx.post(f"{base}/reload", json={}, timeout=TIMEOUT_S)
        assert reload.headers["x-model-generation"] == "41"
        assert set(reload.json()["replicas"].values()) == {41}
        answer = httpx.post(f"{base}/predict", json={"instances": [[0.1, 0.2]]})
        assert answer.headers["x-model-generation"] == "41" and answer.json()["generation"] == 41
        bad = httpx.post(f"{base}/predict", json={"instances": [[0.1, 0.2, 0.3]]})
        assert bad.status_code == 422
    finally:
        serve.delete("online-example")


def test_demo_serves_the_online_example() -> None:
    from examples import demo

    assert ("online", "/online") in [(name, prefix) for name, prefix, _ in demo.APPS]
    code = "import sys; sys.modules['sklearn'] = None; import examples.demo as d; print(*d.SKIPPED)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
        timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "online" in proc.stdout.split()
