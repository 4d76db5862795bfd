"""ReseedCoordinator: rebuild a missing counter from its source of truth once, fleet-wide.

The whole protocol lives in this file::

    get(key, loader):
      GET key                               hit: return it (the hot path, one round trip)
      miss: one rebuild per key per process (singleflight); the others await it
        loop, paced by tenacity backoff, until the caller's deadline:
          probe key                         present: return it; else note the generation
          try the Redlock lease on (key, generation)
            lost    -> back off and loop (the holder may die, so keep trying)
            no quorum -> go on without a lease (degraded), still fenced
            won     -> token := new fencing token, re-check key (one script)
                       present: return it
                       value := loader()    the one DB read, fleet-wide
                       seed: SET value if key absent and token is still the newest
                       release; return the stored value (or our own read if fenced out)

The lease only saves DB reads; correctness rests on the seed script, which never overwrites a
counter and refuses any write whose token a newer rebuild or a reset has superseded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from tenacity import AsyncRetrying, RetryError, retry_if_result, stop_before_delay
from tenacity.wait import wait_random_exponential

from .errors import (
    ConfigurationError,
    CoordinatorClosedError,
    InvalidValueError,
    LoaderError,
    ReseedError,
    ReseedTimeoutError,
    StoreError,
)
from .keys import lease_name, validate_key
from .lock import LeaseManager, QuorumUnavailable, lock_client
from .singleflight import SingleFlight
from .stats import Stats
from .store import CounterStore
from .values import check_amount, check_loaded

log = logging.getLogger(__name__)

T = TypeVar("T")

Loader = Callable[[], Awaitable[float]]
OnTimeout = Literal["raise", "load"]


def _positive(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if (
        value is None
        or isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")


class ReseedCoordinator:
    """Reads counters from Redis and rebuilds missing ones from a loader, once per miss
    across every process that shares the same counter store and lock masters.

    ``ttl`` is the counter's expiry (None: never), ``lease`` the Redlock lease a rebuild
    holds (extended up to ``lease_extensions`` times while the loader runs), ``wait`` the
    default deadline of a call. ``on_timeout="load"`` makes a call whose deadline passed
    read the loader directly (bounded by another ``wait``) and return that without writing.
    """

    def __init__(
        self,
        store: Redis,
        *,
        lock_masters: Sequence[Redis] | None = None,
        ttl: float | None = 60.0,
        lease: float = 10.0,
        wait: float = 15.0,
        lease_extensions: int = 3,
        backoff_initial: float = 0.005,
        backoff_max: float = 0.1,
        on_timeout: OnTimeout = "raise",
        fence_ttl: float | None = 86400.0,
    ) -> None:
        _positive("ttl", ttl, optional=True)
        _positive("lease", lease)
        _positive("wait", wait)
        _positive("backoff_initial", backoff_initial)
        _positive("backoff_max", backoff_max)
        _positive("fence_ttl", fence_ttl, optional=True)
        if isinstance(lease_extensions, bool) or not isinstance(lease_extensions, int):
            raise ConfigurationError(f"lease_extensions must be an int, got {lease_extensions!r}")
        if lease_extensions < 0:
            raise ConfigurationError(f"lease_extensions must be >= 0, got {lease_extensions}")
        if on_timeout not in ("raise", "load"):
            raise ConfigurationError(f"on_timeout must be 'raise' or 'load', got {on_timeout!r}")
        if fence_ttl is not None and fence_ttl <= lease * (lease_extensions + 1):
            # A fence that expires under a live holder would let its token be granted again.
            raise ConfigurationError("fence_ttl must outlive a lease with all its extensions")
        self._store = CounterStore(store, fence_ttl=fence_ttl)
        self._locks = LeaseManager(
            lock_masters if lock_masters is not None else [store],
            duration=lease,
            extensions=lease_extensions,
        )
        self._ttl = ttl
        self._wait = wait
        self._on_timeout: OnTimeout = on_timeout
        self._backoff = wait_random_exponential(multiplier=backoff_initial, max=backoff_max)
        self._flights: SingleFlight[str, float] = SingleFlight()
        self._stats = Stats()
        self._owned: list[Redis] = []
        self._closed = False

    @classmethod
    def from_urls(
        cls,
        url: str,
        *,
        lock_urls: Sequence[str] | None = None,
        socket_timeout: float = 0.5,
        lock_timeout: float = 0.3,
        **options: Any,
    ) -> ReseedCoordinator:
        """Build the clients too (and close them in :meth:`aclose`).

        The store client retries once, at once, so a pooled connection left stale by a
        server restart does not fail a call; lock clients never retry (see ``lock``).
        """
        store = Redis.from_url(
            url,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
        )
        masters = [lock_client(u, timeout=lock_timeout) for u in lock_urls or []]
        coordinator = cls(store, lock_masters=masters or None, **options)
        coordinator._owned = [store, *masters]
        return coordinator

    @property
    def stats(self) -> Stats:
        """A snapshot of this coordinator's counters."""
        return replace(self._stats)

    async def get(self, key: str, loader: Loader, *, wait: float | None = None) -> float:
        """The counter at ``key``, rebuilt from ``loader`` if it is missing."""
        key = validate_key(key)
        budget = self._budget(wait)
        self._check_open()
        value = await self._guard(self._store.read(key))
        if value is not None:
            self._stats.hits += 1
            return value
        self._stats.misses += 1
        return await self._reseed(key, loader, budget)

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
        budget = self._budget(wait)
        self._check_open()
        deadline = asyncio.get_running_loop().time() + budget
        while True:
            new = await self._guard(self._store.increment(key, amount, self._ttl))
            if new is not None or loader is None:
                return new
            # The counter can vanish again (reset, expiry) between the rebuild and the add.
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                self._stats.timeouts += 1
                raise ReseedTimeoutError(f"could not increment {key!r} within {budget}s", key=key)
            await self._reseed(key, loader, remaining)

    async def reset(self, key: str) -> None:
        """Delete the counter and fence out every rebuild of it in flight, fleet-wide."""
        key = validate_key(key)
        self._check_open()
        await self._guard(self._store.reset(key))
        # A get after this returns must start a fresh rebuild, not join the doomed one.
        self._flights.forget(key)

    async def aclose(self) -> None:
        """Cancel rebuilds in flight and close the clients built by :meth:`from_urls`."""
        if self._closed:
            return
        self._closed = True
        flights = self._flights.in_flight()
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        for client in self._owned:
            await client.aclose()

    async def __aenter__(self) -> ReseedCoordinator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the miss path -------------------------------------------------------------------

    async def _reseed(self, key: str, loader: Loader, budget: float) -> float:
        self._check_open()
        deadline = asyncio.get_running_loop().time() + budget
        try:
            value, joined = await asyncio.wait_for(
                self._guard(self._flights.do(key, lambda: self._rebuild(key, loader, deadline))),
                budget,
            )
        except (asyncio.TimeoutError, ReseedTimeoutError):
            self._stats.timeouts += 1
            if self._on_timeout == "raise":
                raise ReseedTimeoutError(
                    f"no value for counter {key!r} within {budget:.3g}s", key=key
                ) from None
            self._stats.fallback_reads += 1
            fallback_deadline = asyncio.get_running_loop().time() + budget
            return await self._load(key, loader, fallback_deadline)
        if joined:
            self._stats.joined += 1
        return value

    async def _rebuild(self, key: str, loader: Loader, deadline: float) -> float:
        retrying = AsyncRetrying(
            stop=stop_before_delay(max(0.0, deadline - asyncio.get_running_loop().time())),
            wait=self._backoff,
            retry=retry_if_result(lambda value: value is None),
        )
        try:
            value: float = await retrying(self._attempt, key, loader, deadline)
        except RetryError:
            raise ReseedTimeoutError(f"no rebuild of {key!r} by the deadline", key=key) from None
        return value

    async def _attempt(self, key: str, loader: Loader, deadline: float) -> float | None:
        """One try: the stored value, the rebuilt value, or None to back off and retry."""
        present, generation = await self._store.probe(key)
        if present is not None:
            return present
        try:
            lease = await self._locks.try_acquire(lease_name(key, generation))
        except QuorumUnavailable:
            self._stats.lock_degraded += 1
            return await self._seed(key, loader, deadline)
        if lease is None:
            self._stats.leases_lost += 1
            return None
        self._stats.leases_won += 1
        async with lease:
            try:
                return await self._seed(key, loader, deadline)
            finally:
                self._stats.lease_extensions += lease.extensions

    async def _seed(self, key: str, loader: Loader, deadline: float) -> float:
        token, present = await self._store.take_token(key)
        if present is not None:
            return present
        value = await self._load(key, loader, deadline)
        outcome = await self._store.seed(key, value, token, self._ttl)
        if outcome.result == "won":
            self._stats.seeds_won += 1
        elif outcome.result == "present":
            self._stats.seeds_lost += 1
        else:
            # A newer rebuild or a reset superseded us. Looping would livelock a key whose
            # loader is slower than the lease, so return our own fresh read instead.
            self._stats.fenced_writes += 1
            log.info("fenced write refused", extra={"key": key, "token": token})
        return value if outcome.value is None else outcome.value

    async def _load(self, key: str, loader: Loader, deadline: float) -> float:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise ReseedTimeoutError(f"no time left to load {key!r}", key=key)
        self._stats.loader_calls += 1
        try:
            pending = loader()
            if not inspect.isawaitable(pending):
                raise InvalidValueError(
                    f"loader for {key!r} must be an async callable; it returned {pending!r}",
                    key=key,
                )
            raw = await asyncio.wait_for(pending, remaining)
        except asyncio.TimeoutError:
            self._stats.loader_errors += 1
            raise ReseedTimeoutError(
                f"loader for {key!r} did not answer within {remaining:.3g}s", key=key
            ) from None
        except ReseedError:
            self._stats.loader_errors += 1
            raise
        except Exception as exc:
            self._stats.loader_errors += 1
            raise LoaderError(f"loader for {key!r} failed: {exc!r}", key=key) from exc
        return check_loaded(raw, key)

    # -- helpers -------------------------------------------------------------------------

    def _budget(self, wait: float | None) -> float:
        if wait is None:
            return self._wait
        _positive("wait", wait)
        return wait

    def _check_open(self) -> None:
        if self._closed:
            raise CoordinatorClosedError("the coordinator is closed")

    async def _guard(self, pending: Awaitable[T]) -> T:
        try:
            return await pending
        except StoreError:
            self._stats.store_errors += 1
            raise
