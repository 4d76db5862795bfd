"""Only typed errors, ever: under a counter-store restart every call returns a value or
raises a :class:`ReseedError` subclass, never a raw redis-py or asyncio error.

The restart lands while one pod holds the leases of a batch of cold keys (its loader held
by a gate) and another pod's callers wait on the seed announcements (pub/sub), the moment
redis-py's shared PubSub connection is most exposed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

from redis.asyncio import Redis

from coordinator import ReseedCoordinator, ReseedError
from coordinator.keys import seed_channel
from coordinator.lab.embedded import EmbeddedServers

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
