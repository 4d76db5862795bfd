"""Exactly-once spend accounting in ledger mode, under one fault at a time.

Real PostgreSQL (the session's) and real redis-servers (each test's own, since a test
SIGSTOPs the counter store). Every test ends with the counter equal to the committed spend
once the outbox is drained, and checks on the way that the counter never exceeds it.

Faults:

* a store stall while the counter is written: the source commits, then the test SIGSTOPs
  the redis-server before the guard's apply, so the apply times out (0.5 s socket timeout)
  and its script stays queued in the stopped server, running when it resumes;
* a pod SIGKILLed before COMMIT or between COMMIT and the counter apply: a spawned process
  that signals an Event at that point and waits there until the parent kills it.

``LAG`` collects, per test, the largest DB - counter seen and how long it lasted, from the
first observation of a lag to the drain that closed it (printed with ``-s``; never asserted).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from coordinator import InvalidKeyError, ReseedCoordinator, SourceError
from coordinator.budget import BudgetGuard, Entity, EntityLike, PostgresSpendSource, Scope
from coordinator.budget.spend_source import OutboxLag
from coordinator.keys import applied_key
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.embedded.redis_server import RedisServer

TEAM: tuple[Scope, str, float] = ("team", "t", 100.0)
KEY: tuple[Scope, str, float] = ("key", "k", 100.0)
ENTITIES: list[EntityLike] = [TEAM, KEY]
COST = 5.0
CHILD_TIMEOUT = 30.0
# The tests drain right away instead of waiting for rows to age: the drain's own
# idempotence is what is under test, not its delay.
GUARD_OPTIONS: dict[str, Any] = {"write_mode": "ledger", "drain_after": 0.001}

LAG: dict[str, float] = {}
LAG_SECONDS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _report_lag(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    name = request.node.name
    if name in LAG:
        lasted = f" for {LAG_SECONDS[name]:.3f}s" if name in LAG_SECONDS else ""
        print(f"\nLAG {name}: largest DB - counter {LAG[name]:g}{lasted}")


@pytest.fixture
async def entities(source: PostgresSpendSource) -> None:
    """The request's two entities, each with 10 spent of a 100 budget."""
    for scope, entity_id, budget in (TEAM, KEY):
        await source.set_budget(scope, entity_id, budget)
    await source.pool.execute("UPDATE budget_entity SET spend = 10")


class FaultAfterCommit(PostgresSpendSource):
    """The shipped source; its next ``record`` after ``arm(fault)`` runs ``fault`` (on the
    counter store's server) right after the COMMIT, before the guard's counter write."""

    def __init__(self, pool: Any) -> None:
        super().__init__(pool)
        self.fault: Callable[[], None] | None = None

    def arm(self, fault: Callable[[], None]) -> None:
        self.fault = fault

    async def record(self, request_id: str, entities: Iterable[EntityLike], cost: float) -> bool:
        committed = await super().record(request_id, entities, cost)
        fault, self.fault = self.fault, None
        if fault is not None:
            fault()
        return committed


@dataclass
class Fleet:
    guard: BudgetGuard
    source: FaultAfterCommit
    server: RedisServer
    store: Redis
    name: str
    lag_since: float | None = None

    async def gaps(self) -> list[float]:
        """DB - counter of every entity (a missing counter is rebuilt first, through the
        guard, as a request's check would)."""
        await self.guard.check(ENTITIES)
        found = []
        for scope, entity_id, _ in (TEAM, KEY):
            raw = await self.store.get(self.guard.key(scope, entity_id))
            assert raw is not None
            found.append(await self.source.fetch(scope, entity_id) - float(raw))
        return found

    async def observe(self) -> None:
        """Counters never above the committed spend; note the largest lag."""
        gaps = await self.gaps()
        assert min(gaps) >= 0, f"a counter exceeds its committed spend: DB - counter {gaps}"
        LAG[self.name] = max(LAG.get(self.name, 0.0), *gaps)
        if max(gaps) > 0 and self.lag_since is None:
            self.lag_since = asyncio.get_running_loop().time()

    async def settled(self) -> None:
        """After a drain: every counter equals its committed spend, the outbox is empty."""
        await self.guard.drain()
        assert await self.gaps() == [0.0, 0.0]
        assert await self.source.outbox_lag() == OutboxLag(0, None)
        if self.lag_since is not None:
            LAG_SECONDS[self.name] = asyncio.get_running_loop().time() - self.lag_since

    async def stalled_record(self, request_id: str) -> None:
        self.source.arm(self.server.pause)
        try:
            recorded = await self.guard.record(request_id, ENTITIES, COST)
        finally:
            self.server.resume()
        assert (recorded.duplicate, recorded.pending) == (False, 2)
        assert self.guard.stats.left_to_drain == 2
        await self.store.ping()  # the queued apply has run by now (or never will)


@pytest.fixture
async def fleet(
    request: pytest.FixtureRequest,
    own_servers: EmbeddedServers,
    source: PostgresSpendSource,
    entities: None,
) -> AsyncIterator[Fleet]:
    server = own_servers.redis[0]
    coordinator = ReseedCoordinator.from_urls(
        server.url, lock_urls=[s.url for s in own_servers.redis[1:4]], socket_timeout=0.5
    )
    faulty = FaultAfterCommit(source.pool)
    guard = BudgetGuard(coordinator, faulty, **GUARD_OPTIONS)
    store = Redis.from_url(server.url)
    found = Fleet(guard, faulty, server, store, request.node.name)
    # A warm pod: counters cached, the apply script loaded (a stalled EVALSHA of a script
    # the server never saw would fail with NOSCRIPT and hide the fault).
    await found.guard.record("warm-up", ENTITIES, 1.0)
    assert await found.gaps() == [0.0, 0.0]
    yield found
    await store.aclose()
    await coordinator.aclose()


async def test_a_store_stall_during_the_counter_write(fleet: Fleet) -> None:
    await fleet.stalled_record("r1")
    await fleet.observe()
    await fleet.settled()


async def test_a_store_stall_then_a_retry_of_the_request(fleet: Fleet) -> None:
    await fleet.stalled_record("r1")
    await fleet.observe()

    retry = await fleet.guard.record("r1", ENTITIES, COST)

    assert (retry.duplicate, retry.pending) == (True, 0)
    await fleet.observe()
    await fleet.settled()


async def test_a_store_stall_then_expiry_and_rebuild_then_a_retry(fleet: Fleet) -> None:
    await fleet.stalled_record("r1")
    await fleet.store.delete(fleet.guard.key("team", "t"), fleet.guard.key("key", "k"))
    await fleet.observe()  # rebuilt from a snapshot that lists r1 as not yet counted

    retry = await fleet.guard.record("r1", ENTITIES, COST)

    assert retry.duplicate
    await fleet.observe()
    await fleet.settled()


async def test_a_store_restart_between_commit_and_the_counter_write(fleet: Fleet) -> None:
    fleet.source.arm(fleet.server.restart)  # SIGKILL, then a new empty server on the port

    recorded = await fleet.guard.record("r1", ENTITIES, COST)

    assert recorded.spends == (None, None)  # the counters went with the old server
    await fleet.store.connection_pool.disconnect()  # the test's own client: stale too
    await fleet.observe()  # rebuilt from the DB, r1 marked counted by the seeds
    await fleet.settled()


async def test_a_failed_db_transaction_counts_nothing(fleet: Fleet) -> None:
    async def broken(conn: Any, entities: Sequence[Entity], cost: float) -> None:
        await conn.execute("UPDATE no_such_table SET spend = spend + $1", cost)

    failing = BudgetGuard(
        fleet.guard._coordinator,
        PostgresSpendSource(fleet.source.pool, write_spend=broken),
        **GUARD_OPTIONS,
    )
    with pytest.raises(SourceError):
        await failing.record("r1", ENTITIES, COST)

    assert await fleet.source.pending("r1") == []
    await fleet.observe()
    await fleet.settled()
    assert (await fleet.guard.record("r1", ENTITIES, COST)).duplicate is False


async def test_the_background_drainer_applies_what_a_dead_pod_left(
    fleet: Fleet, source: PostgresSpendSource
) -> None:
    assert await source.record("r1", ENTITIES, COST)  # committed; its pod died right here
    await fleet.observe()
    assert LAG[fleet.name] == COST

    options = {**GUARD_OPTIONS, "drain_interval": 0.01}
    async with BudgetGuard(fleet.guard._coordinator, source, **options) as drainer:
        for _ in range(1000):
            if await source.outbox_lag() == OutboxLag(0, None):
                break
            await asyncio.sleep(0.01)
        assert drainer.stats.drained == 2
    await fleet.settled()


def test_markers_share_their_counters_cluster_slot() -> None:
    for key in ["litellm:spend:team:t", "{litellm}:spend:key:k", "a{b}c"]:
        assert key_slot(applied_key(key, "r1").encode()) == key_slot(key.encode())
    # No tag can match a key with an empty brace pair: such a key is refused.
    with pytest.raises(InvalidKeyError, match="slot"):
        applied_key("a{}b", "r1")
    with pytest.raises(InvalidKeyError):
        applied_key("k", "has space")


# -- pods killed mid-record -----------------------------------------------------------------


def _pod(dsn: str, redis_url: str, stop_at: str, reached: Event) -> None:
    """A pod recording r1, stopped for good at ``stop_at``: ``"locked"`` (spend rows
    written, before COMMIT) or ``"committed"`` (after COMMIT, before the counter apply)."""

    async def hold_forever() -> None:
        reached.set()
        await asyncio.Event().wait()  # the parent SIGKILLs this process here

    class Stopping(PostgresSpendSource):
        async def record(
            self, request_id: str, entities: Iterable[EntityLike], cost: float
        ) -> bool:
            committed = await super().record(request_id, entities, cost)
            if stop_at == "committed":
                await hold_forever()
            return committed

    async def write_then_stop(conn: Any, entities: Sequence[Entity], cost: float) -> None:
        for entity in entities:
            await conn.execute(
                "UPDATE budget_entity SET spend = spend + $1 WHERE scope = $2 AND entity_id = $3",
                cost,
                entity.scope,
                entity.id,
            )
        await hold_forever()

    async def main() -> None:
        writer = write_then_stop if stop_at == "locked" else None
        source = await Stopping.connect(dsn, write_spend=writer)
        async with ReseedCoordinator.from_urls(redis_url) as coordinator:
            guard = BudgetGuard(coordinator, source, **GUARD_OPTIONS)
            await guard.record("r1", ENTITIES, COST)

    asyncio.run(main())


async def _kill_pod_at(fleet: Fleet, dsn: str, stop_at: str) -> None:
    context = multiprocessing.get_context("spawn")
    reached = context.Event()
    pod = context.Process(target=_pod, args=(dsn, fleet.server.url, stop_at, reached))
    pod.start()
    try:
        assert await asyncio.to_thread(reached.wait, CHILD_TIMEOUT), "the pod never got there"
        assert pod.pid is not None
        os.kill(pod.pid, signal.SIGKILL)
    finally:
        await asyncio.to_thread(pod.join, CHILD_TIMEOUT)
    assert pod.exitcode == -signal.SIGKILL


async def _wait_for_rollback(source: PostgresSpendSource) -> None:
    # The killed pod's backend rolls back once it notices the closed socket; its row
    # locks make this update wait for exactly that.
    await source.pool.execute("UPDATE budget_entity SET spend = spend WHERE entity_id = 't'")


async def test_a_pod_killed_before_commit(fleet: Fleet, servers: EmbeddedServers) -> None:
    assert servers.postgres is not None
    await _kill_pod_at(fleet, servers.postgres.dsn, "locked")
    await _wait_for_rollback(fleet.source)

    assert await fleet.source.pending("r1") == []
    await fleet.observe()
    await fleet.settled()
    assert await fleet.source.fetch("team", "t") == 11.0  # the warm-up only


async def test_a_pod_killed_after_commit_before_the_counter_write(
    fleet: Fleet, servers: EmbeddedServers
) -> None:
    assert servers.postgres is not None
    await _kill_pod_at(fleet, servers.postgres.dsn, "committed")

    assert len(await fleet.source.pending("r1")) == 2
    await fleet.observe()  # lags by the cost: nobody has applied it yet
    assert LAG[fleet.name] == COST
    await fleet.settled()
    assert await fleet.source.fetch("team", "t") == 16.0


async def test_a_pod_killed_after_commit_then_the_counter_expires(
    fleet: Fleet, servers: EmbeddedServers
) -> None:
    assert servers.postgres is not None
    await _kill_pod_at(fleet, servers.postgres.dsn, "committed")
    await fleet.store.delete(fleet.guard.key("team", "t"))

    await fleet.observe()  # the rebuild counted r1 and marked it: the drain adds nothing
    drained = await fleet.guard.drain()

    assert drained == 2
    await fleet.settled()


# -- no faults ------------------------------------------------------------------------------


async def test_a_replayed_request_id_applies_nothing(fleet: Fleet) -> None:
    first = await fleet.guard.record("r1", ENTITIES, COST)
    assert (first.duplicate, first.spends, first.pending) == (False, (16.0, 16.0), 0)
    assert await fleet.gaps() == [0.0, 0.0]

    for _ in range(3):
        replay = await fleet.guard.record("r1", ENTITIES, COST)
        assert (replay.duplicate, replay.spends, replay.pending) == (True, (None, None), 0)
        assert await fleet.gaps() == [0.0, 0.0]

    assert await fleet.source.fetch("team", "t") == 16.0
    assert fleet.guard.stats.duplicates == 3
    await fleet.settled()


async def test_every_record_leaves_no_lag_without_faults(fleet: Fleet) -> None:
    await fleet.store.delete(fleet.guard.key("key", "k"))  # one cold counter too
    for i in range(5):
        recorded = await fleet.guard.record(f"r{i}", ENTITIES, COST)
        assert recorded.pending == 0
        assert await fleet.gaps() == [0.0, 0.0]
    assert await fleet.source.outbox_lag() == OutboxLag(0, None)
