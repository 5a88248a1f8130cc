"""The last request failures of this process (a bounded ring), sent with its metrics."""

from __future__ import annotations

import time
from collections import deque

#: How many failures a process keeps (the oldest are dropped).
RECENT_ERRORS = 20
#: Longest traceback kept per failure (its end: where the error was raised).
MAX_TRACEBACK_CHARS = 8000

#: One failure: (unix time, application, deployment, replica, request_id, error type,
#: message, traceback).
ErrorData = tuple[float, str, str, str, str, str, str, str]

ERROR_KEYS = (
    "time", "application", "deployment", "replica", "request_id", "type", "message",
    "traceback",
)  # fmt: skip


class RecentErrors:
    """Keeps the last ``RECENT_ERRORS`` failures, oldest first."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        self.ring: deque[ErrorData] = deque(maxlen=size)

    def record(
        self,
        application: str,
        deployment: str,
        replica: str,
        request_id: str,
        type_name: str,
        message: str,
        traceback: str,
    ) -> None:
        self.ring.append((
            time.time(), application, deployment, replica, request_id, type_name,
            message[:MAX_TRACEBACK_CHARS], traceback[-MAX_TRACEBACK_CHARS:],
        ))  # fmt: skip

    def data(self) -> list[ErrorData]:
        return list(self.ring)


def as_dict(error: ErrorData) -> dict[str, object]:
    """One failure with its field names (``ERROR_KEYS``)."""
    return dict(zip(ERROR_KEYS, error, strict=True))
