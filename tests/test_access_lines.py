"""The cheap per-request paths of observability (docs/observability.md, "What it costs").

An access line written directly (no LogRecord) reads exactly as the formatter's line for
the same record; a request counter that counts its histogram's observations reports the
same totals; the transport's picklers do not keep paying for one large message.
"""

from __future__ import annotations

import json
import logging
import time

from shoal._observe import logs
from shoal._observe.access_lines import MESSAGE, AccessLine, latency_text
from shoal._observe.metrics.registry import Registry
from shoal._observe.pending import ACCESS, Pending


def _record(
    line: AccessLine, request_id: str, latency_ms: float, created: float
) -> logging.LogRecord:
    fields = {
        "application": line.application, "deployment": line.deployment,
        "replica": line.replica, "request_id": request_id, "method": line.method,
        "route": line.route, "status_code": line.status, "latency_ms": latency_ms,
    }  # fmt: skip
    record = logging.LogRecord(
        "ray.serve", logging.INFO, line.where[0], line.where[1], MESSAGE,
        (line.method, line.route, line.status, latency_text(latency_ms)), None,
    )  # fmt: skip
    record.__dict__.update(fields)
    record.created = created
    return record


def test_a_direct_access_line_reads_as_the_formatters_line() -> None:
    line = AccessLine(("access.py", 20), "app", "proxy", "proxy-1a2b3c4d", "POST", "/echo", 200)
    offset = time.time() - time.perf_counter()
    for request_id, latency_ms in (("rid-7", 0.35), ("", 12.25), ("x" * 32, 1234.56), ("r", 0.04)):
        now = time.perf_counter()
        waiting = (now, line, request_id, latency_ms)
        text = line.text(waiting, offset)
        record = _record(line, request_id, latency_ms, now + offset)
        assert text == logs.TextFormatter().format(record) + "\n"
        as_json = json.loads(line.json(waiting, offset))
        expected = json.loads(logs.JsonFormatter().format(record))
        assert as_json == expected


def test_a_block_of_access_lines_reads_as_the_formatters_lines() -> None:
    """Lines formatted together (a time stamp and a head shared while they last) read as
    each record formatted alone: across milliseconds and seconds, lines, ids given as
    text or as the header's bytes, none, and latencies past the precomputed ones."""
    lines = [
        AccessLine(("access.py", 20), "app", "proxy", "proxy-1a2b3c4d", "POST", "/echo", 200),
        AccessLine(("direct.py", 9), "app", "Echo", "app#Echo#x", "GET", "/", 504),
    ]
    offset = time.time() - time.perf_counter()
    start = time.perf_counter()
    ids: list[str | bytes] = ["rid-7", b"rid-\xe9", "", "x" * 32]
    latencies = (0.04, 0.35, 99.94, 99.96, 1234.56)
    waiting = [
        (start + step * 0.0004, lines[step % 3 == 0], ids[step % 4], latencies[step % 5])
        for step in range(3000)  # 1.2 s: hundreds of milliseconds, two seconds or more
    ]  # fmt: skip
    expected = "".join(
        logs.TextFormatter().format(
            _record(line, rid.decode("latin-1") if isinstance(rid, bytes) else rid,
                    latency_ms, created + offset)
        ) + "\n"
        for created, line, rid, latency_ms in waiting
    )  # fmt: skip
    assert AccessLine.texts(waiting, offset) == expected


def test_pending_lines_keep_their_order_and_format_access_lines_when_taken() -> None:
    stream, file = Pending(None), Pending(None, json=True)
    ACCESS.route_to([stream, file])
    try:
        line = AccessLine(("server.py", 9), "a", "D", "a#D#x", "CALL", "m", "OK")
        stream.add("first\n")
        ACCESS.append((time.perf_counter(), line, "rid", 0.5))
        stream.add("middle\n")  # after the access line logged before it
        ACCESS.append((time.perf_counter(), line, "", 1.25))
        first, access, middle, second = stream.take().splitlines()
        assert (first, middle) == ("first", "middle")
        assert access.startswith("INFO ")
        assert access.endswith(" a D a#D#x [rid] server.py:9 - CALL m OK 0.5ms")
        assert second.endswith(" a D a#D#x server.py:9 - CALL m OK 1.3ms")
        assert stream.take() == "" and stream.lines == []
        # The other destination got the same lines once each, as JSON.
        objects = [json.loads(text) for text in file.take().splitlines()]
        assert [(o.get("request_id", ""), o["latency_ms"])
                for o in objects] == [("rid", 0.5), ("", 1.25)]  # fmt: skip
    finally:
        ACCESS.route_to(())
    ACCESS.append((time.perf_counter(), line, "lost", 1.0))  # no destination: dropped
    ACCESS.seal()
    assert ACCESS.items == [] and stream.take() == ""


def test_a_counter_counting_a_histogram_reports_its_observations() -> None:
    registry = Registry()
    latency = registry.family("latency_ms", "histogram", "h", ("route",), (1, 10)).labels("/")
    requests = registry.family("requests", "counter", "c", ("route",))
    requests.labels("/").inc(2)  # counted before: kept
    child = requests.count_of(latency, "/")
    for value in (0.5, 5, 50):
        latency.observe(value)
    child.inc()  # an increment of its own is kept too
    (_name, _kind, _help, samples) = requests.data()
    assert samples == [("requests_total", (("route", "/"),), 6.0)]


def test_a_large_pickle_does_not_slow_the_next_small_ones() -> None:
    from shoal._transport import codec

    small = ("__call__", (1, "x"), {})

    def cost() -> float:
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for _ in range(200):
                codec.dumps(small)
            best = min(best, time.process_time() - started)
        return best

    before = cost()
    codec.dumps([(f"name{i}", (str(i), f"v{i}"), float(i)) for i in range(20_000)])
    after = cost()
    # The memo table of a 20,000-object pickle made each later small pickle ~50x slower.
    assert after < before * 5 + 0.002, (before, after)
