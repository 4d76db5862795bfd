"""Loaders that read a counter's authoritative value from PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg

from .coordinator import Loader
from .errors import InvalidValueError, MissingRowError, SourceError

#: What asyncpg can raise for a failed database call: its two error bases, its internal
#: client errors (a protocol error, a statement cache outdated by a schema change), raw
#: socket errors and asyncio timeouts (not an ``OSError`` before Python 3.11).
DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)



async def create_pool(dsn: str, min_size: int, max_size: int, timeout: float) -> Any:
    """An asyncpg pool on ``dsn``; a failure to connect is a :class:`SourceError`."""
    try:
        return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, timeout=timeout)
    except DB_ERRORS as exc:
        raise SourceError(f"cannot connect to PostgreSQL: {exc}") from exc

class PostgresSource:
    """One parameterised query on an asyncpg pool; ``loader(*args)`` makes a coordinator
    loader that runs it. The query must return one row whose first column is the value."""

    def __init__(self, pool: Any, query: str) -> None:
        self.pool = pool
        self.query = query

    @classmethod
    async def connect(
        cls, dsn: str, query: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 5.0
    ) -> PostgresSource:
        return cls(await create_pool(dsn, min_size, max_size, timeout), query)

    def loader(self, *args: object) -> Loader:
        async def load() -> float:
            return await self.fetch(*args)

        return load

    async def fetch(self, *args: object) -> float:
        try:
            row = await self.pool.fetchrow(self.query, *args)
        except DB_ERRORS as exc:
            raise SourceError(f"PostgreSQL query failed for {args!r}: {exc}") from exc
        if row is None:
            raise MissingRowError(f"no row in the source for {args!r}")
        value = row[0]
        if isinstance(value, Decimal):
            return float(value)
        if value is None:
            raise InvalidValueError(f"the source holds NULL for {args!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise InvalidValueError(f"the source holds {type(value).__name__} {value!r} for {args!r}")

    async def aclose(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> PostgresSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
