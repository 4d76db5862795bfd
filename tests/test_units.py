"""Pure logic, no servers: singleflight, key validation, strict value conversion."""

from __future__ import annotations

import asyncio
import gc
import math
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.errors import CorruptCounterError, InvalidKeyError, InvalidValueError
from coordinator.keys import MAX_KEY_BYTES, fence_key, lease_name, validate_key
from coordinator.singleflight import SingleFlight
from coordinator.values import MAX_VALUE, check_amount, check_loaded, format_value, parse_stored

KEY = "spend:key:k1"


class Work:
    """A flight body that counts its runs and finishes only when released."""

    def __init__(self, result: str = "done", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False

    def __call__(self) -> Coroutine[Any, Any, str]:
        return self._run()

    async def _run(self) -> str:
        self.runs += 1
        self.started.set()
        await self.release.wait()
        self.finished = True
        if self.error is not None:
            raise self.error
        return self.result


async def _callers(
    flight: SingleFlight[str, str], work: Callable[[], Coroutine[Any, Any, str]], n: int
) -> list[asyncio.Task[tuple[str, bool]]]:
    tasks = [asyncio.create_task(flight.do("k", work)) for _ in range(n)]
    await asyncio.sleep(0)  # let every caller register before the flight is released
    return tasks


# -- SingleFlight ----------------------------------------------------------------------


async def test_singleflight_shares_one_run_and_its_result() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    tasks = await _callers(flight, work, 5)
    work.release.set()
    outcomes = await asyncio.gather(*tasks)
    assert work.runs == 1
    assert [value for value, _ in outcomes] == ["done"] * 5
    assert [joined for _, joined in outcomes] == [False, True, True, True, True]
    assert flight.in_flight() == []


async def test_singleflight_shares_the_exception_and_marks_it_retrieved() -> None:
    unretrieved: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    flight: SingleFlight[str, str] = SingleFlight()
    boom = RuntimeError("boom")
    work = Work(error=boom)
    tasks = await _callers(flight, work, 3)
    work.release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes == [boom, boom, boom]
    assert all(outcome is boom for outcome in outcomes)

    # A flight whose every caller gave up must not log "exception was never retrieved".
    lonely = Work(error=RuntimeError("nobody listens"))
    (caller,) = await _callers(flight, lonely, 1)
    (orphan,) = flight.in_flight()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    lonely.release.set()
    await asyncio.wait([orphan])
    del caller, tasks, orphan
    gc.collect()
    assert unretrieved == []


async def test_singleflight_caller_cancellation_leaves_the_flight_running() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    work = Work()
    first, second = await _callers(flight, work, 2)
    await work.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    work.release.set()
    assert await second == ("done", True)
    assert work.finished


async def test_singleflight_forget_detaches_the_flight() -> None:
    flight: SingleFlight[str, str] = SingleFlight()
    old, new = Work("old"), Work("new")
    (old_caller,) = await _callers(flight, old, 1)
    flight.forget("k")
    (new_caller,) = await _callers(flight, new, 1)
    old.release.set()
    assert await old_caller == ("old", False)
    # The old flight landing must not unregister the new one: a later caller joins it.
    (late_caller,) = await _callers(flight, Work("never"), 1)
    new.release.set()
    assert await new_caller == ("new", False)
    assert await late_caller == ("new", True)
    assert (old.runs, new.runs) == (1, 1)


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "litellm:spend:team:7f3a",
        "x" * MAX_KEY_BYTES,
        "é" * (MAX_KEY_BYTES // 2),  # 2 bytes each: exactly the limit
        "€uro:😀",
    ],
)
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "x" * (MAX_KEY_BYTES + 1),
        "é" * (MAX_KEY_BYTES // 2) + "x",  # the limit is in UTF-8 bytes, not characters
        "a\u00a0b",  # non-ASCII whitespace
        "a\u2028b",
        "a\x1fb",  # the separator of derived keys
        "a\ud83db",
    ],
)
def test_validate_key_refuses(key: str) -> None:
    with pytest.raises(InvalidKeyError) as caught:
        validate_key(key)
    assert caught.value.key == key


def test_derived_keys_cannot_collide_with_counter_keys() -> None:
    for derived in (fence_key(KEY), lease_name(KEY, 7)):
        assert KEY in derived
        with pytest.raises(InvalidKeyError):
            validate_key(derived)
    assert lease_name(KEY, 7) != lease_name(KEY, 8)


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"0", 0.0),
        (b"12", 12.0),
        ("12.5", 12.5),
        (b"-3.25", -3.25),  # refunds can take a counter below zero
        (b"0.30000000000000004", 0.1 + 0.2),
        (b"1e-05", 1e-05),
    ],
)
def test_parse_stored_accepts(raw: bytes | str, expected: float) -> None:
    assert parse_stored(raw, KEY) == expected


@pytest.mark.parametrize(
    "raw", [b"abc", b"", b"nan", b"inf", b"-inf", b"1e999", b"\xff", b" 5", b"1_000", b"0x10"]
)
def test_parse_stored_refuses(raw: bytes) -> None:
    with pytest.raises(CorruptCounterError, match=KEY) as caught:
        parse_stored(raw, KEY)
    assert caught.value.key == KEY


@pytest.mark.parametrize("value", [0, 0.0, 5, 12.5, MAX_VALUE, 10**15])
def test_check_loaded_accepts(value: float) -> None:
    assert check_loaded(value, KEY) == value
    assert isinstance(check_loaded(value, KEY), float)


@pytest.mark.parametrize(
    "value", [-1, -0.01, math.nan, math.inf, MAX_VALUE * 1.5, 10**400, True, "12", None]
)
def test_check_loaded_refuses(value: object) -> None:
    with pytest.raises(InvalidValueError, match=KEY):
        check_loaded(value, KEY)


@pytest.mark.parametrize("amount", [-5, -0.01, 0, 2.5, -MAX_VALUE])
def test_check_amount_accepts_refunds(amount: float) -> None:
    assert check_amount(amount, KEY) == amount


@pytest.mark.parametrize("amount", [math.nan, -math.inf, 1e300, 10**400, False, "1", None])
def test_check_amount_refuses(amount: object) -> None:
    with pytest.raises(InvalidValueError, match=KEY):
        check_amount(amount, KEY)


@given(st.floats(min_value=-MAX_VALUE, max_value=MAX_VALUE, allow_nan=False))
def test_format_value_round_trips_exactly(value: float) -> None:
    back = parse_stored(format_value(value).encode(), KEY)
    # repr tells -0.0 from 0.0, which == does not.
    assert repr(back) == repr(value)


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_format_value_round_trips_integers(value: int) -> None:
    assert parse_stored(format_value(value), KEY) == value
