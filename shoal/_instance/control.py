"""The one code path for operating an instance: deploy, inspect, delete, shut down.

The REST API (``rest.py``), the CLI, the attach socket of a second Python
process and ``serve.run`` in the driver all end here, so an application
deployed one way is seen and managed the same way by the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shoal._deploy_config import ServeDeploySchema
    from shoal._observe.metrics.store import MetricsStore


class ControlPlane(Protocol):
    """What an operator can do to a running instance (every method is safe to call concurrently)."""

    async def apply_config(self, config: ServeDeploySchema) -> None:
        """Make the instance match ``config`` (declarative): applications missing from it are
        deleted, changed ones are updated, unchanged ones are left alone.

        Returns once the config is accepted and recorded; applications then deploy in
        the background (``details()`` shows their progress and failures). Raises
        ConfigError (a 400 over REST) for a config this instance cannot take.
        """
        ...

    async def delete_app(self, name: str) -> None:
        """Delete one application (a no-op if it does not exist)."""
        ...

    async def delete_all(self) -> None:
        """Delete every application; the instance keeps running."""
        ...

    def details(self) -> dict[str, Any]:
        """The instance in the JSON shape of Ray's ``GET /api/serve/applications/``
        (``ServeInstanceDetails``): proxy location, HTTP options, proxies, and per
        application its status, message, route prefix, deployed config and deployments."""
        ...

    def metrics(self) -> MetricsStore:
        """Every process's metrics and recent request failures: ``collect()`` yields the
        merged prometheus_client families (what ``GET /metrics`` exports),
        ``recent_errors()`` the failures, newest first (dicts with keys time,
        application, deployment, replica, request_id, type, message, traceback)."""
        ...

    def log_directory(self) -> str | None:
        """The directory of the instance's log files (docs/logging.md), or None if it
        writes none (local testing mode)."""
        ...

    async def shutdown(self) -> None:
        """Stop the whole instance in order (routes, applications, proxy, then the process
        hosting it, if it is a ``shoal start`` server)."""
        ...
