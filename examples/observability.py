"""What an operator sees of a running application: metrics, status, logs, the dashboard.

A two-deployment pipeline (``Ingress`` calls ``Scorer``) serves over HTTP; the scorer
counts its positive answers in a custom metric, logs each request, and reports its
own details into status (``status_details()``). The example sends a few requests (one
of them bad, so it fails), then prints, as an operator would read them:

1. lines of ``GET /metrics`` on the admin API (Prometheus format, Ray Serve's names);
2. ``print(serve.status())``: the indented summary, with the scorer's details;
3. the scorer's log lines from its file in the instance's log directory;
4. the dashboard's address (``/`` on the admin API), and the failed request as the
   dashboard lists it (its request id and error).

Guide: docs/observability.md. Run it (serves on 127.0.0.1, free ports, then stops)::

    python -m examples.observability
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request

from shoal import serve
from shoal.serve.metrics import Counter

logger = logging.getLogger(__name__)


@serve.deployment(health_check_period_s=0.5)
class Scorer:
    def __init__(self) -> None:
        self.threshold = 0.5
        self.positives = Counter(
            "scorer_positive_answers", description="Scores above the threshold."
        )
        self.answered = 0

    def __call__(self, score: float) -> bool:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be within [0, 1], got {score}")
        logger.info("scoring %.2f", score)
        self.answered += 1
        positive = score > self.threshold
        if positive:
            self.positives.inc()
        return positive

    def status_details(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "answered": self.answered}


@serve.deployment
class Ingress:
    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    async def __call__(self, request: Request) -> dict[str, bool]:
        score = float((await request.json())["score"])
        return {"positive": await self.scorer.remote(score)}


app = Ingress.bind(Scorer.bind())

#: The metric families the example prints (of the many /metrics has).
SHOWN = (
    "ray_serve_num_http_requests_total{",
    "ray_serve_deployment_request_counter_total{",
    "ray_scorer_positive_answers_total{",
)


def wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout_s:g} s")


def main(port: int, admin_port: int, logs_dir: str) -> None:
    serve.start(http_options={"port": port}, admin_options={"port": admin_port}, _attach=False)
    try:
        # logs_dir: this application's replicas write their files there (docs/logging.md).
        serve.run(app, name="scoring", route_prefix="/score", logging_config={"logs_dir": logs_dir})
        url, admin = f"http://127.0.0.1:{port}/score", f"http://127.0.0.1:{admin_port}"
        with httpx.Client(timeout=10) as client:
            for score in (0.9, 0.2, 0.7):
                client.post(url, json={"score": score}).raise_for_status()
            failed = client.post(url, json={"score": 7})  # a 500: shown in recent errors
            print(f"== a bad request: HTTP {failed.status_code}, "
                  f"request id {failed.headers['x-request-id']}")  # fmt: skip

            def metric_lines() -> list[str]:
                text = client.get(f"{admin}/metrics").text
                lines = [line for line in text.splitlines() if line.startswith(SHOWN)]
                return lines if len(lines) >= 5 and "ray_scorer" in text else []

            print("== GET /metrics (some of its lines)")
            print("\n".join(wait_for(metric_lines, "metrics")))
            print("== print(serve.status())")
            wait_for(lambda: _details_of_scorer(), "the scorer's details")
            print(serve.status())
            print("== the scorer's log file")
            for line in wait_for(lambda: _scorer_log_lines(logs_dir), "log lines"):
                print(line)
            print(f"== the dashboard: {admin}/")
            errors = wait_for(
                lambda: client.get(f"{admin}/api/shoal/dashboard/errors").json()["errors"],
                "a recent error",
            )
            print(f"recent error: {errors[0]['request_id']} {errors[0]['type']}: "
                  f"{errors[0]['message']}")  # fmt: skip
    finally:
        serve.shutdown()


def _details_of_scorer() -> bool:
    overview = serve.status().applications["scoring"].deployments["Scorer"]
    return any(replica.details for replica in overview.replicas)


def _scorer_log_lines(logs_dir: str) -> list[str]:
    pattern = os.path.join(logs_dir, "replica_scoring_Scorer_*.log")
    lines = [line for path in glob.glob(pattern) for line in Path(path).read_text().splitlines()]
    return [line for line in lines if "scoring " in line]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--admin-port", type=int, default=8265)
    parser.add_argument("--logs-dir", default=None, help="default: a new temporary directory")
    args = parser.parse_args()
    main(args.port, args.admin_port, args.logs_dir or tempfile.mkdtemp(prefix="shoal-logs-"))
