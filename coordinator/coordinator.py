"""ReseedCoordinator: rebuild a missing counter from its source of truth once, fleet-wide.

The whole protocol lives in this file. A miss is a small state machine; each attempt of a
rebuild ends in one named state, and tenacity paces the attempts that must be retried::

    get(key, loader):
      GET key                               present: return it (the hot path, one round trip)
      miss: probe key                       present: return it; else its reset generation g
        one rebuild per (key, g) per process (singleflight); the others await it
        state := Missing(g); attempt until Hit or Seeded, or the most patient caller's
        deadline, paced by tenacity backoff (woken early by the seed's pub/sub announcement):
          the winner announced a value      -> Hit(value)
          LeaseHeld, before its retry time  -> GET key: Hit(value), or LeaseHeld again
          Missing(g)                        -> try the lease on (key, g)      (no probe)
          otherwise                         -> probe: Hit(value), or try the lease on (key, g)
          try the Redlock lease on (key, g):
            lost      -> LeaseHeld(retry_at): someone else rebuilds; the lease is retried
                         at exponentially growing intervals (the holder may die)
            no quorum -> seed without a lease (degraded), still fenced
            won       -> seed, then release the lease in the background
          seed:
            token := new fencing token, re-check key (one script)
                                            present: Hit(value)
            value := loader()               the one DB read, fleet-wide
            SET value if key absent and token is still the newest, announce it:
              written, or found present     -> Seeded(the stored value)
              fenced out by a newer rebuild -> Seeded(our own fresh read)
              fenced out by a reset         -> Fenced: rebuild in the new generation

Hit and Seeded end the rebuild; LeaseHeld and Fenced are retried. The lease only saves DB
reads; correctness rests on the seed script, which never overwrites a counter and refuses
any write whose token a newer rebuild or a reset has superseded. The step docstrings name
the guarantees they keep, numbered as in the README's "Guarantees".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from redis.asyncio import Redis, RedisCluster
from tenacity import AsyncRetrying, RetryError, retry_if_result
from tenacity.wait import wait_random_exponential

from .clients import cluster_client, is_cluster_url, redis_client
from .deadline import Deadline, bounded_by, current_deadline, stop_before_deadline, wait_until
from .errors import (
    ConfigurationError,
    CoordinatorClosedError,
    InvalidValueError,
    LoaderError,
    ReseedError,
    ReseedTimeoutError,
    StoreError,
)
from .keys import validate_key
from .lock import LeaseManager, QuorumUnavailable, lock_client
from .observe import MissRole, Observer
from .singleflight import SingleFlight
from .stats import Stats
from .store import ApplyOutcome, CounterStore, OnMissing
from .values import Snapshot, check_amount, check_loaded, parse_stored, positive_seconds
from .wakeup import SeedSignals, Watch

log = logging.getLogger(__name__)

T = TypeVar("T")

Loader = Callable[[], Awaitable[float]]
OnTimeout = Literal["raise", "load"]


@dataclass(frozen=True)
class Missing:
    """The first caller's probe found no counter in reset generation ``generation``: the
    first attempt goes straight to the lease."""

    generation: int


@dataclass(frozen=True)
class Hit:
    """The counter is there: stored, or announced by the winner's seed. Nothing loaded."""

    value: float


@dataclass(frozen=True)
class Seeded:
    """This flight ran the loader; ``value`` is the stored counter, or our own fresh read
    when a newer rebuild fenced our write out."""

    value: float


@dataclass(frozen=True)
class LeaseHeld:
    """Another process holds the lease: back off and re-read the key; retry the lease at
    ``retry_at`` (loop time), ``lost`` being the leases this flight has lost so far."""

    retry_at: float
    lost: int


@dataclass(frozen=True)
class Fenced:
    """A reset superseded our token: what we loaded may predate it. Rebuild in the new
    generation."""


Done = Hit | Seeded  # the states that end a rebuild
Outcome = Hit | Seeded | LeaseHeld | Fenced  # what an attempt ends in
State = Missing | Outcome  # what the next attempt starts from


def _again(outcome: Outcome) -> bool:
    return isinstance(outcome, (LeaseHeld, Fenced))


def _being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (3.11+; on 3.10 assume not)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


class ReseedCoordinator:
    """Reads counters from Redis and rebuilds missing ones from a loader, once per miss
    across every process that shares the same counter store and lock masters.

    ``ttl`` is the counter's expiry (None: never), ``lease`` the Redlock lease a rebuild
    holds (extended every ``lease/2`` while the loader runs; ``lease_extensions`` caps the
    extensions, None: as long as the loader runs, which its deadline bounds), ``wait`` the
    default deadline of a call. ``wake_on_seed`` ends losers' backoff the moment the winner
    seeds (pub/sub); without it they notice at their next backoff re-read.
    ``replicas`` > 0 follows every seed and increment with ``WAIT replicas`` (up to
    ``replica_timeout`` seconds) so that a failover loses fewer acknowledged writes; a write
    not acknowledged in time is logged, never raised (it is applied: a resend would count
    it twice).
    ``on_timeout="load"`` makes a call whose deadline passed read the loader directly
    (bounded by another ``wait``) and return that without writing.
    """

    def __init__(
        self,
        store: Redis | RedisCluster,
        *,
        lock_masters: Sequence[Redis] | None = None,
        ttl: float | None = 60.0,
        lease: float = 10.0,
        wait: float = 15.0,
        lease_extensions: int | None = None,
        backoff_initial: float = 0.005,
        backoff_max: float = 0.1,
        on_timeout: OnTimeout = "raise",
        fence_ttl: float | None = 86400.0,
        observer: Observer | None = None,
        wake_on_seed: bool = True,
        replicas: int = 0,
        replica_timeout: float = 0.1,
    ) -> None:
        positive_seconds("lease", lease)
        positive_seconds("wait", wait)
        positive_seconds("backoff_initial", backoff_initial)
        positive_seconds("backoff_max", backoff_max)
        for name, maybe in {"ttl": ttl, "fence_ttl": fence_ttl}.items():
            if maybe is not None:  # None: no expiry
                positive_seconds(name, maybe)
        if lease_extensions is not None and (
            isinstance(lease_extensions, bool)
            or not isinstance(lease_extensions, int)
            or lease_extensions < 0
        ):
            raise ConfigurationError(
                f"lease_extensions must be None or an int >= 0, got {lease_extensions!r}"
            )
        if on_timeout not in ("raise", "load"):
            raise ConfigurationError(f"on_timeout must be 'raise' or 'load', got {on_timeout!r}")
        longest_hold = wait + lease if lease_extensions is None else lease * (lease_extensions + 1)
        if fence_ttl is not None and fence_ttl <= longest_hold:
            # Tokens restart from the server clock when a fence expires, so they stay
            # monotonic; a fence that outlives every holder keeps that independent of clocks.
            raise ConfigurationError("fence_ttl must outlive a lease with all its extensions")
        if lock_masters is None:
            if isinstance(store, RedisCluster):
                # Redlock needs independent masters; a cluster's shards fail over together.
                raise ConfigurationError(
                    "a Redis Cluster counter store needs lock_masters (independent servers)"
                )
            lock_masters = [store]
        self._store = CounterStore(
            store, fence_ttl=fence_ttl, replicas=replicas, replica_timeout=replica_timeout
        )
        self._signals = SeedSignals(self._store, enabled=wake_on_seed)
        self._locks = LeaseManager(
            lock_masters,
            duration=lease,
            extensions=lease_extensions,
        )
        self._ttl = ttl
        self._wait = wait
        self._on_timeout: OnTimeout = on_timeout
        self._backoff = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._releases: set[asyncio.Task[None]] = set()
        self._flights: SingleFlight[tuple[str, int], Done] = SingleFlight()
        self._probes: SingleFlight[str, tuple[float | None, int]] = SingleFlight()
        self._deadlines: dict[asyncio.Future[Done], Deadline] = {}
        self._stats = Stats()
        self._observer = observer
        self._owned: list[Redis | RedisCluster] = []
        self._closed = False

    @classmethod
    def from_urls(
        cls,
        url: str,
        *,
        lock_urls: Sequence[str] | None = None,
        socket_timeout: float = 0.5,
        lock_timeout: float = 0.3,
        max_connections: int = 100,
        cluster: bool = False,
        **options: Any,
    ) -> ReseedCoordinator:
        """Build the clients too (and close them in :meth:`aclose`). Neither the store
        client nor the lock clients retry commands blindly (see ``clients``); past
        ``max_connections`` store commands in flight, a command waits for a connection.
        A ``redis+cluster://host:port[,host:port...]`` URL, or ``cluster=True`` with a
        node's URL, makes the store a Redis Cluster (``lock_urls`` required)."""
        store: Redis | RedisCluster
        if cluster or is_cluster_url(url):
            store = cluster_client(url, timeout=socket_timeout, max_connections=max_connections)
        else:
            store = redis_client(url, timeout=socket_timeout, max_connections=max_connections)
        masters = [lock_client(u, timeout=lock_timeout) for u in lock_urls or []]
        coordinator = cls(store, lock_masters=masters or None, **options)
        coordinator._owned = [store, *masters]
        return coordinator

    @property
    def store(self) -> Redis | RedisCluster:
        """The counter store's client (for callers' own scripts on the same counters)."""
        return self._store.client

    @property
    def ttl(self) -> float | None:
        """The counters' expiry in seconds (None: none), set by seeds, refreshed by adds."""
        return self._ttl

    @property
    def stats(self) -> Stats:
        """A snapshot of this coordinator's counters."""
        return replace(self._stats, under_replicated=self._store.under_replicated)

    async def get(self, key: str, loader: Loader, *, wait: float | None = None) -> float:
        """The counter at ``key``, rebuilt from ``loader`` if it is missing."""
        key = validate_key(key)
        _check_loader(loader, key)
        budget = self._budget(wait)
        self._check_open()
        with bounded_by.budget(budget):
            try:  # _guard, inlined: one coroutine less on the hot path
                value = await self._store.read(key)
            except StoreError:
                self._count("store_errors")
                raise
            except ReseedTimeoutError:
                self._count("timeouts")
                raise
            if value is not None:
                self._count("hits")
                return value
            self._count("misses")
            return await self._reseed(key, loader, budget)

    async def get_many(
        self, requests: Sequence[tuple[str, Loader]], *, wait: float | None = None
    ) -> list[float]:
        """Several counters, in order: one MGET round trip when all are present; the
        missing ones are rebuilt concurrently, each through the full protocol."""
        keys = [validate_key(key) for key, _ in requests]
        for key, (_, loader) in zip(keys, requests, strict=True):
            _check_loader(loader, key)
        budget = self._budget(wait)
        self._check_open()
        if not keys:
            return []
        with bounded_by.budget(budget):
            values = await self._guard(self._store.read_many(keys))
            missing = [i for i, value in enumerate(values) if value is None]
            self._count("hits", len(keys) - len(missing))
            self._count("misses", len(missing))
            rebuilt = await asyncio.gather(
                *(self._reseed(keys[i], requests[i][1], budget) for i in missing)
            )
        for i, value in zip(missing, rebuilt, strict=True):
            values[i] = value
        return [value for value in values if value is not None]

    async def increment(
        self,
        key: str,
        amount: float,
        *,
        loader: Loader | None = None,
        wait: float | None = None,
    ) -> float | None:
        """Add ``amount`` to the counter if it exists; the new value, or None.

        With ``loader`` (a source that lags the counter, e.g. spend written to the DB in
        batches) a missing counter is first rebuilt through the protocol, then incremented.
        """
        key = validate_key(key)
        amount = check_amount(amount, key)
        if loader is not None:
            _check_loader(loader, key)
        budget = self._budget(wait)
        self._check_open()
        with bounded_by.budget(budget) as deadline:
            while True:
                new = await self._guard(self._store.increment(key, amount, self._ttl))
                if new is not None or loader is None:
                    return new
                # The counter can vanish again (reset, expiry) between the rebuild and the add.
                remaining = deadline.remaining()
                if remaining <= 0:
                    self._count("timeouts")
                    raise ReseedTimeoutError(
                        f"could not increment {key!r} within {budget}s", key=key
                    )
                await self._reseed(key, loader, remaining)

    async def apply_once(
        self,
        key: str,
        amount: float,
        spend_id: str,
        *,
        window: float,
        on_missing: OnMissing = "fence",
    ) -> ApplyOutcome:
        """Add ``amount`` to the counter once per ``spend_id``: an add, or a seed from a
        :class:`~coordinator.values.Snapshot` naming it, makes every later apply of that
        id within ``window`` seconds a no-op. A missing counter is never created;
        ``on_missing="fence"`` (the source holds the spend already) fences out every rebuild
        in flight, whose read may predate the spend, ``"mark"`` remembers the id (the caller
        adds the spend to a rebuilt counter itself)."""
        key = validate_key(key)
        amount = check_amount(amount, key)
        marker_ttl = positive_seconds("window", window)
        if on_missing not in ("fence", "mark"):
            raise ConfigurationError(f"on_missing must be 'fence' or 'mark', got {on_missing!r}")
        self._check_open()
        with bounded_by.budget(self._wait):
            return await self._guard(
                self._store.apply(key, spend_id, amount, self._ttl, marker_ttl, on_missing)
            )

    async def reset(
        self, key: str, *, counted: Sequence[str] = (), window: float | None = None
    ) -> None:
        """Delete the counter and fence out every rebuild of it in flight, fleet-wide.

        ``counted``: ids of spends the reset wiped out of the source; every
        :meth:`apply_once` of them within ``window`` seconds adds nothing to the rebuilt
        counter (an apply still in flight across the reset would bring them back)."""
        key = validate_key(key)
        marker_ttl = positive_seconds("window", window) if counted else None
        self._check_open()
        # Rebuilds are per (key, generation), so a get after this starts a fresh rebuild
        # (in this process or any other) instead of joining one the reset doomed.
        with bounded_by.budget(self._wait):
            generation = await self._guard(self._store.reset(key, counted, marker_ttl))
        log.debug("counter reset", extra={"key": key, "generation": generation, "outcome": "reset"})

    async def aclose(self) -> None:
        """Cancel rebuilds in flight and close the clients built by :meth:`from_urls`."""
        if self._closed:
            return
        self._closed = True
        flights = self._flights.in_flight()
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        await asyncio.gather(*self._releases)
        await self._signals.aclose()
        for client in self._owned:
            await client.aclose()

    async def __aenter__(self) -> ReseedCoordinator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the miss path -------------------------------------------------------------------

    async def _reseed(self, key: str, loader: Loader, budget: float) -> float:
        """A missing counter, within ``budget``. Keeps 5 (bounded waits): past the deadline
        a typed ``ReseedTimeoutError``, or with ``on_timeout="load"`` a direct read that
        writes nothing (so 1 and 4 still hold)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        started = loop.time()
        role: MissRole = "failed"
        try:
            value, role = await self._fly(key, loader, budget)
        except (asyncio.TimeoutError, ReseedTimeoutError):
            self._count("timeouts")
            if self._on_timeout == "raise":
                raise ReseedTimeoutError(
                    f"no value for counter {key!r} within {budget:.3g}s", key=key
                ) from None
            self._count("fallback_reads")
            log.warning(
                "no rebuild of %s within %.3gs; reading the loader directly, writing nothing",
                key,
                budget,
                extra={"key": key, "outcome": "fallback_read", "wait": budget},
            )
            value = await self._load(key, loader, Deadline(loop.time() + budget))
            role = "loaded"
        finally:
            if self._observer is not None:
                self._observer.on_miss(role, loop.time() - started)
        return value

    async def _fly(self, key: str, loader: Loader, budget: float) -> tuple[float, MissRole]:
        """Join (or start) this process's rebuild of ``key`` in its current reset generation
        and wait for it, ``budget`` at most; the value and this caller's role.

        Keeps 2 (one DB read per cold miss): one rebuild per (key, generation) per process,
        so the lease is contended by processes, not callers. Keeps 5: each caller waits
        its own budget, and a flight runs until its most patient caller's deadline.
        """
        deadline = Deadline(asyncio.get_running_loop().time() + budget)
        # Callers that miss together share one probe: a stampede costs one per process.
        (present, generation), _ = await self._guard(
            self._probes.do(key, lambda: self._store.probe(key))
        )
        if present is not None:
            return present, "waited"
        flight_key = (key, generation)

        def start() -> Coroutine[Any, Any, Done]:
            return self._rebuild(key, loader, deadline, generation)

        flight, joined = self._flights.join(flight_key, start)
        if joined and self._deadlines[flight].remaining() <= 0:
            # That flight gave up and is winding down: don't inherit its timeout.
            self._flights.forget(flight_key)
            flight, joined = self._flights.join(flight_key, start)
        if joined:
            self._count("joined")
            self._deadlines[flight].extend(deadline.at)
        else:
            self._deadlines[flight] = deadline
            flight.add_done_callback(self._deadlines.pop)
        try:
            done = await asyncio.wait_for(self._guard(asyncio.shield(flight)), budget)
        except asyncio.CancelledError:
            if self._closed and flight.cancelled() and not _being_cancelled():
                raise CoordinatorClosedError(
                    f"the coordinator was closed while rebuilding {key!r}", key=key
                ) from None
            raise
        return done.value, "loaded" if isinstance(done, Seeded) and not joined else "waited"

    async def _rebuild(self, key: str, loader: Loader, deadline: Deadline, generation: int) -> Done:
        """Run the attempts from :class:`Missing` (``generation``, what the first caller's
        probe found) until one ends in :class:`Hit` or :class:`Seeded`.

        Keeps 5 (bounded waits): tenacity stops before a backoff would end past the
        deadline, and the rebuild raises ``ReseedTimeoutError`` then.
        """
        state: State = Missing(generation)
        # This task's own context: its commands queue for connections until the flight's
        # (extensible) deadline, not the first caller's.
        current_deadline.set(deadline)
        try:
            async with self._signals.watch(key) as watch:

                async def step() -> Outcome:
                    nonlocal state
                    state = await self._attempt(key, loader, deadline, watch, state)
                    return state

                retrying = AsyncRetrying(
                    stop=stop_before_deadline(deadline),
                    wait=self._backoff,
                    sleep=watch.sleep,
                    retry=retry_if_result(_again),
                )
                done: Done = await retrying(step)
        except RetryError:
            raise ReseedTimeoutError(f"no rebuild of {key!r} by the deadline", key=key) from None
        return done

    async def _attempt(
        self, key: str, loader: Loader, deadline: Deadline, watch: Watch, state: State
    ) -> Outcome:
        """One attempt, from the state the previous one ended in (see the module docstring).

        Keeps 2 (one DB read per cold miss): only the lease's holder loads, and a loser
        re-reads the key (one GET) until its lease retry time instead of hammering every
        lock master. Never loads when the key is present (Hit).
        """
        if watch.seeded is not None:
            # The winner announced the value it seeded: no need to read it back.
            return Hit(parse_stored(watch.seeded, key))
        loop = asyncio.get_running_loop()
        if isinstance(state, LeaseHeld) and loop.time() < state.retry_at:
            value = await self._store.read(key)
            return state if value is None else Hit(value)
        if isinstance(state, Missing):
            generation = state.generation
        else:
            present, generation = await self._store.probe(key)
            if present is not None:
                return Hit(present)
        try:
            lease = await self._locks.try_acquire(
                key, generation, lambda: self._count("lease_extensions")
            )
        except QuorumUnavailable:
            self._count("lock_degraded")
            return await self._seed(key, loader, deadline, generation)
        if lease is None:
            self._count("leases_lost")
            # Retry soon at first (a split vote among contenders leaves no holder at all),
            # then ever less often while a live holder loads, up to once per backoff_max.
            lost = state.lost + 1 if isinstance(state, LeaseHeld) else 1
            pause = min(self._backoff_max, self._backoff_initial * 2**lost)
            return LeaseHeld(loop.time() + pause, lost)
        self._count("leases_won")
        lease.hold()
        try:
            return await self._seed(key, loader, deadline, generation)
        finally:
            release = lease.let_go()
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    async def _seed(
        self, key: str, loader: Loader, deadline: Deadline, generation: int
    ) -> Hit | Seeded | Fenced:
        """Load and write under a fresh fencing token, with or without the lease.

        Keeps 1 (no inflation): the write is a SET NX, never an add. Keeps 4 (no stale
        writes): a token that a newer rebuild or a reset superseded writes nothing, and a
        read that may predate a reset is never returned (Fenced). Keeps 6 (nothing lost on
        errors): a loader failure raises before the script runs, so nothing is written.
        """
        token, present = await self._store.take_token(key)
        if present is not None:
            return Hit(present)
        value = await self._load(key, loader, deadline)
        outcome = await self._store.seed(key, value, token, self._ttl)
        fields = {"key": key, "token": token, "outcome": outcome.result}
        if outcome.result == "won":
            self._count("seeds_won")
            log.debug("counter seeded", extra=fields)
        elif outcome.result == "present":
            self._count("seeds_lost")
            log.debug("counter already seeded", extra=fields)
        else:
            self._count("fenced_writes")
            log.info("fenced write refused", extra=fields)
            if outcome.generation != generation:
                # Callers that arrived after the reset must not get what we read.
                return Fenced()
            # A newer rebuild overtook our lease. Looping would livelock a key whose loader
            # is slower than a (capped) lease, so return our own fresh read instead.
        return Seeded(value if outcome.value is None else outcome.value)

    async def _load(self, key: str, loader: Loader, deadline: Deadline) -> float:
        """One loader call, bounded by ``deadline``. Keeps 5 (a hung loader times out),
        6 (any loader failure is a ``LoaderError`` to every waiter) and 8 (a non-finite,
        negative or non-numeric value is refused before anything is written)."""
        if deadline.remaining() <= 0:
            raise ReseedTimeoutError(f"no time left to load {key!r}", key=key)
        self._count("loader_calls")
        started = asyncio.get_running_loop().time()
        try:
            pending = loader()
            if not inspect.isawaitable(pending):
                raise InvalidValueError(
                    f"loader for {key!r} must be an async callable; it returned {pending!r}",
                    key=key,
                )
            raw = await wait_until(deadline, pending)
        except asyncio.TimeoutError:
            self._count("loader_errors")
            raise ReseedTimeoutError(
                f"loader for {key!r} did not answer by the deadline", key=key
            ) from None
        except ReseedError:
            self._count("loader_errors")
            raise
        except Exception as exc:
            self._count("loader_errors")
            raise LoaderError(f"loader for {key!r} failed: {exc!r}", key=key) from exc
        finally:
            if self._observer is not None:
                self._observer.on_loader(asyncio.get_running_loop().time() - started)
        value = check_loaded(raw, key)
        # A Snapshot travels on to the seed, which marks the spends it includes.
        return raw if isinstance(raw, Snapshot) else value

    # -- helpers -------------------------------------------------------------------------

    def _budget(self, wait: float | None) -> float:
        if wait is None:
            return self._wait
        return positive_seconds("wait", wait)

    def _count(self, name: str, amount: int = 1) -> None:
        if amount:
            setattr(self._stats, name, getattr(self._stats, name) + amount)
            if self._observer is not None:
                self._observer.on_count(name, amount)

    def _check_open(self) -> None:
        if self._closed:
            raise CoordinatorClosedError("the coordinator is closed")

    async def _guard(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except StoreError:
            self._count("store_errors")
            raise


def _check_loader(loader: object, key: str) -> None:
    # Caught here, a non-callable is a setup mistake; caught in the rebuild, it would reach
    # every waiter as a LoaderError, as if the database had failed.
    if not callable(loader):
        raise ConfigurationError(f"loader for {key!r} must be an async callable, got {loader!r}")
