"""The targets the suite checks, each a threshold on one figure of the results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Getter = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    unit: str
    threshold: float
    at_least: bool
    value: Getter


@dataclass(frozen=True)
class PointGetter:
    """A getter that reads the HTTP points ``uses`` ((workload, concurrency), any server):
    its target is not valid when one of them is not (too much foreign CPU)."""

    get: Getter
    uses: tuple[tuple[str, int], ...]

    def __call__(self, results: dict[str, Any]) -> float | None:
        return self.get(results)


def find_point(points: list[dict[str, Any]], wl: str, server: str, c: int) -> dict[str, Any] | None:
    for point in points:
        if (point["workload"], point["server"], point["concurrency"]) == (wl, server, c):
            return point
    return None


def _point_value(wl: str, c: int, field: str) -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        point = find_point(results.get("points", []), wl, "shoal", c)
        return None if point is None else point.get(field)

    return PointGetter(get, ((wl, c),))


def _ratio_value(wl: str, c: int, ref: str, field: str = "throughput_ratio") -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        for r in results.get("ratios", []):
            if (r["workload"], r["concurrency"], r["reference"]) == (wl, c, ref):
                value: float | None = r[field]
                return value
        return None

    return PointGetter(get, ((wl, c),))


def _shoal_ratio(wl: str, other_wl: str, c: int) -> Getter:
    """Throughput of shoal on ``wl`` ÷ shoal on ``other_wl``, both at ``c`` (same run)."""

    def get(results: dict[str, Any]) -> float | None:
        a = _point_value(wl, c, "throughput_rps")(results)
        b = _point_value(other_wl, c, "throughput_rps")(results)
        return a / b if a is not None and b else None

    return PointGetter(get, ((wl, c), (other_wl, c)))


@dataclass(frozen=True)
class SectionGetter:
    """A getter that reads a field of a section: its target is not valid when the section
    says so (``"valid": False``: no run of it had at most 15% of a core foreign)."""

    get: Getter
    section: str

    def __call__(self, results: dict[str, Any]) -> float | None:
        return self.get(results)


def _section_value(section: str, *path: str) -> Getter:
    def get(results: dict[str, Any]) -> float | None:
        data: Any = results.get(section) or {}
        for key in path:
            data = data.get(key) if isinstance(data, dict) else None
        return data if isinstance(data, int | float) else None

    return SectionGetter(get, section)


# Issue 15's thresholds where it sets one (W1, W2, W3, W4, handle, cold start), else earlier ones.
TARGETS: tuple[Target, ...] = (
    # W1 through the proxy, then the same targets through direct ingress (W1*-direct).
    Target("W1-thr-c64", "W1 throughput c=64 vs Starlette (1 process), proxy", "x", 0.8, True,
           _ratio_value("W1", 64, "starlette")),
    Target("W1D-thr-c64", "W1, default options: throughput c=64 vs Starlette (1 process), proxy",
           "x", 0.8, True, _ratio_value("W1-defaults", 64, "starlette")),
    Target("W1-p50r-c1", "W1 p50 latency c=1 vs Starlette's (1 process), proxy", "x", 1.5, False,
           _ratio_value("W1", 1, "starlette", "p50_ratio")),
    Target("W1-p50-c1", "W1 p50 latency c=1, proxy", "ms", 0.5, False,
           _point_value("W1", 1, "p50_ms")),
    Target("W1X-thr-c64", "W1 throughput c=64 vs Starlette (1 process), direct ingress", "x", 0.8,
           True, _ratio_value("W1-direct", 64, "starlette")),
    Target("W1DX-thr-c64",
           "W1, default options: throughput c=64 vs Starlette (1 process), direct ingress", "x",
           0.8, True, _ratio_value("W1-defaults-direct", 64, "starlette")),
    Target("W1X-p50r-c1", "W1 p50 latency c=1 vs Starlette's (1 process), direct ingress", "x",
           1.5, False, _ratio_value("W1-direct", 1, "starlette", "p50_ratio")),
    Target("W1X-p50-c1", "W1 p50 latency c=1, direct ingress", "ms", 0.5, False,
           _point_value("W1-direct", 1, "p50_ms")),
    Target("W1F-thr-c64", "W1 via FastAPI ingress: throughput c=64 vs FastAPI", "x", 0.4, True,
           _ratio_value("W1-fastapi", 64, "fastapi")),
    Target("W1F-p50-c1", "W1 via FastAPI ingress: p50 latency c=1", "ms", 0.7, False,
           _point_value("W1-fastapi", 1, "p50_ms")),
    Target("W2-thr-c64", "W2 throughput c=64 vs FastAPI", "x", 1.0, True,
           _ratio_value("W2", 64, "fastapi")),
    Target("W2-p50-c1", "W2 p50 latency c=1", "ms", 0.5, False, _point_value("W2", 1, "p50_ms")),
    Target("W2X-thr-c64", "W2 throughput c=64 vs FastAPI, direct ingress", "x", 1.0, True,
           _ratio_value("W2-direct", 64, "fastapi")),
    Target("W2X-p50-c1", "W2 p50 latency c=1, direct ingress", "ms", 0.5, False,
           _point_value("W2-direct", 1, "p50_ms")),
    Target("W3-thr-c64", "W3 batching: throughput c=64 vs hand-written batcher", "x", 1.0, True,
           _ratio_value("W3", 64, "starlette")),
    Target("W3-size-c64", "W3 batching: mean batch size c=64", "", 30.0, True,
           _point_value("W3", 64, "batch_size_mean")),
    Target("W3L-p50-c1", "W3 latency-target mode: p50 latency c=1", "ms", 11.0, False,
           _point_value("W3-latency", 1, "p50_ms")),
    Target("W3L-thr-c64", "W3 latency-target mode: throughput c=64 vs fixed", "x", 1.0, True,
           _shoal_ratio("W3-latency", "W3", 64)),
    Target("W4-p50-c1", "W4 p50 latency c=1", "ms", 5.6, False, _point_value("W4", 1, "p50_ms")),
    Target("W4-thr-c32", "W4 throughput c=32 vs FastAPI", "x", 0.95, True,
           _ratio_value("W4", 32, "fastapi")),
    Target("W4X-p50-c1", "W4 p50 latency c=1, direct ingress", "ms", 5.6, False,
           _point_value("W4-direct", 1, "p50_ms")),
    Target("W4X-thr-c32", "W4 throughput c=32 vs FastAPI, direct ingress", "x", 0.95, True,
           _ratio_value("W4-direct", 32, "fastapi")),
    Target("stream-first", "stream: time to first chunk above the generator's (p50)", "ms", 2.0,
           False, _section_value("stream", "first_chunk", "shoal", "overhead_p50_ms")),
    Target("stream-rate", "stream: small chunks per second through one stream", "/s", 20_000.0,
           True, _section_value("stream", "rate", "shoal", "items_per_s")),
    Target("handle-p50", "handle round trip p50", "us", 100.0, False,
           _section_value("handle", "p50_us")),
    Target("cold-start", "cold start (median)", "s", 0.4, False,
           _section_value("cold_start", "median_s")),
    Target("idle-rss", "idle RSS, driver + descendants", "MB", 200.0, False,
           _section_value("idle_rss", "rss_mb")),
)  # fmt: skip
