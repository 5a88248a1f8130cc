"""Results: environment facts, same-run ratios, targets, and the JSON + Markdown files."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import INVALID_CORE_PCT, git_dirty
from bench.targets import TARGETS

PACKAGES = ("shoal", "uvicorn", "starlette", "fastapi", "uvloop", "httptools", "pydantic")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- environment -----------------------------------------------------------------------------
def write_named_results(name: str, started: datetime, results: dict[str, Any], text: str) -> Path:
    """Write a scenario's ``results`` and their Markdown ``text`` to
    ``bench/results/<name>-<UTC timestamp of started>.json`` and ``.md``; the .md path."""
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=1))
    markdown = RESULTS_DIR / f"{name}-{stamp}.md"
    markdown.write_text(text)
    return markdown


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    if name == "shoal":  # a source checkout that is not pip-installed
        try:
            import shoal

            return str(getattr(shoal, "__version__", "source checkout"))
        except Exception:
            return None
    return None


def _git_commit(repo: Path) -> str | None:
    if not shutil.which("git"):
        return None
    proc = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work on the machine skews results)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def environment(loadgen: dict[str, object], started: datetime) -> dict[str, Any]:
    """Machine, Python, package versions, start date and the load generator."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "mem_total_mb": _mem_total_mb(),
            "platform": platform.platform(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
        },
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": _git_commit(RESULTS_DIR.parent.parent),
        "git_dirty": git_dirty(RESULTS_DIR.parent.parent),  # uncommitted changes measured
        "loadgen": loadgen,
    }


# --- ratios and targets ------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """shoal / reference for throughput and p50, for every (workload, c) measured by both."""
    out = []
    for shoal in (p for p in points if p["server"] == "shoal"):
        for ref in points:
            if ref["server"] == "shoal" or ref["workload"] != shoal["workload"]:
                continue
            if ref["concurrency"] != shoal["concurrency"]:
                continue
            out.append(
                {
                    "workload": shoal["workload"],
                    "concurrency": shoal["concurrency"],
                    "reference": ref["server"],
                    "throughput_ratio": _ratio(
                        shoal.get("throughput_rps"), ref.get("throughput_rps")
                    ),
                    "p50_ratio": _ratio(shoal.get("p50_ms"), ref.get("p50_ms")),
                    "valid": shoal.get("valid", True) and ref.get("valid", True),
                }
            )
    return out


def _points_valid(results: dict[str, Any], uses: tuple[tuple[str, int], ...]) -> bool:
    return all(
        p.get("valid", True)
        for p in results.get("points", [])
        if (p["workload"], p["concurrency"]) in uses
    )


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        value = t.value(results)
        valid = _points_valid(results, getattr(t.value, "uses", ()))
        section = getattr(t.value, "section", None)  # (a section records its own validity)
        if section is not None and (results.get(section) or {}).get("valid") is False:
            valid = False
        met = (
            None
            if value is None
            else (value >= t.threshold if t.at_least else value <= t.threshold)
        )
        out.append(
            {
                "key": t.key,
                "description": t.description,
                "threshold": f"{'>=' if t.at_least else '<='} {t.threshold:g} {t.unit}",
                "value": value,
                "unit": t.unit,
                "met": met,
                "valid": valid,
            }
        )
    return out


# --- Markdown ----------------------------------------------------------------------------------
def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _verdict(met: bool | None, valid: bool = True) -> str:
    verdict = {True: "met", False: "**missed**", None: "not measured"}[met]
    return verdict if valid or met is None else f"{verdict} (NOT VALID)"


def _valid(point: dict[str, Any]) -> str:
    return "yes" if point.get("valid", True) else "**NOT VALID**"


def _foreign(point: dict[str, Any]) -> str:
    values = point.get("foreign_core_pct")
    if not isinstance(values, list):
        return "-"
    return " / ".join(f"{v:.0f}" for v in values)


def _header(results: dict[str, Any]) -> list[str]:
    env, settings = results["environment"], results["settings"]
    m, lg = env["machine"], env["loadgen"]
    pkgs = ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items())
    return [
        f"# shoal benchmark — {env['date']}",
        "",
        f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, {_f(m['mem_total_mb'], 0)} MB RAM",
        f"- Python {env['python']['version']}; {pkgs}",
        f"- Git commit: {env.get('git_commit') or '-'}"
        + {True: " + **uncommitted changes** (dirty tree)", False: " (clean tree)"}.get(
            env.get("git_dirty"), " (tree state unknown)"
        ),
        f"- Load generator: {lg.get('name')} ({lg.get('version')})",
        f"- Each point: {settings['warmup_s']} s warm-up, then {settings['repeats']} x "
        f"{settings['duration_s']} s; medians reported, requests/errors summed.",
        f"- Load average (1/5/15 min) at start {settings.get('loadavg_start') or '-'}, "
        f"at end {settings.get('loadavg_end') or '-'}; wall time {settings.get('wall_s', '-')} s",
        f"- Background CPU (processes outside the bench, share of all CPUs): "
        f"{_pct(settings.get('background_cpu_pct'))} over the whole run.",
        f"- Foreign CPU (used by processes that are neither the bench, nor its servers, nor "
        f"the load generator), in % of one core, per measured run: the `foreign` column. A "
        f"run above {INVALID_CORE_PCT:g}% is **not valid** and left out of its point's "
        "medians; a point without a valid run shows the medians of all its runs, marked "
        "NOT VALID, and so are the ratios and targets computed from it.",
        *_validity_banner(results),
        "",
    ]


def _validity_banner(results: dict[str, Any]) -> list[str]:
    points = [p for p in results.get("points", []) if "error" not in p]
    invalid = [p for p in points if not p.get("valid", True)]
    partial = [p for p in points if p.get("valid", True) and _some_invalid(p)]
    lines = []
    if invalid:
        lines.append(
            f"- **NOT VALID: {len(invalid)} of {len(points)} points had no run with at most "
            f"{INVALID_CORE_PCT:g}% of a core foreign CPU** (the machine was not quiet)."
        )
    if partial:
        lines.append(f"- {len(partial)} points had runs left out of their medians (not valid).")
    if points and not invalid and not partial:
        lines.append(f"- All {len(points)} points valid.")
    return lines


def _some_invalid(point: dict[str, Any]) -> bool:
    return "runs_valid" in point and int(point["runs_valid"]) < len(point.get("runs", []))


def _points_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "## HTTP workloads",
        "",
        "Medians over the valid runs; `foreign`: foreign CPU of each run, % of one core.",
        "",
        "| workload | server | c | requests | errors | req/s | p50 ms | p90 ms | p99 ms "
        "| foreign % core | valid runs | valid |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for p in results.get("points", []):
        if "error" in p:
            msg = p["error"].splitlines()[0][:80].replace("|", "/")
            lines.append(f"| {p['workload']} | {p['server']} | {p['concurrency']} | "
                         f"failed: {msg} | | | | | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {p['workload']} | {p['server']} | {p['concurrency']} | {p['requests']} | "
            f"{p['errors']} | {_f(p['throughput_rps'], 0)} | {_f(p['p50_ms'], 3)} | "
            f"{_f(p['p90_ms'], 3)} | {_f(p['p99_ms'], 3)} | {_foreign(p)} | "
            f"{p.get('runs_valid', '-')}/{len(p.get('runs', []))} | {_valid(p)} |"
        )
    lines += ["", "## Ratios (shoal ÷ reference, same run)", ""]
    lines += [
        "`starlette` is one uvicorn process; `starlette-2w` is `uvicorn --workers 2` (a "
        "supervisor and two worker processes sharing the port).",
        "",
        "| workload | c | reference | throughput | p50 latency | valid |",
        "|---|--:|---|--:|--:|---|",
    ]
    for r in results.get("ratios", []):
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['reference']} | "
            f"{_x(r['throughput_ratio'])} | {_x(r['p50_ratio'])} | {_valid(r)} |"
        )
    return [*lines, ""]


DIRECT_SUFFIX = "-direct"


def _direct_table(results: dict[str, Any]) -> list[str]:
    """The ratios of each ``*-direct`` workload beside its proxy-path workload's (same
    concurrency and reference); "-" where the proxy path was not measured."""
    ratios = results.get("ratios", [])
    by_key = {(r["workload"], r["concurrency"], r["reference"]): r for r in ratios}
    direct = [r for r in ratios if r["workload"].endswith(DIRECT_SUFFIX)]
    if not direct:
        return []
    lines = [
        "## Direct ingress vs the proxy path (shoal ÷ reference, same run)",
        "",
        "`proxy`: shoal driven at the proxy's port (workload without `-direct`); `direct`: at "
        "the ingress replicas' own port (`--direct-ingress-port`). Each is ÷ the reference "
        "measured interleaved with it.",
        "",
        "| workload | c | reference | throughput proxy | throughput direct | p50 proxy "
        "| p50 direct | valid (proxy / direct) |",
        "|---|--:|---|--:|--:|--:|--:|---|",
    ]
    for d in direct:
        base = d["workload"].removesuffix(DIRECT_SUFFIX)
        p = by_key.get((base, d["concurrency"], d["reference"]), {})
        lines.append(
            f"| {base} | {d['concurrency']} | {d['reference']} | "
            f"{_x(p.get('throughput_ratio'))} | {_x(d['throughput_ratio'])} | "
            f"{_x(p.get('p50_ratio'))} | {_x(d['p50_ratio'])} | "
            f"{_valid(p) if p else '-'} / {_valid(d)} |"
        )
    return [*lines, ""]


def _cpu_table(results: dict[str, Any]) -> list[str]:
    points = [p for p in results.get("points", []) if p.get("cpu_us_per_request")]
    if not points:
        return []
    lines = [
        "## CPU per request, per process",
        "",
        "CPU time (user + system) each process used during the measured runs the medians use, "
        "÷ the requests they served, in µs. `total`: all the server's processes; `cores`: "
        "their CPU ÷ wall time; `loadgen`: the load generator (its own process).",
        "",
        "| workload | server | c | total µs | cores | per process µs | loadgen µs | valid |",
        "|---|---|--:|--:|--:|---|--:|---|",
    ]
    for p in points:
        each = ", ".join(f"{k} {_f(v, 0)}" for k, v in p["cpu_us_per_request"].items())
        lines.append(
            f"| {p['workload']} | {p['server']} | {p['concurrency']} | "
            f"{_f(p.get('server_cpu_us_per_request'), 0)} | {_f(p.get('server_cores'), 2)} | "
            f"{each} | {_f(p.get('loadgen_cpu_us_per_request'), 0)} | {_valid(p)} |"
        )
    return [*lines, ""]


def _failure(section: dict[str, Any]) -> str:
    first = str(section["error"]).splitlines()[0] if section["error"] else "error"
    return f"failed: {first[:200]}"


def _handle_validity(h: dict[str, Any]) -> str:
    """How many of the handle section's runs were valid (older results did not say)."""
    if "runs_valid" not in h:
        return ""
    note = f"; {h['runs_valid']} of {h['runs_total']} runs valid (foreign CPU"
    note += f" ≤ {INVALID_CORE_PCT:g}% of a core)"
    return note if h.get("valid", True) else note + ": **NOT VALID**"


def _cold_start_conditions(cs: dict[str, Any]) -> str:
    """How the cold starts were launched (older results did not say)."""
    note = ""
    if cs.get("warmup_launches"):
        note += f"; after {cs['warmup_launches']} launch not measured (it fills the page cache)"
    if cs.get("compiled_ahead"):
        note += "; shoal's modules compiled ahead, as an installed package's are"
    return note


def _other_sections(results: dict[str, Any]) -> list[str]:
    h, cs, mem = results.get("handle"), results.get("cold_start"), results.get("idle_rss")
    if not (h or cs or mem):
        return []
    lines = ["## Handle round trip, cold start, idle memory", ""]
    if h:
        lines.append(
            "- Handle noop A->B: "
            + (
                _failure(h)
                if "error" in h
                else f"p50 {_f(h['p50_us'], 1)} us, p90 {_f(h['p90_us'], 1)} us, "
                f"p99 {_f(h['p99_us'], 1)} us ({h['sequential_calls']} sequential calls, "
                f"median of runs); 64 in flight: {_f(h['calls_per_s'], 0)} calls/s"
                + _handle_validity(h)
            )
        )
    if cs:
        lines.append(
            "- Cold start `python -m shoal run bench.apps:w1` to first 200: "
            + (
                _failure(cs)
                if "error" in cs
                else f"median {_f(cs['median_s'], 3)} s, runs "
                + ", ".join(f"{t:.3f}" for t in cs["runs"])
                + _cold_start_conditions(cs)
            )
        )
    if mem:
        lines.append(
            "- Idle memory of the W1 app (driver + descendants): "
            + (
                _failure(mem)
                if "error" in mem
                else f"RSS {_f(mem['rss_mb'], 1)} MB (PSS {_f(mem['pss_mb'], 1)} MB) over "
                f"{mem['processes']} processes, after {mem['idle_wait_s']} s idle"
            )
        )
    return [*lines, ""]


def _w3_sections(results: dict[str, Any]) -> list[str]:
    batched = [p for p in results.get("points", []) if "batch_size_mean" in p]
    ramp = results.get("w3_ramp")
    if not batched and not ramp:
        return []
    lines = [
        "## W3 batching",
        "",
        "Handler: sleep 10 ms + 0.1 ms per item. Fixed configuration (`W3`): max 32, 5 ms wait "
        "(ceiling 32 / 13.2 ms = 2,424 req/s); `W3-latency`: max 64, `target_latency_s=0.05`. "
        "Mean batch size = requests / batches formed during the measured runs.",
        "",
        "| workload | server | c | req/s | p50 ms | p99 ms | batches | mean batch size |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p in batched:
        lines.append(
            f"| {p['workload']} | {p['server']} | {p['concurrency']} | "
            f"{_f(p['throughput_rps'], 0)} | {_f(p['p50_ms'], 2)} | {_f(p['p99_ms'], 2)} | "
            f"{p['batches']} | {_f(p['batch_size_mean'], 1)} |"
        )
    lines.append("")
    if ramp:
        lines += _ramp_table(ramp)
    return lines


def _ramp_table(ramp: dict[str, Any]) -> list[str]:
    lines = ["## W3-latency load ramp", ""]
    if "error" in ramp:
        return [*lines, _failure(ramp), ""]
    lines += [
        f"One run of {ramp['step_s']:g} s per step on the latency-target app; the plan "
        "(`batch_stats().latency`) is read right after each step.",
        "",
        "| step | connections | req/s | p50 ms | p99 ms | errors | mean batch size "
        "| planned size | planned max wait ms | arrival rate /s | foreign % core | valid |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for i, r in enumerate(ramp["steps"], 1):
        lines.append(
            f"| {i} | {r['concurrency']} | {_f(r['throughput_rps'], 0)} | {_f(r['p50_ms'], 2)} | "
            f"{_f(r['p99_ms'], 2)} | {r['errors']} | {_f(r['batch_size_mean'], 1)} | "
            f"{_f(r['plan_batch_size'])} | {_f(r['plan_max_wait_ms'], 2)} | "
            f"{_f(r['arrival_rate_per_s'], 0)} | {_f(r.get('foreign_core_pct'), 0)} | "
            f"{'-' if r.get('valid') is None else _valid(r)} |"
        )
    return [*lines, ""]


def _stream_section(results: dict[str, Any]) -> list[str]:
    st = results.get("stream")
    if not st:
        return []
    lines = [
        "## Streaming",
        "",
        f"First chunk: the generator yields after {_f(st['first_delay_ms'], 0)} ms; overhead = "
        "client's time to first chunk - the generator's own start-to-yield time (p50 over "
        f"the requests). Rate: {st['items']:,} items of 16 bytes through one stream.",
        "",
        "| server | requests | first chunk p50 ms | generator p50 ms | overhead p50 ms "
        "| overhead p90 ms | request in p50 ms | yield to client p50 ms | items/s "
        "| HTTP chunks per item |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, first in st.get("first_chunk", {}).items():
        rate = st.get("rate", {}).get(name, {})
        if "error" in first:
            lines.append(f"| {name} | {_failure(first)[:80]} | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {first['requests']} | {_f(first['ttfc_p50_ms'], 2)} | "
            f"{_f(first['generator_p50_ms'], 2)} | {_f(first['overhead_p50_ms'], 2)} | "
            f"{_f(first['overhead_p90_ms'], 2)} | {_f(first['request_in_p50_ms'], 2)} | "
            f"{_f(first['delivery_p50_ms'], 2)} | {_f(rate.get('items_per_s'), 0)} | "
            f"{_f(rate.get('http_chunks_per_item'), 2)} |"
        )
    return [*lines, ""]


def render_markdown(results: dict[str, Any]) -> str:
    lines = _header(results)
    lines += ["## Targets", "", "| target | threshold | value | result |", "|---|---|--:|---|"]
    for t in results.get("targets", []):
        value = "-" if t["value"] is None else f"{_f(float(t['value']), 3)} {t['unit']}"
        verdict = _verdict(t["met"], t.get("valid", True))
        lines.append(f"| {t['description']} | {t['threshold']} | {value} | {verdict} |")
    lines.append("")
    lines += _points_table(results)
    lines += _direct_table(results)
    lines += _cpu_table(results)
    lines += _w3_sections(results)
    lines += _stream_section(results)
    lines += _other_sections(results)
    return "\n".join(lines)


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Add ratios and target verdicts computed from the measured points."""
    results["ratios"] = ratios(results.get("points", []))
    results["targets"] = evaluate_targets(results)
    return results


def _clean(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results(results: dict[str, Any], out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Write <UTC timestamp>.json/.md and copies as latest.json/.md; returns the two paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results = _clean(results)
    text_json = json.dumps(results, indent=2, sort_keys=False, allow_nan=False) + "\n"
    text_md = render_markdown(results) + "\n"
    json_path, md_path = out_dir / f"{stamp}.json", out_dir / f"{stamp}.md"
    for path, text in ((json_path, text_json), (md_path, text_md)):
        path.write_text(text)
        (out_dir / f"latest{path.suffix}").write_text(text)
    return json_path, md_path
