"""Spend in PostgreSQL, the source of truth behind :class:`~coordinator.budget.BudgetGuard`.

:class:`PostgresSpendSource` reads one entity's spend per query (a loader for the
coordinator) and is the ledger of ``write_mode="ledger"`` (:class:`~coordinator.budget.guard.
LedgerSource`): it records a request's cost, idempotent per request id, with one
``spend_outbox`` row per entity in the same transaction, reads an entity's spend together
with its outbox rows in one snapshot, and hands stale outbox rows to one drainer at a time.

A schema of your own: give ``queries``, one per scope; each takes the id as ``$1``
(``team_member``: team as ``$1``, user as ``$2``) and returns one row whose first column is
the spend. They run in a REPEATABLE READ transaction together with the outbox read, so they
must not lock (no ``FOR SHARE``/``FOR UPDATE``, which would fail on a row written since the
snapshot). Give ``write_spend``, an async ``(connection, entities, cost)`` that adds the cost
to your rows: ``record`` runs it inside its transaction, after the ``spend_ledger`` row has
deduplicated the request id and before the outbox rows. Create ``spend_ledger`` and
``spend_outbox`` as the shipped schema (``coordinator/budget/sql/budget_schema.sql``) does;
a reset of an entity's spend must delete its ``spend_outbox`` rows in the same transaction
(:meth:`PostgresSpendSource.reset_spend` does, on the shipped schema).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import TracebackType
from typing import Any

from ..coordinator import Loader
from ..errors import ConfigurationError, MissingRowError, SourceError
from ..sources import DB_ERRORS, PostgresSource, create_pool
from ..values import check_amount
from .guard import (
    SCOPES,
    Entity,
    EntityId,
    EntityLike,
    OutboxRow,
    Scope,
    as_entity,
    entity_ref,
)

#: Called with the request ids of the outbox rows a reset wiped out.
OnLocked = Callable[[list[str]], Awaitable[object]]
#: Adds ``cost`` to each entity's spend on ``connection``, inside ``record``'s transaction.
WriteSpend = Callable[[Any, Sequence[Entity], float], Awaitable[object]]

_SINGLE = "SELECT spend FROM budget_entity WHERE scope = '{scope}' AND entity_id = $1"

#: The shipped schema's queries, one per scope.
DEFAULT_QUERIES: Mapping[Scope, str] = {
    **{scope: _SINGLE.format(scope=scope) for scope in SCOPES if scope != "team_member"},
    "team_member": "SELECT spend FROM team_member WHERE team_id = $1 AND user_id = $2",
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
_OUTBOX = """
INSERT INTO spend_outbox (entity, request_id, cost) SELECT unnest($2::text[]), $1, $3
"""
_AGE = "extract(epoch FROM clock_timestamp() - created_at)"
_OUTBOX_COLUMNS = f"entity, request_id, cost, {_AGE}"
_UNAPPLIED = "SELECT coalesce(array_agg(request_id), '{}') FROM spend_outbox WHERE entity = $1"
_PENDING = f"SELECT {_OUTBOX_COLUMNS} FROM spend_outbox WHERE request_id = $1"
# SKIP LOCKED: each stale row goes to one drainer at a time; the row locks are its lease.
_STALE = f"""
SELECT {_OUTBOX_COLUMNS} FROM spend_outbox
WHERE created_at < clock_timestamp() - make_interval(secs => $1)
ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED
"""
_SETTLE = """
DELETE FROM spend_outbox o USING unnest($1::text[], $2::text[]) AS d(entity, request_id)
WHERE o.entity = d.entity AND o.request_id = d.request_id
"""
_FORGET = "DELETE FROM spend_outbox WHERE entity = $1 RETURNING request_id"
_LAG = f"SELECT count(*), max({_AGE}) FROM spend_outbox"
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


def schema_sql() -> str:
    """The shipped schema (``CREATE TABLE IF NOT EXISTS``: safe to run again)."""
    return resources.files(__package__).joinpath("sql/budget_schema.sql").read_text("utf-8")


def _args(entity_id: EntityId) -> tuple[str, ...]:
    return entity_id if isinstance(entity_id, tuple) else (entity_id,)


def _row(record: Any) -> OutboxRow:
    entity, request_id, cost, age = record
    return OutboxRow(entity, request_id, float(cost), float(age))


@dataclass(frozen=True)
class OutboxLag:
    """Committed costs not yet known to be counted: ``count`` outbox rows, the oldest
    ``oldest_age`` seconds old (None: the outbox is empty)."""

    count: int
    oldest_age: float | None


async def outbox_lag(db: Any) -> OutboxLag | None:
    """The outbox lag on ``db`` (a connection or pool); None if there is no outbox table."""
    if await db.fetchval("SELECT to_regclass('spend_outbox')") is None:
        return None
    count, oldest = await db.fetchrow(_LAG)
    return OutboxLag(int(count), None if oldest is None else float(oldest))


async def unapplied(conn: Any, scope: Scope, entity_id: EntityId) -> list[str]:
    """The request ids in the entity's outbox rows (read it in the spend read's snapshot)."""
    return list(await conn.fetchval(_UNAPPLIED, entity_ref(scope, entity_id)))


async def _write_shipped(conn: Any, entities: Sequence[Entity], cost: float) -> None:
    singles = [(e.scope, e.id) for e in entities if isinstance(e.id, str)]
    members = [e.id for e in entities if isinstance(e.id, tuple)]
    if singles:
        await conn.execute(_ADD_ENTITIES, cost, *map(list, zip(*singles, strict=True)))
    if members:
        await conn.execute(_ADD_MEMBERS, cost, *map(list, zip(*members, strict=True)))


class _Claim:
    """Stale outbox rows locked by one drainer's transaction."""

    def __init__(self, conn: Any, rows: list[OutboxRow]) -> None:
        self._conn = conn
        self.rows = rows

    async def settle(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            await self._conn.execute(
                _SETTLE, [row.entity for row in rows], [row.request_id for row in rows]
            )


class PostgresSpendSource:
    """Spend per entity on an asyncpg pool. ``queries`` (scope -> SQL) replaces the shipped
    schema's queries entirely; a scope without a query cannot be read. ``write_spend``
    replaces the shipped schema's spend update in :meth:`record`."""

    def __init__(
        self,
        pool: Any,
        queries: Mapping[str, str] | None = None,
        *,
        write_spend: WriteSpend | None = None,
        timeout: float = 5.0,
    ) -> None:
        chosen = DEFAULT_QUERIES if queries is None else queries
        unknown = sorted(set(chosen) - set(SCOPES))
        if unknown:
            raise ConfigurationError(f"queries for unknown scopes {unknown}; scopes are {SCOPES}")
        self.pool = pool
        self._timeout = timeout
        self._readers = {scope: PostgresSource(pool, sql) for scope, sql in chosen.items()}
        self._write_spend: WriteSpend = write_spend or _write_shipped

    @classmethod
    async def connect(
        cls,
        dsn: str,
        queries: Mapping[str, str] | None = None,
        *,
        write_spend: WriteSpend | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
    ) -> PostgresSpendSource:
        pool = await create_pool(dsn, min_size, max_size, timeout)
        try:
            return cls(pool, queries, write_spend=write_spend, timeout=timeout)
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
        return await self._read(self._reader(item.scope), item)

    async def snapshot(self, scope: Scope, entity_id: EntityId) -> tuple[float, list[str]]:
        """The entity's spend and the request ids of its outbox rows, read in one
        REPEATABLE READ snapshot: the seed of a counter from it marks those counted."""
        item = as_entity((scope, entity_id))
        reader = self._reader(item.scope)
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            spend = await self._read(PostgresSource(conn, reader.query), item)
            return spend, await unapplied(conn, item.scope, item.id)

    async def record(self, request_id: str, entities: Iterable[EntityLike], cost: float) -> bool:
        """Add ``cost`` to each entity's spend, write the ledger row and one outbox row per
        entity, in one transaction. False if ``request_id`` was recorded before: nothing
        written. Rows missing for an entity are created (shipped schema)."""
        items = list({(e.scope, e.id): e for e in map(as_entity, entities)}.values())
        amount = check_amount(cost, request_id)
        refs = [entity_ref(item.scope, item.id) for item in items]
        async with self._connection() as conn, conn.transaction():
            if await conn.fetchval(_LEDGER, request_id, amount, refs) is None:
                return False
            await self._write_spend(conn, items, amount)
            await conn.execute(_OUTBOX, request_id, refs, amount)
        return True

    async def pending(self, request_id: str) -> list[OutboxRow]:
        """The request's outbox rows: committed costs not yet known to be counted."""
        async with self._connection() as conn:
            return [_row(record) for record in await conn.fetch(_PENDING, request_id)]

    async def settle(self, request_id: str, entities: Sequence[str]) -> None:
        """Delete the request's outbox rows of ``entities`` (refs): they are counted."""
        async with self._connection() as conn:
            await conn.execute(_SETTLE, list(entities), [request_id] * len(entities))

    @contextlib.asynccontextmanager
    async def claim_stale(self, older_than: float, limit: int) -> AsyncIterator[_Claim]:
        """Up to ``limit`` outbox rows older than ``older_than`` seconds, oldest first,
        locked (other claims skip them) until the block ends; rows settled in the block are
        deleted when it ends without an error."""
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(_STALE, float(older_than), limit)
            yield _Claim(conn, [_row(record) for record in rows])

    async def outbox_lag(self) -> OutboxLag | None:
        """Unapplied outbox rows: how many, and the age of the oldest."""
        async with self._connection() as conn:
            return await outbox_lag(conn)

    async def reset_spend(
        self, scope: Scope, entity_id: EntityId, *, on_locked: OnLocked | None = None
    ) -> list[str]:
        """Set the entity's spend to 0 and drop its outbox rows (costs the reset wipes out);
        their request ids. ``guard.reset_spend(scope, id)`` is the one call that also resets
        the counter: it passes ``on_locked=`` a callback that receives those ids and resets
        the counter marking them counted (so an apply still in flight for one of them adds
        nothing to the rebuilt counter), called while the row is locked (no spend write in
        flight can land between the two resets) and once more after the commit: a rebuild
        that read the spend between the first counter reset and the commit (its snapshot
        does not wait for the row lock) seeded the old spend, and the second reset deletes
        that seed or fences it out."""
        item = as_entity((scope, entity_id))
        if item.scope == "team_member":
            sql, args = _RESET_MEMBER, _args(item.id)
        else:
            sql, args = _RESET_ENTITY, (item.scope, *_args(item.id))
        async with self._connection() as conn, conn.transaction():
            if await conn.fetchval(sql, *args) is None:
                raise MissingRowError(f"no {item.scope} row for {item.id!r} to reset")
            rows = await conn.fetch(_FORGET, entity_ref(item.scope, item.id))
            wiped = [row[0] for row in rows]
            if on_locked is not None:
                await on_locked(wiped)
        if on_locked is not None:
            await on_locked(wiped)
        return wiped

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

    def _reader(self, scope: Scope) -> PostgresSource:
        reader = self._readers.get(scope)
        if reader is None:
            raise ConfigurationError(f"no spend query for scope {scope!r}")
        return reader

    @staticmethod
    async def _read(reader: PostgresSource, item: Entity) -> float:
        try:
            return await reader.fetch(*_args(item.id))
        except MissingRowError as exc:
            raise MissingRowError(
                f"no {item.scope} row for {item.id!r} in the spend source"
            ) from exc

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; database failures surface as :class:`SourceError`."""
        try:
            async with self.pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except DB_ERRORS as exc:
            raise SourceError(f"PostgreSQL failed: {type(exc).__name__}: {exc}") from exc
