"""``python -m bench.oip``: the Open Inference Protocol's cost (issue 14's targets).

One server process (``python -m bench.oip --serve HTTP_PORT GRPC_PORT``: ``serve.start``
with HTTP and gRPC, then) serves side by side

* **W1**: the plain JSON echo of ``bench.apps`` (``POST /echo``, body ``{"x": 1}``);
* **OIP**: an OIP model ``bench-echo`` declaring one FP32 ``[-1, 4]`` input, whose async
  ``infer`` returns it (``POST /v2/models/bench-echo/infer``, a 1x4 FP32 tensor as JSON);
* **probe**: an OIP model that reports whether its input array owns its memory.

Each round measures W1 and OIP at c=1 (then c=64), interleaved, with wrk or the Python
load generator; the figures are medians over the rounds. Target: OIP's p50 at c=1 within
0.2 ms of W1's. Then a 4 MiB FP32 tensor goes through gRPC ``ModelInfer`` with raw contents
(tritonclient.grpc's wire format, sent with shoal's own stubs): its latency, and whether the
model's array is a view of the received message (no copy; docs/oip.md counts the copies
the wire needs). Results go to ``bench/results/oip-<UTC timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ECHO_BODY, median_or_none
from bench.loadgen import LoadSpec, run_load, wrk_path
from bench.procs import HOST, INVALID_CORE_PCT, ForeignCpu, ServerProcess, free_port, git_dirty

OIP_PATH = "/v2/models/bench-echo/infer"
OIP_BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                   "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()  # fmt: skip
JSON = (("content-type", "application/json"),)
TARGET_MS = 0.2
BIG = 1024 * 1024  # FP32 elements: 4 MiB


def serve_main(http_port: int, grpc_port: int) -> int:
    """The server process, until SIGTERM."""
    from bench.apps import MAX_ONGOING, w1
    from shoal import oip, serve

    @serve.deployment(max_ongoing_requests=MAX_ONGOING)
    @oip.model(name="bench-echo", inputs=[oip.TensorSpec("x", "FP32", [-1, 4])],
               outputs=[oip.TensorSpec("x", "FP32", [-1, 4])])  # fmt: skip
    class BenchEcho:
        async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return inputs

    @serve.deployment
    @oip.model(name="probe", outputs=[oip.TensorSpec("owns_data", "BOOL", [1])])
    class Probe:
        async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"owns_data": np.array([inputs["x"].flags.owndata])}

    serve.start(
        http_options={"host": HOST, "port": http_port}, admin_options={"port": 0}, _attach=False,
        grpc_options={"port": grpc_port,
                      "grpc_servicer_functions": ["shoal.oip:add_inference_service"]},
    )  # fmt: skip
    serve.run(w1, name="w1", route_prefix="/")
    serve.run(BenchEcho.bind(), name="bench-echo")
    serve.run(Probe.bind(), name="probe")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def measure_http(args: argparse.Namespace, port: int, meter: ForeignCpu) -> list[dict[str, Any]]:
    """Every run with its foreign CPU; one above INVALID_CORE_PCT of a core is not valid."""
    loadgen = "wrk" if wrk_path() and args.loadgen != "python" else "python"
    runs = []
    for round_ in range(args.rounds):
        for concurrency in (1, 64):
            for name, path, body in (("W1", "/echo", ECHO_BODY), ("OIP", OIP_PATH, OIP_BODY)):
                warm = LoadSpec(port, path, "POST", body, concurrency, args.warmup, headers=JSON)
                run_load(warm, loadgen)
                spec = LoadSpec(port, path, "POST", body, concurrency, args.duration, headers=JSON)
                meter.window()
                result = run_load(spec, loadgen)
                foreign = meter.window()["foreign_core_pct"]
                runs.append({"round": round_, "workload": name, "concurrency": concurrency,
                             "foreign_core_pct": foreign, "valid": foreign <= INVALID_CORE_PCT,
                             **result.to_dict()})  # fmt: skip
                print(f"round {round_} {name} c={concurrency}: {result.throughput_rps:.0f} req/s "
                      f"p50 {result.p50_ms:.3f} ms errors {result.errors} "
                      f"(foreign {foreign:.0f}% of a core)",
                      file=sys.stderr, flush=True)  # fmt: skip
    return runs


def measure_grpc(grpc_port: int, calls: int) -> dict[str, Any]:
    """4 MiB FP32 through ModelInfer with raw contents: p50 latency, and the probe's answer."""
    import grpc

    from shoal._oip.protos import grpc_predict_v2_pb2 as pb

    channel = grpc.insecure_channel(
        f"{HOST}:{grpc_port}",
        options=[("grpc.max_receive_message_length", 64 << 20),
                 ("grpc.max_send_message_length", 64 << 20)],
    )  # fmt: skip
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                request_serializer=pb.ModelInferRequest.SerializeToString,
                                response_deserializer=pb.ModelInferResponse.FromString)  # fmt: skip
    x = np.arange(BIG, dtype=np.float32)

    def request(model: str) -> Any:
        message = pb.ModelInferRequest(model_name=model)
        message.inputs.add(name="x", datatype="FP32", shape=[BIG])
        message.raw_input_contents.append(x.tobytes())
        return message

    probe = infer(request("probe"), timeout=60)
    owns = bool(np.frombuffer(probe.raw_output_contents[0], dtype=np.bool_)[0])
    times = []
    message = request("probe")
    for _ in range(calls):
        start = time.perf_counter()
        infer(message, timeout=60)
        times.append((time.perf_counter() - start) * 1000)
    channel.close()
    return {"tensor_bytes": x.nbytes, "model_array_owns_data": owns,
            "calls": calls, "p50_ms": statistics.median(times)}  # fmt: skip


def replica_work_us(repeats: int, calls: int) -> dict[str, float]:
    """What the ingress replica does per request, in-process (µs, the best of ``repeats``):
    W1's path (a Starlette request, ``await request.json()``, the JSON response) against an
    OIP model's (the same request, decoded into numpy, the response encoded). The machine's
    load hardly moves a best-of figure, unlike latency percentiles."""
    import asyncio

    from shoal import oip
    from shoal._replica import http
    from shoal._transport.http import HttpRequestData

    @oip.model(name="bench-echo", inputs=[oip.TensorSpec("x", "FP32", [-1, 4])],
               outputs=[oip.TensorSpec("x", "FP32", [-1, 4])])  # fmt: skip
    class BenchEcho:
        async def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return inputs

    model = BenchEcho()
    headers = [(b"content-type", b"application/json")]

    async def w1(data: HttpRequestData) -> Any:
        return await http.to_response(await http.build_request(data).json())

    async def oip_model(data: HttpRequestData) -> Any:
        return await http.to_response(await model(http.build_request(data)))

    async def best(handler: Any, path: str, root: str, body: bytes) -> float:
        data = HttpRequestData("POST", "http", path, root, b"", headers, body, None, None)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                await handler(data)
            times.append((time.perf_counter() - start) / calls * 1e6)
        return min(times)

    async def both() -> dict[str, float]:
        return {
            "W1": await best(w1, "/echo", "", ECHO_BODY),
            "OIP": await best(oip_model, OIP_PATH, "/v2/models/bench-echo", OIP_BODY),
        }

    return asyncio.run(both())


def summarize(all_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the valid runs (a round's gap only if both of its c=1 runs are valid)."""
    runs = [r for r in all_runs if r["valid"]]
    points = {}
    for name in ("W1", "OIP"):
        for c in (1, 64):
            mine = [r for r in runs if r["workload"] == name and r["concurrency"] == c]
            points[f"{name} c={c}"] = {
                "p50_ms": median_or_none([r["p50_ms"] for r in mine]),
                "rps": median_or_none([r["throughput_rps"] for r in mine]),
            }
    gaps = []  # per round: runs of one round are back to back, so they share its load
    for round_ in sorted({r["round"] for r in runs}):
        c1 = {r["workload"]: r["p50_ms"] for r in runs
              if r["round"] == round_ and r["concurrency"] == 1}  # fmt: skip
        if c1.get("W1") is not None and c1.get("OIP") is not None:
            gaps.append(c1["OIP"] - c1["W1"])
    gap = statistics.median(gaps) if gaps else None
    return {"points": points, "c1_p50_gap_ms": gap, "c1_p50_gaps_ms": gaps,
            "target_met": gap is not None and gap <= TARGET_MS,
            "valid_runs": len(runs), "runs": len(all_runs)}  # fmt: skip


def render(results: dict[str, Any]) -> str:
    env, s, g = results["environment"], results["summary"], results["grpc"]
    lines = [
        f"# Open Inference Protocol cost ({results['started']})", "",
        f"- commit {env['git_commit']} (dirty tree: {results['dirty']}); "
        f"{env['machine']['cpu_model']}, {env['machine']['nproc']} cores; Python "
        f"{env['python']['version']}; {results['rounds']} rounds of {results['duration_s']:g} s",
        f"- valid runs {s['valid_runs']} of {s['runs']} (foreign CPU ≤ {INVALID_CORE_PCT:g}% of "
        "a core); the figures are medians of the valid runs",
        "", "| workload | p50 ms | req/s |", "| --- | --- | --- |",
    ]  # fmt: skip
    for name, point in s["points"].items():
        p50, rps = point["p50_ms"], point["rps"]
        lines.append(f"| {name} | {_f(p50, 3)} | {_f(rps, 0)} |")
    gap, work = s["c1_p50_gap_ms"], results["replica_work_us"]
    each = ", ".join(f"{g:+.3f}" for g in s["c1_p50_gaps_ms"])
    lines += [
        "",
        f"OIP infer (1x4 FP32, REST JSON) p50 - W1 p50 at c=1, median of the rounds' "
        f"differences: {_f(gap, 3)} ms (rounds: {each}; target ≤ {TARGET_MS} ms): "
        f"{'PASS' if s['target_met'] else 'FAIL'}",
        "",
        f"The ingress replica's work per request, in-process (best of runs): W1 "
        f"{work['W1']:.1f} µs, OIP {work['OIP']:.1f} µs: +{work['OIP'] - work['W1']:.1f} µs",
        "",
        f"gRPC ModelInfer of {g['tensor_bytes'] / 2**20:g} MiB FP32 (raw contents): p50 "
        f"{g['p50_ms']:.2f} ms over {g['calls']} calls; the model's array owns its data: "
        f"{g['model_array_owns_data']} (False: a view of the received message, no copy)",
    ]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve_main(int(argv[1]), int(argv[2]))
    parser = argparse.ArgumentParser(prog="python -m bench.oip")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--grpc-calls", type=int, default=30)
    parser.add_argument("--work-repeats", type=int, default=7)
    parser.add_argument("--loadgen", choices=("auto", "python"), default="auto")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.grpc_calls = 1, 1.0, 0.3, 5
        args.work_repeats = 2
    from bench import report

    started = datetime.now(UTC)
    env = report.environment({"name": "wrk or bench.loadgen"}, started)
    http_port, grpc_port = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-oip-"))
    server = ServerProcess(
        "shoal-oip", [sys.executable, "-m", "bench.oip", "--serve", str(http_port),
                      str(grpc_port)], work,
    )  # fmt: skip
    server.start()
    meter = ForeignCpu(interval_s=None)
    meter.roots.add(server.pid)
    try:
        server.wait_http_ok(http_port, "POST", OIP_PATH, OIP_BODY, 120.0)
        server.wait_quiet()  # its start-up work (the fork server's imports) is not measured
        runs = measure_http(args, http_port, meter)
        grpc_result = measure_grpc(grpc_port, args.grpc_calls)
    finally:
        server.stop()
        meter.close()
    results = {
        "started": started.isoformat(timespec="seconds"), "environment": env,
        "dirty": git_dirty(), "rounds": args.rounds, "duration_s": args.duration,
        "runs": runs, "summary": summarize(runs), "grpc": grpc_result,
        "replica_work_us": replica_work_us(args.work_repeats, 3000),
    }  # fmt: skip
    text = render(results)
    print(text)
    if not args.quick:
        report.write_named_results("oip", started, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
