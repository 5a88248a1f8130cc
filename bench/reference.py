"""Reference servers: bare uvicorn + Starlette and uvicorn + FastAPI.

Both implement the W1, W2 and W4 workloads inline, in one process, on the same URLs the
shoal apps are driven on (``POST /echo``, ``POST /w2``, ``GET /w4``). Starlette also serves
W3 through the hand-written batcher of ``bench.batcher`` (``POST /w3``, counters at
``GET /w3/stats``) and the streams (``GET /stream/first``, ``GET /stream/many?n=N``)::

    python -m bench.reference starlette --port 8001
    python -m bench.reference fastapi --port 8002
    python -m bench.reference starlette --port 8003 --workers 2   # uvicorn --workers 2

With ``--workers N`` (N > 1) uvicorn's supervisor process spawns N worker processes that
share the listening socket (as ``uvicorn --workers N`` does).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench.batcher import Batcher
from bench.common import (
    MEMBER_VALUES,
    W3_MAX_BATCH,
    W3_WAIT_S,
    featurize,
    first_yield_stream,
    many_items_stream,
    mean,
    member,
    predict,
    sleep_batch,
)

FRAMEWORKS = ("starlette", "fastapi")


async def _echo_body(request: Request) -> Any:
    return await request.json()


async def _w2_body(request: Request) -> dict[str, float]:
    body = await request.json()
    return {"y": predict(featurize(body))}


async def _w4_body() -> dict[str, float]:
    values = await asyncio.gather(*(member(v) for v in MEMBER_VALUES))
    return {"mean": mean(values)}


def starlette_app() -> Starlette:
    """Bare Starlette: one route per workload, JSONResponse."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(await _echo_body(request))

    async def w2(request: Request) -> JSONResponse:
        return JSONResponse(await _w2_body(request))

    async def w4(request: Request) -> JSONResponse:
        return JSONResponse(await _w4_body())

    batcher = Batcher(sleep_batch, W3_MAX_BATCH, W3_WAIT_S)

    async def w3(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await batcher.submit(body.get("x")))

    async def w3_stats(request: Request) -> JSONResponse:
        return JSONResponse(batcher.stats())

    async def stream_first(request: Request) -> StreamingResponse:
        return StreamingResponse(first_yield_stream(), media_type="text/plain")

    async def stream_many(request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", "1000"))
        return StreamingResponse(many_items_stream(n), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["POST"]),
            Route("/w2", w2, methods=["POST"]),
            Route("/w4", w4, methods=["GET"]),
            Route("/w3", w3, methods=["POST"]),
            Route("/w3/stats", w3_stats, methods=["GET"]),
            Route("/stream/first", stream_first, methods=["GET"]),
            Route("/stream/many", stream_many, methods=["GET"]),
        ]
    )


def fastapi_app() -> FastAPI:
    """FastAPI: the same workloads, returning dicts (FastAPI's JSON encoding)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await _echo_body(request)

    @app.post("/w2")
    async def w2(request: Request) -> dict[str, float]:
        return await _w2_body(request)

    @app.get("/w4")
    async def w4() -> dict[str, float]:
        return await _w4_body()

    return app


FACTORIES = {name: f"bench.reference:{name}_app" for name in FRAMEWORKS}


def build_app(framework: str) -> Starlette | FastAPI:
    if framework == "starlette":
        return starlette_app()
    if framework == "fastapi":
        return fastapi_app()
    raise ValueError(f"unknown framework {framework!r}; expected one of {FRAMEWORKS}")


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.reference")
    parser.add_argument("framework", choices=FRAMEWORKS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes (default 1: no supervisor)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    # More than one worker: uvicorn's supervisor spawns processes that import the app.
    app: Any = build_app(args.framework) if args.workers == 1 else FACTORIES[args.framework]
    uvicorn.run(
        app,
        factory=args.workers > 1,
        workers=args.workers if args.workers > 1 else None,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
