"""Shoal applications of the bench that are built on FastAPI, served like those of
``bench.apps``::

    python -m shoal run bench.apps_fastapi:w1_fastapi --host 127.0.0.1 --port 8000

* ``w1_fastapi``: W1 (``POST /echo`` returns the JSON body) as a class-based route of a
  ``@serve.ingress(FastAPI())`` deployment, written like the FastAPI reference's route.
* ``business``: ``examples.business_logic`` as it ships (``build_app``), with its SQLite
  feature store at ``$SHOAL_BENCH_BUSINESS_DB`` (the bench points it into its temporary
  log directory), else in a fresh temporary directory.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

from bench.apps import MAX_ONGOING
from bench.common import BUSINESS_DB_ENV
from shoal import serve
from shoal.serve import Application

echo_api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING)
@serve.ingress(echo_api)
class FastEcho:
    @echo_api.post("/echo")
    async def echo(self, request: Request) -> Any:
        return await request.json()


w1_fastapi = FastEcho.bind()


def business() -> Application:
    """Called by ``shoal run``: the business-logic example with a private feature store."""
    from examples.business_logic import build_app

    db_path = os.environ.get(BUSINESS_DB_ENV)
    if not db_path:
        db_path = str(Path(tempfile.mkdtemp(prefix="shoal-bench-business-")) / "features.db")
    return build_app(db_path=db_path)
