"""Strict conversion between counter values and their stored text."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .errors import ConfigurationError, CorruptCounterError, InvalidValueError

# Beyond 2**53 a double cannot hold every integer; well below it, cents still add exactly
# enough for spend. Larger values are refused rather than silently rounded.
MAX_VALUE = 1e15

# The plain decimal form, and only it: Python's float() also takes " 5", "1_000", "nan" and
# "inf", and Redis's INCRBYFLOAT also takes hex; a counter is what both sides agree on.
# The increment script applies the same grammar (store.py) so get and increment agree.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_stored(raw: bytes | str, key: str) -> float:
    """Parse a stored counter; anything but a finite number is a corrupt counter."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not _NUMBER.fullmatch(text):
        raise CorruptCounterError(
            f"counter {key!r} holds a non-numeric value {text[:60]!r}", key=key
        )
    value = float(text)
    if not math.isfinite(value):
        raise CorruptCounterError(f"counter {key!r} holds a non-finite value {text!r}", key=key)
    return value


def _number(value: object, what: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValueError(
            f"{what} {type(value).__name__} {value!r}; expected an int or float", key=key
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_VALUE:
        raise InvalidValueError(
            f"{what} {value!r}; expected a finite number within +/-{MAX_VALUE:g}", key=key
        )
    return number


def check_loaded(value: object, key: str) -> float:
    """Validate a loader's result: a finite, non-negative int or float (not a bool)."""
    number = _number(value, f"loader for {key!r} returned", key)
    if number < 0:
        raise InvalidValueError(f"loader for {key!r} returned negative {value!r}", key=key)
    return number


def check_amount(amount: object, key: str) -> float:
    """Validate an increment: a finite int or float (negative allowed: refunds)."""
    return _number(amount, f"increment of {key!r} by", key)


def format_value(value: float) -> str:
    """Shortest text that round-trips ``value`` exactly (what INCRBYFLOAT can parse)."""
    return repr(float(value))


def positive_seconds(name: str, value: object) -> float:
    """A setting that must be a positive, finite number of seconds."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def ms_text(seconds: float | None) -> str:
    """Seconds as whole milliseconds for a script argument ("0": no expiry)."""
    return "0" if seconds is None else str(max(1, round(seconds * 1000)))


class Snapshot(float):
    """A loader's value that also names the increments it already includes.

    Read the value and the ids of the increments committed in it but not yet applied to the
    counter from one consistent snapshot of the source: the seed that writes the value marks
    those ids applied in the same script (each marker lives ``applied_ttl`` seconds), so a
    late :meth:`~coordinator.ReseedCoordinator.apply_once` of any of them adds nothing.
    A float, so that any loader may return one and whoever reads the value needs no change.
    """

    applied: tuple[str, ...]
    applied_ttl: float

    def __new__(
        cls, value: float, applied: Iterable[str] = (), applied_ttl: float = 600.0
    ) -> Snapshot:
        snapshot = super().__new__(cls, value)
        snapshot.applied = tuple(applied)
        snapshot.applied_ttl = positive_seconds("applied_ttl", applied_ttl)
        return snapshot
