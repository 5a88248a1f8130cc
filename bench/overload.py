"""``python -m bench.overload``: issue 11's targets under load, with real processes.

Every scenario starts its own ``shoal start`` server (a scratch ``SHOAL_HOME``, free
127.0.0.1 ports; :class:`bench.control_plane.Instance`), deploys ``bench.apps_overload``
through the REST API with the options under test in the config's ``deployments``
overrides, drives it over HTTP through the real proxy from a separate client process
(``python -m bench.overload --client SPEC``: asyncio, uvloop when installed), and stops
it at the end (``shoal shutdown``, then SIGTERM/SIGKILL to whatever of its tree is left).

* **overload**: one replica of a 20 ms handler, ``max_ongoing_requests=2``,
  ``max_queued_requests=10``. Its unloaded p99 (1 closed-loop client) and capacity (4
  closed-loop clients), then an open-loop (Poisson) load of 10x the capacity for 60 s:
  503 latency (p99 ≤ 10 ms), accepted p99 (≤ 2 x unloaded p99 + the queue's own wait,
  ``max_queued_requests / capacity``), the proxy's RSS before and after (≤ 10 MB growth).
* **goodput**: the same deployment; 200 clients with a 1 s timeout (then they drop the
  connection and retry at once) and a 100-300 ms random backoff after a 503, for 20 s:
  successful requests/s after a 5 s warm-up ≥ 90% of the capacity. The same load on the
  same deployment without ``max_queued_requests`` is reported alongside (no target).
* **autoscale**: a 50 ms handler, ``max_ongoing_requests=4``, ``autoscaling_config``
  (``target_ongoing_requests=2``, ``metrics_interval_s=0.5``, ``look_back_period_s=2``,
  ``upscale_delay_s=1``, ``downscale_delay_s=5``, 1-10 replicas); closed-loop clients
  2 (1x) -> 16 (8x: 8 replicas needed) -> 2, the replicas polled every 0.1 s through the
  REST API: time to 8 RUNNING (≤ ``upscale_delay_s`` + replica start time + 1 s, the
  start time being the slowest new replica's listed -> RUNNING), overshoot (≤ 1), failed
  requests (0); after the step down, the first downscaling decision (not before
  ``downscale_delay_s`` - 0.5 s) and 1 replica left (≤ ``downscale_delay_s`` + 1 s), with
  0 failed requests.
* **zero**: the 20 ms handler with ``min_replicas=0, initial_replicas=0``: one request's
  latency from zero replicas, 3 times (≤ the replica's cold start + 0.5 s), where the cold
  start is a replica of the same deployment starting in the same server (a
  ``num_replicas=1`` application deployed next to it: its replica listed -> RUNNING).

The CPU used by everything else on the machine (``foreign CPU``, as in
``bench.control_plane``) is recorded for every scenario; above 15% of one core the
scenario's figures are marked INVALID. Results go to
``bench/results/overload-<UTC timestamp>.json`` and ``.md`` (also printed).
"""


# The layout: this module is the command line; bench.overload_scenarios runs the four
# scenarios (their parameters, servers and measurements), bench.overload_clients holds the
# load clients (the --client processes), bench.overload_analysis the figures drawn from
# their records and from the replica polls, bench.overload_report the table and Markdown.

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import overload_scenarios as scenarios
from bench.control_plane import DeployFailed, ForeignCpu, _dirty, _exit, log
from bench.overload_clients import client_main
from bench.overload_report import render, rows
from bench.overload_scenarios import INVALID_CORE_PCT, RUNNERS, SECTIONS

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        return client_main(argv[1])
    args, sections, backoff_s = _parse(argv)
    scenarios.BACKOFF_S = backoff_s
    from bench import report  # the main suite's environment facts (machine, versions, commit)

    env = report.environment({"name": "bench.overload clients (asyncio)"}, datetime.now(UTC))
    signal.signal(signal.SIGTERM, _exit)
    work = Path(tempfile.mkdtemp(prefix="shoal-bench-overload-"))
    scenarios.METER = meter = ForeignCpu()
    whole = ForeignCpu()
    whole.roots = meter.roots
    load_start, started = report.loadavg(), time.perf_counter()
    results: dict[str, Any] = {"schema": 1, "environment": env}
    try:
        for name in sections:
            results[name] = _run(name, work, args.quick)
    finally:
        overall = whole.window()
        meter.close()
        whole.close()
        shutil.rmtree(work, ignore_errors=True)
    core = round(overall["foreign_cpu_pct"] * (os.cpu_count() or 1), 1)
    results["settings"] = {
        "sections": sections,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_start": load_start,
        "loadavg_end": report.loadavg(),
        "foreign_cpu_pct": overall["foreign_cpu_pct"],
        "foreign_core_pct": core,
        "invalid": core > INVALID_CORE_PCT,
        "dirty": _dirty(),
    }
    results["rows"] = rows(results)
    _write(results, args.out)
    return 0


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], tuple[float, float]]:
    """The options, the scenarios to run (in SECTIONS' order) and the goodput backoff (s)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: short loads (5 s overload), 1 scale-from-zero",
    )
    parser.add_argument(
        "--backoff-ms",
        default="100,300",
        help="goodput: a client's wait after a 503, uniform between LO,HI ms (default 100,300)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    wanted = [s.strip().lower() for s in (args.only or "").split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if not wanted or s in wanted]
    try:
        low, high = (float(x) / 1e3 for x in args.backoff_ms.split(","))
    except ValueError:
        parser.error(f"--backoff-ms wants LO,HI in ms, not {args.backoff_ms!r}")
    return args, sections, (low, high)


def _run(name: str, work: Path, quick: bool) -> dict[str, Any]:
    """One scenario's results, or its error."""
    log(f"bench.overload: {name}")
    try:
        return RUNNERS[name](work, quick)
    except (
        DeployFailed,
        RuntimeError,
        TimeoutError,
        OSError,
        subprocess.TimeoutExpired,
        KeyError,
        ValueError,
    ) as exc:
        log(f"  {name} failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}


def _write(results: dict[str, Any], out: Path) -> None:
    """The results as JSON and Markdown in ``out`` (the Markdown also printed)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"overload-{stamp}.json"
    md_path = out / f"overload-{stamp}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(render(results))
    print(md_path.read_text())
    log(f"bench.overload: wrote {json_path} and {md_path}")


if __name__ == "__main__":
    raise SystemExit(main())
