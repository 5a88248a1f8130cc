"""Feature stores for the business-logic example: SQLite (stdlib) or Redis (optional).

A store maps a user id to a dict of pre-computed features. Lookups are async
and never block the event loop they are awaited on: SQLite queries run in a
small pool of worker threads, Redis uses the ``redis`` package's asyncio client.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

Features = dict[str, float]


class FeatureStore(Protocol):
    """Where pre-computed features live."""

    def seed(self, rows: Iterable[tuple[int, Features]]) -> None:
        """Add the rows that are missing (blocking: call it at start-up only)."""

    async def get(self, user_id: int) -> Features | None:
        """The user's features, or None for an unknown user."""

    async def aclose(self) -> None:
        """Release threads and connections."""


class SQLiteFeatureStore:
    """Feature vectors as JSON in a SQLite file, read in a small pool of worker threads.

    sqlite3 calls block, so they never run on the event loop: a slow disk (or
    a writer holding the lock) would otherwise stall every request the replica
    is serving, not just the one doing the lookup.
    """

    def __init__(self, path: str | Path, max_threads: int = 4) -> None:
        self.path = str(path)
        self._local = threading.local()  # sqlite3 connections stay in their thread
        self._pool = ThreadPoolExecutor(max_threads, thread_name_prefix="feature-store")

    def seed(self, rows: Iterable[tuple[int, Features]]) -> None:
        # INSERT OR IGNORE in one transaction: every replica may run it at once.
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # commits on success
                db.execute(
                    "CREATE TABLE IF NOT EXISTS features (user_id INTEGER PRIMARY KEY, vector TEXT)"
                )
                db.executemany(
                    "INSERT OR IGNORE INTO features VALUES (?, ?)",
                    [(user_id, json.dumps(vector)) for user_id, vector in rows],
                )
        finally:
            db.close()

    async def get(self, user_id: int) -> Features | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._lookup, user_id)

    def _lookup(self, user_id: int) -> Features | None:
        db = getattr(self._local, "db", None)
        if db is None:
            # Read-only: the request path can never modify the store.
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        row = db.execute("SELECT vector FROM features WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else dict(json.loads(row[0]))

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RedisFeatureStore:
    """Feature vectors as JSON strings under ``<key_prefix><user id>`` in Redis.

    Needs the ``redis`` package (``pip install redis``); imported here only.
    """

    def __init__(self, url: str, key_prefix: str = "shoal-example:features:") -> None:
        import redis
        import redis.asyncio

        self.url = url
        self.key_prefix = key_prefix
        self._sync = redis.Redis.from_url(url)  # seeding only: start-up may block
        self._client = redis.asyncio.Redis.from_url(url)  # the request path

    def seed(self, rows: Iterable[tuple[int, Features]]) -> None:
        # SET NX keeps values that are already there; one pipeline, one round trip.
        try:
            with self._sync.pipeline(transaction=False) as pipe:
                for user_id, vector in rows:
                    pipe.set(f"{self.key_prefix}{user_id}", json.dumps(vector), nx=True)
                pipe.execute()
        finally:
            self._sync.close()

    async def get(self, user_id: int) -> Features | None:
        raw = await self._client.get(f"{self.key_prefix}{user_id}")
        return None if raw is None else dict(json.loads(raw))

    async def aclose(self) -> None:
        await self._client.aclose()


def open_store(db_path: str | Path, redis_url: str | None = None) -> FeatureStore:
    """Redis when a URL is given, else the SQLite file at ``db_path``."""
    if redis_url:
        return RedisFeatureStore(redis_url)
    return SQLiteFeatureStore(db_path)
