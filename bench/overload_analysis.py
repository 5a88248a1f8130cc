"""The figures of ``python -m bench.overload``, drawn from what its scenarios recorded.

From the load clients' records (:data:`bench.overload_clients.Record`): latency
percentiles, status counts, per-window counts and request rates. From the replica
states polled while a deployment autoscales (:class:`ReplicaPoller`): each replica's
life, the replica counts over time and the scale-up/scale-down figures of a step load
(:func:`analyse_steps`). Nothing here starts a server or a client.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import percentile
from bench.control_plane import Instance
from bench.overload_clients import ERROR, TIMEOUT, _ms

Sample = tuple[float, int | None, dict[str, str]]  # (monotonic time, target, {replica: state})


# --- figures from the clients' records ------------------------------------------------------------
def latency(records: Sequence[Sequence[float]], status: int | None = 200) -> dict[str, Any]:
    """n, p50/p99/max ms of the records with ``status`` (None: all)."""
    values = sorted(r[1] for r in records if status is None or r[2] == status)
    return {
        "n": len(values),
        "p50_ms": _ms(percentile(values, 50)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(values[-1]) if values else None,
    }


def statuses(records: Sequence[Sequence[float]]) -> dict[str, int]:
    """Count of each outcome: HTTP status, ``timeout`` or ``error``."""
    out: dict[str, int] = {}
    for r in records:
        key = {TIMEOUT: "timeout", ERROR: "error"}.get(int(r[2]), str(int(r[2])))
        out[key] = out.get(key, 0) + 1
    return out


def windows(
    records: Sequence[Sequence[float]], begin: float, duration: float, step: float
) -> list[list[Any]]:
    """Per ``step`` s of sending: [start s, 200s, 503s, others, p99 ms of 503s, of 200s]."""
    out = []
    for k in range(math.ceil(duration / step)):
        part = [r for r in records if begin + k * step <= r[0] < begin + (k + 1) * step]
        codes = statuses(part)
        ok, refused = codes.pop("200", 0), codes.pop("503", 0)
        p99 = [latency(part, 503)["p99_ms"], latency(part, 200)["p99_ms"]]
        out.append([k * step, ok, refused, sum(codes.values()), *p99])
    return out


def rate(records: Sequence[Sequence[float]], start: float, end: float, status: int = 200) -> float:
    """Requests/s with ``status`` answered (sent + latency) within [start, end)."""
    n = sum(1 for r in records if r[2] == status and start <= r[0] + r[1] < end)
    return n / (end - start) if end > start else 0.0


def failed(
    records: Sequence[Sequence[float]], start: float = -math.inf, end: float = math.inf
) -> int:
    """Requests sent within [start, end) that did not get a 200."""
    return sum(1 for r in records if r[2] != 200 and start <= r[0] < end)


# --- replica counts over time ---------------------------------------------------------------------
class ReplicaPoller:
    """Polls ``GET /api/serve/applications/`` every ``period_s`` in a thread, recording
    (monotonic time, target_num_replicas, {replica_id: state}) of one deployment."""

    def __init__(self, inst: Instance, app: str, period_s: float = 0.1) -> None:
        self.inst, self.app, self.period_s = inst, app, period_s
        self.samples: list[Sample] = []
        self.extra: dict[str, Any] = {}  # the deployment's status fields beyond Ray's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                t = time.monotonic()
                app = self.inst.details()["applications"][self.app]
                dep = next(iter(app["deployments"].values()))
                states = {r["replica_id"]: r["state"] for r in dep.get("replicas") or []}
                self.samples.append((t, dep.get("target_num_replicas"), states))
                self.extra = {k: v for k, v in dep.items() if k not in _RAY_DEPLOYMENT_KEYS}
            self._stop.wait(self.period_s)

    def __enter__(self) -> ReplicaPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


_RAY_DEPLOYMENT_KEYS = {
    "name",
    "status",
    "status_trigger",
    "message",
    "deployment_config",
    "target_num_replicas",
    "required_resources",
    "replicas",
}
LIVE_STATES = ("STARTING", "RUNNING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def running(states: dict[str, str]) -> int:
    return sum(1 for s in states.values() if s == "RUNNING")


def live(states: dict[str, str]) -> int:
    """Replicas started or starting (not stopping)."""
    return sum(1 for s in states.values() if s in LIVE_STATES)


@dataclass
class Life:
    """One replica as the polls saw it (``time.monotonic()`` values)."""

    first_seen: float
    first_running: float | None = None
    last_seen: float = 0.0
    last_state: str = ""

    @property
    def start_s(self) -> float | None:
        """Listed (STARTING) -> RUNNING: the replica's start time, to the poll period."""
        return None if self.first_running is None else self.first_running - self.first_seen


def replica_lives(samples: Sequence[Sample]) -> dict[str, Life]:
    """For each replica: when it was first listed and first RUNNING."""
    out: dict[str, Life] = {}
    for t, _, states in samples:
        for rid, state in states.items():
            life = out.setdefault(rid, Life(t))
            life.last_seen, life.last_state = t, state
            if state == "RUNNING" and life.first_running is None:
                life.first_running = t
    return out


def timeline(samples: Sequence[Sample], origin: float) -> list[list[Any]]:
    """[t_s, target, running, live] at every change (times from ``origin``)."""
    out: list[list[Any]] = []
    for t, target, states in samples:
        point = [target, running(states), live(states)]
        if not out or out[-1][1:] != point:
            out.append([round(t - origin, 2), *point])
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def analyse_steps(
    samples: Sequence[Sample],
    records: Sequence[Sequence[float]],
    starts: Sequence[float],
    end: float,
    needed: int,
    config: dict[str, Any],
    decisions: Sequence[dict[str, Any]] = (),
    wall_offset: float = 0.0,
) -> dict[str, Any]:
    """Scale-up and scale-down figures of a low -> high -> low step load. Times are
    ``time.monotonic()`` values; ``decisions`` (the status' ``scaling_decisions``) carry
    ``time.time()`` values, ``wall_offset`` = time.time() - time.monotonic()."""
    t_low, t_up, t_down = starts[0], starts[1], starts[2]
    lives = replica_lives(samples)
    log_rel = [
        [round(d["time"] - wall_offset - t_low, 2), d["from_replicas"], d["to_replicas"],
         d.get("reason", "")]
        for d in decisions
    ]  # fmt: skip
    return {
        **_scale_up(samples, lives, t_up, t_down, needed, config),
        **_scale_down(samples, t_up, t_down, config, decisions, wall_offset),
        "failed_1x": failed(records, t_low, t_up),
        "failed_up": failed(records, t_up, t_down),
        "failed_down": failed(records, t_down, end + 60),
        "statuses": statuses(records),
        "rps": [
            round(rate(records, a, b), 1) for a, b in ((t_low, t_up), (t_up, t_down), (t_down, end))
        ],
        "timeline": timeline(samples, t_low),
        # each replica: [first listed, first RUNNING, last listed (s from the 1x start), state]
        "replicas": {
            rid: [
                _r(life.first_seen - t_low),
                None if life.first_running is None else _r(life.first_running - t_low),
                _r(life.last_seen - t_low),
                life.last_state,
            ]
            for rid, life in lives.items()
        },
        "decisions": log_rel,
    }


def _scale_up(
    samples: Sequence[Sample],
    lives: dict[str, Life],
    t_up: float,
    t_down: float,
    needed: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """The step up's figures: replicas RUNNING at 1x, time to ``needed`` RUNNING against
    its bound (upscale_delay_s + the slowest new replica's start + 1 s), the peak."""
    before_up = [s for s in samples if s[0] <= t_up]
    at_low = running(before_up[-1][2]) if before_up else None
    reached_up = next(
        (t for t, _, st in samples if t_up <= t <= t_down and running(st) >= needed), None
    )
    starts_s = sorted(
        life.start_s
        for life in lives.values()
        if t_up < life.first_seen <= t_down and life.start_s is not None
    )
    after_up = [s for s in samples if s[0] >= t_up]
    peak_live = max((live(st) for _, _, st in after_up), default=None)
    peak_target = max((tg for _, tg, _ in after_up if tg is not None), default=None)
    peak = max((v for v in (peak_live, peak_target) if v is not None), default=None)
    max_start = starts_s[-1] if starts_s else None
    up_bound = None if max_start is None else config["upscale_delay_s"] + max_start + 1.0
    up_s = None if reached_up is None else reached_up - t_up
    return {
        "needed": needed,
        "running_at_1x": at_low,
        "up_s": _r(up_s),
        "replica_start_s": {
            "n": len(starts_s),
            "max": _r(max_start),
            "median": _r(statistics.median(starts_s)) if starts_s else None,
        },
        "up_bound_s": _r(up_bound),
        "up_met": up_bound is not None and up_s is not None and up_s <= up_bound,
        "peak_replicas": peak,
        "peak_target": peak_target,
        "overshoot": None if peak is None else max(0, peak - needed),
    }


def _scale_down(
    samples: Sequence[Sample],
    t_up: float,
    t_down: float,
    config: dict[str, Any],
    decisions: Sequence[dict[str, Any]],
    wall_offset: float,
) -> dict[str, Any]:
    """The step down's figures: the first downscaling decision after it (from the
    decision log when the status has one, else the first drop of target_num_replicas),
    any during the high load, and the time to 1 replica against downscale_delay_s."""
    at_down = next((running(st) for t, _, st in reversed(samples) if t <= t_down), None)
    target_down = next((tg for t, tg, _ in reversed(samples) if t <= t_down), None)
    downs = [d["time"] - wall_offset for d in decisions if d["to_replicas"] < d["from_replicas"]]
    downs_high = [t for t in downs if t_up < t < t_down]
    first_down = next((t for t in downs if t >= t_down), None)
    if not decisions:
        first_down = next(
            (t for t, tg, _ in samples if t >= t_down and tg is not None
             and target_down is not None and tg < target_down),
            None,
        )  # fmt: skip
    reached_down = next(
        (t for t, _, st in samples if t >= t_down and running(st) <= 1 and live(st) <= 1), None
    )
    delay = config["downscale_delay_s"]
    down_s = None if reached_down is None else reached_down - t_down
    first_down_s = None if first_down is None else first_down - t_down
    return {
        "running_at_step_down": at_down,
        "first_removal_s": _r(first_down_s),
        "downscales_at_8x": [round(t - t_up, 2) for t in downs_high],
        "down_s": _r(down_s),
        "down_bound_s": delay + 1.0,
        "down_met": (
            down_s is not None
            and first_down_s is not None
            and first_down_s >= delay - 0.5
            and down_s <= delay + 1.0
        ),
    }
