"""``python -m bench``: run the shoal benchmark suite and write bench/results/.

Options: ``--quick`` (short smoke run), ``--duration S`` (seconds per measured run),
``--only LIST`` (a comma-separated subset of the sections that ``--help`` lists); see
bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import loadgen, report
from bench.procs import INVALID_CORE_PCT, BackgroundCpu, ServerProcess, compile_ahead
from bench.stream import run_stream
from bench.suite import WORKLOADS, Settings, run_cold_start, run_handle, run_workload
from bench.w3 import run_w3

SECTIONS = (
    "cold", "rss", "W1", "W1-direct", "W1-defaults", "W1-defaults-direct", "W1-fastapi", "W2",
    "W2-direct", "W3", "W3-latency", "W4", "W4-direct", "stream", "business", "handle",
)  # fmt: skip
ALIASES = {
    "cold_start": "cold",
    "coldstart": "cold",
    "idle_rss": "rss",
    "memory": "rss",
    "w1f": "w1-fastapi",
    "w1d": "w1-defaults",
    "w3l": "w3-latency",
    "w3-latency-target": "w3-latency",
    "streaming": "stream",
    "business-logic": "business",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_only(text: str | None) -> list[str]:
    """``W1,handle`` -> canonical section names in run order; raises ValueError if unknown."""
    if not text:
        return list(SECTIONS)
    by_lower = {name.lower(): name for name in SECTIONS}
    wanted = set()
    for raw in text.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if name not in by_lower:
            raise ValueError(f"unknown section {raw.strip()!r}; choose from {', '.join(SECTIONS)}")
        wanted.add(by_lower[name])
    return [s for s in SECTIONS if s in wanted]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1 minute)")
    parser.add_argument("--duration", type=float, help="seconds per measured run (default 3)")
    parser.add_argument("--repeats", type=int, help="measured runs per point (default 3)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per point (default 1)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="results directory")
    return parser


def make_settings(args: argparse.Namespace, log_dir: Path, compiled_ahead: bool) -> Settings:
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (1.0 if quick else 3.0)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0.0 if quick else 1.0)
    return Settings(
        duration_s=max(0.5, min(duration, 600.0)),
        repeats=max(1, min(repeats, 20)),
        warmup_s=max(0.0, min(warmup, 60.0)),
        loadgen=loadgen.choose(args.loadgen),
        cold_runs=1 if quick else 3,
        idle_wait_s=1.0 if quick else 3.0,
        handle_n=300 if quick else 2000,
        handle_par_calls=640 if quick else 6400,
        handle_repeats=1 if quick else 3,
        log_dir=log_dir,
        compiled_ahead=compiled_ahead,
        stream_requests=20 if quick else 50,
        stream_items=20_000 if quick else 200_000,
    )


def run_sections(sections: list[str], settings: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {"points": []}
    if "cold" in sections or "rss" in sections:
        results.update(run_cold_start(settings, log, "cold" in sections, "rss" in sections))
    for key in (
        "W1", "W1-direct", "W1-defaults", "W1-defaults-direct", "W1-fastapi", "W2", "W2-direct"
    ):  # fmt: skip
        if key in sections:
            results["points"].extend(run_workload(WORKLOADS[key], settings, log))
    if "W3" in sections or "W3-latency" in sections:
        w3 = run_w3(settings, log, fixed="W3" in sections, latency="W3-latency" in sections)
        results["points"].extend(w3["points"])
        if "ramp" in w3:
            results["w3_ramp"] = w3["ramp"]
    for key in ("W4", "W4-direct"):
        if key in sections:
            results["points"].extend(run_workload(WORKLOADS[key], settings, log))
    if "stream" in sections:
        results["stream"] = run_stream(settings, log)
    if "business" in sections:
        results["points"].extend(run_workload(WORKLOADS["business"], settings, log))
    if "handle" in sections:
        results["handle"] = run_handle(settings, log)
    return results


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _failed(results: dict[str, Any]) -> bool:
    sections = [results.get(k) or {} for k in ("handle", "cold_start", "idle_rss", "w3_ramp")]
    stream = results.get("stream") or {}
    sections += [*stream.get("first_chunk", {}).values(), *stream.get("rate", {}).values()]
    return any("error" in p for p in results["points"]) or any("error" in s for s in sections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sections = parse_only(args.only)
    except ValueError as exc:
        build_parser().error(str(exc))
    log_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-logs-"))
    settings = make_settings(args, log_dir, compile_ahead(log_dir))
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    started = time.perf_counter()
    env = report.environment(loadgen.describe(settings.loadgen), datetime.now(UTC))
    load_start = report.loadavg()
    meter = BackgroundCpu()
    log(f"bench: sections {sections}, load generator {settings.loadgen}, logs in {log_dir}")
    try:
        results = run_sections(sections, settings)
    except KeyboardInterrupt:
        log("bench: interrupted; stopping servers")
        return 130
    finally:
        ServerProcess.stop_all()
    results = {
        "schema": 1,
        "environment": env,
        "settings": {
            **{k: v for k, v in vars(settings).items() if k != "log_dir"},
            "quick": bool(args.quick),
            "sections": sections,
            "wall_s": round(time.perf_counter() - started, 1),
            "loadavg_start": load_start,
            "loadavg_end": report.loadavg(),
            "background_cpu_pct": round(meter.percent(), 1),
        },
        **results,
    }
    json_path, md_path = report.write_results(report.finalize(results), args.out)
    print(md_path.read_text())
    log(f"bench: wrote {json_path} and {md_path} (+ latest.json/.md)")
    measured = [p for p in results["points"] if "error" not in p]
    invalid = [p for p in measured if not p.get("valid", True)]
    if invalid:
        log(
            f"bench: {len(invalid)} of {len(measured)} points NOT VALID (every run had more "
            f"than {INVALID_CORE_PCT:g}% of a core of foreign CPU): the machine was not quiet"
        )
    if _failed(results):
        log(f"bench: some measurements failed; server logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
