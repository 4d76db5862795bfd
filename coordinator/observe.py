"""The hook through which a coordinator reports what it does, for metrics exporters.

Every count is also kept in :class:`~coordinator.stats.Stats`; an observer adds durations
and lets an exporter (Prometheus, StatsD, logs) see events as they happen. Observers are
called inline on the event loop, so they must be cheap and must not raise.
"""

from __future__ import annotations

from typing import Literal, Protocol

#: How a call that missed ended: its flight (or its timeout fallback) ran the loader
#: ("loaded"), it waited for a rebuild elsewhere, in this process or another ("waited"), or
#: it ended with an error ("failed").
MissRole = Literal["loaded", "waited", "failed"]


class Observer(Protocol):
    def on_count(self, name: str, amount: int = 1) -> None:
        """``name`` is a :class:`~coordinator.stats.Stats` field."""

    def on_loader(self, seconds: float) -> None:
        """One loader call (the DB read) took ``seconds``, successful or not."""

    def on_miss(self, role: MissRole, seconds: float) -> None:
        """A call that missed got its value, or its error, after ``seconds``."""
