"""A ``shoal start`` server's desired state, kept in SQLite in its directory.

Written after every deploy and delete, in one transaction (a reader, or a
server restarted after ``kill -9``, sees the old state or the new one, never a
mix). It holds the applications' specs (the user's code still pickled, see
``UserCode``) and the config each declarative application came from; running
replicas are not stored: they say who they are when they rejoin.
"""

from __future__ import annotations

import logging
import pickle
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from shoal._controller.status import ApplicationStatusOverview
from shoal._seam.specs import AppSpec

logger = logging.getLogger("shoal.controller")

_SCHEMA = "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL)"


@dataclass
class DesiredState:
    """What the server should run: its applications, the config of declarative ones, and
    the applications listed without anything running: a failed first ``serve.run``
    (``failed``), and a config's applications whose build failed or was still running
    (``unbuilt``), so a restarted server still says why."""

    apps: list[AppSpec] = field(default_factory=list)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    target_capacity: float | None = None  # of the last config file applied
    failed: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    unbuilt: dict[str, ApplicationStatusOverview] = field(default_factory=dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A checkpoint written before a field existed has that field's default.
        self.__dict__.update({"failed": {}, "unbuilt": {}, **state})


class Checkpoint:
    """The SQLite file at ``path`` (created on first save)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def save(self, state: DesiredState) -> None:
        """Replace the stored state atomically; a failure is logged, never raised (the
        running applications matter more than the next restart)."""
        try:
            blob = pickle.dumps(state, protocol=5)
            with sqlite3.connect(self.path) as db:  # commits on success, one transaction
                db.execute(_SCHEMA)
                db.execute("INSERT OR REPLACE INTO state VALUES ('desired', ?)", (blob,))
        except Exception:
            logger.exception("could not checkpoint the desired state to %s", self.path)

    def load(self) -> DesiredState | None:
        """The last saved state, or None if there is none (or it cannot be read)."""
        try:
            with sqlite3.connect(self.path) as db:
                db.execute(_SCHEMA)
                row = db.execute("SELECT value FROM state WHERE key = 'desired'").fetchone()
        except sqlite3.Error:
            logger.exception("could not read the checkpoint %s; starting empty", self.path)
            return None
        if row is None:
            return None
        state: DesiredState = pickle.loads(row[0])  # written by this user's own server
        return state
