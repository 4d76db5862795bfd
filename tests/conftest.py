"""Shared fixtures: real redis-server processes and a real PostgreSQL, started once per run.

``servers.redis[0]`` is the counter store and ``servers.redis[1:4]`` the three lock masters.
Tests that kill or pause a server use ``own_servers`` (their own processes) so that no other
test sees the fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from patience import PATIENT
from redis.asyncio import Redis

from coordinator import ReseedCoordinator
from coordinator.budget.spend_source import PostgresSpendSource
from coordinator.lab.embedded import EmbeddedServers

CoordFactory = Callable[..., ReseedCoordinator]


@pytest.fixture(scope="session")
def servers() -> Iterator[EmbeddedServers]:
    with EmbeddedServers(redis_count=4, postgres=True) as running:
        yield running


@pytest.fixture
def own_servers() -> Iterator[EmbeddedServers]:
    with EmbeddedServers(redis_count=4, postgres=False) as running:
        yield running


async def _flush(urls: list[str]) -> None:
    for url in urls:
        client = Redis.from_url(url)
        try:
            await client.flushall()
        finally:
            await client.aclose()


@pytest.fixture
async def store(servers: EmbeddedServers) -> AsyncIterator[Redis]:
    """A client on the (flushed) counter store; lock masters are flushed too."""
    await _flush([server.url for server in servers.redis])
    client = Redis.from_url(servers.redis[0].url)
    yield client
    await client.aclose()


def _factory(
    env: EmbeddedServers, defaults: dict[str, float] | None = None
) -> tuple[Callable[..., ReseedCoordinator], Callable[[], Awaitable[None]]]:
    made: list[ReseedCoordinator] = []

    def make(**options: Any) -> ReseedCoordinator:
        options = {**(defaults or {}), **options}
        options.setdefault("lock_urls", [server.url for server in env.redis[1:4]])
        coordinator = ReseedCoordinator.from_urls(env.redis[0].url, **options)
        made.append(coordinator)
        return coordinator

    async def close() -> None:
        for coordinator in made:
            await coordinator.aclose()

    return make, close


@pytest.fixture
async def make_coordinator(
    servers: EmbeddedServers, store: Redis
) -> AsyncIterator[CoordFactory]:
    """Coordinators with their own clients (each one behaves as a separate pod)."""
    make, close = _factory(servers, PATIENT)  # the shared servers are never faulted
    yield make
    await close()


@pytest.fixture
async def make_own_coordinator(own_servers: EmbeddedServers) -> AsyncIterator[CoordFactory]:
    """Like ``make_coordinator`` but on ``own_servers``, for tests that inject faults."""
    make, close = _factory(own_servers)
    yield make
    await close()


@pytest.fixture
async def source(servers: EmbeddedServers) -> AsyncIterator[PostgresSpendSource]:
    """The spend source on the session's PostgreSQL: the shipped schema, every table empty."""
    assert servers.postgres is not None
    spend = await PostgresSpendSource.connect(servers.postgres.dsn, max_size=6)
    await spend.install_schema()
    await spend.pool.execute(
        "TRUNCATE budget_entity, team_member, api_key, spend_ledger, spend_outbox"
    )
    yield spend
    await spend.aclose()
