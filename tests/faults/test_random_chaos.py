"""The random chaos (``python -m coordinator chaos --random``) on real servers and pods, and
the library bugs it found, each pinned by a test of its own.

The random runs use this module's own servers (4 redis-servers and a PostgreSQL): the
nemesis kills, pauses and restarts them. Two fixed seeds must pass every check with their
faults actually injected; a run with a deliberately double-applying record, and one whose
seed script skips the fencing-token check, must each fail the checker, so the checker is
known to be able to fail.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator

import asyncpg
import pytest

from coordinator import ReseedCoordinator, SourceError
from coordinator.budget import BudgetGuard, EntityLike, PostgresSpendSource
from coordinator.lab.chaos.nemesis import KINDS, schedule
from coordinator.lab.chaos.randomized import Options, run_random
from coordinator.lab.embedded import EmbeddedServers
from coordinator.lab.servers import Deployment
from coordinator.sources import PostgresSource

SECONDS = 8.0


@pytest.fixture(scope="module")
def env() -> Iterator[Deployment]:
    with EmbeddedServers(redis_count=4, postgres=True) as running:
        yield Deployment.embedded(running)


def test_a_seed_alone_decides_the_schedule() -> None:
    first = schedule(7, 60.0, 4, 8)
    assert first == schedule(7, 60.0, 4, 8)
    assert first != schedule(8, 60.0, 4, 8)
    assert all(f.at + f.duration <= 59.0 for f in first)
    # No target is held by two faults at once.
    for one in first:
        for other in first:
            same = (KINDS[one.kind].group, one.target) == (KINDS[other.kind].group, other.target)
            if one is not other and same and one.at <= other.at:
                assert one.at + one.duration <= other.at


@pytest.mark.parametrize("seed", [1, 2])
def test_random_faults_pass_every_check(env: Deployment, seed: int) -> None:
    verdict = run_random(env, Options(seconds=SECONDS, seed=seed))

    assert [check.name for check in verdict.checks if not check.ok] == [], verdict.checks
    planned = Counter(fault["kind"] for fault in verdict.schedule)
    assert planned == verdict.faults, verdict.fault_errors  # every fault was injected
    assert verdict.skipped == {}
    assert verdict.calls["record"] > 0
    assert verdict.calls["check"] > 0
    assert verdict.lag.samples > 0
    assert verdict.misses > 0
    assert verdict.calls["reset"] > 0


def test_the_checker_catches_a_record_that_applies_a_retry_twice(env: Deployment) -> None:
    verdict = run_random(env, Options(seconds=4.0, seed=3, sabotage="double-apply"))

    failed = {check.name for check in verdict.checks if not check.ok}
    assert "no counter ever observed above the DB spend" in failed
    assert verdict.lag.above > 0
    assert not verdict.passed


COUNTER_CHECKS = {
    "counters equal the DB spend at quiescence",
    "no counter ever observed above the DB spend",
}


def test_the_checker_catches_a_seed_that_skips_the_fence(env: Deployment) -> None:
    verdict = run_random(env, Options(seconds=4.0, seed=3, sabotage="broken-fence"))

    failed = {check.name for check in verdict.checks if not check.ok}
    # A rebuild that read before a reset seeds the old spend after it.
    assert "no counter ever observed above the DB spend" in failed, verdict.checks
    assert failed <= COUNTER_CHECKS, verdict.checks  # the calls and the ledger stay sound
    assert verdict.lag.above > 0
    assert not verdict.passed


# -- bugs the random chaos found -------------------------------------------------------------

TEAM = ("team", "t", 100.0)


async def _team_spent_ten(
    source: PostgresSpendSource, ledger: PostgresSpendSource, coordinator: ReseedCoordinator
) -> BudgetGuard:
    """A ledger guard on ``ledger``; team t has spent 10, its counter is warm."""
    guard = BudgetGuard(coordinator, ledger, write_mode="ledger")
    await source.set_budget("team", "t", 100.0)
    await guard.record("r1", [TEAM], 10.0)
    assert await guard.check([TEAM]) == [10.0]
    return guard


async def test_a_rebuild_between_the_counter_reset_and_the_commit_is_undone(
    source: PostgresSpendSource, make_coordinator: Callable[..., ReseedCoordinator]
) -> None:
    guard = await _team_spent_ten(source, source, make_coordinator())

    async def reset_then_another_pod_reads(wiped: list[str]) -> None:
        await guard.reset("team", "t", wiped)
        # Not committed yet: the rebuild's snapshot reads the old spend and seeds it.
        await guard.check([TEAM])

    await source.reset_spend("team", "t", on_locked=reset_then_another_pod_reads)

    assert await source.fetch("team", "t") == 0.0
    assert await guard.check([TEAM]) == [0.0]


async def test_a_connection_left_mid_operation_fails_as_a_source_error() -> None:
    class Broken:
        async def fetchrow(self, *args: object) -> None:
            raise asyncpg.InternalClientError("cannot switch to state 15; another operation")

    with pytest.raises(SourceError):
        await PostgresSource(Broken(), "SELECT 1").fetch()


class AfterCommit(PostgresSpendSource):
    """The shipped source; its ``record`` runs ``between`` right after its COMMIT, before
    the guard applies the cost to the counters."""

    between: Callable[[], Awaitable[None]] | None = None

    async def record(self, request_id: str, entities: Iterable[EntityLike], cost: float) -> bool:
        committed = await super().record(request_id, entities, cost)
        between, self.between = self.between, None
        if between is not None:
            await between()
        return committed


async def test_a_reset_between_a_commit_and_its_counter_apply(
    source: PostgresSpendSource, make_coordinator: Callable[..., ReseedCoordinator]
) -> None:
    ledger = AfterCommit(source.pool)
    guard = await _team_spent_ten(source, ledger, make_coordinator())

    async def another_pod_resets_then_reads() -> None:
        await guard.reset_spend("team", "t")
        assert await guard.check([TEAM]) == [0.0]  # rebuilt: r2's cost was wiped out

    ledger.between = another_pod_resets_then_reads
    await guard.record("r2", [TEAM], 5.0)  # committed, then reset, then applied

    assert await source.fetch("team", "t") == 0.0
    assert await guard.check([TEAM]) == [0.0]  # the reset marked r2 counted: not added


async def test_a_drain_between_a_commit_and_its_counter_apply(
    source: PostgresSpendSource, make_coordinator: Callable[..., ReseedCoordinator]
) -> None:
    ledger = AfterCommit(source.pool)
    guard = await _team_spent_ten(source, ledger, make_coordinator())
    drainer = BudgetGuard(guard._coordinator, source, write_mode="ledger", drain_after=0.001)

    async def expiry_then_another_pods_drain_then_a_read() -> None:
        # The pod is slow here (paused, busy): its row outlives drain_after.
        await guard._coordinator.store.delete(guard.key("team", "t"))
        await asyncio.sleep(0.01)
        assert await drainer.drain() == 1  # no counter: nothing added, the row settled
        assert await guard.check([TEAM]) == [15.0]  # rebuilt with r2; the drain marked it

    ledger.between = expiry_then_another_pods_drain_then_a_read
    await guard.record("r2", [TEAM], 5.0)  # committed, drained, then applied

    assert await source.fetch("team", "t") == 15.0
    assert await guard.check([TEAM]) == [15.0]  # the late apply finds the marker
