"""The source of truth of the chaos table, seen from the parent."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from .common import QUERY, TABLE


class Database:
    """The source of truth: one row per counter key in :data:`TABLE`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def setup(self) -> None:
        self._execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id text PRIMARY KEY, spend double precision NOT NULL)"
        )

    def put(self, key: str, value: float) -> None:
        self._execute(
            f"INSERT INTO {TABLE} (id, spend) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET spend = EXCLUDED.spend",
            key,
            value,
        )

    def cleanup(self, namespace: str) -> None:
        self._execute(f"DELETE FROM {TABLE} WHERE id LIKE $1", f"{namespace}:%")

    def loaders_running(self) -> int:
        """Loader queries (:data:`QUERY`) running in PostgreSQL right now."""
        count = self._execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE state = 'active' AND query = $1 AND pid <> pg_backend_pid()",
            QUERY,
        )
        return int(count)

    def _execute(self, sql: str, *args: object) -> Any:
        async def execute() -> Any:
            conn = await asyncpg.connect(self.dsn, timeout=10.0)
            try:
                return await conn.fetchval(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(execute())
