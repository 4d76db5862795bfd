"""Redlock leases: the efficiency device that lets one process, fleet-wide, read the DB.

Correctness never rests on the lease (the seed is fenced), so every failure here degrades to
"no lease" instead of an error. Three facts about pottery shape this module:

* an ``AIORedlock`` object holds the token of its last acquire, so sharing one between
  concurrent tasks makes the holder's release fail: we make a new object per attempt;
* a call fans out to every master in tasks of its own: cancelling it orphans those tasks and
  can leave the lock on the masters for the whole lease. So calls are bounded by the lock
  clients' socket timeouts, never by ``wait_for``, and a cancelled caller first lets its
  call finish (and undoes an acquire that succeeded meanwhile): see :func:`_finish`;
* a dead master costs seconds per acquire under redis-py's default retries, so lock clients
  are built with retries off and short timeouts (:func:`lock_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

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

T = TypeVar("T")


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


async def _finish(call: Awaitable[T], undo: Callable[[T], Awaitable[object]] | None = None) -> T:
    """Await a pottery call; if the caller is cancelled, let the call finish first (it is
    bounded by socket timeouts), run ``undo`` on its result, then go on cancelling."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            result = await task
            if undo is not None:
                await undo(result)
        raise


async def _release(lock: AIORedlock) -> None:
    with contextlib.suppress(ReleaseUnlockedLock, QuorumIsImpossible):
        await _finish(lock.release())


class Lease:
    """A held Redlock. Inside ``async with`` it is extended in the background (every half
    lease, while the holder runs, up to the manager's cap if it has one) so that only a
    dead or stalled holder is overtaken; on exit it is released, and a lease that already
    expired is not an error."""

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
        await _release(self._lock)

    async def _keep(self) -> None:
        while True:
            # Half the lease leaves room for a slow master before the lease lapses.
            await asyncio.sleep(self._duration / 2)
            try:
                await _finish(self._lock.extend())
            except TooManyExtensions:
                return
            except (ExtendUnlockedLock, QuorumIsImpossible):
                log.warning("lease %s lapsed; the fence will reject a late write", self._lock.key)
                return
            self._on_extend()


class LeaseManager:
    """Non-blocking Redlock acquires on a fixed set of masters."""

    def __init__(
        self, masters: Sequence[Redis], *, duration: float, extensions: int | None
    ) -> None:
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
            # No cap: the holder's work is bounded by its caller's deadline anyway.
            num_extensions=sys.maxsize if self.extensions is None else self.extensions,
            raise_on_redis_errors=True,
        )
        try:
            acquired = await _finish(
                lock.acquire(blocking=False),
                undo=lambda won: _release(lock) if won else asyncio.sleep(0),
            )
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
