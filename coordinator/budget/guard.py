"""Budget enforcement on spend counters: the read an LLM proxy makes on every request.

Counters live at ``<namespace>:spend:<scope>:<id>`` and are rebuilt from a spend source
(PostgreSQL, see :mod:`coordinator.budget.spend_source`) through a :class:`ReseedCoordinator`, so a
cold counter costs one DB read fleet-wide and never comes back inflated.

Ids are percent-encoded: everything outside ``A-Z a-z 0-9 - . _ ~ @ +`` becomes ``%XX`` (of
its UTF-8 bytes), so an encoded id never holds ``:`` and two ids never share a key. A
``team_member`` id is the pair ``(team_id, user_id)``, encoded part by part and joined by
``:``. Each id part is 1 to :data:`MAX_ID_BYTES` UTF-8 bytes, which keeps every key, even a
team member's in a 64-character namespace, under the coordinator's key limit.

Write modes (what :meth:`BudgetGuard.record` writes):

* ``"ledger"``: the source is the ledger. ``record`` commits the cost to the source, with one
  outbox row per entity in the same transaction, and only then adds it to the counters,
  exactly once per request id and counter (a marker per counted request, see
  :func:`coordinator.keys.applied_key`), deleting the outbox rows it applied. A counter is
  rebuilt from one snapshot of the source that yields both the entity's spend and the
  requests in its outbox: the seed marks those counted, so their late applies add nothing,
  while later commits are not in the snapshot and apply once. Rows left behind (a pod
  killed after COMMIT, a store stall) are applied by :meth:`BudgetGuard.drain` once they are
  ``drain_after`` seconds old, from any pod (the source hands each stale row to one drainer
  at a time). So a counter never exceeds the committed spend, and lags it by at most the
  outbox rows younger than ``drain_after`` plus a drain interval.
* ``"lagging"``: the source is written later (a batched writer). ``record`` adds the cost to
  the counters once per request id; a missing counter is rebuilt from the source, then the
  cost is added.

The ledger contract, for a schema of your own (:class:`LedgerSource`; the shipped
:class:`~coordinator.budget.spend_source.PostgresSpendSource` implements it, with your
spend queries and your spend writer on the shipped ``spend_ledger`` and ``spend_outbox``):

1. ``record`` adds the cost to your spend rows and inserts the outbox rows in one
   transaction, idempotent per request id (a request id seen before writes nothing);
2. ``snapshot`` reads an entity's spend and the request ids of its outbox rows in one
   snapshot (one statement, or a REPEATABLE READ transaction; no ``FOR SHARE``, which
   would read a newer row than the snapshot's outbox);
3. ``pending``, ``settle`` and ``claim_stale`` read and delete outbox rows (``claim_stale``
   locks the rows it returns until its block ends, skipping rows another drainer holds);
4. a reset of an entity's spend deletes its outbox rows in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable
from urllib.parse import quote, unquote

from ..coordinator import Loader, ReseedCoordinator
from ..errors import (
    ConfigurationError,
    InvalidKeyError,
    InvalidValueError,
    MissingRowError,
    ReseedError,
    SourceError,
    StoreError,
)
from ..keys import validate_key
from ..singleflight import SingleFlight
from ..store import ApplyOutcome, CounterStore, ReserveOutcome, slot_groups
from ..values import Snapshot, check_amount, positive_seconds

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


def spend_id(request_id: str) -> str:
    """A request id as it names the request's markers: percent-encoded, 1-128 bytes."""
    return _encode_part(request_id, "request_id")


def entity_ref(scope: str, entity_id: EntityId) -> str:
    """``<scope>:<encoded id>``: an entity in the ledger and the outbox, and the tail of its
    counter key (``<namespace>:spend:<ref>``)."""
    return f"{scope}:{encode_entity_id(scope, entity_id)}"


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
    """An entity whose spend reached its budget; for a reservation, whose spend plus
    ``held`` (the holds of other requests in flight) plus ``estimate`` would reach it."""

    scope: Scope
    id: EntityId
    spend: float
    max_budget: float
    held: float = 0.0
    estimate: float = 0.0


class BudgetExceededError(ReseedError):
    """The request is refused: ``scope``/``id`` spent ``spend`` >= ``max_budget``.

    The named entity is the first over-budget one in the request's order; ``exceeded``
    holds every over-budget entity of the request.
    """

    def __init__(self, exceeded: Sequence[Overage], *, key: str | None = None) -> None:
        first = exceeded[0]
        pending = (
            f" + held {first.held:.15g} + estimate {first.estimate:.15g}"
            if first.held or first.estimate
            else ""
        )
        super().__init__(
            f"{first.scope} {first.id!r} is over budget: spend {first.spend:.15g}{pending} >= "
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


@dataclass(frozen=True)
class OutboxRow:
    """A committed cost of ``request_id`` not yet known to be counted on ``entity``'s counter
    (``entity`` as :func:`entity_ref`); ``age`` in seconds since it was written."""

    entity: str
    request_id: str
    cost: float
    age: float


class Claim(Protocol):
    """Stale outbox rows held by one drainer until the claim ends."""

    @property
    def rows(self) -> Sequence[OutboxRow]:
        """The rows claimed."""

    async def settle(self, rows: Sequence[OutboxRow]) -> None:
        """Delete ``rows`` (they are counted) when the claim ends."""


@runtime_checkable
class LedgerSource(SpendSource, Protocol):
    """A spend source that is the ledger: what ``write_mode="ledger"`` needs (see the
    module docstring for the contract)."""

    async def record(self, request_id: str, entities: Iterable[EntityLike], cost: float) -> bool:
        """Commit ``cost`` for every entity with its outbox rows; False: a known request."""

    async def snapshot(self, scope: Scope, entity_id: EntityId) -> tuple[float, list[str]]:
        """The entity's spend and the request ids of its outbox rows, in one snapshot."""

    async def pending(self, request_id: str) -> list[OutboxRow]:
        """The request's outbox rows."""

    async def settle(self, request_id: str, entities: Sequence[str]) -> None:
        """Delete the request's outbox rows of ``entities``."""

    def claim_stale(self, older_than: float, limit: int) -> AbstractAsyncContextManager[Claim]:
        """Up to ``limit`` outbox rows older than ``older_than`` seconds that no other
        claim holds, oldest first."""

    async def reset_spend(
        self,
        scope: Scope,
        entity_id: EntityId,
        *,
        on_locked: Callable[[list[str]], Awaitable[object]] | None = None,
    ) -> list[str]:
        """Set the entity's spend to 0 and drop its outbox rows, in one transaction;
        ``on_locked(request ids dropped)`` runs inside it and again after the commit."""


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
    duplicates: int = 0  # record calls whose request id was recorded before
    left_to_drain: int = 0  # ledger: committed costs whose counter apply failed
    drained: int = 0  # ledger: outbox rows applied (or settled by a reset) by drain
    overdue_resets: int = 0  # ledger: counters reset because a row outlived its marker
    holds: int = 0  # reservations that hold budget in the counter store
    releases: int = 0  # holds ended by settle or release (the rest expire)


@dataclass(frozen=True)
class Reservation:
    """An estimated cost held against a request's budgeted entities until the request is
    settled (:meth:`BudgetGuard.settle`), released (:meth:`BudgetGuard.release`) or its
    hold expires. ``spends`` are as :meth:`BudgetGuard.check` returns them; ``held_keys``
    the counters holding it (none when no entity has a budget, or when an outage policy
    decided the request without the counter store)."""

    request_id: str
    entities: tuple[Entity, ...]
    estimate: float
    spends: tuple[float | None, ...]
    held_keys: tuple[str, ...]


@dataclass(frozen=True)
class SpendRecord:
    """What :meth:`BudgetGuard.record` did: ``duplicate`` (the request id was recorded
    before: nothing new applied), the counters' new values in entity order (None where no
    counter was added to), and ``pending``: the counters (ledger mode) whose add failed
    and is left to :meth:`BudgetGuard.drain` (the cost is committed)."""

    duplicate: bool
    spends: tuple[float | None, ...]
    pending: int = 0


class BudgetGuard:
    """Per-request budget checks and spend records on coordinated spend counters.

    ``write_mode`` has no default: ``"ledger"`` with a lagging source loses spend, and
    ``"lagging"`` with a ledger source counts it twice. ``outage_policy`` decides a check
    when the counter store fails (``"read-through"``: decide against the source;
    ``"fail-closed"``: raise :class:`BudgetUnavailableError`; ``"fail-open"``: allow).
    ``idempotency_window`` is how long a request is remembered as counted on a counter.

    Reservations (:meth:`reserve`, then :meth:`settle` or :meth:`release`) hold an estimated
    cost against the budgets while the call runs, so concurrent requests cannot all pass the
    same headroom: spend overshoots a budget by at most the sum of (actual - estimate) over
    the requests in flight. A hold lives ``hold_ttl`` seconds at most (set it above the
    longest call): a pod killed mid-call holds budget until then, not forever.

    Ledger mode: outbox rows older than ``drain_after`` seconds are the drain's
    (:meth:`drain`; ``async with guard`` runs it every ``drain_interval`` seconds when one
    is given). A row older than half the window may have outlived its markers: the drain
    resets its counter (rebuilt from the source on its next read) instead of adding to it.
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
        drain_after: float = 5.0,
        drain_interval: float | None = None,
        hold_ttl: float = 300.0,
        observer: BudgetObserver | None = None,
    ) -> None:
        if write_mode not in WRITE_MODES:
            raise ConfigurationError(f"write_mode must be one of {WRITE_MODES}, got {write_mode!r}")
        if outage_policy not in OUTAGE_POLICIES:
            raise ConfigurationError(
                f"outage_policy must be one of {OUTAGE_POLICIES}, got {outage_policy!r}"
            )
        if write_mode == "ledger" and not isinstance(source, LedgerSource):
            raise ConfigurationError(
                "write_mode='ledger' needs a LedgerSource (record, snapshot, pending, settle, "
                f"claim_stale), got {type(source).__name__}"
            )
        self._window = positive_seconds("idempotency_window", idempotency_window)
        self._read_through_timeout = positive_seconds("read_through_timeout", read_through_timeout)
        self._drain_after = positive_seconds("drain_after", drain_after)
        self._hold_ttl = positive_seconds("hold_ttl", hold_ttl)
        if self._drain_after >= self._window / 2:
            raise ConfigurationError("drain_after must be below half the idempotency_window")
        self._drain_interval = (
            None if drain_interval is None else positive_seconds("drain_interval", drain_interval)
        )
        self.namespace = _check_namespace(namespace)
        self.write_mode: WriteMode = write_mode
        self.outage_policy: OutagePolicy = outage_policy
        self._coordinator = coordinator
        self._store = CounterStore(coordinator.store)
        self._source = source
        self._observer = observer
        self._direct: SingleFlight[str, float] = SingleFlight()
        self._stats = BudgetStats()
        self._refusals: Counter[str] = Counter()
        self._drainer: asyncio.Task[None] | None = None

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
            left_to_drain=self._stats.left_to_drain,
            drained=self._stats.drained,
            overdue_resets=self._stats.overdue_resets,
            holds=self._stats.holds,
            releases=self._stats.releases,
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
        return self._decide(keys, items, spends)

    async def reserve(
        self, request_id: str, entities: Iterable[EntityLike], estimate: float
    ) -> Reservation:
        """Check the request and hold ``estimate`` against every budgeted entity, atomically
        (one script for all its counters): refused, holding nothing, if any entity's spend
        plus the holds in flight plus ``estimate`` reaches its budget.

        Missing counters are rebuilt (once fleet-wide) first. When the counter store fails,
        the outage policy decides as for :meth:`check` (the read-through counts ``estimate``
        but holds nothing). Raises :class:`BudgetExceededError`. A ``request_id`` reserved
        again replaces its own hold.
        """
        items = tuple(as_entity(item) for item in entities)
        keys = [self._key(item) for item in items]
        hold = spend_id(request_id)
        amount = check_amount(estimate, request_id)
        if amount < 0:
            raise InvalidValueError(f"estimate of {request_id!r} must be >= 0, got {estimate!r}")
        self._stats.checks += 1
        budgeted = {
            key: item for key, item in zip(keys, items, strict=True) if item.max_budget is not None
        }
        if not budgeted:
            return Reservation(request_id, items, amount, (None,) * len(items), ())
        try:
            spends = await self._hold(budgeted, hold, amount)
        except StoreError as exc:
            spends = await self._on_outage(budgeted, exc)
            values = self._decide(keys, items, spends, estimate=amount)
            return Reservation(request_id, items, amount, tuple(values), ())
        self._stats.holds += 1
        values = [spends[key] if key in budgeted else None for key in keys]
        return Reservation(request_id, items, amount, tuple(values), tuple(budgeted))

    async def settle(self, reservation: Reservation, cost: float) -> SpendRecord:
        """Record the request's actual ``cost`` (:meth:`record`, once per request id), then
        end its hold. If recording fails it raises and the hold stays until it expires (the
        cost is not counted, the estimate still is); a failed release is only logged."""
        recorded = await self.record(reservation.request_id, reservation.entities, cost)
        try:
            await self.release(reservation)
        except StoreError as exc:
            log.warning("hold of %s not released (it expires): %s", reservation.request_id, exc)
        return recorded

    async def release(self, reservation: Reservation) -> int:
        """End the reservation's hold without recording a cost (the call failed); how many
        counters it was held on. Raises :class:`~coordinator.errors.StoreError`."""
        if not reservation.held_keys:
            return 0
        ended = await self._store.release(
            list(reservation.held_keys), spend_id(reservation.request_id)
        )
        if ended:
            self._stats.releases += 1
        return ended

    async def current_spend(self, scope: str, entity_id: EntityId) -> float:
        """The entity's spend, from its counter (rebuilt from the source if missing)."""
        item = as_entity((scope, entity_id))
        return await self._coordinator.get(self._key(item), self._loader(item))

    async def record(
        self, request_id: str, entities: Iterable[EntityLike], cost: float
    ) -> SpendRecord:
        """Record ``cost`` for every entity, once per ``request_id``.

        Ledger mode: commit it to the source (with its outbox rows), then add it to every
        present counter and delete the outbox rows applied. A counter store failure after
        the commit does not raise: the cost is recorded, ``pending`` counts the counters
        left to :meth:`drain`. A known request id commits nothing and applies what its
        outbox still holds (so a retry heals a failed apply at once). A failed commit raises
        :class:`~coordinator.errors.SourceError`: if the commit went through after all, the
        drain applies it.

        Lagging mode: add it to every present counter (once per request id and counter,
        within the window); a missing counter is rebuilt from the source, then the cost
        added. A counter store failure raises :class:`BudgetUnavailableError`.

        A counter holding garbage raises its error (``CorruptCounterError``,
        ``WrongTypeError``) after the other counters are served.
        """
        items = list({self._key(e): e for e in map(as_entity, entities)}.items())
        marker = spend_id(request_id)
        amount = check_amount(cost, request_id)
        if self.write_mode == "lagging":
            return await self._record_lagging(items, marker, amount)
        source = self._ledger()
        new = await source.record(request_id, [item for _, item in items], amount)
        if new:
            rows = [OutboxRow(entity_ref(e.scope, e.id), request_id, amount, 0.0) for _, e in items]
        else:
            self._stats.duplicates += 1
            rows = await source.pending(request_id)
        outcomes = await asyncio.gather(*map(self._apply_row, rows), return_exceptions=True)
        done = [row for row, outcome in zip(rows, outcomes, strict=True) if _settled(outcome)]
        pending = len(rows) - len(done)
        if done:
            try:
                await source.settle(request_id, [row.entity for row in done])
            except SourceError as exc:
                log.warning("outbox rows of %s not deleted (drain repeats them): %s", marker, exc)
        if pending:
            self._outage()
            self._stats.left_to_drain += pending
            log.warning("spend of %s committed, %d counters left to the drain", marker, pending)
        _raise_bad_counter(outcomes)
        applied = {
            row.entity: outcome.value
            for row, outcome in zip(rows, outcomes, strict=True)
            if isinstance(outcome, ApplyOutcome)
        }
        spends = tuple(applied.get(entity_ref(e.scope, e.id)) for _, e in items)
        return SpendRecord(not new, spends, pending)

    async def drain(self, *, limit: int = 500) -> int:
        """Apply the outbox rows older than ``drain_after`` (ledger mode): each one to its
        counter once, or, past half the window, by resetting the counter. Rows another
        drainer holds are skipped. The number of rows settled."""
        async with self._ledger().claim_stale(self._drain_after, limit) as claim:
            outcomes = await asyncio.gather(
                *map(self._apply_row, claim.rows), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, ReseedError):
                    log.warning("outbox row not drained: %s", outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
            done = [
                row for row, outcome in zip(claim.rows, outcomes, strict=True) if _settled(outcome)
            ]
            await claim.settle(done)
        self._stats.drained += len(done)
        return len(done)

    async def __aenter__(self) -> BudgetGuard:
        if self._drain_interval is not None and self._drainer is None:
            self._drainer = asyncio.create_task(self._drain_forever(self._drain_interval))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background drainer, if one runs."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
            self._drainer = None

    async def reset(
        self, scope: str, entity_id: EntityId, wiped: Sequence[str] = ()
    ) -> None:
        """Delete the entity's counter through the coordinator's fenced reset: a rebuild in
        flight cannot bring pre-reset spend back. ``wiped``: request ids whose spend the
        source's reset dropped, marked counted so that no apply of them still in flight
        lands on the rebuilt counter. Reset the source's spend first, or call
        :meth:`reset_spend`, which does both."""
        await self._coordinator.reset(
            self.key(scope, entity_id),
            counted=[spend_id(request_id) for request_id in wiped],
            window=self._window,
        )

    async def reset_spend(self, scope: Scope, entity_id: EntityId) -> None:
        """A budget reset, in one call (ledger mode): the source's spend set to 0 and its
        outbox rows of the entity dropped, the counter reset while the row is locked and
        once more after the commit (see ``PostgresSpendSource.reset_spend``)."""

        async def counter(wiped: list[str]) -> None:
            await self.reset(scope, entity_id, wiped)

        await self._ledger().reset_spend(scope, entity_id, on_locked=counter)

    # -- internals -----------------------------------------------------------------------

    def _decide(
        self,
        keys: list[str],
        items: Sequence[Entity],
        spends: dict[str, float],
        *,
        estimate: float = 0.0,
    ) -> list[float | None]:
        """Each entity's spend, or raise for those whose spend + ``estimate`` reaches the
        budget (entities absent from ``spends`` were not read: allowed)."""
        over = [
            (key, Overage(item.scope, item.id, spends[key], item.max_budget, estimate=estimate))
            for key, item in zip(keys, items, strict=True)
            if item.max_budget is not None
            and key in spends
            and spends[key] + estimate >= item.max_budget
        ]
        if over:
            raise self._refusal(over)
        return [
            spends.get(key) if item.max_budget is not None else None
            for key, item in zip(keys, items, strict=True)
        ]

    def _refusal(self, over: Sequence[tuple[str, Overage]]) -> BudgetExceededError:
        first_key, first = over[0]
        self._refuse(first.scope)
        return BudgetExceededError([overage for _, overage in over], key=first_key)

    async def _hold(
        self, budgeted: dict[str, Entity], hold: str, amount: float
    ) -> dict[str, float]:
        """Hold ``amount`` on every counter of ``budgeted``, rebuilding missing ones first;
        their spends, or raise :class:`BudgetExceededError`.

        One script per slot group (one for all on a single server): each group holds or
        refuses atomically; when one group does not hold, the holds the others took are
        ended before anything is decided, so a request never keeps a partial hold."""
        keys = list(budgeted)
        budgets = [item.max_budget or 0.0 for item in budgeted.values()]
        groups = slot_groups(self._coordinator.store, keys)
        # A rebuilt counter can vanish again (reset, expiry) before the next attempt.
        for _ in range(_HOLD_ATTEMPTS):
            outcomes = await asyncio.gather(
                *(
                    self._store.reserve(
                        [keys[i] for i in group],
                        hold,
                        amount,
                        [budgets[i] for i in group],
                        self._hold_ttl,
                    )
                    for group in groups
                ),
                return_exceptions=True,
            )
            results = list(zip(groups, outcomes, strict=True))
            held = [
                group
                for group, outcome in results
                if isinstance(outcome, ReserveOutcome) and outcome.result == "held"
            ]
            if len(held) == len(groups):
                return {
                    keys[i]: spend
                    for group, outcome in results
                    if isinstance(outcome, ReserveOutcome)
                    for i, spend in zip(group, outcome.spends, strict=True)
                }
            if held:
                await self._end_partial([keys[i] for group in held for i in group], hold)
            failure = next((o for o in outcomes if isinstance(o, BaseException)), None)
            if failure is not None:
                raise failure  # a store failure goes to the outage policy
            decided = [
                (group, outcome)
                for group, outcome in results
                if isinstance(outcome, ReserveOutcome)
            ]
            over = sorted(
                (group[j], outcome, j)
                for group, outcome in decided
                if outcome.result == "over"
                for j in outcome.indices
            )
            if over:
                raise self._refusal(
                    [
                        (
                            keys[i],
                            Overage(
                                budgeted[keys[i]].scope,
                                budgeted[keys[i]].id,
                                outcome.spends[j],
                                budgets[i],
                                outcome.held[j],
                                amount,
                            ),
                        )
                        for i, outcome, j in over
                    ]
                )
            missing = [
                keys[group[j]]
                for group, outcome in decided
                if outcome.result == "missing"
                for j in outcome.indices
            ]
            await self._coordinator.get_many(
                [(key, self._loader(budgeted[key])) for key in missing]
            )
        raise BudgetUnavailableError(
            f"counters kept vanishing while reserving for {hold!r}",
            policy=self.outage_policy,
            key=keys[0],
        )

    async def _end_partial(self, keys: list[str], hold: str) -> None:
        try:
            await self._store.release(keys, hold)
        except StoreError as exc:
            log.warning("partial hold %s not ended (it expires): %s", hold, exc)

    def _ledger(self) -> LedgerSource:
        if not isinstance(self._source, LedgerSource):
            raise ConfigurationError("this needs write_mode='ledger' (and a LedgerSource)")
        return self._source

    def _loader(self, item: Entity) -> Loader:
        if self.write_mode == "ledger":
            return functools.partial(self._snapshot, item)
        return functools.partial(self._source.fetch, item.scope, item.id)

    async def _snapshot(self, item: Entity) -> Snapshot:
        spend, request_ids = await self._ledger().snapshot(item.scope, item.id)
        return Snapshot(spend, map(spend_id, request_ids), self._window)

    async def _apply_row(self, row: OutboxRow) -> ApplyOutcome | None:
        """Count one outbox row on its counter; None if that took a reset."""
        key = validate_key(f"{self.namespace}:spend:{row.entity}")
        if row.age >= self._window / 2:
            # Its marker may be gone: whether the counter holds the cost is unknown, so let
            # the next read rebuild the counter from the source, which holds it.
            await self._coordinator.reset(key)
            self._stats.overdue_resets += 1
            return None
        return await self._coordinator.apply_once(
            key, row.cost, spend_id(row.request_id), window=self._window
        )

    async def _record_lagging(
        self, items: list[tuple[str, Entity]], marker: str, amount: float
    ) -> SpendRecord:
        outcomes = await asyncio.gather(
            *(
                self._coordinator.apply_once(
                    key, amount, marker, window=self._window, on_missing="mark"
                )
                for key, _ in items
            ),
            return_exceptions=True,
        )
        failed = next((o for o in outcomes if isinstance(o, StoreError)), None)
        if failed is not None:
            raise self._unavailable(
                f"spend of request {marker!r} not recorded", failed, failed.key
            ) from failed
        _raise_bad_counter(outcomes)
        results = [outcome for outcome in outcomes if isinstance(outcome, ApplyOutcome)]
        if all(outcome.result == "duplicate" for outcome in results):
            self._stats.duplicates += 1
            return SpendRecord(True, tuple(None for _ in items))
        spends = [outcome.value for outcome in results]
        missing = [i for i, outcome in enumerate(results) if outcome.result == "missing"]
        await self._reseed_and_add(items, missing, spends, amount)
        return SpendRecord(False, tuple(spends))

    async def _drain_forever(self, interval: float) -> None:
        while True:
            try:
                await self.drain()
            except ReseedError as exc:
                log.warning("outbox drain failed: %s", exc)
            await asyncio.sleep(interval)

    async def _reseed_and_add(
        self,
        items: list[tuple[str, Entity]],
        missing: list[int],
        spends: list[float | None],
        amount: float,
    ) -> None:
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


_HOLD_ATTEMPTS = 3


def _settled(outcome: object) -> bool:
    """Whether an apply of an outbox row leaves nothing to do (applied, a duplicate, no
    counter, or settled by a reset)."""
    return outcome is None or isinstance(outcome, ApplyOutcome)


def _raise_bad_counter(outcomes: Sequence[object]) -> None:
    """Raise the first error that is not the store's (a garbage counter, a cancellation)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, StoreError):
            raise outcome
