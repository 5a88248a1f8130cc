"""The results table of ``python -m bench.overload``: verdicts and Markdown.

:func:`rows` turns the scenarios' raw figures into one row per target (the figure, the
target, PASS/MISS or context, the foreign CPU of the scenario's loads) and
:func:`render` writes the Markdown report: the environment, an INVALID banner when
other processes used too much CPU, the table, then notes (errors, the overload's
per-5 s load, the autoscaling timeline and decisions).
"""

from __future__ import annotations

import json
from typing import Any

from bench.overload_scenarios import INVALID_CORE_PCT, MAX_QUEUED, OVERLOAD_FACTOR, SECTIONS

VERDICTS = {None: "not measured", True: "PASS", False: "MISS", "info": "-"}


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _cpu(section: dict[str, Any]) -> str:
    if "foreign_core_pct" not in section:
        return "-"
    text = f"{_f(section['foreign_core_pct'])}% of a core (load {_f(section.get('loadavg_1m'))})"
    return f"**INVALID**: {text}" if section.get("invalid") else text


def _row(
    scenario: str, what: str, value: str, target: str, met: Any, section: dict[str, Any]
) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "what": what,
        "value": value,
        "target": target,
        "met": met,
        "cpu": _cpu(section),
        "invalid": bool(section.get("invalid")),
    }


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows: each scenario's targets in turn, then a row per failed scenario."""
    out: list[dict[str, Any]] = []
    o = results.get("overload")
    if o and "error" not in o:
        out += _overload_rows(o)
    g = results.get("goodput")
    if g and "error" not in g:
        out += _goodput_rows(g)
    a = results.get("autoscale")
    if a and not a.get("available", True):
        out.append(_row("autoscale", "step load 1x -> 8x -> 1x", "not available", "-", None, a))
    elif a and "error" not in a:
        out += _scale_up_rows(a) + _scale_down_rows(a)
    z = results.get("zero")
    if z and not z.get("available", True):
        out.append(_row("zero", "first request from zero replicas", "not available", "-", None, z))
    elif z and "error" not in z:
        out.append(_zero_row(z))
    for name in SECTIONS:
        section = results.get(name)
        if isinstance(section, dict) and "error" in section:
            out.append(_row(name, "error", "error", "-", False, section))
    return out


def _overload_rows(o: dict[str, Any]) -> list[dict[str, Any]]:
    """503 p99, accepted p99, the proxy's RSS growth, and any answer neither 200 nor 503."""
    ref, acc = o["refused"], o["accepted"]
    what = (
        f"503 latency p99 ({ref['n']:,} refused of {sum(o['statuses'].values()):,}; "
        f"p50 {_f(ref['p50_ms'], 2)} ms; {o['offered_rps']:.0f} req/s offered = "
        f"{OVERLOAD_FACTOR:g} x capacity {o['capacity']['capacity_rps']:.0f}, "
        f"{o['duration_s']:.0f} s)"
    )
    p99 = ref["p99_ms"]
    out = [
        _row(
            "overload",
            what,
            f"{_f(p99, 2)} ms",
            "≤ 10 ms",
            None if p99 is None else p99 <= 10.0,
            o,
        )
    ]
    what = (
        f"accepted p99 ({acc['n']:,} served at {o['accepted_rps']:.0f} req/s; p50 "
        f"{_f(acc['p50_ms'], 2)} ms; unloaded p99 {_f(o['unloaded']['p99_ms'], 2)} ms, "
        f"queue wait {MAX_QUEUED}/capacity = {_f(o['queue_wait_bound_ms'])} ms)"
    )
    bound, p99 = o["accepted_p99_bound_ms"], acc["p99_ms"]
    met = None if bound is None or p99 is None else p99 <= bound
    out.append(_row("overload", what, f"{_f(p99, 2)} ms", f"≤ {_f(bound)} ms", met, o))
    out.append(_proxy_row(o))
    other = {k: v for k, v in o["statuses"].items() if k not in ("200", "503")}
    if other:
        out.append(
            _row(
                "overload",
                "answers neither 200 nor 503 (socket errors: "
                f"{json.dumps(o.get('client', {}).get('error_kinds'))})",
                json.dumps(other),
                "0",
                False,
                o,
            )
        )
    return out


def _proxy_row(o: dict[str, Any]) -> dict[str, Any]:
    proxy = o["proxy"]
    growth = proxy["rss_growth_mb"]
    what = (
        f"proxy RSS growth over the {o['duration_s']:.0f} s ({_f(proxy['start']['rss_mb'])}"
        f" -> {_f(proxy['end']['rss_mb'])} MB; PSS {_f(proxy['pss_growth_mb'])} MB; "
        f"from 10 s on {_f(proxy['rss_growth_from_10s_mb'])} MB; the client opened "
        f"{o.get('client', {}).get('connections', '?')} connections, set-up p99 "
        f"{_f((o.get('client', {}).get('connects') or {}).get('p99_ms'))} ms; the proxy "
        f"used {_f(proxy.get('cpu_core_pct'))}% of a core)"
    )
    return _row(
        "overload",
        what,
        f"{_f(growth)} MB",
        "≤ 10 MB",
        None if growth is None else growth <= 10.0,
        o,
    )


def _goodput_rows(g: dict[str, Any]) -> list[dict[str, Any]]:
    """Goodput with max_queued_requests (the target), then without it (context)."""
    out = []
    cap = g["capacity"]["capacity_rps"]
    backoff = "-".join(f"{1e3 * b:g}" for b in g.get("backoff_s") or ())
    for key, label in (
        ("limited", f"max_queued_requests={g['max_queued_requests']}"),
        ("unlimited", "no max_queued_requests"),
    ):
        run = g[key]
        s = run["statuses"]
        what = (
            f"goodput, {label} ({g['clients']} clients, {g['timeout_s']:g} s timeout, "
            f"{backoff} ms after a 503, {run['attempts_rps']:.0f} attempts/s: "
            f"{s.get('200', 0):,} ok, {s.get('503', 0):,} 503, "
            f"{s.get('timeout', 0):,} timed out; {run['wasted_runs']} handler runs wasted; "
            f"capacity {cap:.0f} req/s)"
        )
        share = run["goodput_share"]
        value = f"{_f(run['goodput_rps'])} req/s = {_f(None if share is None else 100 * share)}%"
        met = (None if share is None else share >= 0.9) if key == "limited" else "info"
        out.append(
            _row(
                "goodput",
                what,
                value,
                "≥ 90% of capacity" if key == "limited" else "- (context)",
                met,
                run,
            )
        )
    return out


def _scale_up_rows(a: dict[str, Any]) -> list[dict[str, Any]]:
    """1x -> 8x: the time to the replicas needed, the overshoot, failed requests."""
    cfg, rs = a["autoscaling_config"], a["replica_start_s"]
    what = (
        f"1x -> 8x: {a['needed']} replicas RUNNING after (replica start: max "
        f"{_f(rs['max'], 2)} s, median {_f(rs['median'], 2)} s of {rs['n']}; "
        f"{a['running_at_1x']} at 1x)"
    )
    up = (
        f"{_f(a['up_s'], 2)} s"
        if a["up_s"] is not None
        else (f"not within the {a['step_s'][1]:g} s at 8x")
    )
    out = [
        _row(
            "autoscale",
            what,
            up,
            f"≤ {_f(a['up_bound_s'], 2)} s (upscale_delay_s "
            f"{cfg['upscale_delay_s']:g} + start + 1)",
            a["up_met"],
            a,
        )
    ]
    what = f"overshoot (peak {a['peak_replicas']} replicas, peak target {a['peak_target']})"
    over = a["overshoot"]
    out.append(_row("autoscale", what, str(over), "≤ 1", None if over is None else over <= 1, a))
    up_failed = a["failed_1x"] + a["failed_up"]
    out.append(
        _row(
            "autoscale",
            f"failed requests at 1x and 8x ({a['rps'][0]:.0f}, {a['rps'][1]:.0f} req/s)",
            str(up_failed),
            "0",
            up_failed == 0,
            a,
        )
    )
    return out


def _scale_down_rows(a: dict[str, Any]) -> list[dict[str, Any]]:
    """8x -> 1x: the time back to 1 replica, downscaling during 8x, failed requests."""
    cfg = a["autoscaling_config"]
    what = (
        f"8x -> 1x: back to 1 replica after (first removal "
        f"{_f(a['first_removal_s'], 2)} s; {a['running_at_step_down']} before)"
    )
    out = [
        _row(
            "autoscale",
            what,
            f"{_f(a['down_s'], 2)} s",
            f"{cfg['downscale_delay_s']:g}-{a['down_bound_s']:g} s",
            a["down_met"],
            a,
        )
    ]
    flaps = a.get("downscales_at_8x") or []
    what = "downscaling decisions during the 8x load (s after the step up)"
    value = f"{len(flaps)}" + (f" ({', '.join(f'{t:g}' for t in flaps)})" if flaps else "")
    out.append(_row("autoscale", what, value, "- (0 expected)", "info", a))
    out.append(
        _row(
            "autoscale",
            "failed requests after the step down",
            str(a["failed_down"]),
            "0",
            a["failed_down"] == 0,
            a,
        )
    )
    return out


def _zero_row(z: dict[str, Any]) -> dict[str, Any]:
    lat = [
        f"{r['latency_s']:.2f}"
        if r.get("status") == 200
        else str(r.get("status") or r.get("error"))
        for r in z["runs"]
    ]
    what = (
        f"first request from zero replicas, max of {len(z['runs'])} ({', '.join(lat)} s;"
        f" cold start {z['cold_start_s']:.2f} s: a replica listed -> RUNNING; a "
        f"1-replica deploy: {z['cold_deploy_s']:.2f} s; beyond each zero replica's own "
        f"start: {', '.join(_f(r.get('beyond_replica_start_s'), 2) for r in z['runs'])} s)"
    )
    return _row(
        "zero",
        what,
        f"{_f(z['latency_max_s'], 2)} s",
        f"≤ {z['bound_s']:.2f} s (cold start + 0.5)",
        z["met"],
        z,
    )


def render(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    invalid = [r for r in results["rows"] if r["invalid"]]
    lines = [
        f"# shoal overload and autoscaling benchmark {env['date']}",
        "",
        f"{env['machine']['nproc']} CPUs ({env['machine']['cpu_model']}), Python "
        f"{env['python']['version']}, shoal {env['packages'].get('shoal')}, uvicorn "
        f"{env['packages'].get('uvicorn')}, commit {env.get('git_commit')} (working tree "
        f"{'with' if settings.get('dirty') else 'without'} uncommitted changes); "
        f"{'quick run; ' if settings.get('quick') else ''}foreign CPU over the run "
        f"{settings['foreign_core_pct']}% of a core, load average {settings['loadavg_start']} "
        f"at the start, {settings['loadavg_end']} at the end; {settings['wall_s']} s.",
        "",
    ]
    if invalid or settings.get("invalid"):
        lines += [
            f"**INVALID**: other processes used more than {INVALID_CORE_PCT:g}% of a core "
            "during a measurement (last column): those figures say nothing about shoal.",
            "",
        ]
    lines += [
        "| scenario | measurement | figure | target | verdict | foreign CPU |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        verdict = VERDICTS[row["met"]]
        if row["invalid"] and row["met"] in (True, False):
            verdict += " (INVALID)"
        lines.append(
            f"| {row['scenario']} | {row['what']} | {row['value']} | {row['target']} | "
            f"{verdict} | {row['cpu']} |"
        )
    notes = _notes(results)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _notes(results: dict[str, Any]) -> list[str]:
    """Errors, unavailable scenarios, the overload per 5 s, the replica timeline."""
    notes = []
    for name in SECTIONS:
        section = results.get(name) or {}
        if section.get("error"):
            notes.append(f"- {name}: {section['error']}")
        if section.get("reason"):
            notes.append(f"- {name}: not available: {section['reason']}")
    o = results.get("overload") or {}
    if o.get("windows"):
        points = "; ".join(
            f"{t:g} s: {ok}/{ref}/{other}, {_f(p503, 1)}/{_f(p200, 1)} ms"
            for t, ok, ref, other, p503, p200 in o["windows"]
        )
        notes.append(
            "- overload per 5 s of sending (200s/503s/others, p99 of the 503s/of the 200s): "
            + points
        )
    a = results.get("autoscale") or {}
    if a.get("timeline"):
        points = ", ".join(f"{t:g} s: {run}/{lv} (target {tg})" for t, tg, run, lv in a["timeline"])
        notes.append(
            f"- autoscale replicas RUNNING/live over time (from the 1x start; 8x at "
            f"{a['step_s'][0]:g} s, 1x at {a['step_s'][0] + a['step_s'][1]:g} s): "
            f"{points}"
        )
    if a.get("decisions"):
        points = "; ".join(f"{t:g} s: {f} -> {to} ({why})" for t, f, to, why in a["decisions"])
        notes.append(f"- autoscale scaling decisions (same times): {points}")
    return notes
