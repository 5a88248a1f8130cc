"""HTTP requests and responses as they travel between the proxy and an ingress replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class HttpRequestData:
    """One HTTP request, fully read by the proxy (ASGI scope fields plus the body)."""

    method: str
    scheme: str
    path: str
    root_path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    http_version: str = "1.1"

    def __reduce__(self) -> tuple[Any, ...]:
        return (HttpRequestData, (
            self.method, self.scheme, self.path, self.root_path, self.query_string,
            self.headers, self.body, self.client, self.server, self.http_version,
        ))  # fmt: skip

    def scope(self) -> dict[str, Any]:
        """The ASGI scope a Starlette ``Request`` (or ``WebSocket``) is built from."""
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": self.root_path,
            "query_string": self.query_string,
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
        }
        if self.method == WEBSOCKET:
            del scope["method"]
            protocols = next((v for k, v in self.headers if k == b"sec-websocket-protocol"), b"")
            scope["type"] = "websocket"
            scope["subprotocols"] = [p.strip() for p in protocols.decode().split(",") if p.strip()]
        return scope


WEBSOCKET = "WEBSOCKET"  # HttpRequestData.method of a websocket connection


@dataclass(slots=True)
class HttpResponseData:
    """A complete HTTP response produced in a replica."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def __reduce__(self) -> tuple[Any, ...]:
        return (HttpResponseData, (self.status, self.headers, self.body))


@dataclass(slots=True)
class HttpResponseStart:
    """The status and headers of a streamed response; body chunks (bytes) follow."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def __reduce__(self) -> tuple[Any, ...]:
        return (HttpResponseStart, (self.status, self.headers))
