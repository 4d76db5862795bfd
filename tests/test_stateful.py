"""Random interleavings of get / increment / increment(loader=) / reset / expire / DB
changes, one at a time or several pods at once, across three coordinators (three pods) on
the real servers, checked against a model after every step.

The model is the DB value and the counter (absent, or its value). A counter is only ever
the DB value read at its seed plus the increments applied since: never a multiple, never a
sum of snapshots. Amounts and DB values are multiples of 1/4 so every sum is exact in both
Python and INCRBYFLOAT, and the model can demand equality.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from itertools import permutations
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from redis.asyncio import Redis

from coordinator import ReseedCoordinator
from coordinator.lab.embedded import EmbeddedServers

T = TypeVar("T")

KEY = "spend:stateful:key"
PODS = 3

pods = st.integers(0, PODS - 1)
amounts = st.integers(-40, 400).map(lambda quarters: quarters / 4)
db_values = st.integers(0, 4000).map(lambda quarters: quarters / 4)


class CounterMachine(RuleBasedStateMachine):
    def __init__(self, env: EmbeddedServers) -> None:
        super().__init__()
        # Clients are bound to the loop they first run on: one loop per example, all steps.
        self.loop = asyncio.new_event_loop()
        urls = [server.url for server in env.redis]
        self.run(self._flush(urls))
        self.raw = Redis.from_url(urls[0])
        self.pods = [
            ReseedCoordinator.from_urls(urls[0], lock_urls=urls[1:4], lease=2.0, wait=5.0)
            for _ in range(PODS)
        ]
        self.db = 100.0
        self.counter: float | None = None
        self.loads = 0
        self.cold_misses = 0

    def run(self, pending: Awaitable[T]) -> T:
        return self.loop.run_until_complete(pending)

    async def _flush(self, urls: list[str]) -> None:
        for url in urls:
            async with Redis.from_url(url) as client:
                await client.flushall()

    async def load(self) -> float:
        self.loads += 1
        # Yield for a moment, so concurrent callers overlap the rebuild instead of its result.
        await asyncio.sleep(0.005)
        return self.db

    def miss(self) -> None:
        """A call that rebuilds: from the DB once if the counter is absent, else not at all."""
        if self.counter is None:
            self.counter = self.db
            self.cold_misses += 1

    @rule(pod=pods)
    def get(self, pod: int) -> None:
        value = self.run(self.pods[pod].get(KEY, self.load))
        self.miss()
        assert value == self.counter

    @rule(pod=pods, amount=amounts)
    def increment(self, pod: int, amount: float) -> None:
        new = self.run(self.pods[pod].increment(KEY, amount))
        if self.counter is not None:
            self.counter += amount
        assert new == self.counter

    @rule(pod=pods, amount=amounts)
    def increment_with_loader(self, pod: int, amount: float) -> None:
        new = self.run(self.pods[pod].increment(KEY, amount, loader=self.load))
        self.miss()
        assert self.counter is not None
        self.counter += amount
        assert new == self.counter

    @rule(pod=pods)
    def reset(self, pod: int) -> None:
        self.run(self.pods[pod].reset(KEY))
        self.counter = None

    @rule()
    def expire(self) -> None:
        """What a TTL expiry or an eviction does: the counter is gone, the fence is not."""
        self.run(self.raw.delete(KEY))
        self.counter = None

    @rule(value=db_values)
    def change_db(self, value: float) -> None:
        self.db = value

    @rule(callers=st.lists(pods, min_size=2, max_size=PODS, unique=True))
    def concurrent_gets(self, callers: list[int]) -> None:
        values = self.run(self._gather([self.pods[pod].get(KEY, self.load) for pod in callers]))
        self.miss()
        assert values == [self.counter] * len(callers)

    @rule(
        adds=st.lists(st.tuples(pods, amounts), min_size=2, max_size=PODS, unique_by=lambda a: a[0])
    )
    def concurrent_increments_with_loader(self, adds: list[tuple[int, float]]) -> None:
        calls = [self.pods[pod].increment(KEY, amount, loader=self.load) for pod, amount in adds]
        news = self.run(self._gather(calls))
        self.miss()
        assert self.counter is not None
        steps = [amount for _, amount in adds]
        # One rebuild, then every amount applied once, in some order.
        assert news in list(_running_totals(self.counter, steps))
        self.counter += sum(steps)

    async def _gather(self, calls: list[Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*calls))

    @invariant()
    def counter_matches_model(self) -> None:
        raw = self.run(self.raw.get(KEY))
        assert (None if raw is None else float(raw)) == self.counter

    @invariant()
    def one_db_read_per_cold_miss(self) -> None:
        assert self.loads == self.cold_misses
        assert sum(pod.stats.loader_calls for pod in self.pods) == self.loads

    def teardown(self) -> None:
        try:
            for pod in self.pods:
                self.run(pod.aclose())
            self.run(self.raw.aclose())
        finally:
            self.loop.close()


def _running_totals(base: float, steps: list[float]) -> Iterator[list[float]]:
    """For each order of applying ``steps`` to ``base``, what each step's caller sees."""
    for order in permutations(range(len(steps))):
        seen, total = [0.0] * len(steps), base
        for index in order:
            total += steps[index]
            seen[index] = total
        yield seen


def test_counter_invariants_hold_over_random_interleavings(servers: EmbeddedServers) -> None:
    run_state_machine_as_test(
        lambda: CounterMachine(servers),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )
