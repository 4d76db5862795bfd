"""Per-process call deduplication, after Go's ``singleflight``.

Concurrent callers of ``do(key, fn)`` share one execution of ``fn``: the first caller starts
it as a task, later ones await the same task. The work runs in its own task (not the first
caller's) so a caller that is cancelled or times out leaves the flight running for the rest,
and every waiter gets the same result or the same exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}

    def join(
        self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]
    ) -> tuple[asyncio.Task[V], bool]:
        """The flight for ``key``, started with ``fn`` if none is in the air, and whether
        it was already in the air. Await it through ``asyncio.shield`` so that a waiter
        giving up does not cancel it for the others."""
        task = self._flights.get(key)
        if task is not None:
            return task, True
        task = asyncio.get_running_loop().create_task(fn())
        self._flights[key] = task
        task.add_done_callback(lambda done: self._land(key, done))
        return task, False

    async def do(self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]) -> tuple[V, bool]:
        """Run ``fn`` once for all concurrent callers of ``key``; the result, and whether
        this caller shared a flight already in the air (Go's ``shared``)."""
        task, joined = self.join(key, fn)
        return await asyncio.shield(task), joined

    def forget(self, key: K) -> None:
        """Detach the flight for ``key``: the next caller starts a new one. Callers already
        waiting on the old flight still get its result."""
        self._flights.pop(key, None)

    def in_flight(self) -> list[asyncio.Task[V]]:
        return list(self._flights.values())

    def _land(self, key: K, task: asyncio.Task[V]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            # Mark the exception retrieved: every waiter may have given up already.
            task.exception()
