"""A rebuild's deadline, which callers who join the rebuild later may push back.

A flight (one rebuild shared by a process's callers) must keep going as long as its most
patient caller waits: otherwise a caller with a long ``wait`` that joins a flight started by
an impatient one would inherit the impatient caller's timeout. Each caller still enforces
its own budget on its own wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextvars import ContextVar, Token
from typing import TypeVar

from tenacity import RetryCallState
from tenacity.stop import stop_base

T = TypeVar("T")


class Deadline:
    def __init__(self, at: float) -> None:
        self.at = at

    def extend(self, at: float) -> None:
        self.at = max(self.at, at)

    def remaining(self) -> float:
        return self.at - asyncio.get_running_loop().time()


#: The deadline of the coordinator call running in this context (None: no call). Tasks
#: inherit it, so a flight's commands and pottery's per-master tasks see it too. Pools read
#: it to bound how long a command may queue for a connection (see :mod:`coordinator.clients`).
current_deadline: ContextVar[Deadline | None] = ContextVar("current_deadline", default=None)


class bounded_by:  # lower case: used as a ``with`` statement, like contextlib's helpers
    """Make ``deadline`` the :data:`current_deadline` of the ``with`` block."""

    __slots__ = ("_token", "deadline")
    _token: Token[Deadline | None]

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __enter__(self) -> Deadline:
        self._token = current_deadline.set(self.deadline)
        return self.deadline

    def __exit__(self, *exc_info: object) -> None:
        current_deadline.reset(self._token)

    @classmethod
    def budget(cls, seconds: float) -> bounded_by:
        return cls(Deadline(asyncio.get_running_loop().time() + seconds))


class stop_before_deadline(stop_base):  # lower case, like tenacity's strategies
    """Stop retrying when the next backoff would end past the deadline, as tenacity's
    ``stop_before_delay`` does, but reading a deadline that may move."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return (retry_state.upcoming_sleep or 0.0) >= self.deadline.remaining()


async def wait_until(deadline: Deadline, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` until the deadline (re-read whenever it is reached), then cancel
    it and raise ``asyncio.TimeoutError``."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            remaining = deadline.remaining()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait({task}, timeout=remaining)
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
