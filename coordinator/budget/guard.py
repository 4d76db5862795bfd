"""Budget enforcement on spend counters: the read an LLM proxy makes on every request.

Counters live at ``<namespace>:spend:<scope>:<id>`` and are rebuilt from a spend source
(PostgreSQL, see :mod:`coordinator.budget.spend_source`) through a :class:`ReseedCoordinator`, so a
cold counter costs one DB read fleet-wide and never comes back inflated.

Ids are percent-encoded: everything outside ``A-Z a-z 0-9 - . _ ~ @ +`` becomes ``%XX`` (of
its UTF-8 bytes), so an encoded id never holds ``:`` and two ids never share a key. A
``team_member`` id is the pair ``(team_id, user_id)``, encoded part by part and joined by
``:``. Each id part is 1 to :data:`MAX_ID_BYTES` UTF-8 bytes, which keeps every key, even a
team member's in a 64-character namespace, under the coordinator's key limit.

Write modes (how :meth:`BudgetGuard.record_spend` treats a missing counter):

* ``"ledger"``: the source already holds this cost (a synchronous ledger: the spend row is
  updated in the request's own transaction). A missing counter is left missing: its next
  rebuild reads the cost from the source. Any rebuild in flight is fenced out, since its
  DB read may predate the cost (see :meth:`BudgetGuard.record_spend` for the contract).
* ``"lagging"``: the source is written later (a batched writer). A missing counter is
  rebuilt from the source, then the cost is added.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args
from urllib.parse import quote, unquote

from redis.exceptions import RedisError, ResponseError

from ..coordinator import Loader, ReseedCoordinator
from ..errors import (
    ConfigurationError,
    CorruptCounterError,
    InvalidKeyError,
    InvalidValueError,
    MissingRowError,
    ReseedError,
    StoreError,
    WrongTypeError,
)
from ..keys import fence_key, validate_key
from ..singleflight import SingleFlight
from ..store import LUA_COUNTER_GRAMMAR
from ..values import check_amount, format_value, ms_text, parse_stored, positive_seconds

log = logging.getLogger(__name__)

Scope = Literal["key", "team", "team_member", "user", "org", "end_user", "tag"]
SCOPES: tuple[Scope, ...] = get_args(Scope)

WriteMode = Literal["ledger", "lagging"]
WRITE_MODES: tuple[WriteMode, ...] = get_args(WriteMode)

OutagePolicy = Literal["fail-closed", "fail-open", "read-through"]
OUTAGE_POLICIES: tuple[OutagePolicy, ...] = get_args(OutagePolicy)

#: A ``team_member`` id is ``(team_id, user_id)``; every other scope's id is one string.
EntityId = str | tuple[str, str]

DEFAULT_NAMESPACE = "litellm"
MAX_ID_BYTES = 128
MAX_NAMESPACE_CHARS = 64
# Braces allow a Redis Cluster hash tag; ':' is safe because keys parse from the right.
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:{}-]+")
_SAFE = "@+"  # besides quote's always-safe letters, digits and "_.-~"


# -- keys ---------------------------------------------------------------------------------


def _check_scope(scope: object) -> Scope:
    if not isinstance(scope, str) or scope not in SCOPES:
        raise InvalidKeyError(f"unknown budget scope {scope!r}; expected one of {SCOPES}")
    return scope


def _check_namespace(namespace: object) -> str:
    if (
        not isinstance(namespace, str)
        or len(namespace) > MAX_NAMESPACE_CHARS
        or not _NAMESPACE.fullmatch(namespace)
    ):
        raise InvalidKeyError(
            f"namespace must be 1-{MAX_NAMESPACE_CHARS} characters of A-Z a-z 0-9 _ . : {{ }} -,"
            f" got {namespace!r}"
        )
    return namespace


def _encode_part(part: object, what: str) -> str:
    if not isinstance(part, str):
        raise InvalidKeyError(f"{what} must be str, got {type(part).__name__}: {part!r}")
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"{what} is not valid UTF-8: {part!r}") from exc
    if not 0 < size <= MAX_ID_BYTES:
        raise InvalidKeyError(f"{what} must be 1-{MAX_ID_BYTES} UTF-8 bytes, got {size}: {part!r}")
    return quote(part, safe=_SAFE)


def _decode_part(text: str, key: str) -> str:
    try:
        part = unquote(text, errors="strict")
    except UnicodeDecodeError:
        part = ""
    # Only the canonical encoding parses, so parsing is the exact inverse of spend_key.
    if not part or quote(part, safe=_SAFE) != text:
        raise InvalidKeyError(f"not a canonical spend key id {text!r} in {key!r}", key=key)
    return part


def _check_id_type(scope: Scope, entity_id: object) -> None:
    # Before any cache: an unhashable id must fail as a bad id, not as a TypeError.
    if scope == "team_member":
        if not (
            isinstance(entity_id, tuple)
            and len(entity_id) == 2
            and all(isinstance(part, str) for part in entity_id)
        ):
            raise InvalidKeyError(
                f"a team_member id is (team_id, user_id), two str, got {entity_id!r}"
            )
    elif not isinstance(entity_id, str):
        raise InvalidKeyError(
            f"a {scope} id must be str, got {type(entity_id).__name__}: {entity_id!r}"
        )


def encode_entity_id(scope: str, entity_id: EntityId) -> str:
    """The encoded id: ``team:a%3Ab`` for team ``a:b``; ``team_member`` joins two parts."""
    _check_id_type(_check_scope(scope), entity_id)
    return _encode_id(scope, entity_id)


@functools.lru_cache(maxsize=4096)
def _encode_id(scope: str, entity_id: EntityId) -> str:
    if isinstance(entity_id, tuple):
        team, user = entity_id
        return f"{_encode_part(team, 'team_id')}:{_encode_part(user, 'user_id')}"
    return _encode_part(entity_id, f"{scope} id")


def spend_key(scope: str, entity_id: EntityId, namespace: str = DEFAULT_NAMESPACE) -> str:
    """``<namespace>:spend:<scope>:<encoded id>``, validated."""
    _check_id_type(_check_scope(scope), entity_id)
    return _spend_key(scope, entity_id, _check_namespace(namespace))


@functools.lru_cache(maxsize=4096)
def _spend_key(scope: str, entity_id: EntityId, namespace: str) -> str:
    # The hot path: the same entities come back on every request.
    return validate_key(f"{namespace}:spend:{scope}:{_encode_id(scope, entity_id)}")


def parse_spend_key(key: str) -> tuple[str, Scope, EntityId]:
    """The inverse of :func:`spend_key`: ``(namespace, scope, id)``."""
    parts = key.rsplit(":", 4)
    if len(parts) == 5 and parts[1:3] == ["spend", "team_member"]:
        return parts[0], "team_member", (_decode_part(parts[3], key), _decode_part(parts[4], key))
    parts = key.rsplit(":", 3)
    single = [scope for scope in SCOPES if scope != "team_member"]
    if len(parts) != 4 or parts[1] != "spend" or parts[2] not in single:
        raise InvalidKeyError(f"not a spend key: {key!r}", key=key)
    namespace = _check_namespace(parts[0])
    return namespace, _check_scope(parts[2]), _decode_part(parts[3], key)


def request_key(request_id: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """The idempotency marker of a request: ``<namespace>:spend-request:<encoded id>``."""
    encoded = _encode_part(request_id, "request_id")
    return validate_key(f"{_check_namespace(namespace)}:spend-request:{encoded}")


# -- entities -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """One budget holder of a request. ``max_budget`` None: no budget (nothing to enforce)."""

    scope: Scope
    id: EntityId
    max_budget: float | None = None


EntityLike = Entity | tuple[str, EntityId] | tuple[str, EntityId, float | None]


def as_entity(item: EntityLike) -> Entity:
    """An :class:`Entity` from itself or a ``(scope, id[, max_budget])`` tuple, validated."""
    scope: object
    if isinstance(item, Entity):
        scope, entity_id, budget = item.scope, item.id, item.max_budget
    elif isinstance(item, tuple) and len(item) in (2, 3):
        scope, entity_id = item[0], item[1]
        budget = item[2] if len(item) == 3 else None
    else:
        raise InvalidValueError(f"an entity is (scope, id[, max_budget]), got {item!r}")
    checked = _check_scope(scope)
    encode_entity_id(checked, entity_id)
    if budget is not None and (
        isinstance(budget, bool)
        or not isinstance(budget, (int, float))
        or not math.isfinite(budget)
        or budget < 0
    ):
        raise InvalidValueError(
            f"max_budget of {scope} {entity_id!r} must be None or a finite number >= 0, "
            f"got {budget!r}"
        )
    return Entity(checked, entity_id, None if budget is None else float(budget))


# -- errors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overage:
    """An entity whose spend reached its budget."""

    scope: Scope
    id: EntityId
    spend: float
    max_budget: float


class BudgetExceededError(ReseedError):
    """The request is refused: ``scope``/``id`` spent ``spend`` >= ``max_budget``.

    The named entity is the first over-budget one in the request's order; ``exceeded``
    holds every over-budget entity of the request.
    """

    def __init__(self, exceeded: Sequence[Overage], *, key: str | None = None) -> None:
        first = exceeded[0]
        super().__init__(
            f"{first.scope} {first.id!r} is over budget: spend {first.spend:.15g} >= "
            f"max_budget {first.max_budget:.15g}",
            key=key,
        )
        self.scope: Scope = first.scope
        self.id: EntityId = first.id
        self.spend = first.spend
        self.max_budget = first.max_budget
        self.exceeded: tuple[Overage, ...] = tuple(exceeded)


class BudgetUnavailableError(ReseedError):
    """No budget decision could be made: the counter store failed (``__cause__``) and the
    outage policy ``policy`` refuses, or its read-through to the source failed too."""

    def __init__(self, message: str, *, policy: OutagePolicy, key: str | None = None) -> None:
        super().__init__(message, key=key)
        self.policy: OutagePolicy = policy


# -- the guard ----------------------------------------------------------------------------


class SpendSource(Protocol):
    """Where spend is authoritative. ``fetch`` returns the entity's spend; a missing entity
    raises :class:`~coordinator.errors.MissingRowError`."""

    async def fetch(self, scope: Scope, entity_id: EntityId) -> float: ...


class BudgetObserver(Protocol):
    """Metrics hook (e.g. a Prometheus exporter). Called inline: cheap, never raising."""

    def on_refusal(self, scope: str) -> None:
        """A request was refused; ``scope`` is the first over-budget entity's scope."""

    def on_outage(self, policy: str) -> None:
        """The counter store failed and ``policy`` decided the call."""


@dataclass
class BudgetStats:
    checks: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # by the refusal's scope
    outages: int = 0  # calls that met a counter store failure
    allowed_blind: int = 0  # fail-open checks allowed without any spend read
    read_through: int = 0  # checks decided against the source directly
    duplicates: int = 0  # record_spend calls whose request id was already applied


@dataclass(frozen=True)
class SpendRecord:
    """What :meth:`BudgetGuard.record_spend` did: ``duplicate`` (the request id was already
    recorded within the window: nothing applied), else the counters' new values in entity
    order (None where no counter exists, ledger mode)."""

    duplicate: bool
    spends: tuple[float | None, ...]


# KEYS: marker, counters 1..n, their fences 1..n. ARGV: window ms, amount, ttl ms (0: none),
# '1' to fence out rebuilds of missing counters (ledger mode).
# Every counter is checked before anything is written: a script that errors keeps the
# writes it made before the error.
_RECORD = (
    LUA_COUNTER_GRAMMAR
    + """
local n = (#KEYS - 1) / 2
local amount = tonumber(ARGV[2])
local present = {}
for i = 1, n do
  local raw = redis.pcall('GET', KEYS[1 + i])
  if type(raw) == 'table' and raw.err then return redis.error_reply('WRONGTYPE ' .. i) end
  if raw then
    local number = tonumber(raw)
    if not is_counter(raw) then return redis.error_reply('CORRUPT ' .. i) end
    if not finite(number + amount) then return redis.error_reply('NONFINITE ' .. i) end
    present[i] = true
  end
end
if not redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1], 'NX') then return {'duplicate'} end
local ttl = tonumber(ARGV[3])
local out = {'applied'}
for i = 1, n do
  if present[i] then
    out[#out + 1] = redis.call('INCRBYFLOAT', KEYS[1 + i], ARGV[2])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[1 + i], ttl) end
  else
    local fence = KEYS[1 + n + i]
    if ARGV[4] == '1' and redis.call('EXISTS', fence) == 1 then
      redis.call('HINCRBY', fence, 't', 1)
    end
    out[#out + 1] = false
  end
end
return out
"""
)

_SCRIPT_ERROR = re.compile(r"(WRONGTYPE|CORRUPT|NONFINITE) (\d+)(?!\S)")


class BudgetGuard:
    """Per-request budget checks and spend records on coordinated spend counters.

    ``write_mode`` has no default: ``"ledger"`` with a lagging source loses spend, and
    ``"lagging"`` with a ledger source counts it twice. ``outage_policy`` decides a check
    when the counter store fails (``"read-through"``: decide against the source;
    ``"fail-closed"``: raise :class:`BudgetUnavailableError`; ``"fail-open"``: allow).
    ``idempotency_window`` is how long a ``record_spend`` request id is remembered.
    """

    def __init__(
        self,
        coordinator: ReseedCoordinator,
        source: SpendSource,
        *,
        write_mode: WriteMode,
        namespace: str = DEFAULT_NAMESPACE,
        outage_policy: OutagePolicy = "read-through",
        idempotency_window: float = 600.0,
        read_through_timeout: float = 5.0,
        observer: BudgetObserver | None = None,
    ) -> None:
        if write_mode not in WRITE_MODES:
            raise ConfigurationError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
        if outage_policy not in OUTAGE_POLICIES:
            raise ConfigurationError(
                f"outage_policy must be one of {OUTAGE_POLICIES}, got {outage_policy!r}"
            )
        self._window_ms = ms_text(positive_seconds("idempotency_window", idempotency_window))
        self._read_through_timeout = positive_seconds("read_through_timeout", read_through_timeout)
        self.namespace = _check_namespace(namespace)
        self.write_mode: WriteMode = write_mode
        self.outage_policy: OutagePolicy = outage_policy
        self._coordinator = coordinator
        self._source = source
        self._observer = observer
        self._record = coordinator.store.register_script(_RECORD)
        self._direct: SingleFlight[str, float] = SingleFlight()
        self._stats = BudgetStats()
        self._refusals: Counter[str] = Counter()

    @property
    def stats(self) -> BudgetStats:
        """A snapshot of this guard's counters."""
        return BudgetStats(
            checks=self._stats.checks,
            refusals=dict(self._refusals),
            outages=self._stats.outages,
            allowed_blind=self._stats.allowed_blind,
            read_through=self._stats.read_through,
            duplicates=self._stats.duplicates,
        )

    def key(self, scope: str, entity_id: EntityId) -> str:
        """The counter key of an entity in this guard's namespace."""
        return self._key(as_entity((scope, entity_id)))

    def _key(self, item: Entity) -> str:
        # as_entity validated the entity and the constructor the namespace.
        return _spend_key(item.scope, item.id, self.namespace)

    async def check(self, entities: Iterable[EntityLike]) -> list[float | None]:
        """Refuse the request if any entity's spend has reached its budget.

        Returns each entity's spend (None for entities without a budget, which are not read,
        and for every entity when a fail-open outage allowed the request blindly). All
        present counters are read in one MGET; missing ones are rebuilt concurrently.
        Raises :class:`BudgetExceededError` (spend >= max_budget is over).
        """
        items = [as_entity(item) for item in entities]
        keys = [self._key(item) for item in items]
        self._stats.checks += 1
        budgeted = {
            key: item for key, item in zip(keys, items, strict=True) if item.max_budget is not None
        }
        if not budgeted:
            return [None] * len(items)
        try:
            values = await self._coordinator.get_many(
                [(key, self._loader(item)) for key, item in budgeted.items()]
            )
            spends: dict[str, float] = dict(zip(budgeted, values, strict=True))
        except StoreError as exc:
            spends = await self._on_outage(budgeted, exc)
        over = [
            (key, Overage(item.scope, item.id, spends[key], item.max_budget))
            for key, item in zip(keys, items, strict=True)
            if item.max_budget is not None and key in spends and spends[key] >= item.max_budget
        ]
        if over:
            first_key, first = over[0]
            self._refuse(first.scope)
            raise BudgetExceededError([overage for _, overage in over], key=first_key)
        return [
            spends.get(key) if item.max_budget is not None else None
            for key, item in zip(keys, items, strict=True)
        ]

    async def current_spend(self, scope: str, entity_id: EntityId) -> float:
        """The entity's spend, from its counter (rebuilt from the source if missing)."""
        item = as_entity((scope, entity_id))
        return await self._coordinator.get(self._key(item), self._loader(item))

    async def record_spend(
        self, entities: Iterable[EntityLike], cost: float, *, request_id: str
    ) -> SpendRecord:
        """Add ``cost`` to every entity's counter, once per ``request_id`` within the window.

        One Lua call sets the request's marker (if it is already set: a duplicate, nothing is
        applied) and increments every present counter, refreshing its TTL; it never creates
        one. Then, in ``"lagging"`` mode only, each missing counter is rebuilt from the source
        and the cost added (the marker already covers the request, so a retry after a
        failure here applies nothing twice; that counter misses the cost until the source
        has it).

        ``"ledger"`` contract: call this while the transaction that added ``cost`` to the
        source still holds its row locks (``PostgresSpendSource.record(on_locked=...)``), and
        let loaders lock the row they read (``FOR SHARE``). Then a rebuild's read either
        sees the committed cost (and this call found no counter) or predates it (and this
        call either increments the counter it seeded or fences its seed out): every cost is
        counted exactly once.
        """
        items = list({self._key(e): e for e in map(as_entity, entities)}.items())
        marker = request_key(request_id, self.namespace)
        amount = check_amount(cost, marker)
        keys = [key for key, _ in items]
        try:
            reply = await self._record(
                keys=[marker, *keys, *map(fence_key, keys)],
                args=[
                    self._window_ms,
                    format_value(amount),
                    ms_text(self._coordinator.ttl),
                    "1" if self.write_mode == "ledger" else "0",
                ],
            )
        except ResponseError as exc:
            bad_counter = _counter_error(exc, [marker, *keys])
            if bad_counter is not None:
                raise bad_counter from exc
            raise self._unavailable(
                f"spend of request {request_id!r} not recorded", exc, marker
            ) from exc
        except RedisError as exc:
            raise self._unavailable(
                f"spend of request {request_id!r} not recorded", exc, marker
            ) from exc
        if reply[0] in (b"duplicate", "duplicate"):
            self._stats.duplicates += 1
            return SpendRecord(True, tuple(None for _ in items))
        spends = [
            None if raw is None else parse_stored(raw, key)
            for key, raw in zip(keys, reply[1:], strict=True)
        ]
        if self.write_mode == "lagging":
            await self._reseed_and_add(items, spends, amount)
        return SpendRecord(False, tuple(spends))

    async def reset(self, scope: str, entity_id: EntityId) -> None:
        """Delete the entity's counter through the coordinator's fenced reset: a rebuild in
        flight cannot bring pre-reset spend back. Reset the source's spend first (or in the
        same transaction: ``PostgresSpendSource.reset_spend(on_locked=...)``)."""
        await self._coordinator.reset(self.key(scope, entity_id))

    # -- internals -----------------------------------------------------------------------

    def _loader(self, item: Entity) -> Loader:
        return functools.partial(self._source.fetch, item.scope, item.id)

    async def _reseed_and_add(
        self, items: list[tuple[str, Entity]], spends: list[float | None], amount: float
    ) -> None:
        missing = [i for i, spend in enumerate(spends) if spend is None]
        try:
            added = await asyncio.gather(
                *(
                    self._coordinator.increment(key, amount, loader=self._loader(item))
                    for key, item in (items[i] for i in missing)
                )
            )
        except StoreError as exc:
            raise self._unavailable("spend not added to a rebuilt counter", exc, exc.key) from exc
        for i, value in zip(missing, added, strict=True):
            spends[i] = value

    async def _on_outage(self, budgeted: dict[str, Entity], exc: StoreError) -> dict[str, float]:
        if self.outage_policy == "fail-closed":
            raise self._unavailable(
                "budget check refused: the counter store failed", exc, exc.key
            ) from exc
        self._outage()
        if self.outage_policy == "fail-open":
            log.warning("counter store failed; request allowed unchecked (fail-open): %s", exc)
            self._stats.allowed_blind += 1
            return {}
        self._stats.read_through += 1
        try:
            values = await asyncio.wait_for(
                asyncio.gather(*(self._fetch_direct(key, item) for key, item in budgeted.items())),
                self._read_through_timeout,
            )
        except MissingRowError:
            raise
        except Exception as failure:
            raise BudgetUnavailableError(
                f"counter store failed ({exc}) and the read-through failed too: {failure!r}",
                policy=self.outage_policy,
            ) from failure
        return dict(zip(budgeted, values, strict=True))

    async def _fetch_direct(self, key: str, item: Entity) -> float:
        # Concurrent read-through checks of one entity in this process share a DB read.
        value, _ = await self._direct.do(key, lambda: self._source.fetch(item.scope, item.id))
        return value

    def _unavailable(self, what: str, exc: Exception, key: str | None) -> BudgetUnavailableError:
        self._outage()
        return BudgetUnavailableError(
            f"{what}: {type(exc).__name__}: {exc}", policy=self.outage_policy, key=key
        )

    def _outage(self) -> None:
        self._stats.outages += 1
        if self._observer is not None:
            self._observer.on_outage(self.outage_policy)

    def _refuse(self, scope: Scope) -> None:
        self._refusals[scope] += 1
        if self._observer is not None:
            self._observer.on_refusal(scope)


def _counter_error(exc: ResponseError, keys: list[str]) -> ReseedError | None:
    """The bad counter the record script refused, or None (the store itself failed)."""
    match = _SCRIPT_ERROR.match(str(exc))
    if match is None:
        return None
    kind, index = match.group(1), int(match.group(2))
    key = keys[index]
    if kind == "WRONGTYPE":
        return WrongTypeError(f"counter {key!r} holds a non-string Redis type", key=key)
    if kind == "CORRUPT":
        return CorruptCounterError(f"counter {key!r} holds a non-numeric value", key=key)
    return InvalidValueError(f"adding the spend would make counter {key!r} non-finite", key=key)


__all__ = [
    "DEFAULT_NAMESPACE",
    "MAX_ID_BYTES",
    "OUTAGE_POLICIES",
    "SCOPES",
    "WRITE_MODES",
    "BudgetExceededError",
    "BudgetGuard",
    "BudgetObserver",
    "BudgetStats",
    "BudgetUnavailableError",
    "Entity",
    "EntityId",
    "EntityLike",
    "OutagePolicy",
    "Overage",
    "Scope",
    "SpendRecord",
    "SpendSource",
    "WriteMode",
    "as_entity",
    "encode_entity_id",
    "parse_spend_key",
    "request_key",
    "spend_key",
]
