"""The random-chaos pod (:mod:`coordinator.lab.chaos.randomized`): a ledger-mode budget
workload on a few entities, run in a spawned pod (:mod:`coordinator.lab.pods`) until the
parent says stop, logging every call with its outcome and sampling every counter against
its DB spend.

Each caller repeats one request: ``guard.check`` on a key, a team, a user and the org, then
``guard.record`` of a cost in quarters (sums stay exact in binary floating point) under a
fresh request id, or under one used before (a retry: this pod's own, or one that every pod
may send at once), and now and then a reset of a key's or a user's spend (the DB row and
the counter, as the README shows). The sampler reads every DB spend, GETs every counter,
and reads every DB spend again: committed spend only grows between resets, so a counter
above the spend read *after* it is a counter that lies, and one below the spend read
*before* it lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.asyncio import Redis

from ... import store
from ...budget import BudgetGuard, PostgresSpendSource
from ...budget.guard import EntityId, Scope, entity_ref
from ...coordinator import ReseedCoordinator
from ...errors import ReseedError, SourceError
from ..cliargs import describe
from ..pods import Link
from .common import ChaosError

#: A budget no spend of a run reaches: every check reads every counter.
BUDGET = 1e12
FLUSH = 0.25  # seconds between the pod's batches to the parent
SAMPLE = 0.2  # seconds between two samples
RETRY = 0.2  # of the records, the share that reuse a request id
SHARED = 0.05  # of the records, the share that use an id any pod may send too
SHARED_IDS = 40
RESETS = 0.02  # of the requests, the share followed by a reset (by default)

#: The lab-only faults the checker must catch: ``double-apply`` adds a retried request's
#: cost to its counters again, as a record that ignored its markers would; ``broken-fence``
#: seeds without comparing the fencing token, so a rebuild whose snapshot predates a reset
#: or a spend writes it all the same.
SABOTAGES = ("double-apply", "broken-fence")
#: With ``broken-fence``: the share of requests followed by a reset, and how long a pod
#: holds a snapshot before seeding it. A stale seed needs a reset or a spend to land while
#: a rebuild holds its read; these make that happen in every short run.
BROKEN_FENCE_RESETS = 0.25
BROKEN_FENCE_STALL = 0.3

# The comparison ``broken-fence`` removes from the store's seed script.
_FENCE_CHECK = """if redis.call('HGET', KEYS[2], 't') ~= ARGV[2] then
  return {'fenced', false, redis.call('HGET', KEYS[2], 'g')}
end
"""


@dataclass(frozen=True)
class Plan:
    """What a pod needs: the servers (``store_url`` is the workload's, maybe through the
    link proxy; ``sample_url`` is direct), the entities as ``(scope, id)`` (those at
    ``resettable`` get reset), and the knobs."""

    dsn: str
    store_url: str
    sample_url: str
    lock_urls: tuple[str, ...]
    namespace: str
    tag: str
    entities: tuple[tuple[str, str], ...]
    resettable: tuple[int, ...]
    callers: int = 3
    wait: float = 3.0
    bound: float = 15.0
    pace: float = 0.02
    drain_after: float = 1.0
    drain_interval: float = 0.5
    resets: float = RESETS
    sabotage: str | None = None

    @property
    def refs(self) -> list[str]:
        return [entity_ref(scope, entity_id) for scope, entity_id in self.entities]


@dataclass(frozen=True)
class Call:
    """One call and its outcome. ``value``: what it returned (record: ``new`` or
    ``duplicate``, and the counters left to the drain); ``error``: the exception's class
    name (``Hang`` past the bound); ``typed``: it is a ``ReseedError``."""

    pod: str
    op: str
    request_id: str | None
    entities: tuple[str, ...]
    cost: float | None
    start: float
    end: float
    value: str | None = None
    error: str | None = None
    typed: bool = False
    message: str | None = None  # what an untyped error said


@dataclass(frozen=True)
class ResetBegun:
    """Sent at once when a reset starts: if the pod dies in it, the parent still knows
    the entity's spend may have dropped from then on."""

    pod: str
    entity: str
    start: float


@dataclass(frozen=True)
class Sample:
    """Every DB spend read (``before``), then every counter GET (None: absent), then every
    DB spend read again (``after``), between ``start`` and ``end``. Committed spend only
    grows between resets: a counter above ``after`` lies; one below ``before`` lags."""

    pod: str
    start: float
    end: float
    before: tuple[float, ...]
    counters: tuple[float | None, ...]
    after: tuple[float, ...]


@dataclass(frozen=True)
class Batch:
    """A pod's news since its last batch, with its cumulative stats; ``final`` is its last."""

    pod: str
    calls: tuple[Call, ...]
    samples: tuple[Sample, ...]
    stats: dict[str, int]
    final: bool = False


@dataclass
class _Outbox:
    calls: list[Call] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


async def random_pod(link: Link, plan: Plan) -> None:
    """A random-chaos pod (spawned): the workload until the parent says stop."""
    broken = plan.sabotage == "broken-fence"
    if broken:
        _break_fence()
    source = await _connect(plan.dsn, _StaleSnapshots if broken else PostgresSpendSource)
    coordinator, guard = ledger_guard(plan, plan.store_url, source, plan.drain_interval)
    pod = _Pod(link, plan, guard, coordinator, source)
    try:
        async with guard:
            link.ready()
            await pod.run()
    finally:
        await coordinator.aclose()
        await source.aclose()


def ledger_guard(
    plan: Plan, store_url: str, source: PostgresSpendSource, drain_interval: float | None
) -> tuple[ReseedCoordinator, BudgetGuard]:
    """A coordinator on ``store_url`` and the plan's ledger-mode guard on it."""
    coordinator = ReseedCoordinator.from_urls(
        store_url, lock_urls=list(plan.lock_urls), wait=plan.wait
    )
    guard = BudgetGuard(
        coordinator,
        source,
        write_mode="ledger",
        namespace=plan.namespace,
        drain_after=plan.drain_after,
        drain_interval=drain_interval,
    )
    return coordinator, guard


def _break_fence() -> None:
    """Sabotage ``broken-fence``, in this (spawned) pod's process only: every counter store
    built from now on registers seed scripts without the token comparison."""
    broken = store._SEED.replace(_FENCE_CHECK, "")
    if broken == store._SEED:
        raise ChaosError("broken-fence: the store's seed script no longer has the token check")
    store._SEED_APPLIED = store._SEED_APPLIED.replace(store._SEED, broken)
    store._SEED = broken


class _StaleSnapshots(PostgresSpendSource):
    """Sabotage ``broken-fence``: a snapshot held for a while before it is seeded."""

    async def snapshot(self, scope: Scope, entity_id: EntityId) -> tuple[float, list[str]]:
        read = await super().snapshot(scope, entity_id)
        await asyncio.sleep(BROKEN_FENCE_STALL)
        return read


async def _connect(dsn: str, kind: type[PostgresSpendSource]) -> PostgresSpendSource:
    """The spend source; a pod started while PostgreSQL is down waits for it."""
    while True:
        try:
            return await kind.connect(dsn, max_size=4)
        except SourceError:
            await asyncio.sleep(0.5)


class _Pod:
    def __init__(
        self,
        link: Link,
        plan: Plan,
        guard: BudgetGuard,
        coordinator: ReseedCoordinator,
        source: PostgresSpendSource,
    ) -> None:
        self.link, self.plan, self.guard = link, plan, guard
        self.coordinator, self.source = coordinator, source
        self.name = link.name
        self.rng = random.Random(f"{plan.tag}:{link.name}")
        self.stop = asyncio.Event()
        self.out = _Outbox()
        self.sent = 0
        self.history: list[tuple[str, tuple[int, ...], float]] = []

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._caller(index)) for index in range(self.plan.callers)]
        tasks += [asyncio.create_task(self._sampler()), asyncio.create_task(self._flusher())]
        while await self.link.next() is not None:
            pass
        self.stop.set()
        await asyncio.gather(*tasks)
        self._flush(final=True)

    # -- the workload ------------------------------------------------------------------

    async def _caller(self, index: int) -> None:
        while not self.stop.is_set():
            request_id, chosen, cost = self._request()
            entities = [(*self.plan.entities[i], BUDGET) for i in chosen]
            refs = tuple(self.plan.refs[i] for i in chosen)
            checked = await self._call("check", None, refs, None, self.guard.check(entities))
            if checked.error is None:
                recording = self._record(request_id, entities, cost)
                await self._call("record", request_id, refs, cost, recording)
            if self.rng.random() < self.plan.resets:
                target = self.rng.choice(self.plan.resettable)
                await self._reset(target)
            await asyncio.sleep(self.rng.uniform(0, 2 * self.plan.pace))

    def _request(self) -> tuple[str, tuple[int, ...], float]:
        """A fresh request, a retry of one of this pod's, or one every pod may send."""
        roll = self.rng.random()
        if roll < SHARED:
            number = self.rng.randrange(SHARED_IDS)
            return self._pick(random.Random(number), f"{self.plan.tag}-s{number}")
        if roll < SHARED + RETRY and self.history:
            return self.rng.choice(self.history)
        self.sent += 1
        request = self._pick(self.rng, f"{self.plan.tag}-{self.name}-{self.sent}")
        self.history = [*self.history[-49:], request]
        return request

    def _pick(self, rng: random.Random, request_id: str) -> tuple[str, tuple[int, ...], float]:
        """One entity of each scope, and a cost of 1/4 to 10 in quarters."""
        by_scope: dict[str, list[int]] = {}
        for index, (scope, _) in enumerate(self.plan.entities):
            by_scope.setdefault(scope, []).append(index)
        chosen = tuple(rng.choice(indexes) for indexes in by_scope.values())
        return request_id, chosen, rng.randint(1, 40) / 4

    async def _record(self, request_id: str, entities: list[Any], cost: float) -> str:
        recorded = await self.guard.record(request_id, entities, cost)
        if recorded.duplicate and self.plan.sabotage == "double-apply":
            for scope, entity_id, _ in entities:
                await self.coordinator.increment(self.guard.key(scope, entity_id), cost)
        kind = "duplicate" if recorded.duplicate else "new"
        return f"{kind} pending={recorded.pending}" if recorded.pending else kind

    async def _reset(self, index: int) -> None:
        scope, entity_id = self.plan.entities[index]
        ref = self.plan.refs[index]
        # At once, not in the next batch: the parent must hear of it even if we die in it.
        self.link.send(ResetBegun(self.name, ref, time.time()))

        async def reset() -> None:
            await self.guard.reset_spend(scope, entity_id)  # type: ignore[arg-type]

        await self._call("reset", None, (ref,), None, reset())

    async def _call(
        self,
        op: str,
        request_id: str | None,
        refs: tuple[str, ...],
        cost: float | None,
        work: Awaitable[object],
    ) -> Call:
        start = time.time()
        value: str | None = None
        error: str | None = None
        typed = False
        message = None
        try:
            result = await asyncio.wait_for(work, self.plan.bound)
            value = result if isinstance(result, str) else None
        except ReseedError as exc:
            error, typed = type(exc).__name__, True
        except asyncio.TimeoutError:
            error = "Hang"
        except Exception as exc:
            error, message = type(exc).__name__, describe(exc)[:300]
        call = Call(
            self.name, op, request_id, refs, cost, start, time.time(), value, error, typed, message
        )
        self.out.calls.append(call)
        return call

    # -- the sampler and the link to the parent ----------------------------------------

    async def _sampler(self) -> None:
        keys = [self.guard.key(scope, entity_id) for scope, entity_id in self.plan.entities]
        store = Redis.from_url(self.plan.sample_url, socket_timeout=1.0)
        conn: asyncpg.Connection | None = None
        try:
            while not self.stop.is_set():
                with contextlib.suppress(Exception):
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(self.plan.dsn, timeout=2.0)
                    await self._sample(store, conn, keys)
                await _sleep_or(self.stop, SAMPLE)
        finally:
            await store.aclose()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _sample(self, store: Redis, conn: asyncpg.Connection, keys: list[str]) -> None:
        start = time.time()
        before = await self._spends(conn)
        raw = await store.mget(keys)
        after = await self._spends(conn)
        counters = tuple(None if value is None else float(value) for value in raw)
        self.out.samples.append(Sample(self.name, start, time.time(), before, counters, after))

    async def _spends(self, conn: asyncpg.Connection) -> tuple[float, ...]:
        rows = await asyncio.wait_for(
            conn.fetch(
                "SELECT scope, entity_id, spend FROM budget_entity "
                "WHERE scope = ANY($1::text[]) AND entity_id = ANY($2::text[])",
                [scope for scope, _ in self.plan.entities],
                [entity_id for _, entity_id in self.plan.entities],
            ),
            2.0,
        )
        spends = {(row["scope"], row["entity_id"]): float(row["spend"]) for row in rows}
        return tuple(spends.get(entity, 0.0) for entity in self.plan.entities)

    async def _flusher(self) -> None:
        while not self.stop.is_set():
            await _sleep_or(self.stop, FLUSH)
            self._flush()

    def _flush(self, *, final: bool = False) -> None:
        out, self.out = self.out, _Outbox()
        stats = {**self.coordinator.stats.as_dict(), **_guard_stats(self.guard)}
        self.link.send(Batch(self.name, tuple(out.calls), tuple(out.samples), stats, final))


def _guard_stats(guard: BudgetGuard) -> dict[str, int]:
    stats = guard.stats
    return {
        "drained": stats.drained,
        "left_to_drain": stats.left_to_drain,
        "duplicates": stats.duplicates,
        "overdue_resets": stats.overdue_resets,
    }


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
