"""Spend in PostgreSQL, the source of truth behind :class:`~coordinator.budget.BudgetGuard`.

:class:`PostgresSpendSource` reads one entity's spend per query (a loader for the
coordinator) and, on the shipped schema (``coordinator/budget/sql/budget_schema.sql``), records a
request's cost in one transaction, idempotent per request id.

The default queries read with ``FOR SHARE``: a rebuild's read waits for a spend write in
progress on the same row, so it sees either all of that request's cost or none of it
(see :meth:`BudgetGuard.record_spend`'s ledger contract). Queries for a schema of your own
are given per scope; each takes the id as ``$1`` (``team_member``: team as ``$1``, user as
``$2``) and returns one row whose first column is the spend.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from importlib import resources
from types import TracebackType
from typing import Any

import asyncpg

from ..coordinator import Loader
from ..errors import ConfigurationError, MissingRowError, SourceError
from ..sources import PostgresSource
from ..values import check_amount
from .guard import SCOPES, EntityId, EntityLike, Scope, as_entity, encode_entity_id

OnLocked = Callable[[], Awaitable[object]]

_SINGLE = "SELECT spend FROM budget_entity WHERE scope = '{scope}' AND entity_id = $1 FOR SHARE"

#: The shipped schema's queries, one per scope.
DEFAULT_QUERIES: Mapping[Scope, str] = {
    **{scope: _SINGLE.format(scope=scope) for scope in SCOPES if scope != "team_member"},
    "team_member": "SELECT spend FROM team_member WHERE team_id = $1 AND user_id = $2 FOR SHARE",
}

# Ledger row first: a concurrent retry of the same request id waits on it, then applies
# nothing. Spend rows are locked in one global order (sorted), so writers never deadlock.
_LEDGER = """
INSERT INTO spend_ledger (request_id, cost, entities) VALUES ($1, $2, $3)
ON CONFLICT (request_id) DO NOTHING RETURNING request_id
"""
_ADD_ENTITIES = """
INSERT INTO budget_entity (scope, entity_id, spend)
SELECT scope, entity_id, $1 FROM unnest($2::text[], $3::text[]) AS e(scope, entity_id)
ORDER BY scope, entity_id
ON CONFLICT (scope, entity_id) DO UPDATE SET spend = budget_entity.spend + EXCLUDED.spend
"""
_ADD_MEMBERS = """
INSERT INTO team_member (team_id, user_id, spend)
SELECT team_id, user_id, $1 FROM unnest($2::text[], $3::text[]) AS m(team_id, user_id)
ORDER BY team_id, user_id
ON CONFLICT (team_id, user_id) DO UPDATE SET spend = team_member.spend + EXCLUDED.spend
"""
_RESET_ENTITY = "UPDATE budget_entity SET spend = 0 WHERE scope = $1 AND entity_id = $2 RETURNING 1"
_RESET_MEMBER = "UPDATE team_member SET spend = 0 WHERE team_id = $1 AND user_id = $2 RETURNING 1"
_SET_ENTITY = """
INSERT INTO budget_entity (scope, entity_id, max_budget) VALUES ($1, $2, $3)
ON CONFLICT (scope, entity_id) DO UPDATE SET max_budget = EXCLUDED.max_budget
"""
_SET_MEMBER = """
INSERT INTO team_member (team_id, user_id, max_budget) VALUES ($1, $2, $3)
ON CONFLICT (team_id, user_id) DO UPDATE SET max_budget = EXCLUDED.max_budget
"""

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def schema_sql() -> str:
    """The shipped schema (``CREATE TABLE IF NOT EXISTS``: safe to run again)."""
    return resources.files(__package__).joinpath("sql/budget_schema.sql").read_text("utf-8")


def _args(entity_id: EntityId) -> tuple[str, ...]:
    return entity_id if isinstance(entity_id, tuple) else (entity_id,)


class PostgresSpendSource:
    """Spend per entity on an asyncpg pool. ``queries`` (scope -> SQL) replaces the shipped
    schema's queries entirely; a scope without a query cannot be read."""

    def __init__(
        self, pool: Any, queries: Mapping[str, str] | None = None, *, timeout: float = 5.0
    ) -> None:
        chosen = DEFAULT_QUERIES if queries is None else queries
        unknown = sorted(set(chosen) - set(SCOPES))
        if unknown:
            raise ConfigurationError(f"queries for unknown scopes {unknown}; scopes are {SCOPES}")
        self.pool = pool
        self._timeout = timeout
        self._readers = {scope: PostgresSource(pool, sql) for scope, sql in chosen.items()}

    @classmethod
    async def connect(
        cls,
        dsn: str,
        queries: Mapping[str, str] | None = None,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
    ) -> PostgresSpendSource:
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, timeout=timeout
            )
        except _DB_ERRORS as exc:
            raise SourceError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            return cls(pool, queries, timeout=timeout)
        except ConfigurationError:
            await pool.close()
            raise

    async def install_schema(self) -> None:
        """Create the shipped tables if they do not exist. Run it once, not from every pod
        at the same time (concurrent ``CREATE TABLE IF NOT EXISTS`` can collide)."""
        async with self._connection() as conn:
            await conn.execute(schema_sql())

    def loader(self, scope: Scope, entity_id: EntityId) -> Loader:
        """A coordinator loader reading the entity's spend."""

        async def load() -> float:
            return await self.fetch(scope, entity_id)

        return load

    async def fetch(self, scope: Scope, entity_id: EntityId) -> float:
        """The entity's spend; :class:`MissingRowError` if the source has no row for it."""
        item = as_entity((scope, entity_id))
        reader = self._readers.get(item.scope)
        if reader is None:
            raise ConfigurationError(f"no spend query for scope {item.scope!r}")
        try:
            return await reader.fetch(*_args(item.id))
        except MissingRowError as exc:
            raise MissingRowError(
                f"no {item.scope} row for {item.id!r} in the spend source"
            ) from exc

    async def record(
        self,
        request_id: str,
        entities: Iterable[EntityLike],
        cost: float,
        *,
        on_locked: OnLocked | None = None,
    ) -> bool:
        """Add ``cost`` to each entity's spend and write the ledger row, in one transaction
        (shipped schema). False if ``request_id`` was recorded before: nothing applied.

        ``on_locked`` runs inside the transaction, after the spend rows are updated and
        while their locks are held (``BudgetGuard.record_spend`` in ledger mode); if it
        raises, nothing is committed. Rows missing for an entity are created.
        """
        items = {(e.scope, e.id): e for e in map(as_entity, entities)}
        amount = check_amount(cost, request_id)
        refs = [f"{scope}:{encode_entity_id(scope, entity_id)}" for scope, entity_id in items]
        singles = [(scope, i) for scope, i in items if isinstance(i, str)]
        members = [i for _, i in items if isinstance(i, tuple)]
        async with self._connection() as conn, conn.transaction():
            if await conn.fetchval(_LEDGER, request_id, amount, refs) is None:
                return False
            if singles:
                await conn.execute(_ADD_ENTITIES, amount, *map(list, zip(*singles, strict=True)))
            if members:
                await conn.execute(_ADD_MEMBERS, amount, *map(list, zip(*members, strict=True)))
            if on_locked is not None:
                await on_locked()
        return True

    async def reset_spend(
        self, scope: Scope, entity_id: EntityId, *, on_locked: OnLocked | None = None
    ) -> None:
        """Set the entity's spend to 0. Pass ``on_locked=lambda: guard.reset(scope, id)``:
        the counter is then reset while the row is locked, so no spend write in flight can
        land between the two resets."""
        item = as_entity((scope, entity_id))
        if item.scope == "team_member":
            sql, args = _RESET_MEMBER, _args(item.id)
        else:
            sql, args = _RESET_ENTITY, (item.scope, *_args(item.id))
        async with self._connection() as conn, conn.transaction():
            if await conn.fetchval(sql, *args) is None:
                raise MissingRowError(f"no {item.scope} row for {item.id!r} to reset")
            if on_locked is not None:
                await on_locked()

    async def set_budget(self, scope: Scope, entity_id: EntityId, max_budget: float | None) -> None:
        """Create the entity (spend 0) or change its budget (None: no budget)."""
        item = as_entity((scope, entity_id, max_budget))
        if item.scope == "team_member":
            sql, names = _SET_MEMBER, _args(item.id)
        else:
            sql, names = _SET_ENTITY, (item.scope, *_args(item.id))
        async with self._connection() as conn:
            await conn.execute(sql, *names, item.max_budget)

    async def aclose(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> PostgresSpendSource:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; database failures surface as :class:`SourceError`."""
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _DB_ERRORS as exc:
            raise SourceError(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from exc
