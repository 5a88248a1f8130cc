"""Replica log lines on the driver's terminal, with the multi-process runtime.

A replica's ``logging.getLogger("ray.serve")`` writes at INFO, in Ray Serve's replica
format (the same as local testing mode): level, time, application, deployment, the
replica id as ``serve.status()`` shows it, the request id while serving one,
file:line, message. The user's own loggers and print() get the same prefix
(docs/logging.md; tests/test_logging.py covers logging_config).
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_driver

SERVE_LOGGER_DRIVER = """
import logging, sys, threading, httpx
from shoal import serve

logger = logging.getLogger("ray.serve")


@serve.deployment
class SayHello:
    def __init__(self):
        logger.info("constructed")  # no request yet

    def __call__(self, request):
        logger.info("Hello world!")
        logger.debug("not shown: the level is INFO")
        logging.getLogger("my.model").warning("scoring")  # a user logger: the root handler
        print("printed to stdout", flush=True)
        print("printed to stderr", file=sys.stderr, flush=True)
        # A thread the user starts has no request, but is still in this replica.
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join()
        return "hi"


@serve.deployment
class Quiet:
    def __init__(self):
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the user's choice wins

    def __call__(self, request):
        logging.getLogger("ray.serve").info("quiet info")
        logging.getLogger("ray.serve").warning("quiet warning")
        return "shh"


port = int(sys.argv[1])
serve.start(http_options={"port": port})
serve.run(SayHello.bind(), name="default", route_prefix="/hello")
serve.run(Quiet.bind(), name="quiet", route_prefix="/quiet")
assert httpx.get(f"http://127.0.0.1:{port}/hello", headers={"x-request-id": "rid-7"}).text == "hi"
assert httpx.get(f"http://127.0.0.1:{port}/quiet", headers={"x-request-id": "rid-8"}).text == "shh"
for app, name in (("default", "SayHello"), ("quiet", "Quiet")):
    replicas = serve.status().applications[app].deployments[name].replicas
    print("REPLICA", name, replicas[0].replica_id, replicas[0].pid, flush=True)
serve.shutdown()
"""

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


def test_ray_serve_logger_lines_reach_the_driver_with_the_replica_id(tmp_path: Path) -> None:
    result = run_driver(tmp_path, SERVE_LOGGER_DRIVER)
    replicas = dict(
        (line.split()[1], line.split()[2])
        for line in result.stdout.splitlines()
        if line.startswith("REPLICA ")
    )
    say_hello, quiet = replicas["SayHello"], replicas["Quiet"]
    assert say_hello.startswith("default#SayHello#") and quiet.startswith("quiet#Quiet#")
    err = result.stderr.splitlines()

    def lines_with(text: str) -> list[str]:
        return [line for line in err if text in line]

    (hello,) = lines_with("Hello world!")
    assert re.fullmatch(
        rf"INFO {TIME} default SayHello {re.escape(say_hello)} \[rid-7\] driver\.py:\d+ - "
        "Hello world!",
        hello,
    ), hello
    (constructed,) = lines_with("constructed")
    assert re.fullmatch(
        rf"INFO {TIME} default SayHello {re.escape(say_hello)} driver\.py:\d+ - constructed",
        constructed,
    ), constructed
    (threaded,) = lines_with("from a thread")
    assert f" SayHello {say_hello} " in threaded, threaded
    assert not lines_with("not shown")
    # The program's level for "ray.serve" is kept: INFO dropped, WARNING printed.
    assert not lines_with("quiet info")
    (warning,) = lines_with("quiet warning")
    assert warning.startswith("WARNING ") and f" Quiet {quiet} [rid-8] " in warning, warning
    # The user's loggers and print() get the same prefix; print() stays on its stream.
    (scoring,) = lines_with("scoring")
    prefix = rf"{TIME} default SayHello {re.escape(say_hello)} \[rid-7\] driver\.py:\d+ - "
    assert re.fullmatch(rf"WARNING {prefix}scoring", scoring), scoring
    (printed,) = [line for line in result.stdout.splitlines() if "printed to stdout" in line]
    assert re.fullmatch(rf"INFO {prefix}printed to stdout", printed), printed
    (printed,) = lines_with("printed to stderr")
    assert re.fullmatch(rf"ERROR {prefix}printed to stderr", printed), printed
