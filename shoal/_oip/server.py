"""The server-level paths of the Open Inference Protocol, answered by the HTTP proxy.

``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready`` belong to no
one model, so the proxy answers them itself, as it answers ``/-/healthz``, once at least
one application is routed under ``/v2/models/`` (an OIP model). It also answers, with the
protocol's 404 body, a path under ``/v2/models/`` that no model claims, and refuses the
model repository extension (``/v2/repository/...``) with 501.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from shoal._errors import UnsupportedExtensionError

#: The server's name and the extensions it implements (``GET /v2``).
SERVER_NAME = "shoal"
EXTENSIONS = ("binary_tensor_data",)
MODELS_PREFIX = "/v2/models/"

Answer = tuple[int, bytes]
REPOSITORY_REFUSED = (
    "the model repository extension (index, load, unload) is not supported by shoal; deploy "
    "and delete models as applications (serve.run, serve.delete, or a config file): "
    "docs/oip.md"
)


def is_oip_route(prefix: str) -> bool:
    """True for an application's route prefix under which an OIP model is served."""
    return prefix.startswith(MODELS_PREFIX)


def server_answer(
    path: str, method: str, route_prefix: str | None, ready: Callable[[], bool]
) -> Answer | None:
    """The proxy's answer to ``path`` (JSON body), or None to route it as usual.

    ``route_prefix``: the prefix of the application the path matched, or None; ``ready``:
    whether every OIP model has a replica able to serve.
    """
    if route_prefix is not None and is_oip_route(route_prefix):
        return None  # a model's own path: its replica answers
    if path in ("/v2", "/v2/"):
        from shoal import __version__

        return 200, _json({"name": SERVER_NAME, "version": __version__,
                           "extensions": list(EXTENSIONS)})  # fmt: skip
    if path == "/v2/health/live":
        return 200, _json({"live": True})
    if path == "/v2/health/ready":
        is_ready = ready()
        return (200 if is_ready else 503), _json({"ready": is_ready})
    if path.startswith(MODELS_PREFIX):
        name = path[len(MODELS_PREFIX) :].split("/", 1)[0]
        return 404, _error(f"Request for unknown model: '{name}' is not found")
    if path.startswith("/v2/repository"):
        refused = UnsupportedExtensionError(f"{method} {path}: {REPOSITORY_REFUSED}")
        return refused.status, _error(str(refused))
    if route_prefix is None:
        return 404, _error(f"no such path: {path}")
    return None


def all_ready(prefixes: Iterable[str], has_replica: Callable[[str], bool]) -> bool:
    """Every OIP model's application has a replica able to serve."""
    return all(has_replica(prefix) for prefix in prefixes if is_oip_route(prefix))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _error(message: str) -> bytes:
    return _json({"error": message})
