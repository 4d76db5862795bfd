"""Budget reservations (BudgetGuard.reserve/settle/release) on real redis-servers and PostgreSQL.

Amounts are binary fractions (0.125, 0.25, ...), so sums of holds are exact and the number of
requests a budget admits is exact too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from redis.asyncio import Redis

from coordinator import CorruptCounterError, ReseedCoordinator
from coordinator.budget import (
    BudgetExceededError,
    BudgetGuard,
    EntityId,
    Reservation,
    Scope,
)
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.errors import ConfigurationError, InvalidValueError
from coordinator.keys import holds_key

CoordFactory = Callable[..., ReseedCoordinator]


class CountingSource(PostgresSpendSource):
    """The shipped source, counting the rebuild reads (snapshots) it serves."""

    def __init__(self, inner: PostgresSpendSource) -> None:
        super().__init__(inner.pool)
        self.reads = 0

    async def snapshot(self, scope: Scope, entity_id: EntityId) -> tuple[float, list[str]]:
        self.reads += 1
        return await super().snapshot(scope, entity_id)


async def _seed(source: PostgresSpendSource, team: str, budget: float, spend: float) -> None:
    await source.set_budget("team", team, budget)
    await source.pool.execute(
        "UPDATE budget_entity SET spend = $1 WHERE entity_id = $2", spend, team
    )


async def _try(
    guard: BudgetGuard, request_id: str, budget: float, estimate: float
) -> Reservation | None:
    try:
        return await guard.reserve(request_id, [("team", "t", budget)], estimate)
    except BudgetExceededError:
        return None


async def _burst(
    guards: list[BudgetGuard], count: int, budget: float, estimate: float, prefix: str = "r"
) -> list[Reservation]:
    """``count`` concurrent reservations spread over the guards (pods); those admitted."""
    tried = await asyncio.gather(
        *(_try(guards[i % len(guards)], f"{prefix}{i}", budget, estimate) for i in range(count))
    )
    return [reservation for reservation in tried if reservation is not None]


async def test_concurrent_reservations_admit_only_what_fits_with_one_rebuild(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    counting = CountingSource(source)
    await _seed(source, "t", 1.6, 0.5)  # room for 4 requests of 0.25: 0.5 + 4 x 0.25 < 1.6
    guards = [BudgetGuard(make_coordinator(), counting, write_mode="ledger") for _ in range(2)]

    admitted = await _burst(guards, 32, 1.6, 0.25)

    assert len(admitted) == 4
    assert counting.reads == 1  # the cold counter was rebuilt once for both pods
    assert sum(guard.stats.refusals.get("team", 0) for guard in guards) == 28
    assert await store.hlen(holds_key(guards[0].key("team", "t"))) == 4
    for i, reservation in enumerate(admitted):
        await guards[i % 2].settle(reservation, 0.25)
    assert await store.hlen(holds_key(guards[0].key("team", "t"))) == 0
    assert await guards[0].current_spend("team", "t") == 1.5
    assert await source.fetch("team", "t") == 1.5
    # With estimates exact, spend stays below the budget, so the next request is refused.
    assert await _try(guards[1], "late", 1.6, 0.25) is None


async def test_overshoot_stays_within_the_sum_of_underestimates_in_flight(
    make_coordinator: CoordFactory, source: PostgresSpendSource
) -> None:
    await _seed(source, "t", 1.0, 0.0)
    guards = [BudgetGuard(make_coordinator(), source, write_mode="ledger") for _ in range(2)]
    estimate, actual = 0.125, 0.25
    underestimates = 0.0
    wave_sizes = []
    for wave in range(3):
        admitted = await _burst(guards, 12, 1.0, estimate, prefix=f"w{wave}-")
        wave_sizes.append(len(admitted))
        underestimates += len(admitted) * (actual - estimate)
        await asyncio.gather(
            *(guards[i % 2].settle(reservation, actual) for i, reservation in enumerate(admitted))
        )

    spend = await guards[0].current_spend("team", "t")
    # Wave 1: 7 holds of 0.125 fit below 1.0; their actual 1.75 is over, so nothing after.
    assert wave_sizes == [7, 0, 0]
    assert spend == 1.75
    assert 0 < spend - 1.0 <= underestimates


async def test_an_expired_hold_frees_its_budget(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await _seed(source, "t", 1.5, 0.0)
    guard = BudgetGuard(make_coordinator(), source, write_mode="ledger", hold_ttl=0.2)
    held = await guard.reserve("killed-mid-call", [("team", "t", 1.5)], 1.0)
    assert held.held_keys == (guard.key("team", "t"),)

    with pytest.raises(BudgetExceededError) as refused:
        await guard.reserve("next", [("team", "t", 1.5)], 1.0)
    assert (refused.value.spend, refused.value.exceeded[0].held) == (0.0, 1.0)

    admitted = None
    for _ in range(100):  # the pod holding it never settles: its hold must expire
        admitted = await _try(guard, "next", 1.5, 1.0)
        if admitted is not None:
            break
        await asyncio.sleep(0.05)
    assert admitted is not None
    holds = await store.hgetall(holds_key(guard.key("team", "t")))
    assert list(holds) == [b"next"]  # the expired hold was pruned


async def test_release_ends_a_hold_and_settle_counts_once(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await _seed(source, "t", 1.5, 0.0)
    guard = BudgetGuard(make_coordinator(), source, write_mode="ledger")
    entities = [("team", "t", 1.5), ("user", "no-budget")]
    failed = await guard.reserve("failed", entities, 1.0)
    assert failed.spends == (0.0, None)

    assert await guard.release(failed) == 1
    assert await guard.release(failed) == 0  # nothing left to end

    served = await guard.reserve("served", entities, 1.0)
    first = await guard.settle(served, 0.5)
    again = await guard.settle(served, 0.5)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert await guard.current_spend("team", "t") == 0.5
    assert await store.hlen(holds_key(guard.key("team", "t"))) == 0
    assert (guard.stats.holds, guard.stats.releases) == (2, 2)


async def test_reserve_refuses_a_corrupt_counter_and_bad_input(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    guard = BudgetGuard(make_coordinator(), source, write_mode="ledger")
    await store.set(guard.key("team", "t"), "12abc")
    with pytest.raises(CorruptCounterError):
        await guard.reserve("r", [("team", "t", 5.0)], 1.0)
    assert not await store.exists(holds_key(guard.key("team", "t")))
    with pytest.raises(InvalidValueError):
        await guard.reserve("r", [("team", "t", 5.0)], -1.0)
    with pytest.raises(ConfigurationError):
        BudgetGuard(make_coordinator(), source, write_mode="ledger", hold_ttl=0)


@pytest.fixture
def split_by_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group a request's counters one per group, as a Redis Cluster's slots would, on the
    single test server (where scripts across groups still run)."""

    def per_key(client: object, keys: list[str]) -> list[list[int]]:
        return [[i] for i in range(len(keys))]

    monkeypatch.setattr("coordinator.budget.guard.slot_groups", per_key)


@pytest.mark.usefixtures("split_by_slot")
async def test_slot_groups_refused_anywhere_keep_no_partial_hold(
    make_coordinator: CoordFactory, store: Redis, source: PostgresSpendSource
) -> None:
    await _seed(source, "t", 1.6, 0.5)
    await source.set_budget("user", "u", 100.0)
    guards = [BudgetGuard(make_coordinator(), source, write_mode="ledger") for _ in range(2)]
    request = [("user", "u", 100.0), ("team", "t", 1.6)]

    tried = await asyncio.gather(
        *(guards[i % 2].reserve(f"r{i}", request, 0.25) for i in range(32)),
        return_exceptions=True,
    )

    admitted = [r for r in tried if isinstance(r, Reservation)]
    refused = [r for r in tried if not isinstance(r, Reservation)]
    assert len(admitted) == 4
    assert all(isinstance(r, BudgetExceededError) and r.scope == "team" for r in refused)
    # The user's group held for every request; the 28 refused by the team's group ended theirs.
    assert await store.hlen(holds_key(guards[0].key("user", "u"))) == 4
    assert await store.hlen(holds_key(guards[0].key("team", "t"))) == 4
