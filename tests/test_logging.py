"""Logs an operator can use (docs/logging.md), with real worker processes.

Two drivers run side by side (each its own shoal): one with deployments and
applications setting their own ``logging_config``, one with ``serve.start``'s. A
``shoal start`` server gets a config file with ``logging_config`` at each level
and is read with ``shoal logs`` (and ``-f``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal._config import AdminOptions, HTTPOptions, LoggingConfig
from shoal._instance.home import LOGS, ServerInfo
from shoal._instance.server import start_server
from tests.conftest import (
    app_running,
    free_port,
    shoal_home,
    start_early,
    started_drivers,
    wait_until,
)
from tests.test_server import _new_home, _put, _stop

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"

DEPLOYMENTS_DRIVER = """
import json, logging, sys, httpx
from conftest import free_port
from shoal import serve
from shoal._observe.process import current_telemetry

log, mine = logging.getLogger("ray.serve"), logging.getLogger("my.model")


@serve.deployment
class Plain:
    def __call__(self, request):
        log.info("plain info")
        log.debug("plain debug")
        mine.info("user info")
        log.info("plain file only", extra={"log_to_stderr": False})  # Ray's attribute
        print("plain print")
        return "plain"


@serve.deployment(logging_config={"log_level": "DEBUG"})
class Debug:
    def __call__(self, request):
        log.debug("debug debug")
        mine.debug("user debug")
        return "debug"


@serve.deployment
class Quiet:
    def __call__(self, request):
        log.info("quiet info")
        log.warning("quiet warning")
        return "quiet"


@serve.deployment(logging_config={"encoding": "JSON", "additional_log_standard_attrs": ["name"]})
class Json:
    def __call__(self, request):
        log.info("json info")
        return "json"


@serve.deployment(logging_config={"logs_dir": sys.argv[1]})
class Elsewhere:
    def __call__(self, request):
        log.info("elsewhere info")
        return "elsewhere"


port = free_port()
serve.start(http_options={"port": port})
quiet = {"log_level": "WARNING", "enable_access_log": False}  # serve.run's: the app's default
apps = {"plain": Plain, "debug": Debug, "quiet": Quiet, "json": Json, "elsewhere": Elsewhere}
for name, deployment in apps.items():
    serve.run(deployment.bind(), name=name, route_prefix=f"/{name}",
              logging_config=quiet if name == "quiet" else None)
for name in apps:
    response = httpx.get(f"http://127.0.0.1:{port}/{name}", headers={"x-request-id": f"rid-{name}"})
    assert response.text == name, response.text
status = serve.status()
replicas = {
    name: status.applications[name].deployments[deployment.name].replicas[0].replica_id
    for name, deployment in apps.items()
}
print("RESULT", json.dumps({"dir": current_telemetry().logging.directory, "replicas": replicas}))
serve.shutdown()
"""

START_DRIVER = """
import json, logging, httpx
from conftest import free_port
from shoal import serve
from shoal._observe.process import current_telemetry


@serve.deployment
class A:
    def __call__(self, request):
        logging.getLogger("ray.serve").debug("a debug")
        return "a"


port = free_port()
serve.start(http_options={"port": port},
            logging_config={"enable_access_log": False, "encoding": "JSON", "log_level": "DEBUG"})
serve.run(A.bind(), name="a", route_prefix="/a")
assert httpx.get(f"http://127.0.0.1:{port}/a", headers={"x-request-id": "rid-a"}).text == "a"
replica = serve.status().applications["a"].deployments["A"].replicas[0].replica_id
print("RESULT", json.dumps({"dir": current_telemetry().logging.directory, "replica": replica}))
serve.shutdown()
"""


def _http_md_example() -> str:
    """docs/http.md's request_ids.py, on a free port."""
    text = (Path(__file__).parent.parent / "docs" / "http.md").read_text()
    start = text.index("```python\n# request_ids.py\n") + len("```python\n")
    source = text[start : text.index("```", start)]
    source = source.replace('"port": 8000', '"port": PORT')
    source = source.replace('"http://127.0.0.1:8000/ids"', 'f"http://127.0.0.1:{PORT}/ids"')
    assert "8000" not in source, source
    return "from conftest import free_port\nPORT = free_port()\n" + source


def _result(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def _started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The three drivers, started at the same time (and stopped at the latest when the
    module ends), and the directory of the deployment that logs elsewhere."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    scripts = {
        "deployments": (DEPLOYMENTS_DRIVER, str(elsewhere)),
        "start": (START_DRIVER,),
        "http.md": (_http_md_example(),),
    }
    for started in started_drivers(tmp_path_factory, **scripts):
        yield {"drivers": started, "elsewhere": elsewhere}


@pytest.fixture(scope="module", autouse=True)
def _start_early(request: pytest.FixtureRequest) -> None:
    # The drivers run while the module's server starts (both only if a selected test uses them).
    start_early(request, "_started", "server")


@pytest.fixture(scope="module")
def drivers(_started: dict[str, Any]) -> dict[str, Any]:
    """The drivers' results, stderr and stdout lines, once they ended."""
    runs = {name: driver.result() for name, driver in _started["drivers"].items()}
    return {
        name: {
            **(_result(run) if name != "http.md" else {}),
            "err": run.stderr.splitlines(),
            "out": run.stdout.splitlines(),
        }
        for name, run in runs.items()
    } | {"elsewhere": _started["elsewhere"]}


def _with(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


def _file(directory: str, app: str, deployment: str, replica_id: str) -> Path:
    path = Path(directory) / f"replica_{app}_{deployment}_{replica_id.rpartition('#')[2]}.log"
    assert path.is_file(), sorted(os.listdir(directory))
    return path


def test_every_line_names_the_replica_as_status_does_and_the_request(
    drivers: dict[str, Any],
) -> None:
    run = drivers["deployments"]
    plain = re.escape(run["replicas"]["plain"])
    prefix = rf"{TIME} plain Plain {plain} \[rid-plain\] driver\.py:\d+ - "
    (line,) = _with(run["err"], "plain info")
    assert re.fullmatch(rf"INFO {prefix}plain info", line), line
    (line,) = _with(run["err"], "user info")  # the user's own logger, at INFO (Ray's default)
    assert re.fullmatch(rf"INFO {prefix}user info", line), line
    (line,) = _with(run["out"], "plain print")  # print() keeps its stream, gains the prefix
    assert re.fullmatch(rf"INFO {prefix}plain print", line), line
    assert not _with(run["err"], "plain debug")


def test_the_request_id_example_of_http_md_prints_what_it_says(drivers: dict[str, Any]) -> None:
    run = drivers["http.md"]
    (line,) = _with(run["err"], "request checkout-42: predicting")
    assert re.fullmatch(
        rf"INFO {TIME} ids Api ids#Api#\w+ \[checkout-42\] driver\.py:28 - "
        "request checkout-42: predicting",
        line,
    ), line
    assert [line for line in run["out"] if line.startswith("checkout-42 {")], run["out"]


def test_log_level_per_deployment_and_per_application(drivers: dict[str, Any]) -> None:
    err = drivers["deployments"]["err"]
    debug = re.escape(drivers["deployments"]["replicas"]["debug"])
    for message in ("debug debug", "user debug"):
        (line,) = _with(err, message)
        assert re.fullmatch(rf"DEBUG {TIME} debug Debug {debug} \[rid-debug\] .* - {message}", line)
    assert not _with(err, "quiet info")  # serve.run(logging_config={"log_level": "WARNING"})
    (line,) = _with(err, "quiet warning")
    assert line.startswith("WARNING ") and " quiet Quiet " in line, line


def test_access_lines_in_the_proxy_and_the_replica_unless_turned_off(
    drivers: dict[str, Any],
) -> None:
    run = drivers["deployments"]
    plain = re.escape(run["replicas"]["plain"])
    # The proxy's lines go to its file only, as Ray's proxy writes them (log_to_stderr
    # False); the replica's go to the terminal too.
    (name,) = [n for n in os.listdir(run["dir"]) if re.fullmatch(r"proxy_[0-9a-f]{8}\.log", n)]
    proxy_file = (Path(run["dir"]) / name).read_text().splitlines()
    proxy = rf"{TIME} plain proxy proxy-[0-9a-f]{{8}} \[rid-plain\] access\.py:\d+ - "
    (line,) = [line for line in proxy_file if re.fullmatch(rf"INFO {proxy}GET /plain 200 .*", line)]
    assert re.fullmatch(rf"INFO {proxy}GET /plain 200 \d+\.\dms", line), line
    assert not [line for line in run["err"] if " proxy proxy-" in line and " access.py:" in line]
    replica = rf"INFO {TIME} plain Plain {plain} \[rid-plain\] server\.py:\d+ - GET /plain 200 "
    assert [line for line in run["err"] if re.match(replica, line)], run["err"]
    # The quiet application turned its replicas' access lines off; the proxy's stay on.
    assert [line for line in proxy_file if " quiet proxy " in line and "GET /quiet 200" in line]
    assert not [line for line in run["err"] if " quiet Quiet " in line and "GET /quiet" in line]
    # serve.start(logging_config={"enable_access_log": False}): no access line anywhere.
    assert not _with(drivers["start"]["err"], "GET /a")


def test_files_per_replica_proxy_and_controller_in_the_log_directory(
    drivers: dict[str, Any],
) -> None:
    run = drivers["deployments"]
    directory = run["dir"]
    names = sorted(os.listdir(directory))
    assert "controller.log" in names, names
    (proxy,) = [name for name in names if re.fullmatch(r"proxy_[0-9a-f]{8}\.log", name)]
    assert "GET /plain 200" in (Path(directory) / proxy).read_text()
    text = _file(directory, "plain", "Plain", run["replicas"]["plain"]).read_text()
    for message in ("plain info", "user info", "plain print", "GET /plain 200", "file only"):
        assert "[rid-plain] " in text and message in text, (message, text)
    assert not _with(run["err"], "plain file only")  # log_to_stderr False: the file only
    # logs_dir moves one deployment's file elsewhere.
    elsewhere = run["replicas"]["elsewhere"]
    assert "elsewhere info" in _file(str(drivers["elsewhere"]), "elsewhere", "Elsewhere",
                                     elsewhere).read_text()  # fmt: skip
    assert not [name for name in names if name.startswith("replica_elsewhere_")]


def test_json_encoding_writes_one_object_a_line_with_the_fields(drivers: dict[str, Any]) -> None:
    run = drivers["deployments"]
    replica = run["replicas"]["json"]
    records = [json.loads(line) for line in _file(run["dir"], "json", "Json", replica).open()]
    (record,) = [r for r in records if r["message"] == "json info"]
    assert record["levelname"] == "INFO" and re.fullmatch(TIME, record["asctime"])
    assert (record["application"], record["deployment"], record["replica"]) == (
        "json",
        "Json",
        replica,
    )
    assert record["request_id"] == "rid-json" and record["name"] == "ray.serve"
    (access,) = [r for r in records if r.get("route") == "/json"]
    assert (access["method"], access["status_code"]) == ("GET", 200)
    assert access["latency_ms"] > 0 and access["request_id"] == "rid-json"
    # serve.start's logging_config is every deployment's default: JSON at DEBUG.
    start = drivers["start"]
    lines = _file(start["dir"], "a", "A", start["replica"]).read_text().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["a debug"]


# --- a `shoal start` server: config-file levels and `shoal logs` --------------------------

GREETER = """
import logging
from shoal import serve

log = logging.getLogger("ray.serve")


@serve.deployment
class Greeter:
    def __call__(self, request):
        log.debug("greeter debug")
        log.info("greeter info")
        log.warning("greeter warning")
        return "hi"


app = Greeter.bind()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ServerInfo]]:
    """(home, info) of a server started with a JSON logging_config (its proxy's), running
    three applications: logging_config from the file's top level (top), the application
    (app) and the deployment (own)."""
    home, code = _new_home(), tmp_path_factory.mktemp("code")
    (code / "greeter.py").write_text(GREETER)
    with shoal_home(home):
        previous = os.getcwd()
        os.chdir(code)
        try:
            info = start_server(
                HTTPOptions(port=free_port()), AdminOptions(port=free_port()), timeout_s=60,
                logging_config=LoggingConfig(encoding="JSON"),
            )  # fmt: skip
        finally:
            os.chdir(previous)
    try:
        with shoal_home(home):

            def app(name: str, **extra: Any) -> dict[str, Any]:
                return {"name": name, "route_prefix": f"/{name}", "import_path": "greeter:app",
                        "runtime_env": {"working_dir": str(code)}, **extra}  # fmt: skip

            own = [{"name": "Greeter", "logging_config": {"encoding": "JSON"}}]
            config = {"logging_config": {"log_level": "WARNING"}, "applications": [
                app("top"), app("app", logging_config={"log_level": "DEBUG"}),
                app("own", logging_config={"log_level": "DEBUG"}, deployments=own),
            ]}  # fmt: skip
            assert _put(info, config).status_code == 200
            for name in ("top", "app", "own"):
                app_running(info, name)
                response = httpx.get(
                    f"http://127.0.0.1:{info.http_port}/{name}",
                    headers={"x-request-id": f"rid-{name}"}, timeout=30,
                )  # fmt: skip
                assert response.text == "hi"
        yield home, info
    finally:
        _stop(home, info)


def _shoal_logs(home: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "logs", *args], capture_output=True, text=True,
        timeout=60, env={**os.environ, "SHOAL_HOME": home},
    )  # fmt: skip


def _replica_file(info: ServerInfo, app: str) -> str:
    directory = Path(info.directory) / LOGS
    (name,) = [n for n in os.listdir(directory) if n.startswith(f"replica_{app}_Greeter_")]
    return (directory / name).read_text()


def test_config_file_logging_config_at_each_level(server: tuple[str, ServerInfo]) -> None:
    _home, info = server
    top = wait_until(lambda: "greeter warning" in (t := _replica_file(info, "top")) and t, 10)
    assert "greeter info" not in top  # the file's top-level WARNING
    assert "greeter debug" in _replica_file(info, "app")  # the application's DEBUG
    own = [json.loads(line) for line in _replica_file(info, "own").splitlines()]
    messages = {record["message"] for record in own}  # its own: JSON, at INFO (not DEBUG)
    assert {"greeter info", "greeter warning"} <= messages and "greeter debug" not in messages
    # `shoal start --logging-config '{"encoding": "JSON"}'`: the proxy's file is JSON.
    directory = Path(info.directory) / LOGS
    (proxy,) = [name for name in os.listdir(directory) if name.startswith("proxy_")]
    wanted = {("/top", 200, "rid-top"), ("/app", 200, "rid-app"), ("/own", 200, "rid-own")}

    def access() -> bool:  # the file gets its lines within 0.1 s
        lines = (directory / proxy).read_text().splitlines()
        return {
            (r["route"], r["status_code"], r["request_id"]) for r in map(json.loads, lines)
        } >= wanted

    wait_until(access, 10, "the proxy's JSON access lines")


def test_shoal_logs_prints_one_applications_files_and_refuses_unknown_names(
    server: tuple[str, ServerInfo], tmp_path: Path
) -> None:
    home, info = server
    wait_until(lambda: "greeter warning" in _replica_file(info, "top"), 10)
    printed = _shoal_logs(home, "top")
    assert printed.returncode == 0, printed.stderr
    (line,) = _with(printed.stdout.splitlines(), "greeter warning")
    assert re.fullmatch(rf"WARNING {TIME} top Greeter top#Greeter#\w+ \[rid-top\] .*", line)
    assert "rid-app" not in printed.stdout
    everything = _shoal_logs(home, "-n", "1000")
    assert "rid-app" in everything.stdout and "GET /top 200" in everything.stdout
    for args, message in (
        (("nosuch",), "no application named 'nosuch' (deployed: app, own, top)"),
        (("top", "Nope"), "application 'top' has no deployment 'Nope' (its deployments: Greeter)"),
    ):
        refused = _shoal_logs(home, *args)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    alone = _shoal_logs(str(tmp_path))  # a home where no server runs
    assert alone.returncode == 1 and "no shoal server is running" in alone.stderr


def test_shoal_logs_address_reads_through_the_admin_api(
    server: tuple[str, ServerInfo], tmp_path: Path
) -> None:
    """--address reads any instance's files through its admin API: here from a home
    where no server runs, so nothing is read from the disk."""
    _home, info = server
    assert info.admin_url is not None
    wait_until(lambda: "greeter warning" in _replica_file(info, "top"), 10)
    printed = _shoal_logs(str(tmp_path), "top", "--address", info.admin_url)
    assert printed.returncode == 0, printed.stderr
    assert _with(printed.stdout.splitlines(), "greeter warning")
    assert "rid-app" not in printed.stdout
    refused = _shoal_logs(str(tmp_path), "nosuch", "--address", info.admin_url)
    assert refused.returncode == 1 and "no application named 'nosuch'" in refused.stderr


def test_the_admin_api_serves_log_files_by_name_and_nothing_else(
    server: tuple[str, ServerInfo],
) -> None:
    _home, info = server
    logs = f"{info.admin_url}/api/shoal/logs"
    listing = httpx.get(logs, timeout=30).json()
    assert listing["directory"] == str(Path(info.directory) / LOGS)
    names = [f["name"] for f in listing["files"]]
    replica = next(n for n in names if n.startswith("replica_top_Greeter_"))
    on_disk = (Path(info.directory) / LOGS / replica).read_bytes()
    whole = on_disk[: on_disk.rfind(b"\n") + 1]
    last = httpx.get(f"{logs}/{replica}", params={"lines": 1}, timeout=30)
    assert last.status_code == 200 and whole.endswith(last.content)
    assert last.content.count(b"\n") == 1
    end = int(last.headers["x-shoal-log-offset"])
    assert end == len(whole)
    start = httpx.get(f"{logs}/{replica}", params={"offset": 0}, timeout=30)
    assert start.content == whole and int(start.headers["x-shoal-log-offset"]) == end
    for path, params, status, says in (
        ("..%2Fstate.sqlite", {}, 400, "is not a log file's name"),
        ("controller.log", {"lines": "-1"}, 400, "lines: '-1' is not a count"),
        ("controller.log", {"lines": 1, "offset": 0}, 400, "not both"),
        ("replica_nosuch_X_abc.log", {}, 404, "no log file named"),
    ):
        answer = httpx.get(f"{logs}/{path}", params=params, timeout=30)
        assert (answer.status_code, says in answer.text) == (status, True), answer.text


def test_shoal_logs_follow_prints_new_lines(server: tuple[str, ServerInfo]) -> None:
    home, info = server
    follow = subprocess.Popen(
        [sys.executable, "-m", "shoal", "logs", "app", "Greeter", "-f", "-n", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "SHOAL_HOME": home},
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follow.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        # Requests until one is seen: -f may start reading after the first is written.
        def seen() -> bool:
            httpx.get(f"http://127.0.0.1:{info.http_port}/app",
                      headers={"x-request-id": "rid-follow"}, timeout=30)  # fmt: skip
            return any("rid-follow" in line and "greeter debug" in line for line in lines)

        wait_until(seen, 30, "shoal logs -f to print the new line")
    finally:
        follow.terminate()
        follow.wait(timeout=30)
        reader.join(timeout=30)
    assert follow.returncode == 0
    assert not [line for line in lines if "rid-top" in line or "rid-own" in line]


def test_local_testing_mode_keeps_each_deployments_log_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from shoal import serve

    log = logging.getLogger("ray.serve")

    @serve.deployment(logging_config={"log_level": "DEBUG"})
    class Chatty:
        def __call__(self) -> str:
            log.debug("chatty debug")
            return "chatty"

    @serve.deployment
    class Plain:
        def __call__(self) -> str:
            log.debug("plain debug")
            log.info("plain info")
            return "plain"

    try:
        for app, name in ((Chatty.bind(), "chatty"), (Plain.bind(), "plainlocal")):
            handle = serve.run(app, name=name, route_prefix=None, _local_testing_mode=True)
            assert handle.remote().result(timeout_s=10) in ("chatty", "plain")
    finally:
        for name in ("chatty", "plainlocal"):
            serve.delete(name, _blocking=True)
    err = capsys.readouterr().err.splitlines()
    (line,) = _with(err, "chatty debug")
    assert re.fullmatch(rf"DEBUG {TIME} chatty Chatty chatty#Chatty#\w+ .* - chatty debug", line)
    assert _with(err, "plain info") and not _with(err, "plain debug")


def test_a_log_file_is_rotated_at_its_size_limit_keeping_the_newest_backups(
    tmp_path: Path,
) -> None:
    from shoal._observe.logs import _BufferedFileHandler

    path = tmp_path / "replica_app_Dep_abc.log"
    handler = _BufferedFileHandler(str(path), maxBytes=1000, backupCount=2, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for batch in range(7):  # 800 bytes a batch: rotated after every second flush
            for line in range(10):
                record = {"msg": f"batch {batch} line {line} " * 5, "levelno": logging.INFO}
                handler.emit(logging.makeLogRecord(record))
            handler.flush_now()
    finally:
        handler.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [path.name, path.name + ".1", path.name + ".2"]  # the oldest dropped
    assert path.read_text().startswith("batch 6 line 0")
    assert "batch 5 line 9" in (tmp_path / (path.name + ".1")).read_text()
    assert (tmp_path / (path.name + ".2")).read_text().startswith("batch 2 line 0")
    assert all(p.stat().st_size < 2000 for p in tmp_path.iterdir())


def test_only_the_newest_embedded_log_directories_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal._instance.home import KEPT_LOG_DIRECTORIES, log_directory

    monkeypatch.setenv("SHOAL_HOME", str(tmp_path))
    parent = tmp_path / LOGS
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(gone.stdout)
    running = parent / f"20000101-000000-{os.getpid()}"  # the oldest, but its process runs
    running.mkdir(parents=True)
    for day in range(1, KEPT_LOG_DIRECTORIES + 5):
        (parent / f"200001{day:02d}-000000-{dead_pid}").mkdir()
    new = Path(log_directory())
    kept = sorted(p.name for p in parent.iterdir() if not p.is_symlink())
    assert running.name in kept and new.name in kept
    assert len(kept) == KEPT_LOG_DIRECTORIES + 1  # the newest 19, the running one, the new one
    assert f"20000124-000000-{dead_pid}" in kept and f"20000101-000000-{dead_pid}" not in kept
