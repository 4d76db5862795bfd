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
import math
import sys
import time
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

from .clients import redis_client
from .deadline import Deadline, current_deadline
from .errors import ReseedTimeoutError
from .keys import lease_name

log = logging.getLogger(__name__)

T = TypeVar("T")


class _MasterErrors(logging.Filter):
    """pottery logs an ERROR with a traceback for every failed master call: with one dead
    master, one per acquire. We drop those and say instead, at most once a minute, how many
    master calls failed, since a minority of dead masters is otherwise invisible (acquires
    still win) until the next failure takes the quorum."""

    interval = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._dropped = 0
        self._reported_at = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if "caught" not in str(record.msg):
            return True
        self._dropped += 1
        now = time.monotonic()
        if now - self._reported_at >= self.interval:
            latest = record.args[-1] if isinstance(record.args, tuple) and record.args else "?"
            log.warning(
                "lock master calls failing: %d since the last report (latest: %s)",
                self._dropped,
                latest,
                extra={"outcome": "master_error", "errors": self._dropped},
            )
            self._dropped, self._reported_at = 0, now
        return False


master_errors = _MasterErrors()
logging.getLogger("pottery").addFilter(master_errors)


class QuorumUnavailable(Exception):
    """Too many lock masters failed for any acquire to succeed."""


def lock_client(url: str, *, timeout: float = 0.3) -> Redis:
    """A lock-master client that fails fast: no retries, short connect and read timeouts."""
    return redis_client(url, timeout=timeout)


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
    """A held Redlock. Between :meth:`hold` and :meth:`let_go` it is extended in the
    background (every half lease, up to the manager's cap if it has one) so that only a dead
    or stalled holder is overtaken. :meth:`let_go` releases it in the background, so the
    holder's callers need not wait for the masters; a lease that already expired is not
    an error."""

    def __init__(
        self, key: str, lock: AIORedlock, duration: float, on_extend: Callable[[], None]
    ) -> None:
        self._key = key
        self._lock = lock
        self._duration = duration
        self._on_extend = on_extend
        self._keeper: asyncio.Task[None] | None = None

    def hold(self) -> None:
        self._keeper = asyncio.get_running_loop().create_task(self._keep())

    def let_go(self) -> asyncio.Task[None]:
        """Stop extending and release; the release runs on in the returned task."""
        if self._keeper is not None:
            self._keeper.cancel()
        return asyncio.get_running_loop().create_task(self._let_go())

    async def _let_go(self) -> None:
        # Whatever the caller's deadline: past the lease's own, a release is moot.
        current_deadline.set(Deadline(asyncio.get_running_loop().time() + self._duration))
        if self._keeper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        try:
            await _release(self._lock)
        except Exception as exc:  # nobody awaits this task for its result
            log.warning(
                "releasing the lease on %s failed (it expires on its own): %r",
                self._key,
                exc,
                extra={"key": self._key, "outcome": "release_failed"},
            )

    async def _keep(self) -> None:
        pause = self._duration / 2
        while True:
            # Half the lease leaves room for a slow master before the lease lapses.
            await asyncio.sleep(pause)
            pause = self._duration / 2
            # An extension that lands after the lease lapsed is moot, however long the
            # flight's deadline: that is how long it may queue for a connection.
            current_deadline.set(Deadline(asyncio.get_running_loop().time() + pause))
            try:
                await _finish(self._lock.extend())
            except TooManyExtensions:
                return
            except (ExtendUnlockedLock, QuorumIsImpossible):
                log.warning(
                    "lease on %s lapsed while rebuilding; the fence will reject a late write",
                    self._key,
                    extra={"key": self._key, "outcome": "lease_lapsed"},
                )
                return
            except Exception as exc:
                # Not a verdict on the lease (pottery raises those above), so try again,
                # soon enough to land before the lease lapses. Left to escape, it would
                # also abort the lease's release.
                pause = self._duration / 8
                log.warning(
                    "extending the lease on %s failed (%s: %s); retrying in %.3gs",
                    self._key,
                    type(exc).__name__,
                    exc,
                    pause,
                    extra={"key": self._key, "outcome": "extend_failed"},
                )
                continue
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

    async def try_acquire(
        self, key: str, generation: int, on_extend: Callable[[], None]
    ) -> Lease | None:
        """The lease for rebuilding ``key`` in reset generation ``generation``, or None if
        another holder has it.

        Raises :class:`QuorumUnavailable` when a majority of masters errored.
        """
        lock = AIORedlock(
            key=lease_name(key, generation),
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
                "lock quorum unavailable: %d of %d masters failed; rebuilding %s without a "
                "lease (still fenced)",
                failed,
                len(self.masters),
                key,
                extra={
                    "key": key,
                    "outcome": "degraded",
                    "failed_masters": failed,
                    "masters": len(self.masters),
                },
            )
            raise QuorumUnavailable(key) from exc
        except ReseedTimeoutError:
            # The call's deadline passed while a master's command queued for a connection:
            # a verdict on the caller's patience, not on the masters.
            with contextlib.suppress(Exception):
                await _release(lock)
            raise
        except Exception as exc:
            # pottery counts only a master's RedisError as a failed master; anything else
            # (a socket or asyncio error redis-py let through) aborts the whole acquire. We
            # cannot tell how many masters it left locked: undo what we may hold, degrade.
            log.warning(
                "lock masters failed outside redis-py's errors (%s: %s); rebuilding %s "
                "without a lease (still fenced)",
                type(exc).__name__,
                exc,
                key,
                extra={"key": key, "outcome": "degraded", "masters": len(self.masters)},
            )
            with contextlib.suppress(Exception):
                await _release(lock)
            raise QuorumUnavailable(key) from exc
        return Lease(key, lock, self.duration, on_extend) if acquired else None
