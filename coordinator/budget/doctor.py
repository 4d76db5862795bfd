"""The doctor: find the spend counters that lie, and rebuild them (``python -m coordinator doctor``
is its command line, in :mod:`coordinator.lab.doctor`).

The doctor walks the counters ``<namespace>:spend:<scope>:<id>`` of a live deployment with
SCAN (batched, never KEYS), reads each batch in one pipelined round trip, looks the batch's
ids up in PostgreSQL with one query per scope, and classifies every counter:

==============  ================================================================  =======
status          meaning                                                           --fix
==============  ================================================================  =======
``inflated``    an integer multiple (>= 2x) of a non-zero DB value: the signature  yes
                of rebuilds that *added* the DB value (INCRBYFLOAT) instead of
                setting it
``low``         below the DB value: spend the counter lost (budgets bypassed)      yes
``no_ttl``      right value but no expiry: it never gets rebuilt from the DB       yes
``garbage``     not a number, or not a Redis string                                yes
``missing_row`` no DB row for the id (or a NULL value)                             no
``healthy``     none of the above (above the DB value, but not a multiple, is a
                source that lags the counter, and healthy)
==============  ================================================================  =======

The checks run in the order garbage, missing_row, inflated, low, no_ttl; a counter gets the
first that applies. ``--fix`` rebuilds a flagged counter the way a budget reset does: the
fenced ``reset`` (which also fences out any rebuild in flight), then ``get`` with a loader
that reads the DB *then*, never the value read during the scan (spend may have moved since),
together with the entity's ``spend_outbox`` rows in the same snapshot, so that the seed marks
them counted as :class:`~coordinator.budget.BudgetGuard`'s own rebuilds do.

The report also gives the outbox lag (ledger mode): how many committed costs are not yet
known to be counted on their counters, and the age of the oldest. Rows older than the
guards' ``drain_after`` plus a drain interval mean that no drainer runs.

Keys are those of :mod:`coordinator.budget` (parsed by its ``parse_spend_key``: percent-encoded
ids, a ``team_member`` id is ``<team>:<user>``); any other key under the prefix is skipped,
and so are the coordinator's own keys (with ``\\x1f``).

Queries: one per scope and batch. ``$1`` is a ``text[]`` of ids (``team_member``: ``$1`` the
team ids, ``$2`` the user ids); the rows are the id column(s), then the value. The default
queries read the shipped schema (``coordinator/budget/sql/budget_schema.sql``); they must not lock
rows (``--fix`` runs them in a REPEATABLE READ snapshot). With ``--query`` only the scopes given
are checked; the counters of the others are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Literal, get_args

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from ..coordinator import Loader, ReseedCoordinator
from ..errors import (
    ConfigurationError,
    CorruptCounterError,
    InvalidKeyError,
    MissingRowError,
    ReseedError,
    SourceError,
)
from ..keys import SEPARATOR
from ..sources import DB_ERRORS
from ..values import Snapshot, parse_stored
from .guard import SCOPES, EntityId, Scope, parse_spend_key, spend_id
from .spend_source import OutboxLag, outbox_lag, unapplied

Status = Literal["inflated", "low", "no_ttl", "garbage", "missing_row", "healthy"]
STATUSES: tuple[Status, ...] = get_args(Status)
FIXABLE: frozenset[Status] = frozenset({"inflated", "low", "no_ttl", "garbage"})

#: Relative slack of the comparisons: live traffic moves the DB and the counter a little
#: apart between the scan's two reads.
DEFAULT_TOLERANCE = 0.01
# Float noise of many INCRBYFLOATs around a DB value of zero.
_ABSOLUTE_SLACK = 1e-9
DEFAULT_BATCH = 1000
FIX_CONCURRENCY = 16


_ENTITIES = (
    "SELECT entity_id, spend FROM budget_entity "
    "WHERE scope = '{scope}' AND entity_id = ANY($1::text[])"
)

#: The shipped schema's batch queries, one per scope.
BATCH_QUERIES: Mapping[Scope, str] = {
    **{scope: _ENTITIES.format(scope=scope) for scope in SCOPES if scope != "team_member"},
    "team_member": (
        "SELECT m.team_id, m.user_id, m.spend FROM team_member m "
        "JOIN unnest($1::text[], $2::text[]) AS k(team_id, user_id) "
        "ON m.team_id = k.team_id AND m.user_id = k.user_id"
    ),
}


def parse_key(namespace: str, key: str) -> tuple[Scope, EntityId] | None:
    """``(scope, id)`` of a spend counter key of ``namespace``; None if it is not one."""
    try:
        found, scope, ident = parse_spend_key(key)
    except InvalidKeyError:
        return None
    return (scope, ident) if found == namespace else None


def _id_parts(ident: EntityId) -> tuple[str, ...]:
    return ident if isinstance(ident, tuple) else (ident,)


def classify(
    counter: float | None, db: float | None, ttl: float | None, tolerance: float
) -> Status:
    """The status of a counter (None: garbage) against its DB value (None: no row);
    ``ttl`` is None when the counter never expires."""
    if counter is None:
        return "garbage"
    if db is None:
        return "missing_row"
    slack = tolerance * abs(db) + _ABSOLUTE_SLACK
    ratio = counter / db if db > 0 else 0.0
    if math.isfinite(ratio) and round(ratio) >= 2 and abs(counter - round(ratio) * db) <= slack:
        return "inflated"
    if counter < db - slack:
        return "low"
    if ttl is None:
        return "no_ttl"
    return "healthy"


@dataclass
class Finding:
    key: str
    scope: Scope
    id: EntityId
    status: Status
    counter: float | None  # None: garbage, see raw
    raw: str | None  # what a garbage counter holds (or its Redis type)
    db: float | None
    ttl: float | None  # seconds left; None: no expiry
    fixed: float | None = None  # the counter after --fix
    fix_error: str | None = None

    @property
    def fixable(self) -> bool:
        return self.status in FIXABLE and self.db is not None

    @property
    def ratio(self) -> float | None:
        if self.counter is None or not self.db:
            return None
        ratio = self.counter / self.db
        return round(ratio, 6) if math.isfinite(ratio) else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Report:
    namespace: str
    findings: list[Finding] = field(default_factory=list)  # healthy ones only if asked
    counts: Counter[str] = field(default_factory=Counter)  # by status, and "skipped"
    outbox: OutboxLag | None = None  # None: no outbox table (not a ledger deployment)

    @property
    def scanned(self) -> int:
        return sum(self.counts[status] for status in STATUSES)

    @property
    def flagged(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status != "healthy"]

    def summary(self) -> dict[str, int]:
        attempted = [finding for finding in self.findings if finding.fixable]
        fixed = sum(finding.fixed is not None for finding in attempted)
        return {
            "scanned": self.scanned,
            **{status: self.counts[status] for status in STATUSES},
            "skipped": self.counts["skipped"],
            "fixed": fixed,
            "fix_failed": sum(finding.fix_error is not None for finding in attempted),
        }

    def summary_line(self) -> str:
        counts = self.summary()
        parts = ", ".join(f"{counts[status]} {status}" for status in STATUSES)
        line = f"{counts['scanned']} counters under {self.namespace}:spend: {parts}"
        if counts["skipped"]:
            line += (
                f" ({counts['skipped']} skipped: not <scope>:<id>, no query for the scope, "
                "or expired during the scan)"
            )
        if counts["fixed"] or counts["fix_failed"]:
            line += f"; fixed {counts['fixed']}, {counts['fix_failed']} failed"
        if self.outbox is not None:
            oldest = self.outbox.oldest_age
            line += f"; outbox: {self.outbox.count} unapplied" + (
                "" if oldest is None else f", oldest {oldest:.1f}s"
            )
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "summary": self.summary(),
            "outbox": None if self.outbox is None else asdict(self.outbox),
            "counters": [finding.as_dict() for finding in self.findings],
        }


Progress = Callable[[int, int], None]  # (counters scanned, flagged so far)


class Doctor:
    """Scans the counters of ``namespace`` on ``store`` (one server, or every master of a
    Redis Cluster) against ``db`` (an asyncpg connection or pool; the doctor issues one query
    at a time). ``idempotency_window`` is the guards': how long the seeds of ``fix`` mark
    outbox rows counted."""

    def __init__(
        self,
        store: Redis | RedisCluster,
        db: Any,
        *,
        namespace: str = "litellm",
        queries: Mapping[str, str] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        batch: int = DEFAULT_BATCH,
        idempotency_window: float = 600.0,
    ) -> None:
        unknown = sorted(set(queries or ()) - set(SCOPES))
        if unknown:
            raise ConfigurationError(f"queries for unknown scopes {unknown}; scopes are {SCOPES}")
        self.store = store
        self.db = db
        self.namespace = namespace
        self.queries = dict(BATCH_QUERIES if queries is None else queries)
        self.tolerance = tolerance
        self.batch = batch
        self.idempotency_window = idempotency_window
        self._db_lock = asyncio.Lock()

    async def scan(
        self, *, include_healthy: bool = False, progress: Progress | None = None
    ) -> Report:
        report = Report(self.namespace)
        seen: set[bytes] = set()
        async for keys in self._batches():
            # SCAN may return a key twice (the table can be rehashed during the scan).
            fresh = [key for key in dict.fromkeys(keys) if key not in seen]
            seen.update(fresh)
            for finding in await self._examine(fresh, report.counts):
                report.counts[finding.status] += 1
                if include_healthy or finding.status != "healthy":
                    report.findings.append(finding)
            if progress is not None:
                progress(report.scanned, report.scanned - report.counts["healthy"])
        report.findings.sort(key=lambda f: (STATUSES.index(f.status), f.key))
        report.outbox = await self.outbox_lag()
        return report

    async def outbox_lag(self) -> OutboxLag | None:
        """Outbox rows not yet applied, and the oldest one's age (None: no outbox)."""
        try:
            async with self._db_lock:
                return await outbox_lag(self.db)
        except DB_ERRORS as exc:
            raise SourceError(f"the outbox query failed: {type(exc).__name__}: {exc}") from exc

    async def fix(
        self,
        findings: Iterable[Finding],
        coordinator: ReseedCoordinator,
        *,
        concurrency: int = FIX_CONCURRENCY,
    ) -> None:
        """Rebuild every fixable finding (fenced reset, then get from the DB); each one
        gets ``fixed`` (the stored value) or ``fix_error``."""
        slots = asyncio.Semaphore(concurrency)

        async def rebuild(finding: Finding) -> None:
            async with slots:
                try:
                    await coordinator.reset(finding.key)
                    finding.fixed = await coordinator.get(
                        finding.key, self._loader(finding.scope, finding.id)
                    )
                except ReseedError as exc:
                    finding.fix_error = str(exc)

        await asyncio.gather(*(rebuild(f) for f in findings if f.fixable))

    async def lookup(self, scope: Scope, ids: Sequence[EntityId]) -> dict[EntityId, float]:
        """The DB values of ``ids`` in ``scope`` (ids without a row, or NULL, are absent).

        A failed query raises :class:`~coordinator.errors.SourceError` naming the scope."""
        async with self._db_lock:
            return await self._lookup_on(self.db, scope, ids)

    async def _lookup_on(
        self, db: Any, scope: Scope, ids: Sequence[EntityId]
    ) -> dict[EntityId, float]:
        sql = self.queries.get(scope)
        if sql is None or not ids:
            return {}
        columns = [list(column) for column in zip(*map(_id_parts, ids), strict=True)]
        width = len(columns)
        try:
            rows = await db.fetch(sql, *columns)
        except DB_ERRORS as exc:
            raise SourceError(
                f"the query for scope {scope!r} failed: {type(exc).__name__}: {exc}\n"
                f"  query: {sql}\n  give the right one with --query '{scope}=SELECT id, "
                "value FROM ... WHERE id = ANY($1)'"
            ) from exc
        values: dict[EntityId, float] = {}
        for row in rows:
            parts = [str(part) for part in row[:width]]
            ident: EntityId = (parts[0], parts[1]) if width == 2 else parts[0]
            value = row[width]
            if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
                values[ident] = float(value)
        return values

    def _loader(self, scope: Scope, ident: EntityId) -> Loader:
        async def load() -> Snapshot:
            async with self._db_lock, _snapshot_of(self.db) as conn:
                values = await self._lookup_on(conn, scope, [ident])
                has_outbox = await conn.fetchval("SELECT to_regclass('spend_outbox')")
                pending = await unapplied(conn, scope, ident) if has_outbox else []
            if ident not in values:
                raise MissingRowError(f"no {scope} row for {ident!r} any more")
            return Snapshot(values[ident], map(spend_id, pending), self.idempotency_window)

        return load

    async def _batches(self) -> AsyncIterator[list[bytes]]:
        pattern = _glob_escape(f"{self.namespace}:spend:") + "*"
        pending: list[bytes] = []
        # On a cluster, redis-py scans every master in turn, each with its own cursor.
        async for key in self.store.scan_iter(match=pattern, count=self.batch):
            raw = key if isinstance(key, bytes) else key.encode()
            if SEPARATOR.encode() not in raw:
                pending.append(raw)
            if len(pending) == self.batch:
                yield pending
                pending = []
        if pending:
            yield pending

    async def _examine(self, keys: list[bytes], counts: Counter[str]) -> list[Finding]:
        """Classify one batch: one pipelined round trip, then one DB query per scope."""
        pipe = self.store.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = await pipe.execute(raise_on_error=False)
        found: list[Finding] = []
        for index, key in enumerate(keys):
            raw, pttl = replies[2 * index], replies[2 * index + 1]
            try:
                text = key.decode()
            except UnicodeDecodeError:
                text = ""  # not a key the coordinator could have written
            parsed = parse_key(self.namespace, text)
            if parsed is None or parsed[0] not in self.queries or raw is None or pttl == -2:
                counts["skipped"] += 1  # not ours to check, or it expired since the SCAN
                continue
            value, shown = await self._value(key, text, raw)
            ttl = None if pttl == -1 else pttl / 1000
            # Classified below, once the batch's DB values are in.
            found.append(Finding(text, *parsed, "healthy", value, shown, None, ttl))
        by_scope: dict[Scope, list[EntityId]] = {}
        for finding in found:
            by_scope.setdefault(finding.scope, []).append(finding.id)
        db = {scope: await self.lookup(scope, ids) for scope, ids in by_scope.items()}
        for finding in found:
            finding.db = db[finding.scope].get(finding.id)
            finding.status = classify(finding.counter, finding.db, finding.ttl, self.tolerance)
        return found

    async def _value(self, key: bytes, text: str, raw: Any) -> tuple[float | None, str | None]:
        """The counter's number, or None and what it holds instead."""
        if isinstance(raw, ResponseError):
            if "WRONGTYPE" not in str(raw):
                raise raw
            kind = await self.store.type(key)
            return None, f"<{kind.decode() if isinstance(kind, bytes) else kind}>"
        try:
            return parse_stored(raw, text), None
        except CorruptCounterError:
            held = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            return None, held[:60]


@contextlib.asynccontextmanager
async def _snapshot_of(db: Any) -> AsyncIterator[Any]:
    """A connection of ``db`` (a pool or a connection) in a read-only REPEATABLE READ
    transaction: every read in it sees one snapshot."""
    async with contextlib.AsyncExitStack() as stack:
        conn = await stack.enter_async_context(db.acquire()) if hasattr(db, "acquire") else db
        await stack.enter_async_context(
            conn.transaction(isolation="repeatable_read", readonly=True)
        )
        yield conn


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
