"""Results: environment facts, same-run ratios, targets, and the JSON + Markdown files."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("shoal", "uvicorn", "starlette", "fastapi", "uvloop", "httptools", "pydantic")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- environment -----------------------------------------------------------------------------
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
        "loadgen": loadgen,
    }


# --- ratios and targets ------------------------------------------------------------------------
def find_point(points: list[dict[str, Any]], wl: str, server: str, c: int) -> dict[str, Any] | None:
    for point in points:
        if (point["workload"], point["server"], point["concurrency"]) == (wl, server, c):
            return point
    return None


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
                }
            )
    return out


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    unit: str
    threshold: float
    at_least: bool
    value: Callable[[dict[str, Any]], float | None]


def _point_value(wl: str, c: int, field: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        point = find_point(results.get("points", []), wl, "shoal", c)
        return None if point is None else point.get(field)

    return get


def _ratio_value(wl: str, c: int, ref: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        for r in results.get("ratios", []):
            if (r["workload"], r["concurrency"], r["reference"]) == (wl, c, ref):
                value: float | None = r["throughput_ratio"]
                return value
        return None

    return get


def _section_value(section: str, field: str) -> Callable[[dict[str, Any]], float | None]:
    def get(results: dict[str, Any]) -> float | None:
        data = results.get(section) or {}
        return data.get(field)

    return get


TARGETS: tuple[Target, ...] = (
    Target("W1-thr-c64", "W1 throughput c=64 vs Starlette", "x", 0.5, True,
           _ratio_value("W1", 64, "starlette")),
    Target("W1-p50-c1", "W1 p50 latency c=1", "ms", 0.5, False, _point_value("W1", 1, "p50_ms")),
    Target("W2-thr-c64", "W2 throughput c=64 vs FastAPI", "x", 0.3, True,
           _ratio_value("W2", 64, "fastapi")),
    Target("W2-p50-c1", "W2 p50 latency c=1", "ms", 1.0, False, _point_value("W2", 1, "p50_ms")),
    Target("W4-p50-c1", "W4 p50 latency c=1", "ms", 6.5, False, _point_value("W4", 1, "p50_ms")),
    Target("W4-thr-c32", "W4 throughput c=32 vs FastAPI", "x", 0.8, True,
           _ratio_value("W4", 32, "fastapi")),
    Target("handle-p50", "handle round trip p50", "us", 150.0, False,
           _section_value("handle", "p50_us")),
    Target("cold-start", "cold start (median)", "s", 1.0, False,
           _section_value("cold_start", "median_s")),
    Target("idle-rss", "idle RSS, driver + descendants", "MB", 200.0, False,
           _section_value("idle_rss", "rss_mb")),
)  # fmt: skip


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        value = t.value(results)
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


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def _header(results: dict[str, Any]) -> list[str]:
    env, settings = results["environment"], results["settings"]
    m, lg = env["machine"], env["loadgen"]
    pkgs = ", ".join(f"{k} {v or '-'}" for k, v in env["packages"].items())
    return [
        f"# shoal benchmark — {env['date']}",
        "",
        f"- Machine: {m['nproc']} CPUs, {m['cpu_model']}, {_f(m['mem_total_mb'], 0)} MB RAM",
        f"- Python {env['python']['version']}; {pkgs}",
        f"- Git commit: {env.get('git_commit') or '-'}",
        f"- Load generator: {lg.get('name')} ({lg.get('version')})",
        f"- Each point: {settings['warmup_s']} s warm-up, then {settings['repeats']} x "
        f"{settings['duration_s']} s; medians reported, requests/errors summed.",
        f"- Load average (1/5/15 min) at start {settings.get('loadavg_start') or '-'}, "
        f"at end {settings.get('loadavg_end') or '-'}; wall time {settings.get('wall_s', '-')} s",
        f"- Background CPU (processes outside the bench, share of all CPUs): "
        f"{_pct(settings.get('background_cpu_pct'))} over the run; per point in the `bg CPU` "
        "column. Above a few % the figures are skewed by other work.",
        "",
    ]


def _points_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "## HTTP workloads",
        "",
        "| workload | server | c | requests | errors | req/s | p50 ms | p90 ms | p99 ms | bg CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for p in results.get("points", []):
        if "error" in p:
            msg = p["error"].splitlines()[0][:80].replace("|", "/")
            lines.append(f"| {p['workload']} | {p['server']} | {p['concurrency']} | "
                         f"failed: {msg} | | | | | | |")  # fmt: skip
            continue
        lines.append(
            f"| {p['workload']} | {p['server']} | {p['concurrency']} | {p['requests']} | "
            f"{p['errors']} | {_f(p['throughput_rps'], 0)} | {_f(p['p50_ms'], 3)} | "
            f"{_f(p['p90_ms'], 3)} | {_f(p['p99_ms'], 3)} | {_pct(p.get('background_cpu_pct'))} |"
        )
    lines += ["", "## Ratios (shoal ÷ reference, same run)", ""]
    lines += ["| workload | c | reference | throughput | p50 latency |", "|---|--:|---|--:|--:|"]
    for r in results.get("ratios", []):
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['reference']} | "
            f"{_x(r['throughput_ratio'])} | {_x(r['p50_ratio'])} |"
        )
    return [*lines, ""]


def _failure(section: dict[str, Any]) -> str:
    first = str(section["error"]).splitlines()[0] if section["error"] else "error"
    return f"failed: {first[:200]}"


def _other_sections(results: dict[str, Any]) -> list[str]:
    lines = ["## Handle round trip, cold start, idle memory", ""]
    h, cs, mem = results.get("handle"), results.get("cold_start"), results.get("idle_rss")
    if h:
        lines.append(
            "- Handle noop A->B: "
            + (
                _failure(h)
                if "error" in h
                else f"p50 {_f(h['p50_us'], 1)} us, p90 {_f(h['p90_us'], 1)} us, "
                f"p99 {_f(h['p99_us'], 1)} us ({h['sequential_calls']} sequential calls, "
                f"median of runs); 64 in flight: {_f(h['calls_per_s'], 0)} calls/s"
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


def render_markdown(results: dict[str, Any]) -> str:
    lines = _header(results)
    lines += ["## Targets", "", "| target | threshold | value | result |", "|---|---|--:|---|"]
    for t in results.get("targets", []):
        value = "-" if t["value"] is None else f"{_f(float(t['value']), 3)} {t['unit']}"
        lines.append(f"| {t['description']} | {t['threshold']} | {value} | {_verdict(t['met'])} |")
    lines.append("")
    lines += _points_table(results)
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
