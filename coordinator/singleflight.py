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

    async def do(self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]) -> tuple[V, bool]:
        """Run ``fn`` once for all concurrent callers of ``key``.

        Returns the result and whether this caller joined a flight already in the air.
        """
        task = self._flights.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(fn())
            self._flights[key] = task
            task.add_done_callback(lambda done: self._land(key, done))
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
