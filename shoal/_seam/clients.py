"""What every in-process replica client shares: its ``closed`` flag and close callbacks."""

from __future__ import annotations

from collections.abc import Callable


class ClosableClient:
    """A :class:`~shoal._seam.protocols.ReplicaClient`'s ``replica_id``, ``closed``,
    :meth:`on_close` and :meth:`close` (each callback is called once)."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id
        self.closed = False
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the client closes (at once if it has)."""
        if self.closed:
            callback()
        else:
            self._on_close.append(callback)

    def close(self) -> None:
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback()
