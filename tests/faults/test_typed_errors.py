"""Only typed errors, ever: under a counter-store restart every call returns a value or
raises a :class:`ReseedError` subclass, never a raw redis-py or asyncio error.

The restart lands while one pod holds the leases of a batch of cold keys (its loader held
by a gate) and another pod's callers wait on the seed announcements (pub/sub), the moment
redis-py's shared PubSub connection is most exposed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from coordinator import (
    ConfigurationError,
    ReseedCoordinator,
    ReseedError,
    SourceError,
    StoreError,
)
from coordinator.keys import seed_channel
from coordinator.lab.embedded import EmbeddedServers
from coordinator.sources import PostgresSource

CoordFactory = Callable[..., ReseedCoordinator]

KEYS_PER_ROUND = 24
ROUNDS = 10
DB_VALUE = 7.0


class GatedSource:
    """A loader that counts its reads; every read waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> float:
        self.calls += 1
        await self.gate.wait()
        return DB_VALUE


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def outcome(result: object) -> str:
    if isinstance(result, float):
        return "value" if result == DB_VALUE else f"wrong value {result!r}"
    if isinstance(result, ReseedError):
        return type(result).__name__
    return f"untyped {type(result).__name__}: {result!r}"


async def test_a_store_restart_under_waiting_losers_raises_only_typed_errors(
    own_servers: EmbeddedServers, make_own_coordinator: CoordFactory
) -> None:
    store = own_servers.redis[0]
    # Lock timeouts roomy enough that a loaded machine does not turn the leases into
    # degraded rebuilds: the losers must lose and wait.
    holder = make_own_coordinator(lock_timeout=2.0)
    waiter = make_own_coordinator(lock_timeout=2.0)
    outcomes: Counter[str] = Counter()
    for round_ in range(ROUNDS):
        keys = [f"restart:{round_}:{i}" for i in range(KEYS_PER_ROUND)]
        source = GatedSource()
        held, waiting = await hold_and_wait(holder, waiter, keys, source)
        if round_ == 0:
            # The losers are subscribed to their seed channels. (In later rounds the
            # previous restart may have left the wake-up channel down: they poll.)
            await until_async(partial(subscribed, store.url, keys))
        await asyncio.to_thread(store.restart)
        source.gate.set()
        results = await asyncio.gather(*held, *waiting, return_exceptions=True)
        outcomes.update(outcome(result) for result in results)
    print(f"\noutcomes over {ROUNDS} restarts: {dict(outcomes)}")
    assert sum(outcomes.values()) == 2 * KEYS_PER_ROUND * ROUNDS
    assert {name for name in outcomes if name.startswith(("untyped", "wrong"))} == set()
    assert outcomes["value"] > 0

    # The wake-up channel comes back: the losers of a healthy round subscribe again, and
    # every call returns the value.
    keys = [f"after:{i}" for i in range(KEYS_PER_ROUND)]
    source = GatedSource()
    held, waiting = await hold_and_wait(holder, waiter, keys, source)
    await until_async(partial(subscribed, store.url, keys))
    source.gate.set()
    assert await asyncio.gather(*held, *waiting) == [DB_VALUE] * (2 * KEYS_PER_ROUND)


async def hold_and_wait(
    holder: ReseedCoordinator, waiter: ReseedCoordinator, keys: list[str], source: GatedSource
) -> tuple[list[asyncio.Task[float]], list[asyncio.Task[float]]]:
    """``holder`` rebuilding every key (held in the loader), ``waiter`` asking for them."""
    held = [asyncio.create_task(holder.get(key, source)) for key in keys]
    await until(lambda: source.calls == len(keys))
    lost_before = waiter.stats.leases_lost
    waiting = [asyncio.create_task(waiter.get(key, source)) for key in keys]
    await until(lambda: waiter.stats.leases_lost - lost_before >= len(keys))
    return held, waiting


async def subscribed(url: str, keys: list[str]) -> bool:
    """Whether every key's seed channel has a subscriber (a fresh client: the store
    restarts)."""
    client = Redis.from_url(url)
    try:
        counts = await client.pubsub_numsub(*(seed_channel(key) for key in keys))
    finally:
        await client.aclose()
    return all(count for _, count in counts)


async def until_async(predicate: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while not await predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- each boundary translates what its client lets through -------------------------------
#
# redis-py and asyncpg raise more than their error bases when a connection breaks under a
# call. These make a real client raise them (a method of one real client replaced, the
# rest of the protocol on real servers) and check the boundary that must translate them.

KEY = "boundary:counter"
# What redis-py raised under the restart above, and the plain socket and asyncio faults.
CLIENT_FAULTS = [
    RuntimeError("readuntil() called while another coroutine is already waiting"),
    AttributeError("'NoneType' object has no attribute 'writelines'"),
    ConnectionResetError("Connection lost"),
    asyncio.TimeoutError(),
]


def failing(exc: Exception) -> Callable[..., Awaitable[object]]:
    async def fail(*args: object, **kwargs: object) -> object:
        raise exc

    return fail


class CountingSource:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> float:
        self.calls += 1
        return DB_VALUE


@pytest.mark.parametrize("fault", CLIENT_FAULTS, ids=lambda exc: type(exc).__name__)
async def test_the_counter_store_translates_every_client_fault(
    store: Redis, monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    async with ReseedCoordinator(store) as coordinator:
        monkeypatch.setattr(store, "get", failing(fault))
        source = CountingSource()
        with pytest.raises(StoreError) as caught:
            await coordinator.get(KEY, source)
    assert caught.value.key == KEY
    assert caught.value.__cause__ is fault
    assert coordinator.stats.store_errors == 1
    assert source.calls == 0


@pytest.fixture
async def masters(servers: EmbeddedServers, store: Redis) -> AsyncIterator[list[Redis]]:
    clients = [Redis.from_url(server.url) for server in servers.redis[1:4]]
    yield clients
    for client in clients:
        await client.aclose()


@pytest.mark.parametrize("fault", CLIENT_FAULTS, ids=lambda exc: type(exc).__name__)
async def test_a_lock_master_failing_outside_redis_errors_degrades_the_lease(
    store: Redis, masters: list[Redis], monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    # pottery counts only RedisError as a failed master: anything else aborts the acquire.
    monkeypatch.setattr(masters[0], "set", failing(fault))
    source = CountingSource()
    async with ReseedCoordinator(store, lock_masters=masters) as coordinator:
        assert await coordinator.get(KEY, source) == DB_VALUE
    stats = coordinator.stats
    assert (stats.lock_degraded, stats.leases_won, stats.seeds_won) == (1, 0, 1)
    assert source.calls == 1
    assert float(await store.get(KEY)) == DB_VALUE


async def test_a_lease_extension_failing_outside_redis_errors_is_retried_then_released(
    store: Redis, masters: list[Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = GatedSource()
    extends = Counter[str]()
    for master in masters:
        real = master.evalsha

        async def evalsha(*args: object, real: Any = real, **kwargs: object) -> object:
            if extends["fail"]:  # the extend script (the lease was taken with SET)
                extends["failed"] += 1
                raise RuntimeError("readuntil() called while another coroutine is waiting")
            return await real(*args, **kwargs)

        monkeypatch.setattr(master, "evalsha", evalsha)
    extends["fail"] = 1
    async with ReseedCoordinator(store, lock_masters=masters, lease=1.0) as coordinator:
        pending = asyncio.create_task(coordinator.get(KEY, source))
        await until(lambda: extends["failed"] >= 1)  # an extension failed
        extends["fail"] = 0
        await until(lambda: coordinator.stats.lease_extensions >= 1)  # the next one holds
        source.gate.set()
        assert await pending == DB_VALUE
    # aclose waited for the release, which ran (the keeper's failure did not abort it).
    assert [await master.keys("redlock:*") for master in masters] == [[], [], []]
    assert coordinator.stats.leases_won == 1


class _FailingPool:
    """An asyncpg pool stand-in whose queries raise ``fault`` (asyncpg's internal client
    errors have no reliable real-server trigger)."""

    def __init__(self, fault: Exception) -> None:
        self.fault = fault

    async def fetchrow(self, *args: object) -> object:
        raise self.fault


@pytest.mark.parametrize(
    "fault",
    [
        asyncpg.exceptions.ProtocolError("unexpected message"),
        asyncpg.exceptions.OutdatedSchemaCacheError("cached statement plan is invalid"),
        asyncio.TimeoutError(),
        ConnectionResetError("Connection lost"),
    ],
    ids=lambda exc: type(exc).__name__,
)
async def test_the_postgres_source_translates_every_driver_fault(fault: Exception) -> None:
    source = PostgresSource(_FailingPool(fault), "SELECT spend FROM t WHERE id = $1")
    with pytest.raises(SourceError) as caught:
        await source.fetch("t1")
    assert caught.value.__cause__ is fault


async def test_a_source_that_never_answers_the_connect_is_a_source_error() -> None:
    # A listener that accepts and then says nothing: asyncpg's connect times out.
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(SourceError):
            await PostgresSource.connect(
                f"postgresql://nobody@127.0.0.1:{port}/db", "SELECT 1", timeout=0.2
            )
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted  # asyncpg did connect, and then gave up waiting


@pytest.mark.parametrize(
    "urls",
    [
        {"url": "localhost:6379"},
        {"url": "redis://127.0.0.1:1/0", "lock_urls": ["http://lock-a"]},
    ],
)
def test_a_bad_redis_url_is_a_configuration_error(urls: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ReseedCoordinator.from_urls(**urls)
