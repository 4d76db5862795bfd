"""Scenario tests of the protocol on real redis servers.

Every coordinator gets its own clients, so several coordinators in one process behave as
several pods: they share nothing but the counter store and the lock masters. Assertions
are on counts (loader calls, stats, stored values) and events; time appears only as a
timeout that cancels a call that hung.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import (
    ConfigurationError,
    CoordinatorClosedError,
    CorruptCounterError,
    InvalidValueError,
    LoaderError,
    ReseedCoordinator,
    ReseedTimeoutError,
    StoreError,
    WrongTypeError,
)
from coordinator.keys import fence_key
from coordinator.lab.embedded import EmbeddedServers

KEY = "litellm:spend:team:t1"
DB_VALUE = 100.0
# Headroom for a loaded 2-core machine in "did not hang" guards; never a speed claim.
SLACK = 5.0

CoordFactory = Callable[..., ReseedCoordinator]


class Source:
    """The database behind a counter: a loader that counts its reads.

    The value is taken when a read starts, so a read begun before a reset returns the
    pre-reset value however late it finishes. The first ``gated`` reads each wait for
    their own event in ``gates`` (set it to let that read finish; never set: a hung read).
    """

    def __init__(
        self,
        value: object = DB_VALUE,
        *,
        delay: float = 0.0,
        error: Exception | None = None,
        gated: int = 0,
    ) -> None:
        self.value = value
        self.delay = delay
        self.error = error
        self.gates = [asyncio.Event() for _ in range(gated)]
        self.calls = 0

    async def __call__(self) -> Any:
        index, value = self.calls, self.value
        self.calls += 1
        if index < len(self.gates):
            await self.gates[index].wait()
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return value


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def within(seconds: float) -> asyncio.Timeout:
    """A hang guard: the block fails with TimeoutError if it runs past ``seconds`` (+ SLACK)."""
    return asyncio.timeout(seconds + SLACK)


def pods(make: CoordFactory, n: int, **options: Any) -> list[ReseedCoordinator]:
    return [make(**options) for _ in range(n)]


async def race(
    coordinators: Sequence[ReseedCoordinator], source: Source, callers: int, **kw: Any
) -> list[Any]:
    """``callers`` concurrent gets on every coordinator, all started together."""
    calls = [c.get(KEY, source, **kw) for c in coordinators for _ in range(callers)]
    return await asyncio.gather(*calls, return_exceptions=True)


def total(coordinators: Sequence[ReseedCoordinator], field: str) -> int:
    return sum(getattr(c.stats, field) for c in coordinators)


async def stored(client: Redis) -> float | None:
    raw = await client.get(KEY)
    return None if raw is None else float(raw)


async def assert_loaded_once_under_a_lease(
    coordinators: Sequence[ReseedCoordinator], source: Source, client: Redis
) -> None:
    """One DB read, under a lease won on a majority (no pod fell back to degraded mode),
    and its value stored."""
    assert source.calls == 1
    assert total(coordinators, "lock_degraded") == 0
    assert await stored(client) == DB_VALUE


async def assert_nothing_written(client: Redis) -> None:
    """No counter, and no key but the fence hash (which a rebuild attempt may create)."""
    assert set(await client.keys("*")) <= {fence_key(KEY).encode()}


@pytest.fixture
async def own_store(own_servers: EmbeddedServers) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_servers.redis[0].url)
    yield client
    await client.aclose()


# -- the cold miss, once ---------------------------------------------------------------


async def test_concurrent_cold_reads_in_one_coordinator_load_once(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    source = Source(delay=0.2)
    values = await race([coordinator], source, 20)
    assert values == [DB_VALUE] * 20
    assert source.calls == 1
    stats = coordinator.stats
    assert stats.hits + stats.misses == 20
    assert stats.joined == stats.misses - 1
    assert (stats.loader_calls, stats.seeds_won) == (1, 1)
    assert await stored(store) == DB_VALUE


async def test_racing_coordinators_load_once_fleet_wide(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinators = pods(make_coordinator, 6)
    source = Source(delay=0.05)
    values = await race(coordinators, source, 10)
    assert values == [DB_VALUE] * 60
    assert source.calls == 1
    assert total(coordinators, "loader_calls") == 1
    assert total(coordinators, "seeds_won") == 1
    assert await stored(store) == DB_VALUE


async def _command_calls(clients: Sequence[Redis]) -> list[Counter[str]]:
    counts = []
    for client in clients:
        stats = await client.info("commandstats")
        counts.append(Counter({name: entry["calls"] for name, entry in stats.items()}))
    return counts


async def test_hot_path_is_one_get_on_the_store_and_nothing_on_the_masters(
    make_coordinator: CoordFactory, servers: EmbeddedServers
) -> None:
    coordinator = make_coordinator()
    await coordinator.get(KEY, Source())  # seeds, and opens the connections
    observers = [Redis.from_url(server.url) for server in servers.redis]
    try:
        before = await _command_calls(observers)
        assert await coordinator.get(KEY, Source()) == DB_VALUE
        after = await _command_calls(observers)
    finally:
        for observer in observers:
            await observer.aclose()
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    for delta in deltas:
        del delta["cmdstat_info"]  # the observer's own INFO
    assert deltas == [Counter({"cmdstat_get": 1}), Counter(), Counter(), Counter()]
    assert coordinator.stats.hits == 1


async def test_zero_is_seeded_and_the_next_read_is_a_hit(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    source = Source(0)
    assert await coordinator.get(KEY, source) == 0.0
    assert await coordinator.get(KEY, source) == 0.0
    assert source.calls == 1
    assert coordinator.stats.hits == 1
    assert await stored(store) == 0.0


# -- errors reach every waiter and write nothing ---------------------------------------


async def test_loader_error_reaches_every_waiter_and_writes_nothing(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    original = RuntimeError("db down")
    source = Source(delay=0.1, error=original)
    errors = await race([coordinator], source, 5)
    assert source.calls == 1
    for error in errors:
        assert isinstance(error, LoaderError)
        assert error.__cause__ is original
        assert error.key == KEY
    assert coordinator.stats.loader_errors == 1
    await assert_nothing_written(store)

    source.error = None
    assert await coordinator.get(KEY, source) == DB_VALUE
    assert source.calls == 2


@pytest.mark.parametrize("bad", [math.nan, -1, "12", None])
async def test_invalid_loader_value_reaches_every_waiter_and_writes_nothing(
    make_coordinator: CoordFactory, store: Redis, bad: object
) -> None:
    coordinator = make_coordinator()
    source = Source(bad, delay=0.05)
    errors = await race([coordinator], source, 3)
    assert source.calls == 1
    assert all(isinstance(error, InvalidValueError) for error in errors), errors
    await assert_nothing_written(store)


# -- increments ------------------------------------------------------------------------


async def test_increment_on_a_missing_counter_creates_nothing(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    assert await coordinator.increment(KEY, 5) is None
    assert await store.keys("*") == []


async def test_increment_with_loader_reseeds_once_then_adds(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    source = Source()
    assert await coordinator.increment(KEY, 5, loader=source) == DB_VALUE + 5
    assert await coordinator.increment(KEY, 2.5, loader=source) == DB_VALUE + 7.5
    assert source.calls == 1
    assert await stored(store) == DB_VALUE + 7.5


async def test_concurrent_increments_with_loader_across_coordinators(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinators = pods(make_coordinator, 3)
    source = Source(delay=0.1)
    amounts = [1.0, 2.0, 3.0, 4.0, 5.0]
    results = await asyncio.gather(
        *(
            coordinators[i % 3].increment(KEY, amount, loader=source)
            for i, amount in enumerate(amounts)
        )
    )
    assert source.calls == 1
    assert await stored(store) == DB_VALUE + sum(amounts)
    # Each add saw the seed plus the adds before it: distinct, the last one is the total.
    assert len(set(results)) == len(amounts)
    assert max(results) == DB_VALUE + sum(amounts)


async def test_ttl_is_set_on_seed_and_refreshed_by_increment(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator(ttl=30.0)
    await coordinator.get(KEY, Source())
    assert 25_000 < await store.pttl(KEY) <= 30_000
    await store.pexpire(KEY, 2_000)
    await coordinator.increment(KEY, 1)
    assert 25_000 < await store.pttl(KEY) <= 30_000


async def test_no_ttl_means_the_counter_never_expires(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator(ttl=None)
    await coordinator.get(KEY, Source())
    await coordinator.increment(KEY, 1)
    assert await store.pttl(KEY) == -1


# -- reset, fencing and slow loaders ---------------------------------------------------


async def test_reset_fences_out_the_rebuild_in_flight(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator()
    source = Source(gated=2)
    doomed = asyncio.create_task(coordinator.get(KEY, source))
    await until(lambda: source.calls == 1)
    source.value = 40.0  # the budget reset also zeroes (here: lowers) the DB spend
    await coordinator.reset(KEY)

    # A get right after the reset starts its own rebuild at once: it neither joins the
    # doomed flight nor waits for the doomed holder's lease (10 s by default).
    fresh = asyncio.create_task(coordinator.get(KEY, source))
    await until(lambda: source.calls == 2, timeout=3.0)

    source.gates[0].set()
    await until(lambda: coordinator.stats.fenced_writes == 1)
    assert await store.get(KEY) is None  # the doomed write was refused

    source.gates[1].set()
    assert await fresh == 40.0
    # The doomed flight's caller asked before the reset, but a pre-reset read must not
    # leak out after it: the flight rebuilds in the new generation and gets its value.
    assert await doomed == 40.0
    assert await stored(store) == 40.0
    assert coordinator.stats.seeds_won == 1
    assert source.calls == 2


async def test_loader_slower_than_the_lease_does_not_livelock(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinators = pods(make_coordinator, 2, lease=0.3, lease_extensions=0, wait=5.0)
    source = Source(delay=1.0)
    async with within(5.0):
        values = await race(coordinators, source, 3)
    assert values == [DB_VALUE] * 6
    assert await stored(store) == DB_VALUE
    # Bound: all callers of a coordinator join its one flight, and a flight stops retrying
    # once an attempt has called the loader (a fenced write returns its own read instead
    # of looping), so each coordinator reads the DB at most once. The lease lapsing under
    # the first reader lets the other overtake it, hence up to 2 reads here, not 1.
    for coordinator in coordinators:
        assert coordinator.stats.loader_calls <= 1
    assert 1 <= source.calls <= 2
    assert total(coordinators, "seeds_won") == 1
    assert total(coordinators, "fenced_writes") == source.calls - 1


async def test_a_live_holder_keeps_its_lease_under_steady_traffic(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    # With a cap on extensions (as above), a loader slower than the capped lease is
    # overtaken by every new flight and, under steady traffic, a seed may never land. By
    # default the lease is extended as long as the loader runs, so only a dead or stalled
    # holder is ever overtaken. The traffic is paced by extensions, not by a clock: a new
    # request on every pod after each one, until the holder's lease was renewed 4 times
    # (two full leases past the one it won), then the loader finishes mid-traffic.
    coordinators = pods(make_coordinator, 2, lease=1.0, wait=30.0)
    source = Source(gated=1)
    calls: list[asyncio.Task[float]] = []

    def more_traffic() -> None:
        calls.extend(asyncio.create_task(c.get(KEY, source)) for c in coordinators)

    more_traffic()
    for extensions in range(1, 5):
        await until(lambda n=extensions: total(coordinators, "lease_extensions") >= n, 10.0)
        more_traffic()
    assert source.calls == 1  # nobody overtook the live holder
    source.gates[0].set()
    await until(calls[0].done, 10.0)  # the first request's answer: the seed landed
    more_traffic()  # requests still arriving after the seed landed: hits
    values = await asyncio.gather(*calls)
    assert set(values) == {DB_VALUE}
    assert source.calls == 1
    assert total(coordinators, "seeds_won") == 1
    assert total(coordinators, "fenced_writes") == 0


async def test_lease_is_extended_while_the_loader_runs(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinators = pods(make_coordinator, 3, lease=1.0, lease_extensions=3)
    source = Source(gated=1)
    racing = asyncio.create_task(race(coordinators, source, 2))
    # Two extensions take the holder past its first lease: nobody else may read meanwhile.
    await until(lambda: total(coordinators, "lease_extensions") >= 2, 10.0)
    assert source.calls == 1
    source.gates[0].set()
    assert await racing == [DB_VALUE] * 6
    assert source.calls == 1
    assert total(coordinators, "leases_won") == 1
    assert total(coordinators, "fenced_writes") == 0
    assert await stored(store) == DB_VALUE


# -- what is at the key ----------------------------------------------------------------


async def _put(client: Redis, kind: str) -> None:
    writers: dict[str, Callable[[], Awaitable[Any]]] = {
        "abc": lambda: client.set(KEY, "abc"),
        "nan": lambda: client.set(KEY, "nan"),
        "hash": lambda: client.hset(KEY, "spend", "5"),
        "list": lambda: client.rpush(KEY, "5"),
    }
    await writers[kind]()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("abc", CorruptCounterError),
        ("nan", CorruptCounterError),
        ("hash", WrongTypeError),
        ("list", WrongTypeError),
    ],
)
async def test_a_bad_value_at_the_key_is_an_error_never_a_miss(
    make_coordinator: CoordFactory, store: Redis, kind: str, error: type[Exception]
) -> None:
    coordinator = make_coordinator()
    await _put(store, kind)
    before = await store.dump(KEY)
    source = Source()
    with pytest.raises(error):
        await coordinator.get(KEY, source)
    with pytest.raises(error):
        await coordinator.increment(KEY, 1)
    with pytest.raises(error):
        await coordinator.increment(KEY, 1, loader=source)
    assert source.calls == 0
    assert coordinator.stats.misses == 0
    assert await store.dump(KEY) == before
    assert await store.pttl(KEY) == -1


# -- faults: own servers, so no other test sees them -----------------------------------


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_store_down_is_a_store_error_not_a_miss(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory, fault: str
) -> None:
    socket_timeout = 0.25
    coordinator = make_own_coordinator(socket_timeout=socket_timeout)
    await coordinator.get("warm", Source())
    warm = coordinator.stats
    server = own_servers.redis[0]
    source = Source()
    operations: list[Callable[[], Awaitable[Any]]] = [
        lambda: coordinator.get(KEY, source),
        lambda: coordinator.increment(KEY, 1, loader=source),
        lambda: coordinator.reset(KEY),
    ]
    getattr(server, fault)()
    try:
        for operation in operations:
            # The store client retries once: two socket timeouts at most.
            async with within(2 * socket_timeout):
                with pytest.raises(StoreError) as caught:
                    await operation()
            assert not isinstance(caught.value, ReseedTimeoutError)
            assert caught.value.key == KEY
    finally:
        if fault == "pause":
            server.resume()
    assert source.calls == 0
    assert coordinator.stats.misses == warm.misses
    assert coordinator.stats.store_errors == len(operations)


async def test_one_lock_master_down_still_loads_once(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory, own_store: Redis
) -> None:
    own_servers.redis[1].kill()
    coordinators = pods(make_own_coordinator, 4)
    source = Source(delay=0.1)
    values = await race(coordinators, source, 2)
    assert values == [DB_VALUE] * 8
    await assert_loaded_once_under_a_lease(coordinators, source, own_store)


async def test_a_paused_lock_master_costs_a_timeout_not_a_hang(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory, own_store: Redis
) -> None:
    coordinators = pods(make_own_coordinator, 3, wait=5.0)
    source = Source(delay=0.1)
    master = own_servers.redis[1]
    master.pause()
    try:
        async with within(5.0):
            values = await race(coordinators, source, 2)
    finally:
        master.resume()
    assert values == [DB_VALUE] * 6
    await assert_loaded_once_under_a_lease(coordinators, source, own_store)


async def test_majority_of_lock_masters_down_degrades_but_stays_correct(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory, own_store: Redis
) -> None:
    own_servers.redis[1].kill()
    own_servers.redis[2].kill()
    coordinators = pods(make_own_coordinator, 3, wait=3.0)
    source = Source(delay=0.05)
    async with within(3.0):
        values = await race(coordinators, source, 2)
    assert values == [DB_VALUE] * 6
    assert await stored(own_store) == DB_VALUE
    assert total(coordinators, "lock_degraded") >= 1
    # Without a lease each coordinator reads on its own, once per flight; the fenced
    # SET NX still lets exactly one of them write.
    assert source.calls <= len(coordinators)
    assert total(coordinators, "seeds_won") == 1


# -- deadlines -------------------------------------------------------------------------


async def test_a_hung_loader_times_out_every_waiter_and_writes_nothing(
    make_coordinator: CoordFactory, store: Redis, servers: EmbeddedServers
) -> None:
    coordinator = make_coordinator()
    source = Source(gated=1)
    async with within(0.5):
        errors = await race([coordinator], source, 3, wait=0.5)
    assert all(isinstance(error, ReseedTimeoutError) for error in errors), errors
    assert coordinator.stats.timeouts == 3
    assert source.calls == 1
    await assert_nothing_written(store)
    # The flight gives its lease back when it gives up (the release runs on in the
    # background): no other pod waits out the lease.
    masters = [Redis.from_url(master.url) for master in servers.redis[1:4]]
    try:
        async with within(0.5):
            # Polls remote state: there is no event of ours to wait on.
            while sum([await master.dbsize() for master in masters]):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    finally:
        for master in masters:
            await master.aclose()


async def test_a_joiner_keeps_its_own_deadline(make_coordinator: CoordFactory) -> None:
    coordinator = make_coordinator()
    source = Source(delay=0.5)
    impatient = asyncio.create_task(coordinator.get(KEY, source, wait=0.2))
    await until(lambda: source.calls == 1)
    patient = asyncio.create_task(coordinator.get(KEY, source, wait=5.0))
    with pytest.raises(ReseedTimeoutError):
        await impatient
    assert await patient == DB_VALUE


async def test_on_timeout_load_returns_a_direct_read_and_writes_nothing(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    coordinator = make_coordinator(on_timeout="load")
    source = Source(gated=1)  # the rebuild's read hangs; the fallback read answers
    async with within(1.0):
        assert await coordinator.get(KEY, source, wait=0.5) == DB_VALUE
    assert source.calls == 2
    assert (coordinator.stats.timeouts, coordinator.stats.fallback_reads) == (1, 1)
    await assert_nothing_written(store)


# -- lifecycle and configuration -------------------------------------------------------


async def test_a_closed_coordinator_refuses_every_call(make_coordinator: CoordFactory) -> None:
    coordinator = make_coordinator()
    await coordinator.aclose()
    await coordinator.aclose()  # idempotent
    with pytest.raises(CoordinatorClosedError):
        await coordinator.get(KEY, Source())
    with pytest.raises(CoordinatorClosedError):
        await coordinator.increment(KEY, 1)
    with pytest.raises(CoordinatorClosedError):
        await coordinator.reset(KEY)


async def test_a_call_in_flight_at_close_gets_a_typed_error(
    make_coordinator: CoordFactory,
) -> None:
    coordinator = make_coordinator()
    source = Source(gated=1)
    call = asyncio.create_task(coordinator.get(KEY, source))
    await until(lambda: source.calls == 1)
    await coordinator.aclose()
    with pytest.raises(CoordinatorClosedError):
        await call


@pytest.mark.parametrize(
    "options",
    [
        {"ttl": 0},
        {"ttl": -1.0},
        {"lease": 0},
        {"lease": math.nan},
        {"wait": math.inf},
        {"wait": "5"},
        {"backoff_initial": 0},
        {"backoff_max": -0.1},
        {"lease_extensions": -1},
        {"lease_extensions": 1.5},
        {"lease_extensions": True},
        {"on_timeout": "retry"},
        {"lease": 10.0, "lease_extensions": 3, "fence_ttl": 40.0},
    ],
)
async def test_bad_settings_are_refused(store: Redis, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ReseedCoordinator(store, **options)


@pytest.mark.parametrize("wait", [0, -1.0, math.nan])
async def test_a_bad_per_call_wait_is_refused(make_coordinator: CoordFactory, wait: float) -> None:
    coordinator = make_coordinator()
    source = Source()
    with pytest.raises(ConfigurationError):
        await coordinator.get(KEY, source, wait=wait)
    with pytest.raises(ConfigurationError):
        await coordinator.increment(KEY, 1, loader=source, wait=wait)
    assert source.calls == 0
