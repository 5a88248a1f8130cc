"""What an instance serves to operators: the admin REST API and, for a ``shoal start``
server, the socket other Python processes attach to."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from shoal._config import AdminOptions
from shoal._instance.plane import InstanceControlPlane

if TYPE_CHECKING:
    from shoal._instance.instance import Instance

logger = logging.getLogger("shoal")


class AdminServices:
    """The control plane of an instance and the servers that expose it."""

    def __init__(self, plane: InstanceControlPlane) -> None:
        self.plane = plane
        self.admin_url: str | None = None
        self._http: Any = None
        self._attach: Any = None
        self._dashboard: Any = None  # its sampler runs while the admin API is served

    @classmethod
    async def start(
        cls,
        instance: Instance,
        options: AdminOptions,
        token: str | None = None,
        attach_socket: str | None = None,
    ) -> AdminServices:
        """Serve the REST API on ``options`` (a busy port raises ConfigError) and, with
        ``attach_socket``, the attach socket; on failure nothing is left listening."""
        from shoal._instance.peer import serve_admin
        from shoal._instance.rest import admin_app

        services = cls(InstanceControlPlane(instance))
        try:
            app = admin_app(services.plane, token)
            server, host, port = await serve_admin(app, options, token)
            services._http = server
            services._dashboard = app.state.dashboard
            services._dashboard.start()
            services.admin_url = f"http://{_url_host(host)}:{port}"
            if attach_socket is not None:
                from shoal._instance.attach import AttachServer

                services._attach = AttachServer(instance)
                await services._attach.start(attach_socket)
        except BaseException:
            await services.close()
            raise
        return services

    async def close(self) -> None:
        """Stop accepting admin calls (first in shutdown: no operation starts meanwhile)."""
        if self._attach is not None:
            await self._attach.close()
        if self._http is not None:
            await self._http.stop()
        if self._dashboard is not None:
            await self._dashboard.close()
        await self.plane.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def new_token(path: str) -> str:
    """A fresh random admin token, written to ``path`` readable by this user only."""
    token = os.urandom(24).hex()
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(token)
    return token
