"""The proxy half of the runtime seam, for runtimes that serve no HTTP."""

from __future__ import annotations

from collections.abc import Callable

from shoal._config import HTTPOptions
from shoal._errors import NotFoundError
from shoal._runtime.node import local_node_id
from shoal._seam.specs import NodeProxy


class WithoutProxy:
    """Runtimes without an HTTP proxy: starting one raises NotFoundError with
    :attr:`no_proxy_message`; the rest of the proxy's calls do nothing."""

    no_proxy_message = "this runtime serves no HTTP"
    proxy_pid: int | None = None

    async def start_proxy(
        self, options: HTTPOptions, on_died: Callable[[], None] | None = None
    ) -> tuple[str, int]:
        raise NotFoundError(self.no_proxy_message)

    async def restart_proxy(self) -> tuple[str, int]:
        return await self.start_proxy(HTTPOptions())

    async def check_proxy(self, timeout_s: float) -> None:
        """No proxy: nothing to check."""

    async def publish_routes(self, routes: dict[str, tuple[str, str]]) -> None:
        """No proxy: routes are not served."""

    async def drain_proxy(self, timeout_s: float = 0.0) -> None:
        """No proxy: nothing to drain."""

    async def fork_helper(self, entry: str, argv: list[str]) -> None:
        """No worker processes, so no fork server: helpers start with ``python -m``."""
        return None

    @property
    def proxy_node_id(self) -> str:
        return local_node_id()

    def node_proxies(self) -> dict[str, NodeProxy]:
        """No proxy: none on other nodes either."""
        return {}
