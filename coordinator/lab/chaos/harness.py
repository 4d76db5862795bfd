"""Servers, the database and the store, seen from the parent."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis import Redis

from ..embedded import EmbeddedServers, PostgresServer, RedisServer
from ..race import Servers, started_servers
from .common import QUERY, TABLE, Need


@dataclass
class ChaosEnv:
    """The servers a table runs on, and handles on those it may kill, pause or restart
    (the embedded ones). ``namespace`` prefixes every key and row the run creates."""

    servers: Servers
    store: RedisServer | None = None
    masters: tuple[RedisServer, ...] = ()
    postgres: PostgresServer | None = None
    namespace: str = field(default_factory=lambda: f"chaos:{uuid.uuid4().hex[:10]}")

    @classmethod
    def embedded(cls, running: EmbeddedServers) -> ChaosEnv:
        """redis[0] the store, redis[1:4] the lock masters, and the bundle's PostgreSQL."""
        assert running.postgres is not None, "the chaos table needs PostgreSQL"
        return cls(
            Servers(
                running.redis[0].url,
                tuple(server.url for server in running.redis[1:4]),
                running.postgres.dsn,
            ),
            running.redis[0],
            tuple(running.redis[1:4]),
            running.postgres,
        )

    def controls(self, need: Need) -> bool:
        if need == "store":
            return self.store is not None
        if need == "masters":
            return len(self.masters) >= 3
        return self.postgres is not None and not self.postgres.external

    def restore(self) -> None:
        """Bring back whatever a scenario killed, paused or stopped."""
        for server in [*([self.store] if self.store else []), *self.masters]:
            if server.running:
                server.resume()
            else:
                server.start()
        if self.postgres is not None and not self.postgres.external:
            self.postgres.start()

    def client(self, url: str | None = None) -> Redis:
        return Redis.from_url(url or self.servers.redis_url, socket_timeout=5.0)

    def counter(self, key: str) -> float | None:
        with self.client() as client:
            raw = client.get(key)
        return None if raw is None else float(raw)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[list[float | None]]:
        """Every value the counter holds while the block runs, polled every 10 ms."""
        seen: list[float | None] = []
        done = threading.Event()

        def poll() -> None:
            with self.client() as client:
                while not done.is_set():
                    raw = client.get(key)
                    seen.append(None if raw is None else float(raw))
                    done.wait(0.01)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            done.set()
            thread.join(10.0)

    def cleanup(self) -> None:
        """Remove every counter and fence hash of this run from the store."""
        with self.client() as client:
            doomed = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
            if doomed:
                client.delete(*doomed)


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


@contextlib.contextmanager
def chaos_env(
    redis_url: str | None = None, lock_urls: Sequence[str] = (), pg_dsn: str | None = None
) -> Iterator[ChaosEnv]:
    """The servers given, plus embedded ones for whatever is missing (kept as handles, so
    that the scenarios can kill them), stopped on exit."""
    with started_servers(redis_url, lock_urls, pg_dsn) as deployment:
        yield ChaosEnv(
            deployment.servers, deployment.store, deployment.masters, deployment.postgres
        )
