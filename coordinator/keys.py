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
#: Joins a counter key to the names of its auxiliary keys; never part of a counter key.
SEPARATOR = "\x1f"
# Control characters (so SEPARATOR can never occur) and whitespace (unicode-aware, as
# str.isspace).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\s]")
#: How companion keys are named (see :func:`same_slot_prefix`), quoted by its errors.
SLOT_RULE = (
    "companion keys share a counter's slot: a key with a {hash tag} keeps it, a key without"
    " '}' is wrapped as {key}, any other key is refused"
)


def validate_key(key: object) -> str:
    """Return ``key`` if it is a usable counter key, else raise :class:`InvalidKeyError`
    (its companions must be able to share its cluster slot, see :func:`same_slot_prefix`)."""
    text = _valid_text(key)
    same_slot_prefix(text)
    return text


def _valid_text(key: object) -> str:
    """``key`` if it is a str of 1 to MAX_KEY_BYTES UTF-8 bytes with no whitespace or
    control character (counter keys and the fragments joined to them)."""
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
    return f"{same_slot_prefix(key)}{SEPARATOR}fence"


def seed_channel(key: str) -> str:
    """The pub/sub channel on which a successful seed of ``key`` is announced (in the key's
    slot, so that a sharded SPUBLISH from the seed script stays on the key's shard)."""
    return f"{same_slot_prefix(key)}{SEPARATOR}seeded"


def lease_name(key: str, generation: int) -> str:
    """The Redlock resource for rebuilding ``key`` in reset generation ``generation``.

    Scoping the lease to the generation means a reader arriving after a reset never waits
    behind a rebuild that the reset has already doomed. Leases live on the lock masters,
    independent servers rather than a cluster's shards, so their names need no hash tag.
    """
    return f"{key}{SEPARATOR}lease{SEPARATOR}{generation}"


def hash_tag(key: str) -> str | None:
    """The part of ``key`` that Redis Cluster hashes when it is not the whole key: the text
    between the first ``{`` and the first ``}`` after it, if that is not empty."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1 : end] if end > start + 1 else None


def same_slot_prefix(key: str) -> str:
    """``key`` as the prefix of its companion keys (fence, seed channel, markers), which
    therefore share its Redis Cluster hash slot; the same names on a single server, so a
    deployment moves to a cluster without renaming anything. The rule (:data:`SLOT_RULE`):

    * a key with a hash tag keeps it: the tag stays the first one in every companion;
    * a key without ``}`` becomes ``{key}``: its tag is then the whole key (an unclosed
      ``{`` included), which hashes exactly as the key does;
    * any other key (a ``}`` but no tag, as in ``a}b`` or ``a{}b``) hashes as a whole,
      which no longer name can: it is refused with :class:`InvalidKeyError`.
    """
    if hash_tag(key) is not None:
        return key
    if "}" not in key:
        return f"{{{key}}}"
    raise InvalidKeyError(
        f"counter key {key!r} has a '}}' but no hash tag, so no companion key can share"
        f" its Redis Cluster slot ({SLOT_RULE})",
        key=key,
    )


def applied_key(key: str, spend_id: str) -> str:
    """The marker saying that spend ``spend_id`` is already counted in counter ``key``.

    ``spend_id`` must be a valid key fragment (no whitespace or control characters).
    """
    _valid_text(spend_id)
    return f"{same_slot_prefix(key)}{SEPARATOR}applied{SEPARATOR}{spend_id}"


def holds_key(key: str) -> str:
    """The hash of budget holds (reservations in flight) against counter ``key``, in its slot."""
    return f"{same_slot_prefix(key)}{SEPARATOR}holds"
