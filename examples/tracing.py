"""Tracing a request through a three-deployment pipeline (OpenTelemetry).

``Ingress`` (HTTP) calls ``Tokenize``, which calls ``Embed``; ``Embed`` makes a span
of its own around its work. Shoal is started with tracing on and the JSON-lines
file exporter, so every shoal process (the proxy and each replica) appends its spans
to one file. The example sends one HTTP request carrying a W3C ``traceparent`` (as
a traced client would), waits for its spans, and prints the span tree, one span a
line, children indented under their parent. Guide: docs/tracing.md. Run it (needs
``pip install 'shoal[tracing]'``; serves on 127.0.0.1:8000 and shuts down)::

    python -m examples.tracing [--port 8000] [--spans /tmp/spans.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import httpx
from opentelemetry import trace
from starlette.requests import Request

from shoal import serve

#: The client's trace: the proxy's span becomes a child of span CLIENT_SPAN_ID.
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@serve.deployment
class Embed:
    def __call__(self, tokens: list[str]) -> list[int]:  # sync: runs in a thread
        # The user's own span: a child of this replica's span (the current one).
        with trace.get_tracer("examples.tracing").start_as_current_span("embed-tokens"):
            return [len(token) for token in tokens]


@serve.deployment
class Tokenize:
    def __init__(self, embed: Any) -> None:
        self.embed = embed

    async def __call__(self, text: str) -> list[int]:
        return await self.embed.remote(text.split())


@serve.deployment
class Ingress:
    def __init__(self, tokenize: Any) -> None:
        self.tokenize = tokenize

    async def __call__(self, request: Request) -> dict[str, Any]:
        text = (await request.json())["text"]
        return {"embedding": await self.tokenize.remote(text)}


app = Ingress.bind(Tokenize.bind(Embed.bind()))


def read_spans(path: str, trace_id: str, count: int, timeout_s: float = 10.0) -> list[dict]:
    """The spans of trace ``trace_id`` in the file, once there are ``count`` (each
    process appends its spans as they end), or all there are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open(path) as file:
            spans = [json.loads(line) for line in file if line.strip()]
        ours = [s for s in spans if s["trace_id"] == trace_id]
        if len(ours) >= count or time.monotonic() > deadline:
            return ours
        time.sleep(0.02)


def tree(spans: list[dict]) -> list[str]:
    """The span tree, one line a span: kind, name, and the process it ran in."""
    children: dict[str | None, list[dict]] = {}
    ids = {span["span_id"] for span in spans}
    for span in sorted(spans, key=lambda s: s["start_ns"]):
        parent = span["parent_span_id"] if span["parent_span_id"] in ids else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in children.get(parent, []):
            where = span["resource"]["shoal.process"].split("-")[0]
            lines.append(f"{'  ' * depth}{span['kind']} {span['name']} [{where}]")
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--spans", help="the JSON-lines file (default: a temporary one)")
    args = parser.parse_args()
    path = args.spans or os.path.join(tempfile.mkdtemp(prefix="shoal-spans-"), "spans.jsonl")
    serve.start(
        http_options={"host": "127.0.0.1", "port": args.port},
        tracing_options={"enabled": True, "exporter": "file", "path": path},
    )
    try:
        serve.run(app, name="tracing", route_prefix="/embed")
        response = httpx.post(
            f"http://127.0.0.1:{args.port}/embed",
            json={"text": "trace every hop"},
            headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"},
            timeout=30,
        )
        request_id = response.headers["x-request-id"]
        print(f"response: {response.status_code} {response.json()}")
        spans = read_spans(path, TRACE_ID, count=7)
        print(f"trace {TRACE_ID}, request {request_id}: {len(spans)} spans in {path}")
        for line in tree(spans):
            print(line)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
