"""shoal: serve machine-learning models and business logic as composable Python deployments.

``from shoal import serve`` and ``import shoal`` expose the same names, which
follow Ray Serve's public API. The list lives in :mod:`shoal.serve` (``__all__``,
pinned by tests/test_config.py); ``shoal.__all__`` is ``["serve", *serve.__all__]``.

The public API is imported on first use (PEP 562), not when a submodule is: a
proxy process, which imports only shoal's internals, starts without it (about
0.2 s less per process).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    serve = importlib.import_module("shoal.serve")  # sets shoal.serve as an attribute
    if name == "__all__":
        return ["serve", *serve.__all__]
    if name == "serve":
        return serve
    if name in serve.__all__:
        return getattr(serve, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")


def __dir__() -> list[str]:
    serve = importlib.import_module("shoal.serve")
    return sorted({*globals(), "serve", *serve.__all__})
