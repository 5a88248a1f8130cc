"""``python -m bench.ray_cluster``'s figures: medians of the valid runs, issue 13's targets,
the Markdown table and the result files (``bench/results/ray-cluster-<UTC>.json``/``.md``)."""

from __future__ import annotations

import dataclasses
import statistics
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import INVALID_CORE_PCT
from bench.ray_cluster import NODE_CPUS, SIDE_NAMES, SIDES

HTTP_POINTS = (("W1", 64), ("W1", 1), ("W2", 64), ("W2", 1))
#: (label, point, field, kind, threshold, target text, digits): "ratio" targets compare
#: shoal with Ray Serve (shoal / Ray Serve >= threshold); "max" ones shoal's own figure.
TEN_X = "≥ 10x Ray Serve"
TARGETS = (
    ("W1 throughput c=64 (req/s)", "W1 c=64", "throughput_rps", "ratio", 10.0, TEN_X, 0),
    ("W1 p50 c=1 (ms)", "W1 c=1", "p50_ms", "max", 1.0, "≤ 1 ms", 3),
    ("W2 throughput c=64 (req/s)", "W2 c=64", "throughput_rps", "ratio", 10.0, TEN_X, 0),
    ("W2 p50 c=1 (ms)", "W2 c=1", "p50_ms", "max", 1.0, "≤ 1 ms", 3),
    ("handle round trip across nodes, p50 (µs)", "handle", "p50_us", "max", 300.0, "≤ 300 µs", 1),
)


def environment(loadgen: dict[str, object], started: datetime) -> dict[str, Any]:
    """bench.report's environment (commit, dirty flag, machine, packages) plus Ray's version
    and the runtimes this shoal registers."""
    env = report.environment(loadgen, started)
    try:
        env["packages"]["ray"] = metadata.version("ray")
    except metadata.PackageNotFoundError:
        env["packages"]["ray"] = None
    try:
        from shoal._runtime.registry import runtime_names

        env["shoal_runtimes"] = runtime_names()
    except Exception as exc:  # an older or broken shoal: say so, do not fail the report
        env["shoal_runtimes"] = f"unknown ({type(exc).__name__}: {exc})"
    return env


def _median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return statistics.median(finite) if finite else None


def point(runs: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, Any]:
    """Medians of ``fields`` over the valid runs (over all of them, marked not valid, when
    none is), with each run's foreign CPU and the cluster's CPU per request."""
    valid = [r for r in runs if r["valid"]]
    used = valid or runs
    out: dict[str, Any] = {f: _median([r.get(f) for r in used]) for f in fields}
    served = sum(r.get("requests", 0) - r.get("errors", 0) for r in used)
    cpu = sum(r.get("system_cpu_s", 0.0) for r in used)
    out.update(
        runs=len(runs),
        runs_valid=len(valid),
        valid=bool(valid),
        foreign_core_pct=[r["foreign_core_pct"] for r in runs],
        requests=sum(r.get("requests", 0) for r in runs),
        errors=sum(r.get("errors", 0) for r in runs),
        system_cpu_us_per_request=round(cpu / served * 1e6, 1) if served else None,
    )
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per side: its state (measured, not available, failed, not run) and its points."""
    out: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        mine = [r for r in records if r["side"] == side]
        measured = [r for r in mine if r["state"] == "measured"]
        runs = [run for r in measured for run in r["runs"]]
        state = "measured" if measured else (mine[-1]["state"] if mine else "not run")
        reasons = [f"round {r['round']}: {r['reason']}" for r in mine if r.get("reason")]
        points: dict[str, Any] = {}
        for workload, c in HTTP_POINTS:
            chosen = [r for r in runs if r["workload"] == workload and r["concurrency"] == c]
            if chosen:
                fields = ("throughput_rps", "p50_ms", "p90_ms", "p99_ms")
                points[f"{workload} c={c}"] = point(chosen, fields)
        handle = [r for r in runs if r["workload"] == "handle"]
        if handle:
            points["handle"] = point(handle, ("p50_us", "p90_us", "p99_us", "mean_us", "n"))
        out[side] = {
            "state": state,
            "reasons": reasons,
            "points": points,
            "start_s": [r.get("start_s") for r in measured],
            "placement": [r.get("placement") for r in measured],
            "settle": [r.get("settle") for r in measured],
        }
    return out


def evaluate(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target: both sides' figures, shoal / Ray Serve, and the verdict."""
    rows = []
    for label, key, field, kind, threshold, target, digits in TARGETS:
        ray_point = summary["ray"]["points"].get(key) or {}
        shoal_point = summary["shoal"]["points"].get(key) or {}
        ray_v, shoal_v = ray_point.get(field), shoal_point.get(field)
        ratio = shoal_v / ray_v if shoal_v is not None and ray_v else None
        met: bool | None
        if kind == "ratio":
            met = None if ratio is None else ratio >= threshold
            valid = bool(ray_point.get("valid")) and bool(shoal_point.get("valid"))
        else:
            met = None if shoal_v is None else shoal_v <= threshold
            valid = bool(shoal_point.get("valid"))
        rows.append(
            {
                "label": label,
                "point": key,
                "field": field,
                "ray": ray_v,
                "shoal": shoal_v,
                "ratio": ratio,
                "target": target,
                "met": met,
                "valid": valid,
                "digits": digits,
            }
        )
    return rows


def build_results(
    settings: Any, env: dict[str, Any], started: datetime, records: list[dict[str, Any]]
) -> dict[str, Any]:
    summary = summarize(records)
    return {
        "started": started.isoformat(timespec="seconds"),
        "environment": env,
        "settings": dataclasses.asdict(settings),
        "cluster": {
            "nodes": [
                {"name": "head", "num_cpus": NODE_CPUS[0]},
                {"name": "node_a", "num_cpus": NODE_CPUS[1], "resources": {"node_a": 1}},
                {"name": "node_b", "num_cpus": NODE_CPUS[2], "resources": {"node_b": 1}},
            ],
            "host": "127.0.0.1",
            "dashboard": False,
            "proxy_location": "HeadOnly",
        },
        "records": records,
        "summary": summary,
        "targets": evaluate(summary),
    }


def write(started: datetime, results: dict[str, Any], text: str) -> Path:
    return report.write_named_results("ray-cluster", started, results, text)


# --- Markdown ----------------------------------------------------------------------------------
def _f(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _verdict(row: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    if row["met"] is None:
        shoal = summary["shoal"]["state"]
        return "not measured" + ("" if shoal == "measured" else f" (shoal-on-Ray {shoal})")
    text = "met" if row["met"] else "**missed**"
    return text + ("" if row["valid"] else " (NOT VALID)")


def _header(results: dict[str, Any]) -> list[str]:
    env, settings, summary = results["environment"], results["settings"], results["summary"]
    packages = env["packages"]
    tree = "**+ uncommitted changes**" if env.get("git_dirty") else "(clean tree)"
    runs = [run for r in results["records"] for run in r.get("runs", [])]
    valid = sum(1 for run in runs if run["valid"])
    lines = [
        f"# shoal-on-Ray vs Ray Serve, one Ray cluster ({results['started']})",
        "",
        f"- commit {env.get('git_commit')} {tree}; {env['machine']['cpu_model']}, "
        f"{env['machine']['nproc']} cores; Python {env['python']['version']}; Ray "
        f"{packages.get('ray')}; shoal {packages.get('shoal')} (runtimes: "
        f"{env.get('shoal_runtimes')}); load generator {env['loadgen'].get('name')}",
        "- cluster: `ray.cluster_utils.Cluster`, a head and two worker nodes on 127.0.0.1 "
        "(custom resources `node_a`, `node_b`; logical CPUs "
        f"{', '.join(str(n['num_cpus']) for n in results['cluster']['nodes'])}), no dashboard; "
        'HTTP proxy on the head (`proxy_location="HeadOnly"`), the frameworks\' defaults '
        "otherwise; the sides one after the other, in their own driver processes",
        f"- {settings['rounds']} interleaved round(s), {settings['duration_s']:g} s per load "
        f"run, {settings['handle_calls']} sequential handle calls; valid runs {valid} of "
        f"{len(runs)} (foreign CPU ≤ {INVALID_CORE_PCT:g}% of a core); medians of the valid "
        "runs" + (" (--quick: a smoke run, not the targets' figures)" if settings["quick"] else ""),
    ]
    for side in SIDES:
        state = summary[side]
        if state["state"] != "measured":
            reason = state["reasons"][-1] if state["reasons"] else ""
            lines.append(
                f"- **{SIDE_NAMES[side]}: {state['state']}**"
                + (f": {reason.splitlines()[0][:500]}" if reason else "")
            )
        elif state["reasons"]:
            lines.append(
                f"- {SIDE_NAMES[side]}: some rounds failed: "
                + "; ".join(r.splitlines()[0][:300] for r in state["reasons"])
            )
    return lines


def _points_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Points",
        "",
        "| point | side | req/s | p50 | p99 | errors | foreign % core | valid runs "
        "| cluster CPU µs/request |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in [f"{w} c={c}" for w, c in HTTP_POINTS] + ["handle"]:
        for side in SIDES:
            p = summary[side]["points"].get(key)
            if p is None:
                continue
            foreign = " / ".join(f"{v:.0f}" for v in p["foreign_core_pct"])
            valid = f"{p['runs_valid']}/{p['runs']}" + ("" if p["valid"] else " **NOT VALID**")
            if key == "handle":
                rate, p50, p99 = "-", f"{_f(p['p50_us'], 1)} µs", f"{_f(p['p99_us'], 1)} µs"
            else:
                rate = _f(p["throughput_rps"], 0)
                p50, p99 = f"{_f(p['p50_ms'], 3)} ms", f"{_f(p['p99_ms'], 3)} ms"
            cpu = _f(p["system_cpu_us_per_request"], 0)
            lines.append(
                f"| {key} | {SIDE_NAMES[side]} | {rate} | {p50} | {p99} | {p['errors']} "
                f"| {foreign} | {valid} | {cpu} |"
            )
    return lines


def _placement(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for side in SIDES:
        places = [p for p in summary[side]["placement"] if p]
        if not places:
            continue
        across = all(
            p.get("caller_node") and p.get("caller_node") != p.get("callee_node") for p in places
        )
        starts = ", ".join(_f(s, 1) for s in summary[side]["start_s"])
        settles = ", ".join(
            f"{s['seconds']:g} s ({s['tree_core_pct']:.0f}%)" for s in summary[side]["settle"] if s
        )
        lines.append(
            f"- {SIDE_NAMES[side]}: handle caller and callee on different nodes in "
            f"every round: {'yes' if across else '**no**'}; driver start to every "
            f"application running: {starts} s; then quiet after: {settles or 'n/a'} "
            "(the tree's CPU in its last second, % of a core)"
        )
    return ["", "## Placement and start", "", *lines] if lines else []


def render(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = _header(results)
    lines += [
        "",
        "| workload | Ray Serve | shoal-on-Ray | shoal ÷ Ray Serve | target | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["targets"]:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(
            f"| {row['label']} | {_f(row['ray'], row['digits'])} | "
            f"{_f(row['shoal'], row['digits'])} | {ratio} | {row['target']} | "
            f"{_verdict(row, summary)} |"
        )
    lines += _points_table(summary) + _placement(summary)
    return "\n".join(lines) + "\n"
