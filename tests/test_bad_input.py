"""Bad input, table by table: a typed error whose message names the key, nothing written.

Real servers: what "nothing written" and "untouched" mean is checked on the counter store.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis

from coordinator import (
    ConfigurationError,
    CorruptCounterError,
    InvalidKeyError,
    InvalidValueError,
    ReseedCoordinator,
    WrongTypeError,
)
from coordinator.keys import MAX_KEY_BYTES, fence_key

KEY = "litellm:spend:key:sk-1"
DB_VALUE = 100.0

CoordFactory = Callable[..., ReseedCoordinator]


class Loader:
    """Returns ``value`` and counts its calls."""

    def __init__(self, value: object = DB_VALUE) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        return self.value


Operation = Callable[[ReseedCoordinator, Loader, Any], Awaitable[Any]]

# Every public call that takes a key; ``key`` is KEY unless a test varies it.
OPERATIONS: dict[str, Operation] = {
    "get": lambda c, loader, key: c.get(key, loader),
    "increment": lambda c, loader, key: c.increment(key, 1),
    "increment-loader": lambda c, loader, key: c.increment(key, 1, loader=loader),
    "reset": lambda c, loader, key: c.reset(key),
}
READS = ["get", "increment-loader"]


def assert_names(error: BaseException, key: object = KEY) -> None:
    fragment = repr(key)[:30] if key != "" else "empty"
    assert fragment in str(error), f"{str(error)!r} does not name {key!r}"


async def snapshot(store: Redis) -> tuple[Any, int]:
    """The key's serialized value (any Redis type) and its expiry."""
    return await store.dump(KEY), await store.pttl(KEY)


async def assert_refused_untouched(
    coordinator: ReseedCoordinator, store: Redis, operation: str, error: type[Exception]
) -> None:
    """``operation`` on what is stored at KEY raises ``error`` naming the key, without
    calling the loader or changing the key's value or expiry."""
    before = await snapshot(store)
    loader = Loader()
    with pytest.raises(error) as caught:
        await OPERATIONS[operation](coordinator, loader, KEY)
    assert_names(caught.value)
    assert loader.calls == 0
    assert await snapshot(store) == before


# -- keys ------------------------------------------------------------------------------

BAD_KEYS = [
    pytest.param(5, id="int"),
    pytest.param(None, id="None"),
    pytest.param(b"spend:k", id="bytes"),
    pytest.param("", id="empty"),
    pytest.param("k" * (MAX_KEY_BYTES + 1), id="too-long"),
    pytest.param("spend k", id="space"),
    pytest.param("spend\nk", id="newline"),
    pytest.param("spend\x00k", id="nul"),
    pytest.param("spend\x1fk", id="unit-separator"),
    pytest.param("spend\x7fk", id="del"),
    pytest.param("spend\ud800k", id="lone-surrogate"),
]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_key_is_refused_and_nothing_written(
    make_coordinator: CoordFactory, store: Redis, key: object, operation: str
) -> None:
    loader = Loader()
    with pytest.raises(InvalidKeyError) as caught:
        await OPERATIONS[operation](make_coordinator(), loader, key)
    assert_names(caught.value, key)
    assert loader.calls == 0
    assert await store.dbsize() == 0


# -- increment amounts -----------------------------------------------------------------


@pytest.mark.parametrize("amount", [math.nan, math.inf, -math.inf, "1", None, True, 1e300, 10**400])
@pytest.mark.parametrize("with_loader", [False, True])
async def test_bad_amount_is_refused_and_the_counter_unchanged(
    make_coordinator: CoordFactory, store: Redis, amount: object, with_loader: bool
) -> None:
    await store.set(KEY, "10", px=60_000)
    before = await store.get(KEY)
    loader = Loader() if with_loader else None
    with pytest.raises(InvalidValueError) as caught:
        await make_coordinator().increment(KEY, amount, loader=loader)
    assert_names(caught.value)
    assert await store.get(KEY) == before
    assert loader is None or loader.calls == 0


# -- loader results --------------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [math.nan, math.inf, -1, -0.5, "12", None, True, Decimal("12"), 10**400, 1e16],
)
@pytest.mark.parametrize("operation", READS)
async def test_bad_loader_result_is_refused_and_nothing_written(
    make_coordinator: CoordFactory, store: Redis, result: object, operation: str
) -> None:
    loader = Loader(result)
    with pytest.raises(InvalidValueError) as caught:
        await OPERATIONS[operation](make_coordinator(), loader, KEY)
    assert_names(caught.value)
    assert loader.calls == 1
    # A rebuild attempt may create the fence hash; nothing else, and never the counter.
    assert set(await store.keys("*")) <= {fence_key(KEY).encode()}


async def test_a_sync_loader_is_refused(make_coordinator: CoordFactory, store: Redis) -> None:
    with pytest.raises(InvalidValueError) as caught:
        await make_coordinator().get(KEY, lambda: DB_VALUE)
    assert_names(caught.value)
    assert await store.get(KEY) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda coord: coord.get(KEY, DB_VALUE),
        lambda coord: coord.get_many([(KEY, DB_VALUE)]),
        lambda coord: coord.increment(KEY, 1.0, loader=DB_VALUE),
    ],
    ids=["get", "get_many", "increment"],
)
async def test_a_non_callable_loader_is_a_configuration_error(
    make_coordinator: CoordFactory, store: Redis, call: Callable[[Any], Awaitable[Any]]
) -> None:
    coordinator = make_coordinator()
    with pytest.raises(ConfigurationError) as caught:
        await call(coordinator)
    assert_names(caught.value)
    assert coordinator.stats.loader_errors == 0
    assert await store.keys("*") == []


@pytest.mark.parametrize("url", ["http://x", "redis://x:notaport", ""])
@pytest.mark.parametrize("where", ["store", "lock"])
def test_a_bad_redis_url_is_a_configuration_error(url: str, where: str) -> None:
    store, locks = (url, []) if where == "store" else ("redis://127.0.0.1:1", [url])
    with pytest.raises(ConfigurationError, match="invalid Redis URL"):
        ReseedCoordinator.from_urls(store, lock_urls=locks)


# -- what is stored at the key ---------------------------------------------------------

# Python's float() takes whitespace and underscores, INCRBYFLOAT takes hex and exponents
# beyond a double: get and increment must both refuse all of them, and rewrite nothing.
STORED = ["abc", "", "nan", "inf", "-inf", "1e999", "0x10", " 5", "5 ", "1_000"]


@pytest.mark.parametrize("operation", READS)
@pytest.mark.parametrize("raw", STORED)
async def test_non_numeric_stored_value_is_corrupt_and_untouched(
    make_coordinator: CoordFactory, store: Redis, raw: str, operation: str
) -> None:
    await store.set(KEY, raw)
    await assert_refused_untouched(make_coordinator(), store, operation, CorruptCounterError)


_WRITERS: dict[str, Callable[[Redis], Awaitable[Any]]] = {
    "hash": lambda store: store.hset(KEY, "spend", "5"),
    "list": lambda store: store.rpush(KEY, "5"),
    "set": lambda store: store.sadd(KEY, "5"),
    "zset": lambda store: store.zadd(KEY, {"spend": 5.0}),
}


@pytest.mark.parametrize("kind", _WRITERS)
@pytest.mark.parametrize("operation", [*READS, "increment"])
async def test_wrong_redis_type_is_refused_and_untouched(
    make_coordinator: CoordFactory, store: Redis, kind: str, operation: str
) -> None:
    await _WRITERS[kind](store)
    await assert_refused_untouched(make_coordinator(), store, operation, WrongTypeError)
