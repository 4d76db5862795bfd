"""Redlock leases: the efficiency device that lets one process, fleet-wide, read the DB.

Correctness never rests on the lease (the seed is fenced), so every failure here degrades to
"no lease" instead of an error. Three facts about pottery shape this module:

* an ``AIORedlock`` object holds the token of its last acquire, so sharing one between
  concurrent tasks makes the holder's release fail: we make a new object per attempt;
* cancelling an acquire leaves the lock on the masters for the whole lease, so acquires are
  bounded by the lock clients' socket timeouts, never by ``wait_for``;
* a dead master costs seconds per acquire under redis-py's default retries, so lock clients
  are built with retries off and short timeouts (:func:`lock_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from pottery import AIORedlock
from pottery.exceptions import (
    ExtendUnlockedLock,
    QuorumIsImpossible,
    ReleaseUnlockedLock,
    TooManyExtensions,
)
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)


class _DropMasterTracebacks(logging.Filter):
    """pottery logs an ERROR with a traceback for every failed master call; one acquire
    against a dead master would flood the logs. We log one warning per attempt instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "caught" not in str(record.msg)


logging.getLogger("pottery").addFilter(_DropMasterTracebacks())


class QuorumUnavailable(Exception):
    """Too many lock masters failed for any acquire to succeed."""


def lock_client(url: str, *, timeout: float = 0.3) -> Redis:
    """A lock-master client that fails fast: no retries, short connect and read timeouts."""
    return Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


class Lease:
    """A held Redlock. Inside ``async with`` it is extended in the background (a bounded
    number of times) so that only a dead or stalled holder is overtaken; on exit it is
    released, and a lease that already expired is not an error."""

    def __init__(self, lock: AIORedlock, duration: float, on_extend: Callable[[], None]) -> None:
        self._lock = lock
        self._duration = duration
        self._on_extend = on_extend
        self._keeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        self._keeper = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        with contextlib.suppress(ReleaseUnlockedLock, QuorumIsImpossible):
            await self._lock.release()

    async def _keep(self) -> None:
        while True:
            # Half the lease leaves room for a slow master before the lease lapses.
            await asyncio.sleep(self._duration / 2)
            try:
                await self._lock.extend()
            except TooManyExtensions:
                return
            except (ExtendUnlockedLock, QuorumIsImpossible):
                log.warning("lease %s lapsed; the fence will reject a late write", self._lock.key)
                return
            self._on_extend()


class LeaseManager:
    """Non-blocking Redlock acquires on a fixed set of masters."""

    def __init__(self, masters: Sequence[Redis], *, duration: float, extensions: int) -> None:
        if not masters:
            raise ValueError("at least one lock master is required")
        self.masters = list(masters)
        self.duration = duration
        self.extensions = extensions

    async def try_acquire(self, name: str, on_extend: Callable[[], None]) -> Lease | None:
        """The lease on ``name``, or None if another holder has it.

        Raises :class:`QuorumUnavailable` when a majority of masters errored.
        """
        lock = AIORedlock(
            key=name,
            masters=self.masters,
            auto_release_time=self.duration,
            num_extensions=self.extensions,
            raise_on_redis_errors=True,
        )
        try:
            acquired = await lock.acquire(blocking=False)
        except QuorumIsImpossible as exc:
            failed = len(list(exc.redis_errors))
            log.warning(
                "lock quorum unavailable for %r: %d of %d masters failed",
                name,
                failed,
                len(self.masters),
            )
            raise QuorumUnavailable(name) from exc
        return Lease(lock, self.duration, on_extend) if acquired else None
