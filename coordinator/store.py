"""The counter store: every read and write of a counter, each one Redis round trip.

Writes that must be atomic (seed, increment, reset, token grant) are Lua scripts, so they
work the same on Redis 6.2 and 7.x (``SET NX GET`` would need 7.0) and never race with each
other. Lua numbers are doubles: counter values cross the script boundary as strings, and
tokens (integers below 2**53) as integer replies, never through tostring (which rounds).

Each counter ``K`` has a fence hash ``K<US>fence`` (see :mod:`coordinator.keys`) with two
fields: ``t``, the last fencing token granted, and ``g``, the reset generation. Both start
from the server clock in microseconds when the hash is created, so tokens keep growing even
after the hash expires or the server loses its data: a holder paused for a long time can
never find its old token current again.

Counters that take spends exactly once (:meth:`CounterStore.apply`) also have one marker
per counted spend, ``applied_key(K, spend_id)``, set only when ``K``'s value includes that
spend, by exactly two scripts: the apply that adds it, and the seed whose value was read
from a snapshot that includes it. A marker may outlive ``K``: any later rebuild of ``K``
reads a source that includes the spend too.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from redis.asyncio import Redis, RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, RedisError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import (
    ConfigurationError,
    CorruptCounterError,
    InvalidValueError,
    ReseedTimeoutError,
    StoreError,
    WrongTypeError,
)
from .keys import applied_key, fence_key, holds_key, seed_channel
from .values import Snapshot, format_value, ms_text, parse_stored

T = TypeVar("T")
log = logging.getLogger(__name__)

#: What else redis-py lets escape when a connection breaks under a command (besides its
#: ``RedisError``): raw socket errors, asyncio timeouts, and the ``RuntimeError`` /
#: ``AttributeError`` of a connection reconnected or closed by another coroutine.
CLIENT_FAULTS: tuple[type[Exception], ...] = (
    OSError,
    asyncio.TimeoutError,
    RuntimeError,
    AttributeError,
)
_FAULTS: tuple[type[Exception], ...] = (RedisError, *CLIENT_FAULTS)
# Failures after which an idempotent command is sent once more: a stale pooled connection,
# and a cluster mid-failover or mid-migration (the cluster client re-reads its slot map
# after each of them before the next command).
_RESEND_IDEMPOTENT: tuple[type[Exception], ...] = (
    RedisConnectionError,
    ClusterDownError,
    TryAgainError,
)
# Failures after which a cluster's slot map may be stale (a master died or was replaced).
_REMAP: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, ClusterDownError)

# Creates the fence hash if missing and refreshes its expiry. Shared by every script below.
_ENSURE_FENCE = """
local fence, fence_ttl = KEYS[2], tonumber(ARGV[1])
if redis.call('EXISTS', fence) == 0 then
  local now = redis.call('TIME')
  local start = now[1] .. string.format('%06d', tonumber(now[2]))
  redis.call('HSET', fence, 't', start, 'g', start)
end
if fence_ttl > 0 then redis.call('PEXPIRE', fence, fence_ttl) end
"""

#: Lua: ``is_counter(text)``, the grammar of :func:`coordinator.values.parse_stored` (a plain,
#: finite decimal), for every script that must refuse a corrupt counter before writing.
LUA_COUNTER_GRAMMAR = """
local function plain(s)
  for _, form in ipairs({'^[+-]?%d+%.?%d*', '^[+-]?%.%d+'}) do
    local mantissa = s:match(form)
    if mantissa then
      local rest = s:sub(#mantissa + 1)
      if rest == '' or rest:match('^[eE][+-]?%d+$') then return true end
    end
  end
  return false
end
local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end
local function is_counter(s) return plain(s) and finite(tonumber(s)) end
"""

# Miss path: the counter (if it appeared) and the generation that names the lease.
_PROBE = _ENSURE_FENCE + """
return {redis.call('GET', KEYS[1]), redis.call('HGET', fence, 'g')}
"""

# Winner: a new fencing token, and the re-check of the counter, in one round trip.
_TOKEN = _ENSURE_FENCE + """
local token = redis.call('HINCRBY', fence, 't', 1)
return {token, redis.call('GET', KEYS[1])}
"""

# Fenced SET NX: write only if the counter is absent and our token is still the newest;
# announce a write on the counter's channel so that waiting losers wake at once (ARGV[5]
# 'sharded': with SPUBLISH, which stays on the counter's shard of a cluster).
_SEED = """
local current = redis.call('GET', KEYS[1])
if current then return {'present', current} end
if redis.call('HGET', KEYS[2], 't') ~= ARGV[2] then
  return {'fenced', false, redis.call('HGET', KEYS[2], 'g')}
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call(ARGV[5] == 'sharded' and 'SPUBLISH' or 'PUBLISH', ARGV[4], ARGV[1])
return {'won', ARGV[1]}
"""

# Increments never create a counter: a partial counter would win every later SET NX.
# The current value must pass the grammar of values.parse_stored first: INCRBYFLOAT would
# happily rewrite hex or an out-of-range exponent, turning a corrupt counter into a number.
_INCREMENT = LUA_COUNTER_GRAMMAR + """
local current = redis.call('GET', KEYS[1])
if not current then return false end
if not is_counter(current) then
  return redis.error_reply('CORRUPT counter holds a non-numeric value')
end
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return value
"""

# Bumping the token fences out every rebuild in flight; bumping the generation gives
# readers after the reset a fresh lease instead of the doomed holder's. KEYS[3..]: the
# markers of spends the reset wiped out of the source (ARGV[2] their expiry in ms), set with
# the DEL: an apply of one still in flight must not add it to the rebuilt counter.
_RESET = _ENSURE_FENCE + """
redis.call('HINCRBY', fence, 't', 1)
local generation = redis.call('HINCRBY', fence, 'g', 1)
redis.call('DEL', KEYS[1])
for i = 3, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', ARGV[2]) end
return generation
"""


# The fenced seed of a Snapshot: _SEED, then, only if it wrote the value, the markers of the
# spends that value includes (KEYS[3..], ARGV[6] their expiry in ms). Atomic with the write,
# so no apply of those spends can slip between them; a seed that finds the counter present
# or is fenced writes no marker, since its value is not the one counted.
_SEED_APPLIED = (
    "local outcome = (function()\n"
    + _SEED
    + """end)()
if outcome[1] == 'won' then
  for i = 3, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', ARGV[6]) end
end
return outcome
"""
)

# Exactly-once add: _INCREMENT, unless the spend's marker (KEYS[3]) says it is counted
# already; the marker is set with the add (ARGV[3]: its expiry in ms). A missing counter
# is never created, and the marker is set all the same: every later seed holds the spend
# (ledger: the source has it; lagging: the caller adds it to the rebuilt counter), so a
# late apply of it (a record paused past the drain that settled its row, a script delivered
# after a stall) must add nothing. ARGV[4] 'fence' (ledger) also bumps the token: a rebuild
# whose read predates the spend must not seed.
_APPLY = (
    """if redis.call('EXISTS', KEYS[3]) == 1 then return {'duplicate', false} end
local value = (function()
"""
    + _INCREMENT
    + """end)()
if type(value) == 'table' then return value end  -- _INCREMENT's error reply: nothing written
if value then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {'applied', value}
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
if ARGV[4] == 'fence' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 't', 1)
end
return {'missing', false}
"""
)

# Budget reservation: KEYS are (counter, holds hash) pairs, one per budgeted entity; ARGV[1]
# the hold's id, ARGV[2] its amount, ARGV[3] its lifetime in ms, ARGV[4..] the budgets in
# KEYS order. A hold is ``<expiry ms> <amount>``, the expiry from the server clock (pod
# clocks may disagree), so a pod killed mid-call holds budget only until then: expired holds
# are pruned by every reservation that reads them. The request is refused, holding nothing,
# if any entity's spend + other holds + amount reaches its budget (the comparison of a plain
# check: an amount of 0 makes this exactly that check). A missing counter decides nothing:
# the caller rebuilds it and calls again. A replayed hold id replaces its own hold.
_RESERVE = LUA_COUNTER_GRAMMAR + """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local id, amount, lifetime = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS / 2
local spends, missing = {}, {}
for i = 1, n do
  local current = redis.call('GET', KEYS[2 * i - 1])
  if not current then
    missing[#missing + 1] = i
  elseif not is_counter(current) then
    return redis.error_reply('CORRUPT counter holds a non-numeric value')
  end
  spends[i] = current
end
if #missing > 0 then return {'missing', missing} end
local held, over = {}, {}
for i = 1, n do
  local holds, sum = KEYS[2 * i], 0
  local entries = redis.call('HGETALL', holds)
  for j = 1, #entries, 2 do
    local hold = entries[j + 1]
    local gap = hold:find(' ', 1, true)
    if tonumber(hold:sub(1, gap - 1)) <= now_ms then
      redis.call('HDEL', holds, entries[j])
    elseif entries[j] ~= id then
      sum = sum + tonumber(hold:sub(gap + 1))
    end
  end
  held[i] = string.format('%.17g', sum)
  if tonumber(spends[i]) + sum + amount >= tonumber(ARGV[3 + i]) then over[#over + 1] = i end
end
if #over > 0 then return {'over', spends, held, over} end
local hold = string.format('%.0f', now_ms + lifetime) .. ' ' .. ARGV[2]
for i = 1, n do
  redis.call('HSET', KEYS[2 * i], id, hold)
  -- The hash outlives its newest hold, never much longer.
  redis.call('PEXPIRE', KEYS[2 * i], lifetime)
end
return {'held', spends, held, over}
"""

# Ends a hold on every holds hash in KEYS (ARGV[1]: its id); how many it ended.
_RELEASE = """
local ended = 0
for i = 1, #KEYS do ended = ended + redis.call('HDEL', KEYS[i], ARGV[1]) end
return ended
"""

OnMissing = Literal["fence", "mark"]


@dataclass(frozen=True)
class ApplyOutcome:
    """What an exactly-once add did: ``applied`` (``value`` is the new counter),
    ``duplicate`` (the spend was counted already: nothing added) or ``missing`` (no
    counter: nothing added)."""

    result: Literal["applied", "duplicate", "missing"]
    value: float | None = None


@dataclass(frozen=True)
class SeedOutcome:
    """What the fenced seed did: ``won`` wrote ``value``; ``present`` found ``value``
    already stored; ``fenced`` wrote nothing because a newer token exists (``value`` None,
    ``generation`` the reset generation now current, to tell a reset from a newer rebuild)."""

    result: Literal["won", "present", "fenced"]
    value: float | None
    generation: int | None = None


@dataclass(frozen=True)
class ReserveOutcome:
    """What a budget reservation did: ``held`` (the amount is held against every counter),
    ``over`` (refused: nothing held) or ``missing`` (a counter is missing: nothing read or
    held). ``spends`` and ``held`` (the other holds in force) are in key order; ``indices``
    are the positions of the over-budget counters, or of the missing ones."""

    result: Literal["held", "over", "missing"]
    spends: tuple[float, ...] = ()
    held: tuple[float, ...] = ()
    indices: tuple[int, ...] = ()


def slot_groups(client: object, keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` grouped by what one script may touch: all of them on one
    server; those of one hash slot on a Redis Cluster (a counter's companions share its
    slot, see :func:`coordinator.keys.same_slot_prefix`)."""
    if not isinstance(client, RedisCluster):
        return [list(range(len(keys)))]
    groups: dict[int, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key_slot(key.encode("utf-8")), []).append(position)
    return list(groups.values())


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class CounterStore:
    """Counter reads and atomic writes on one ``redis.asyncio.Redis`` client, or a
    ``RedisCluster`` client (every script's keys share the counter's slot, see
    :func:`coordinator.keys.same_slot_prefix`)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        fence_ttl: float | None = 86400.0,
        replicas: int = 0,
        replica_timeout: float = 0.1,
    ) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigurationError(f"replicas must be an int >= 0, got {replicas!r}")
        if not isinstance(replica_timeout, (int, float)) or not 0 < replica_timeout < math.inf:
            raise ConfigurationError(
                f"replica_timeout must be a positive number of seconds, got {replica_timeout!r}"
            )
        self.client = client
        self._replicas = replicas
        self._replica_timeout_ms = max(1, round(replica_timeout * 1000))
        # A cluster client used from many tasks before it has read the slot map misroutes
        # commands and can tear itself down under them: the first command reads it alone.
        self._unmapped = isinstance(client, RedisCluster)
        self._mapped_once = False
        self._mapping = asyncio.Lock()
        #: Writes (seeds, increments, applies) the replicas did not acknowledge in time.
        self.under_replicated = 0
        self._under = False
        #: Whether seeds are announced with sharded pub/sub (SPUBLISH): on a cluster of
        #: Redis/Valkey >= 7, known once the slot map is read.
        self.sharded = False
        self._fence_ttl = ms_text(fence_ttl)
        self._probe = client.register_script(_PROBE)
        self._token = client.register_script(_TOKEN)
        self._seed = client.register_script(_SEED)
        self._increment = client.register_script(_INCREMENT)
        self._reset = client.register_script(_RESET)
        self._seed_applied = client.register_script(_SEED_APPLIED)
        self._apply = client.register_script(_APPLY)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    async def read(self, key: str) -> float | None:
        """The hot path: one GET."""
        raw = await self._call(key, lambda: self.client.get(key), idempotent=True)
        return None if raw is None else parse_stored(raw, key)

    async def read_many(self, keys: list[str]) -> list[float | None]:
        """Several counters in one MGET round trip (a wrong-type key reads as missing;
        the rebuild's GET then raises :class:`WrongTypeError` for it)."""
        raws = await self._call(keys[0], lambda: self._get_many(keys), idempotent=True)
        pairs = zip(keys, raws, strict=True)
        return [None if raw is None else parse_stored(raw, key) for key, raw in pairs]

    async def _get_many(self, keys: list[str]) -> list[bytes | str | None]:
        client = self.client
        if not isinstance(client, RedisCluster):
            return await client.mget(keys)
        # One MGET would be refused (CROSSSLOT) unless every key shares a slot; a cluster
        # pipeline sends one batch per node, to all nodes at once.
        pipe = client.pipeline()
        for key in keys:
            pipe.get(key)
        return await pipe.execute()

    async def probe(self, key: str) -> tuple[float | None, int]:
        """The counter if present, and the current reset generation."""
        raw, generation = await self._script(self._probe, key, idempotent=True)
        value = None if raw is None else parse_stored(raw, key)
        return value, int(_text(generation))

    async def take_token(self, key: str) -> tuple[int, float | None]:
        """A new fencing token for ``key``, and the counter if someone seeded it already."""
        # Sent again after a stale connection fails it: a replay only skips a token that
        # nobody holds (a restarted store leaves every pooled connection stale).
        token, raw = await self._script(self._token, key, idempotent=True)
        return int(token), None if raw is None else parse_stored(raw, key)

    async def seed(self, key: str, value: float, token: int, ttl: float | None) -> SeedOutcome:
        """Fenced SET NX of ``value`` under ``token``; a :class:`~coordinator.values.Snapshot`
        marks the spends it includes applied in the same script."""
        keys = [key, fence_key(key)]
        publish = "sharded" if self.sharded else "plain"
        args = [format_value(value), str(token), ms_text(ttl), seed_channel(key), publish]
        script = self._seed
        if isinstance(value, Snapshot) and value.applied:
            script = self._seed_applied
            keys += [applied_key(key, spend_id) for spend_id in value.applied]
            args.append(ms_text(value.applied_ttl))
        result, raw, *rest = await self._call(
            key,
            lambda: self._write(key, script, keys, args, lambda reply: _text(reply[0]) == "won"),
            idempotent=True,  # a replay finds its own write "present", or is fenced again
        )
        kind = _text(result)
        if kind == "fenced":
            generation = rest[0] if rest else None
            return SeedOutcome("fenced", None, None if generation is None else int(generation))
        stored = parse_stored(raw, key)
        return SeedOutcome("won" if kind == "won" else "present", stored)

    async def increment(self, key: str, amount: float, ttl: float | None) -> float | None:
        """INCRBYFLOAT if (and only if) the counter exists; its new value, else None."""
        args = [format_value(amount), ms_text(ttl)]
        raw = await self._call(
            key, lambda: self._write(key, self._increment, [key], args, _wrote_value)
        )
        return None if raw is None else parse_stored(raw, key)

    async def apply(
        self,
        key: str,
        spend_id: str,
        amount: float,
        ttl: float | None,
        marker_ttl: float,
        on_missing: OnMissing,
    ) -> ApplyOutcome:
        """Add spend ``spend_id`` to the counter unless it is counted already (see
        ``_APPLY``; ``marker_ttl``: how long the spend is remembered)."""
        marker = applied_key(key, spend_id)
        keys = [key, fence_key(key), marker]
        args = [format_value(amount), ms_text(ttl), ms_text(marker_ttl), on_missing]
        kind, raw = await self._call(
            key,
            lambda: self._write(
                key, self._apply, keys, args, lambda reply: _text(reply[0]) == "applied"
            ),
            idempotent=True,  # the marker makes a replay a duplicate
        )
        result = _text(kind)
        if result == "applied":
            return ApplyOutcome("applied", parse_stored(raw, key))
        return ApplyOutcome("duplicate" if result == "duplicate" else "missing")

    async def reserve(
        self, keys: list[str], hold_id: str, amount: float, budgets: list[float], lifetime: float
    ) -> ReserveOutcome:
        """Hold ``amount`` against every counter in ``keys`` for ``lifetime`` seconds, in one
        script, unless one of them would reach its budget (see ``_RESERVE``)."""
        script_keys = [name for key in keys for name in (key, holds_key(key))]
        args = [hold_id, format_value(amount), ms_text(lifetime), *map(format_value, budgets)]
        kind, *rest = await self._call(
            keys[0],
            lambda: self._reserve(keys=script_keys, args=args),
            idempotent=True,  # a replay replaces its own hold
        )
        result = _text(kind)
        if result == "missing":
            return ReserveOutcome("missing", indices=tuple(int(i) - 1 for i in rest[0]))
        raw_spends, raw_held, over = rest
        return ReserveOutcome(
            "over" if result == "over" else "held",
            tuple(parse_stored(raw, key) for raw, key in zip(raw_spends, keys, strict=True)),
            tuple(float(_text(raw)) for raw in raw_held),
            tuple(int(i) - 1 for i in over),
        )

    async def release(self, keys: list[str], hold_id: str) -> int:
        """End hold ``hold_id`` on every counter in ``keys``; how many holds it ended."""
        return int(
            await self._call(
                keys[0],
                lambda: self._release(keys=[holds_key(key) for key in keys], args=[hold_id]),
                idempotent=True,
            )
        )

    async def reset(
        self, key: str, counted: Sequence[str] = (), marker_ttl: float | None = None
    ) -> int:
        """Fence out every rebuild in flight and delete the counter; the new generation.
        ``counted``: spend ids to mark counted with the delete (see ``_RESET``)."""
        markers = [applied_key(key, spend_id) for spend_id in counted]
        raw = await self._call(
            key,
            lambda: self._reset(
                keys=[key, fence_key(key), *markers], args=[self._fence_ttl, ms_text(marker_ttl)]
            ),
        )
        return int(raw)

    async def _write(
        self,
        key: str,
        script: AsyncScript,
        keys: list[str],
        args: list[str],
        wrote: Callable[[Any], bool],
    ) -> Any:
        """``script``'s reply; with ``replicas``, followed by ``WAIT`` on the same connection
        (WAIT counts the replicas that have the connection's own writes), pipelined.

        A write the replicas did not acknowledge in time is logged, not raised: it is
        applied on the master, and an error would invite the caller to resend it (which
        would count an increment twice). ``wrote``: whether the reply says it wrote.
        """
        if not self._replicas:
            return await script(keys=keys, args=args)
        pipe = self.client.pipeline(transaction=False)
        # EVAL, not EVALSHA: a pipeline cannot load a script a new master has never seen.
        source = cast(str, script.script)  # every script here is registered from a str
        pipe.eval(source, len(keys), *keys, *args)
        wait = ("WAIT", self._replicas, self._replica_timeout_ms)
        if isinstance(self.client, RedisCluster):
            # Not every master (WAIT's default route): the one the script ran on.
            pipe.execute_command(*wait, target_nodes=self.client.get_node_from_key(key))
        else:
            pipe.execute_command(*wait)
        try:
            reply, acknowledged = await pipe.execute()
        except _REMAP:
            # redis-py re-reads the slot map after a failed command, not after a failed
            # pipeline: without this, every write would go to a dead master forever.
            self._unmapped = isinstance(self.client, RedisCluster)
            raise
        if wrote(reply):
            self._replicated(key, int(acknowledged))
        return reply

    def _replicated(self, key: str, acknowledged: int) -> None:
        if acknowledged >= self._replicas:
            if self._under:
                self._under = False
                log.info("replicas acknowledge writes again", extra={"outcome": "replicated"})
            return
        self.under_replicated += 1
        # Once until writes are acknowledged again: a master left without its replica
        # (after a failover) would otherwise log every write.
        level = logging.DEBUG if self._under else logging.WARNING
        self._under = True
        log.log(
            level,
            "write to %r acknowledged by %s of %s replicas within %s ms: a failover now may "
            "lose it",
            key,
            acknowledged,
            self._replicas,
            self._replica_timeout_ms,
            extra={"outcome": "under_replicated", "key": key},
        )

    async def _script(self, script: Any, key: str, *, idempotent: bool = False) -> Any:
        return await self._call(
            key,
            lambda: script(keys=[key, fence_key(key)], args=[self._fence_ttl]),
            idempotent=idempotent,
        )

    async def _call(
        self, key: str, op: Callable[[], Awaitable[T]], *, idempotent: bool = False
    ) -> T:
        """Run ``op``, translating redis-py errors (and :data:`CLIENT_FAULTS`) into the
        library's.

        A pooled connection left stale by a server restart fails its next command. Reads
        and idempotent scripts (token grants too: a replay only skips a token) are sent once
        more on a fresh connection; increments and resets never are: if the first reply was
        lost, they may have been applied already (which is why clients should be built with
        redis-py's retries off).
        """
        try:
            if isinstance(self.client, RedisCluster) and self._unmapped:
                await self._map_slots(self.client)
            try:
                return await op()
            except _RESEND_IDEMPOTENT:
                if not idempotent:
                    raise
                return await op()
        except ResponseError as exc:
            raise _translate(exc, key) from exc
        except ReseedTimeoutError as exc:  # the deadline passed in the queue: not a fault
            raise ReseedTimeoutError(f"{exc} (on {key!r})", key=key) from exc
        except _FAULTS as exc:
            raise StoreError(
                f"counter store failed on {key!r}: {type(exc).__name__}: {exc}", key=key
            ) from exc

    async def _map_slots(self, cluster: RedisCluster) -> None:
        async with self._mapping:
            if self._unmapped:
                if self._mapped_once:
                    await cluster.nodes_manager.initialize()
                await cluster.initialize()
                self._mapped_once = True
                info = await cluster.info("server")
                # Valkey reports the Redis version it is compatible with (7.2 for 8.x).
                self.sharded = int(str(info["redis_version"]).split(".")[0]) >= 7
                self._unmapped = False


def _wrote_value(reply: Any) -> bool:
    return reply is not None


def _translate(exc: ResponseError, key: str) -> Exception:
    text = str(exc)
    if "WRONGTYPE" in text:
        return WrongTypeError(f"counter {key!r} holds a non-string Redis type", key=key)
    if "not a valid float" in text or text.startswith("CORRUPT"):
        return CorruptCounterError(f"counter {key!r} holds a non-numeric value", key=key)
    if "NaN or Infinity" in text:
        return InvalidValueError(f"increment of {key!r} would make it non-finite", key=key)
    return StoreError(f"counter store refused a command on {key!r}: {text}", key=key)
