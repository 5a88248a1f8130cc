"""The multi-process runtime forks its workers from a fork server (shoal._runtime.process.zygote).

What a user relies on: a forked replica behaves as one started with ``python -m``
(the driver's environment, working directory and import path of the moment it
is started, its own random state, the same command line in ``ps``), and a fork
server that dies or hangs costs speed, never a replica.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, run_driver, wait_until

from bench.procs import descendants, is_alive
from shoal import serve

#: Driver code: start the instance's fork server (it starts with a second replica) and
#: wait until it can fork.
FORK_SERVER_READY = """
from shoal import serve

def fork_server_ready():
    from shoal._instance import api
    from conftest import wait_until

    @serve.deployment(num_replicas=2)
    def warm(_):
        return 0

    serve.run(warm.bind(), name="warm", route_prefix=None)
    forks = api._instances["process"].controller.runtime._forks
    wait_until(lambda: forks.ready, 60, "the fork server")
    serve.delete("warm")
"""


@serve.deployment(num_replicas=2)
def warm(_: object) -> int:
    return 0


@pytest.fixture(scope="module")
def forking(http_port: int) -> None:
    """The session instance's fork server, ready: it starts with a second replica."""
    from shoal._instance import api

    serve.run(warm.bind(), name="fork-warm", route_prefix=None)
    forks = api._instances["process"].controller.runtime._forks  # type: ignore[attr-defined]
    wait_until(lambda: forks.ready, 60, "the fork server")
    serve.delete("fork-warm")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@serve.deployment(num_replicas=2)
class Probe:
    def __call__(self, module: str) -> dict[str, Any]:
        import importlib

        import numpy as np

        return {
            "pid": os.getpid(),
            "marker": os.environ.get("SHOAL_FORK_TEST_MARKER"),
            "cwd": os.getcwd(),
            "imported": importlib.import_module(module).VALUE,
            "random": float(np.random.random()),
        }


def _ask_every_replica(handle: Any, module: str) -> list[dict[str, Any]]:
    """One answer from each of the two replicas."""
    answers: dict[int, dict[str, Any]] = {}

    def both() -> bool:
        answer = handle.remote(module).result(timeout_s=30)
        answers[answer["pid"]] = answer
        return len(answers) == 2

    wait_until(both, 30, "answers from both replicas")
    return list(answers.values())


def test_a_forked_replica_runs_in_the_drivers_present_environment(
    forking: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server of the session's instance started long ago, in another directory
    # and environment: the replicas must see the ones of the moment they start.
    (tmp_path / "fork_test_module.py").write_text("VALUE = 'from the new directory'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # replicas import as the driver does
    monkeypatch.setenv("SHOAL_FORK_TEST_MARKER", "set after the fork server started")
    handle = serve.run(Probe.bind(), name="fork-probe", route_prefix=None)
    try:
        answers = _ask_every_replica(handle, "fork_test_module")
        parents = [_parent(answer["pid"]) for answer in answers]
        commands = [_command(answer["pid"]) for answer in answers]
    finally:
        serve.delete("fork-probe")
    for answer, fork_server, command in zip(answers, parents, commands, strict=True):
        assert answer["marker"] == "set after the fork server started"
        assert answer["cwd"] == str(tmp_path)
        assert answer["imported"] == "from the new directory"
        assert "shoal._runtime.process.zygote" in _command(fork_server)
        assert _parent(fork_server) == os.getpid()
        assert f"{sys.executable} -m shoal._runtime.process.worker " in command  # as in ps
    # Each replica has its own numpy random state, as a new process would.
    assert answers[0]["random"] != answers[1]["random"]


@serve.deployment(ray_actor_options={"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
def threads(_: object) -> dict[str, Any]:
    return {"pid": os.getpid(), "omp": os.environ.get("OMP_NUM_THREADS")}


def test_a_replica_with_env_vars_starts_with_python_m(forking: None) -> None:
    # numpy reads OMP_NUM_THREADS when imported: it cannot apply in a process forked from
    # one that imported numpy already, so such a replica is not forked.
    handle = serve.run(threads.bind(), name="fork-env", route_prefix=None)
    try:
        answer = handle.remote(None).result(timeout_s=30)
        parent, command = _parent(answer["pid"]), _command(answer["pid"])
    finally:
        serve.delete("fork-env")
    assert answer["omp"] == "1"
    assert parent == os.getpid()
    assert f"{sys.executable} -m shoal._runtime.process.worker " in command


SNAPSHOT_MODULE = """
import importlib, sys
from shoal._runtime.process.zygote import PRELOAD_LATER

# The fork server imports these while idle, maybe between this module and the fork:
# imported here first, they cannot show as the replica's own.
for name in PRELOAD_LATER:
    importlib.import_module(name)
MODULES = frozenset(sys.modules)  # imported by the fork server: what it held at that moment
"""


@serve.deployment(num_replicas=2)
class ImportedLater:
    """Reports the modules its process imported after its module was imported."""

    def __init__(self, snapshot: Any) -> None:
        self.snapshot = snapshot

    def __call__(self, _: object) -> dict[str, Any]:
        return {"pid": os.getpid(), "later": sorted(set(sys.modules) - self.snapshot.MODULES)}


def test_a_forked_replica_imports_nothing_of_its_own_before_it_serves(
    forking: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the fork server imported is shared copy-on-write by every worker it forks; what
    # a worker imports after its fork is private to it, in memory and in CPU. uvloop was:
    # ~3.5 MB and ~15 ms in each of the demo's 50 workers.
    (tmp_path / "fork_snapshot_module.py").write_text(SNAPSHOT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fork_snapshot_module

    try:
        handle = serve.run(ImportedLater.bind(fork_snapshot_module), name="fork-later")
        answers = _ask_every_replica(handle, None)
        parents = [_command(_parent(answer["pid"])) for answer in answers]
    finally:
        sys.modules.pop("fork_snapshot_module", None)
        serve.delete("fork-later")
    for answer, parent in zip(answers, parents, strict=True):
        assert "shoal._runtime.process.zygote" in parent
        assert answer["later"] == [], answer["later"]


@serve.deployment(num_replicas=1)
class ImportsInInit:
    """Imports an installed module in its constructor (as ``import sklearn`` often is):
    one of the standard library's that neither shoal nor what its fork server preloads
    imports (``colorsys`` would not do: FastAPI imports it)."""

    def __init__(self) -> None:
        self.had_it = "graphlib" in sys.modules  # before this replica's constructor ran
        import graphlib  # noqa: F401

    def __call__(self, _: object) -> dict[str, Any]:
        return {"pid": os.getpid(), "had_it": self.had_it}


def test_replicas_forked_after_one_started_have_what_its_constructor_imported(
    forking: None,
) -> None:
    # A scale-up, redeploy or replacement forks its replicas from the fork server: they
    # start with what the deployment's first replica imported in its constructor (an
    # installed package) rather than each importing it again.
    try:
        handle = serve.run(ImportsInInit.bind(), name="fork-learned", route_prefix=None)
        [first] = _answers(handle, 1)
        assert first["had_it"] is False  # the fork server did not have it yet
        serve.run(ImportsInInit.options(num_replicas=3).bind(), name="fork-learned",
                  route_prefix=None)  # fmt: skip
        answers = _answers(handle, 3)
    finally:
        serve.delete("fork-learned")
    later = [answer for answer in answers if answer["pid"] != first["pid"]]
    assert len(later) == 2 and all(answer["had_it"] for answer in later), answers


@serve.deployment
class Sklearn:
    """Imports scikit-learn in its constructor (~1,200 installed modules to learn)."""

    def __init__(self, *downstream: Any) -> None:
        from sklearn.linear_model import LogisticRegression  # noqa: F401

        self.downstream = downstream

    def __call__(self, _: object) -> list[int]:
        return [os.getpid()]


def test_a_redeploy_of_deployments_that_learned_much_is_still_forked(forking: None) -> None:
    # A redeploy preloads what each deployment's replicas imported (scikit-learn: ~1,200
    # modules): it must not end forking (sent in full with every preload, those of
    # examples/demo.yaml's eleven applications once filled the fork server's socket).
    from shoal._instance import api

    forks = api._instances["process"].controller.runtime._forks  # type: ignore[attr-defined]
    graph = Sklearn.bind(*(Sklearn.options(name=f"Sklearn{i}").bind() for i in range(3)))
    for _ in range(2):
        serve.run(graph, name="fork-learned-many", route_prefix=None)
        serve.delete("fork-learned-many")
    handle = serve.run(graph, name="fork-learned-many", route_prefix=None)
    try:
        [pid] = handle.remote(None).result(timeout_s=30)
        assert forks.broken is None
        assert "shoal._runtime.process.zygote" in _command(_parent(pid))
    finally:
        serve.delete("fork-learned-many")


def _answers(handle: Any, count: int) -> list[dict[str, Any]]:
    """One answer from each of ``count`` replicas."""
    answers: dict[int, dict[str, Any]] = {}

    def all_answered() -> bool:
        answer = handle.remote(None).result(timeout_s=30)
        answers[answer["pid"]] = answer
        return len(answers) == count

    wait_until(all_answered, 60, f"answers from {count} replicas")
    return list(answers.values())


def test_only_installed_modules_imported_without_a_new_thread_are_learned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import threading

    from shoal._runtime.process.learned import ImportsDuring

    (tmp_path / "learned_user_module.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "graphlib", raising=False)
    imports = ImportsDuring()
    try:
        importlib.import_module("graphlib")  # the standard library: installed
        importlib.import_module("learned_user_module")  # the user's: edited, re-imported
    finally:
        assert imports.stop() == ["graphlib"]
    assert imports not in sys.meta_path
    monkeypatch.delitem(sys.modules, "graphlib")
    imports = ImportsDuring()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="started-by-an-import")
    try:
        importlib.import_module("graphlib")
        thread.start()
    finally:  # which import started it cannot be told: nothing is learned
        assert imports.stop() == []
        stop.set()
        if thread.is_alive():
            thread.join()
        sys.modules.pop("learned_user_module", None)


def test_the_fork_server_never_takes_shoal_for_a_users_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When a user's file changes, the fork server drops the user's modules it imported, to
    # import them afresh. Dropping shoal's own (an editable install or a checkout is not in
    # site-packages) made a second copy of its classes beside those the rest of shoal
    # holds: a config built in a forked child failed ``isinstance(app, Application)``.
    import shoal._api.deployment
    from shoal._runtime.process import zygote

    (tmp_path / "fork_user_module.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fork_user_module

    try:
        assert zygote._file_stamp(shoal._api.deployment) is None
        assert zygote._file_stamp(fork_user_module) is not None
    finally:
        sys.modules.pop("fork_user_module", None)


DRIVER = (
    FORK_SERVER_READY
    + """
import json, os, signal, sys
from pathlib import Path
from conftest import wait_until
from shoal import serve

def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

@serve.deployment
def whoami(_):
    return os.getpid()

serve.start(http_options={"port": int(sys.argv[1])})
fork_server_ready()
first = serve.run(whoami.bind(), name="first", route_prefix=None)
forked = first.remote(None).result(timeout_s=30)
fork_server = parent(forked)
os.kill(fork_server, signal.SIGKILL)
wait_until(lambda: parent(forked) != fork_server, 10, "the orphan to be reparented")
# The forked replica still serves; a new one starts without the fork server.
still = first.remote(None).result(timeout_s=30)
second = serve.run(whoami.bind(), name="second", route_prefix=None)
unforked = second.remote(None).result(timeout_s=30)
# A forked replica's death is still seen: it is replaced.
os.kill(forked, signal.SIGKILL)

def replacement():
    try:
        pid = first.remote(None).result(timeout_s=30)
    except serve.exceptions.RayServeException:  # sent to the dying replica
        return None
    return pid if pid != forked else None

replaced = wait_until(replacement, 30, "a replacement of the killed replica")
found = {
    "driver": os.getpid(), "fork_server_was_parent": fork_server != os.getpid(),
    "forked": forked, "still": still, "unforked_parent": parent(unforked),
    "replaced_parent": parent(replaced), "pids": [forked, unforked, replaced],
}
serve.shutdown()
print(json.dumps(found))
"""
)


def test_a_dead_fork_server_costs_speed_not_replicas(tmp_path: Path) -> None:
    result = run_driver(tmp_path, DRIVER)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["fork_server_was_parent"]
    assert found["still"] == found["forked"]  # it kept serving without its parent
    assert found["unforked_parent"] == found["driver"]  # started with python -m
    assert found["replaced_parent"] == found["driver"]
    for pid in found["pids"]:  # serve.shutdown() ended them all, forked or not
        assert not is_alive(pid)


def test_shutdown_ends_the_fork_server(tmp_path: Path) -> None:
    source = (
        FORK_SERVER_READY
        + """
import json, os, sys
from pathlib import Path
from shoal import serve

@serve.deployment
def whoami(_):
    return os.getpid()

serve.start(http_options={"port": int(sys.argv[1])})
fork_server_ready()
pid = serve.run(whoami.bind(), name="a", route_prefix=None).remote(None).result(timeout_s=30)
fork_server = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
serve.shutdown()
alive = Path(f"/proc/{fork_server}").exists()
print(json.dumps({"fork_server": fork_server, "driver": os.getpid(), "alive": alive}))
"""
    )
    found = json.loads(run_driver(tmp_path, source).stdout.strip().splitlines()[-1])
    assert found["fork_server"] != found["driver"]
    assert not found["alive"], "serve.shutdown() left the fork server running"


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the fork server is Linux only")


MODULE = """
import os

with open(os.environ["SHOAL_FORK_TEST_IMPORTS"], "a") as imports:
    imports.write(f"{os.getpid()}\\n")  # who imported this module

VERSION = %d
"""


@serve.deployment(num_replicas=2)
class Versioned:
    """Holds a module: unpickling it imports the module (cloudpickle sends it by name)."""

    def __init__(self, module: Any, generation: int) -> None:
        self.module = module  # generation: new arguments make serve.run replace the replicas

    def __call__(self, _: object) -> dict[str, Any]:
        return {"version": self.module.VERSION, "pid": os.getpid()}


def test_replicas_share_their_module_imported_once_and_see_its_edits(
    forking: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tmp_path / "fork_shared_module.py"
    imports = tmp_path / "imports.txt"
    monkeypatch.setenv("SHOAL_FORK_TEST_IMPORTS", str(imports))
    monkeypatch.syspath_prepend(str(tmp_path))
    module.write_text(MODULE % 1)
    import fork_shared_module

    try:
        handle = serve.run(Versioned.bind(fork_shared_module, 1), name="shared", route_prefix=None)
        first = _ask_every_replica(handle, None)
        importers = {int(line) for line in imports.read_text().split()} - {os.getpid()}
        # Imported by the fork server, before it forked the two replicas: not by each.
        assert len(importers) == 1, importers
        (fork_server,) = importers
        assert all(_parent(answer["pid"]) == fork_server for answer in first)
        assert {answer["version"] for answer in first} == {1}
        # A redeploy of edited code runs the new code, though the fork server holds the old.
        module.write_text(MODULE % 2)
        sys.modules.pop("fork_shared_module")
        import fork_shared_module as edited

        handle = serve.run(Versioned.bind(edited, 2), name="shared", route_prefix=None)
        second = _ask_every_replica(handle, None)
        assert {answer["version"] for answer in second} == {2}
    finally:
        sys.modules.pop("fork_shared_module", None)
        serve.delete("shared")


THREAD_DRIVER = (
    FORK_SERVER_READY
    + """
import os, sys
from pathlib import Path
from shoal import serve

Path(sys.argv[2], "threaded_module.py").write_text(
    "import threading, os\\n"
    "threading.Thread(target=threading.Event().wait, daemon=True).start()\\n"
    "def pid(_):\\n"
    "    return os.getpid()\\n"
)
sys.path.insert(0, sys.argv[2])
import threaded_module

def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

def started(app, name):
    return serve.run(app, name=name, route_prefix=None).remote(None).result(timeout_s=30)

serve.start(http_options={"port": int(sys.argv[1])})
fork_server_ready()
def after(_):
    return os.getpid()

threaded = started(serve.deployment(threaded_module.pid).bind(), "t")
after = started(serve.deployment(after).bind(), "after")
print(parent(threaded), parent(after), os.getpid())
serve.shutdown()
"""
)


def test_a_module_that_starts_a_thread_is_not_forked(tmp_path: Path) -> None:
    # Forking a process with threads can deadlock the child (a lock held by a thread
    # that does not exist there): once an import started one, nothing more is forked.
    result = run_driver(tmp_path, THREAD_DRIVER, str(tmp_path))
    threaded_parent, after_parent, driver = (int(n) for n in result.stdout.split()[-3:])
    assert threaded_parent == driver  # started with python -m by the driver itself
    assert after_parent == driver  # and so is every replica after it


def test_the_fork_server_is_turned_off_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal._errors import ConfigError
    from shoal._runtime.process.forks import fork_server_wanted

    monkeypatch.delenv("SHOAL_FORK_SERVER", raising=False)
    assert fork_server_wanted()
    monkeypatch.setenv("SHOAL_FORK_SERVER", "0")
    assert not fork_server_wanted()
    monkeypatch.setenv("SHOAL_FORK_SERVER", "off")
    with pytest.raises(ConfigError, match="SHOAL_FORK_SERVER='off': use 1"):
        fork_server_wanted()


WHO_APP = """
import os
from shoal import serve

with open(os.environ["SHOAL_FORK_TEST_IMPORTS"], "a") as imports:
    imports.write(f"{os.getpid()}\\n")  # who imported this module

@serve.deployment
def who(_):
    return {"pid": os.getpid(), "parent": os.getppid()}

app = who.bind()
"""


def test_shoal_run_forks_its_proxy_and_first_replica_and_ends_its_fork_server(
    tmp_path: Path,
) -> None:
    # shoal run forks the fork server right after its own imports: even the proxy and the
    # instance's only replica are forked (the cold start), and Ctrl-C ends them all.
    (tmp_path / "who_app.py").write_text(WHO_APP)
    imports = tmp_path / "imports.txt"
    port = free_port()
    command = [sys.executable, "-m", "shoal", "run", "who_app:app", "--port", str(port),
               "--admin-port", "0"]  # fmt: skip
    environ = {**os.environ, "SHOAL_FORK_TEST_IMPORTS": str(imports)}
    server = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=environ)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # printed once the route answers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as reply:
            answer = json.loads(reply.read())
        fork_server = answer["parent"]
        assert _parent(fork_server) == server.pid
        assert "shoal._runtime.process.zygote" in _command(fork_server)
        assert f"{sys.executable} -m shoal._runtime.process.worker " in _command(answer["pid"])
        # The target is imported by the CLI and by the fork server (as soon as it could
        # fork), not by the replica.
        assert sorted(map(int, imports.read_text().split())) == sorted([server.pid, fork_server])
        forked = descendants(fork_server)
        assert any("proxy_worker" in _command(pid) for pid in forked), forked
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
        gone = [fork_server, *forked]
        wait_until(lambda: not any(map(is_alive, gone)), 10, f"processes {gone} to end")
    finally:
        server.kill()
        server.wait(timeout=10)


EARLY_DRIVER = """
import json, os, signal, sys, threading
from pathlib import Path
from conftest import wait_until
from shoal import serve
from shoal._runtime.process import forks

def parent(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

# Not from a process with another thread: a child would inherit the locks it holds.
blocker = threading.Event()
thread = threading.Thread(target=blocker.wait)
thread.start()
refused = not forks.start_early()
blocker.set()
thread.join()
# Discarded if no instance takes it: ended and reaped.
assert forks.start_early()
discarded = forks._early[0]
forks.discard_early()
discarded_gone = not Path(f"/proc/{discarded}").exists()

assert forks.start_early()
early = forks._early[0]

@serve.deployment
def whoami(_):
    return os.getpid()

serve.start(http_options={"port": int(sys.argv[1])})
from shoal._instance import api
runtime = api._instances["process"].controller.runtime
first = serve.run(whoami.bind(), name="first", route_prefix=None).remote(None).result(timeout_s=30)
found = {
    "driver": os.getpid(), "early": early, "refused": refused, "discarded": discarded_gone,
    "first": first,
    "first_parent": parent(first), "proxy_parent": parent(runtime.proxy_pid),
}
os.kill(early, signal.SIGKILL)  # survivable: workers start with python -m from then on
wait_until(lambda: runtime._forks.broken, 10, "the runtime to see the fork server die")
second = serve.run(whoami.bind(), name="second", route_prefix=None)
second = second.remote(None).result(timeout_s=30)
found["second_parent"] = parent(second)
found["first_still"] = serve.get_app_handle("first").remote(None).result(timeout_s=30)
serve.shutdown()
found["early_gone"] = not Path(f"/proc/{early}").exists()  # reaped, not a zombie
print(json.dumps(found))
"""


def test_an_early_fork_server_forks_the_first_workers_and_can_be_killed(tmp_path: Path) -> None:
    found = json.loads(run_driver(tmp_path, EARLY_DRIVER).stdout.strip().splitlines()[-1])
    assert found["refused"]  # another thread ran: no fork
    assert found["discarded"]
    assert found["first_parent"] == found["early"]  # the first replica: forked
    assert found["proxy_parent"] == found["early"]  # and the proxy
    assert found["second_parent"] == found["driver"]  # python -m once it is dead
    assert found["first_still"] == found["first"]  # its forked replica kept serving
    assert found["early_gone"]


def test_a_new_workers_replica_sets_reach_it_before_any_later_update() -> None:
    # A forked proxy says hello within milliseconds, while the instance publishes its first
    # replica sets: the sets of the moment must be sent before any update published after
    # (sent one task each, a newer set arrived first and the older one was applied over
    # it: the proxy answered 500, no replica, for good).
    import asyncio

    from shoal._runtime.process.workers import Subscriber, send_in_order
    from shoal._transport.messages import Result

    sent: list[str] = []

    class Connection:
        closed = False

        def call(self, message: str) -> asyncio.Future[Result]:
            sent.append(message)
            future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            future.get_loop().call_soon(future.set_result, Result())
            return future

    async def scenario() -> None:
        connection = Connection()
        worker = Subscriber("attached-test", connection)  # type: ignore[arg-type]

        async def publish() -> None:
            connection.call("newer set")

        spawn = asyncio.ensure_future(send_in_order(worker, ["configure", "set"], 5.0))  # type: ignore[list-item]
        await asyncio.gather(spawn, publish())

    asyncio.run(scenario())
    assert sent == ["configure", "set", "newer set"]


async def test_requests_that_fill_a_busy_fork_servers_socket_wait_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the fork server imports a deployment's slow module it reads nothing, and the
    # runtime's next requests fill its socket (here: each carries a 60 KB environment;
    # the socket holds ~210 KB). They wait for it to read, rather than end forking.
    import asyncio

    from shoal._runtime.process.forks import ForkServer

    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(1.0)\n")
    monkeypatch.setenv("SHOAL_TEST_LARGE_ENV", "x" * 60_000)
    server = ForkServer(ready_timeout_s=60, spawn_timeout_s=5, preload_timeout_s=30)
    server.start()
    path, cwd = [str(tmp_path), *sys.path], str(tmp_path)
    try:
        first = asyncio.ensure_future(server.preload(["slow_to_import"], path, cwd))
        more = [server.preload([], path, cwd) for _ in range(6)]
        await asyncio.wait_for(asyncio.gather(first, *more), 60)
        assert server.broken is None
        assert server.ready
    finally:
        await server.stop(10)
