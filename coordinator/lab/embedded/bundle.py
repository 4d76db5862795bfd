"""Several throwaway servers started together."""

from __future__ import annotations

import contextlib

from .binaries import find_redis_server
from .postgres_server import PostgresServer
from .redis_server import RedisServer
from .server import Lifecycle, ManagedServer


class EmbeddedServers(Lifecycle):
    """``redis_count`` redis servers and (optionally) one PostgreSQL, started together.

    All processes are launched first and then awaited, so startup costs about as much as
    the slowest server. Exiting the context (or ``close()``, alias ``stop()``) stops them
    all and removes their temp dirs. ``pg_dsn`` (or env ``RESEED_PG_DSN``) uses an existing
    PostgreSQL instead of starting one.
    """

    def __init__(
        self, redis_count: int = 4, postgres: bool = True, pg_dsn: str | None = None
    ) -> None:
        binary = find_redis_server() if redis_count > 0 else None
        self.redis: list[RedisServer] = [RedisServer(binary=binary) for _ in range(redis_count)]
        self.postgres: PostgresServer | None = PostgresServer(pg_dsn) if postgres else None

    def __repr__(self) -> str:
        return f"EmbeddedServers(redis={self.redis!r}, postgres={self.postgres!r})"

    @property
    def redis_urls(self) -> list[str]:
        return [server.url for server in self.redis]

    def start(self) -> None:
        try:
            pending = [server for server in self._servers() if not server.running]
            for server in pending:
                server._begin_start()
            for server in pending:
                server._finish_start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop everything and remove temp dirs; raises the first error after trying all."""
        errors: list[BaseException] = []
        for redis in self.redis:
            with contextlib.suppress(OSError):
                redis._request_stop()
        for server in self._servers():
            try:
                server.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    stop = close

    def _servers(self) -> list[ManagedServer]:
        return [*self.redis, *([self.postgres] if self.postgres is not None else [])]
