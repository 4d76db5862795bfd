"""What the parent asks of a chaos pod, and what it answers (pickled through queues)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import Op


@dataclass(frozen=True)
class Profile:
    """How a pod builds a coordinator: the servers it talks to (possibly through a proxy)
    and the options for :meth:`ReseedCoordinator.from_urls`. A pod keeps one coordinator per
    profile, so pods can be reused across scenarios."""

    store_url: str
    lock_urls: tuple[str, ...]
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def wait(self) -> float:
        return float(dict(self.options).get("wait", 15.0))


@dataclass(frozen=True)
class Work:
    """One batch for one pod: ``callers`` concurrent callers; caller ``i`` uses key
    ``keys[i % len(keys)]`` and runs ``ops`` in turn starting at ``ops[i % len(ops)]``, once
    through, or over and over for ``duration`` seconds (``pace`` apart). The loader reads
    the row named after the key with ``db_delay`` of ``pg_sleep``; with ``stall`` it then
    reports its read and holds the value until the parent releases the batch; cancelled, it
    takes ``cancel_delay`` seconds to give up (a driver whose cancel request is slow). Every
    call is abandoned as a hang after ``bound`` seconds. ``start_at`` (wall clock) lines
    pods up."""

    profile: Profile
    keys: tuple[str, ...]
    ops: tuple[Op, ...] = ("get",)
    callers: int = 1
    db_delay: float = 0.0
    stall: bool = False
    cancel_delay: float = 0.0
    wait: float | None = None
    amount: float = 1.0
    duration: float = 0.0
    pace: float = 0.0
    bound: float = 30.0
    start_at: float | None = None


@dataclass(frozen=True)
class Prepare:
    """Parent to pod: build and warm the coordinator of ``profile``."""

    ticket: int
    profile: Profile


@dataclass(frozen=True)
class Start:
    """Parent to pod: run ``work``; its report comes as :class:`Done`."""

    ticket: int
    work: Work


@dataclass(frozen=True)
class Release:
    """Parent to pod: let the stalled loaders of the batch ``ticket`` return."""

    ticket: int


@dataclass(frozen=True)
class AskStats:
    """Parent to pod: the counters of the coordinator of ``profile``, as :class:`Counters`."""

    ticket: int
    profile: Profile


@dataclass(frozen=True)
class Prepared:
    """Pod to parent: the coordinator asked for by :class:`Prepare` is warm."""

    ticket: int


@dataclass(frozen=True)
class Counters:
    """Pod to parent: the answer to :class:`AskStats`."""

    ticket: int
    stats: dict[str, int]


@dataclass(frozen=True)
class Loaded:
    """A stalled loader read ``value`` for ``key`` and now holds it."""

    ticket: int
    pod: str
    key: str
    value: float


@dataclass(frozen=True)
class Outcome:
    """One call: its value (None: no counter, or no value to return) or its error class
    name; ``typed`` says whether the error is a :class:`ReseedError`."""

    op: Op
    key: str
    value: float | None
    error: str | None
    typed: bool
    seconds: float


@dataclass(frozen=True)
class Report:
    """A batch's result. ``stats`` is the pod coordinator's counters over the batch (a
    concurrent batch on the same pod and profile would be counted in both)."""

    pod: str
    ticket: int
    outcomes: tuple[Outcome, ...]
    loads: dict[str, int]
    stats: dict[str, int]


@dataclass(frozen=True)
class Done:
    """Pod to parent: the report of the batch ``ticket``."""

    ticket: int
    report: Report
