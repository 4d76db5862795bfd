"""A burst of cold keys on one coordinator: callers past ``max_connections`` wait for a
pooled connection as long as their deadline allows, and never fail for the lack of one."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest

from coordinator import ReseedCoordinator, ReseedTimeoutError

CoordFactory = Callable[..., ReseedCoordinator]

BURST = 5000
# A bound that only a hang reaches: on a loaded 2-core machine the burst alone takes a minute.
WAIT = 600.0


async def test_a_burst_of_cold_gets_waits_for_connections(
    make_coordinator: CoordFactory,
) -> None:
    coordinator = make_coordinator(max_connections=50)
    reads: Counter[str] = Counter()

    def loader(key: str, value: float) -> Callable[[], asyncio.Future[float]]:
        async def load() -> float:
            reads[key] += 1
            await asyncio.sleep(0.001)  # a DB round trip, so that the burst overlaps
            return value

        return load  # type: ignore[return-value]

    keys = [f"burst:{i}" for i in range(BURST)]
    values = await asyncio.gather(
        *(coordinator.get(key, loader(key, float(i)), wait=WAIT) for i, key in enumerate(keys)),
        return_exceptions=True,
    )
    failures = Counter(type(value).__name__ for value in values if isinstance(value, Exception))
    assert not failures
    assert values == [float(i) for i in range(BURST)]
    assert coordinator.stats.store_errors == 0
    assert sum(reads.values()) == BURST
    assert set(reads.values()) == {1}


async def test_a_burst_past_its_deadline_times_out_typed(make_coordinator: CoordFactory) -> None:
    """A caller whose deadline passes while it queues for a connection gets a typed timeout
    (not a store error), and nothing is written for it."""
    coordinator = make_coordinator(max_connections=1)
    gate = asyncio.Event()

    async def hung() -> float:
        await gate.wait()
        return 1.0

    async def quick() -> float:
        return 2.0

    # The first caller holds the one connection only briefly; the loader hangs, not Redis.
    first = asyncio.ensure_future(coordinator.get("burst:slow", hung, wait=5.0))
    results = await asyncio.gather(
        *(coordinator.get(f"burst:quick:{i}", quick, wait=5.0) for i in range(200)),
        return_exceptions=True,
    )
    assert results == [2.0] * 200
    gate.set()
    assert await first == 1.0
    assert coordinator.stats.store_errors == 0


@pytest.mark.parametrize("wait", [0.001])
async def test_a_deadline_shorter_than_the_queue_is_a_timeout(
    make_coordinator: CoordFactory, wait: float
) -> None:
    coordinator = make_coordinator(max_connections=1)

    async def load() -> float:
        return 3.0

    results = await asyncio.gather(
        *(coordinator.get(f"burst:short:{i}", load, wait=wait) for i in range(300)),
        return_exceptions=True,
    )
    kinds = Counter(type(result).__name__ for result in results)
    assert set(kinds) <= {"float", ReseedTimeoutError.__name__}
    assert kinds[ReseedTimeoutError.__name__] > 0
    assert coordinator.stats.store_errors == 0
