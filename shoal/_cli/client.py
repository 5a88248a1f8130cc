"""The CLI's client of an instance's admin REST API (``shoal/_instance/rest.py``).

The address comes from ``--address``, else ``SHOAL_ADDRESS``, else Ray's
``RAY_DASHBOARD_ADDRESS``, else the local ``shoal start`` server's, else
``http://127.0.0.1:8265``, read when a command runs. The bearer token, when one
is needed, comes from ``SHOAL_ADMIN_TOKEN`` or, for the local ``shoal start``
server's own address only, from its ``admin.token`` file, so a local token is
never sent to another host.

Every failure is a ``SystemExit`` with a message saying what to do.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from shoal._config import TIMEOUTS

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def local_server() -> Any:
    """The local ``shoal start`` server's ``ServerInfo`` (of ``$SHOAL_HOME``), or None."""
    from shoal._instance.home import read_server_info

    try:
        return read_server_info()
    except Exception:
        return None  # an unusable state directory: no local server to talk to


def resolve_address(given: str | None) -> str:
    """The admin address a command talks to (see the module docstring for the order)."""
    address = given or os.environ.get("SHOAL_ADDRESS") or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not address:
        info = local_server()
        address = (info.admin_url if info is not None else None) or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def is_local_server(info: Any, address: str) -> bool:
    """Whether ``address`` reaches the local server ``info`` describes (same port, and a
    loopback host or the host it serves on)."""
    if info is None or not info.admin_url:
        return False
    ours = urllib.parse.urlsplit(info.admin_url)
    wanted = urllib.parse.urlsplit(address)
    loopback = wanted.hostname in ("127.0.0.1", "localhost", "::1")
    return ours.port == wanted.port and (loopback or ours.hostname == wanted.hostname)


def _local_token(address: str) -> str | None:
    """The local server's token, only for its own address: never sent to another host."""
    info = local_server()
    if not is_local_server(info, address):
        return None
    try:
        return Path(info.token_path).read_text().strip() or None
    except OSError:
        return None


class AdminClient:
    """Requests to one admin address; errors exit with ``{command}: message``."""

    def __init__(self, command: str, address: str | None) -> None:
        self.command = command
        self.address = resolve_address(address)
        self.token = os.environ.get("SHOAL_ADMIN_TOKEN") or _local_token(self.address)

    def request(
        self, method: str, path: str, body: Any = None, timeout_s: float | None = None
    ) -> Any:
        """Send one request; the decoded JSON answer (None for an empty body). It waits
        ``timeout_s`` at most (default ``TIMEOUTS.cli_call_s``)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        raw, _ = self._send(method, path, data, headers, timeout_s)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise SystemExit(
                f"{self.command}: {self.address} answered something that is not JSON; is it "
                "a shoal instance's (or a Ray dashboard's) admin address?"
            ) from None

    def read(self, path: str) -> tuple[bytes, dict[str, str]] | None:
        """GET ``path``: the answer's body as sent, and its headers (lowercase names);
        None if the instance answers 404 (what was asked for is not there)."""
        return self._send("GET", path, None, {}, None, missing_ok=True)

    def _send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        headers: dict[str, str],
        timeout_s: float | None,
        *,
        missing_ok: bool = False,
    ) -> Any:
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        import urllib.error  # here: `shoal run` imports this module, never needs them
        import urllib.request

        request = urllib.request.Request(
            self.address + path, data=data, headers=headers, method=method
        )
        limit = TIMEOUTS.cli_call_s if timeout_s is None else timeout_s
        try:
            with urllib.request.urlopen(request, timeout=limit) as response:
                return response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            text = exc.read().decode(errors="replace").strip()
            raise SystemExit(f"{self.command}: {self._explain(exc.code, text)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SystemExit(f"{self.command}: {self._unreachable(exc)}") from None

    def answers(self) -> bool:
        """Whether anything accepts connections at the address (no error on failure)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.address + "/api/ray/version", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            return False

    def _unreachable(self, exc: Exception) -> str:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"no shoal instance answers at {self.address}; start one with `shoal start`, "
                "or pass --address (or set SHOAL_ADDRESS)"
            )
        if isinstance(reason, TimeoutError):
            return f"{self.address} did not answer within the timeout; is the instance overloaded?"
        return f"cannot reach {self.address} ({reason}); check --address (or SHOAL_ADDRESS)"

    def _explain(self, status: int, text: str) -> str:
        if status == 400:
            return text or "the instance refused the request (400)"
        if status == 403:
            return text or (
                "the instance refused the request (403); set SHOAL_ADMIN_TOKEN to its token"
            )
        if status == 404:
            return (
                f"{self.address} has no such admin route ({text or 404}); is it a shoal "
                "instance's admin address?"
            )
        return f"the instance at {self.address} answered {status}: {text}"
