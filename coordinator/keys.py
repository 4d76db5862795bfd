"""Counter keys and the auxiliary keys derived from them.

A counter key may contain any printable character except ASCII control characters, so the
unit separator (0x1F) can never appear in one: joining auxiliary names with it makes every
derived key impossible to confuse with a user's counter key, whatever naming scheme the user
has (``a:fence`` would collide with a user's counter called ``a:fence``).
"""

from __future__ import annotations

import re

from .errors import InvalidKeyError

MAX_KEY_BYTES = 1024
_SEP = "\x1f"
# Control characters (so _SEP can never occur) and whitespace (unicode-aware, as str.isspace).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\s]")


def validate_key(key: object) -> str:
    """Return ``key`` if it is a usable counter key, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"counter key must be str, got {type(key).__name__}: {key!r}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"counter key is not valid UTF-8: {key!r}", key=key) from exc
    if not size:
        raise InvalidKeyError("counter key must not be empty", key=key)
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(
            f"counter key is longer than {MAX_KEY_BYTES} bytes: {key[:40]!r}...", key=key
        )
    bad = _FORBIDDEN.search(key)
    if bad is not None:
        raise InvalidKeyError(
            f"counter key contains whitespace or a control character {bad.group()!r}: {key!r}",
            key=key,
        )
    return key


def fence_key(key: str) -> str:
    """The hash holding the key's fencing token (``t``) and reset generation (``g``)."""
    return f"{key}{_SEP}fence"


def seed_channel(key: str) -> str:
    """The pub/sub channel on which a successful seed of ``key`` is announced."""
    return f"{key}{_SEP}seeded"


def lease_name(key: str, generation: int) -> str:
    """The Redlock resource for rebuilding ``key`` in reset generation ``generation``.

    Scoping the lease to the generation means a reader arriving after a reset never waits
    behind a rebuild that the reset has already doomed.
    """
    return f"{key}{_SEP}lease{_SEP}{generation}"


def same_slot_prefix(key: str) -> str:
    """``key`` as the prefix of its companion keys, chosen so that they share its Redis
    Cluster hash slot where possible: a key without braces becomes ``{key}`` (its tag is the
    whole key, so it hashes as the key does); a key with a hash tag stays as it is (its tag
    stays the first one in every companion). A key with an empty or unclosed brace pair
    hashes as a whole, which no longer key can match: it stays as it is too.
    """
    return f"{{{key}}}" if "{" not in key and "}" not in key else key


def applied_key(key: str, spend_id: str) -> str:
    """The marker saying that spend ``spend_id`` is already counted in counter ``key``.

    ``spend_id`` must be a valid key fragment (no whitespace or control characters).
    """
    validate_key(spend_id)
    return f"{same_slot_prefix(key)}{_SEP}applied{_SEP}{spend_id}"


def holds_key(key: str) -> str:
    """The hash of budget holds (reservations in flight) against counter ``key``, in its slot."""
    return f"{same_slot_prefix(key)}{_SEP}holds"
