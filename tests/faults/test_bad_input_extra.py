"""Bad input that ``tests/test_bad_input.py`` does not reach: values as a real PostgreSQL
source returns them (through :class:`PostgresSource`, not a Python stub), and ``get_many``.

Each case: a clear typed error, nothing written, what was at the key untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from coordinator import (
    CorruptCounterError,
    InvalidKeyError,
    InvalidValueError,
    LoaderError,
    MissingRowError,
    ReseedCoordinator,
    SourceError,
    WrongTypeError,
)
from coordinator.coordinator import Loader
from coordinator.lab.embedded import EmbeddedServers
from coordinator.sources import PostgresSource

KEY = "litellm:spend:team:bad-source"
OTHER = "litellm:spend:team:fine"

CoordFactory = Callable[..., ReseedCoordinator]


async def only_fences(store: Redis) -> bool:
    """No counter was written: a rebuild attempt may only have left fence hashes."""
    return all(key.endswith(b"\x1ffence") for key in await store.keys("*"))


# The two calls that read the source.
READS: dict[str, Callable[[ReseedCoordinator, Loader], Awaitable[float | None]]] = {
    "get": lambda coordinator, loader: coordinator.get(KEY, loader),
    "increment-loader": lambda coordinator, loader: coordinator.increment(KEY, 1, loader=loader),
}

# What the row (or the query) holds, and the error a caller must get for it.
SOURCE_VALUES = [
    pytest.param("SELECT NULL::numeric", InvalidValueError, id="null"),
    pytest.param("SELECT 'NaN'::numeric", InvalidValueError, id="numeric-nan"),
    pytest.param("SELECT 'Infinity'::float8", InvalidValueError, id="infinity"),
    pytest.param("SELECT -5::numeric", InvalidValueError, id="negative"),
    pytest.param("SELECT 1e300::float8", InvalidValueError, id="huge"),
    pytest.param("SELECT '12'::text", InvalidValueError, id="text"),
    pytest.param("SELECT true", InvalidValueError, id="bool"),
    pytest.param("SELECT 1 WHERE false", MissingRowError, id="no-row"),
    pytest.param("SELECT 1 / 0", SourceError, id="query-error"),
]


@pytest.mark.parametrize(("query", "error"), SOURCE_VALUES)
@pytest.mark.parametrize("operation", READS)
async def test_a_bad_value_from_postgres_is_a_typed_error_and_nothing_written(
    make_coordinator: CoordFactory,
    store: Redis,
    servers: EmbeddedServers,
    query: str,
    error: type[Exception],
    operation: str,
) -> None:
    assert servers.postgres is not None
    coordinator = make_coordinator()
    async with await PostgresSource.connect(servers.postgres.dsn, query, max_size=1) as source:
        with pytest.raises(error) as caught:
            await READS[operation](coordinator, source.loader())
    # A source's failure reaches the caller as a loader failure, whatever its kind.
    assert isinstance(caught.value, (LoaderError, InvalidValueError))
    assert await only_fences(store)
    assert coordinator.stats.seeds_won == 0


async def fine() -> float:
    return 5.0


@pytest.mark.parametrize("bad", ["", "a b", "k\x00", "x" * 2000, None])
async def test_get_many_refuses_a_bad_key_before_any_read(
    make_coordinator: CoordFactory, store: Redis, bad: object
) -> None:
    with pytest.raises(InvalidKeyError):
        await make_coordinator().get_many([(OTHER, fine), (bad, fine)])
    assert await store.dbsize() == 0


@pytest.mark.parametrize("raw", ["abc", "nan", "0x10", " 5"])
async def test_get_many_refuses_a_corrupt_counter_and_rewrites_nothing(
    make_coordinator: CoordFactory, store: Redis, raw: str
) -> None:
    await store.set(KEY, raw)
    with pytest.raises(CorruptCounterError):
        await make_coordinator().get_many([(OTHER, fine), (KEY, fine)])
    assert await store.get(KEY) == raw.encode()
    assert await store.exists(OTHER) == 0  # refused before any rebuild started


async def test_get_many_refuses_a_wrong_type_and_leaves_it(
    make_coordinator: CoordFactory, store: Redis
) -> None:
    await store.hset(KEY, "spend", "5")
    before = await store.dump(KEY)
    with pytest.raises(WrongTypeError):
        await make_coordinator().get_many([(OTHER, fine), (KEY, fine)])
    assert await store.dump(KEY) == before


@pytest.mark.parametrize("bad", [float("nan"), -1.0, "5", None])
async def test_get_many_refuses_a_bad_loader_value_for_that_key_only(
    make_coordinator: CoordFactory, store: Redis, bad: object
) -> None:
    async def broken() -> object:
        return bad

    coordinator = make_coordinator()
    with pytest.raises(InvalidValueError):
        await coordinator.get_many([(OTHER, fine), (KEY, broken)])
    assert await store.exists(KEY) == 0
    # The good key's rebuild is not undone by its neighbour's bad value.
    assert await coordinator.get(OTHER, fine) == 5.0
