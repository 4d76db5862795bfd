"""The workload of the multi-process tests' pods (spawned by :mod:`coordinator.lab.pods`):
its own coordinator, its own Redis and PostgreSQL clients, and ``callers`` concurrent
callers of one counter.

Spawned children import this module by name through the ``sys.path`` they inherit from the
parent, where pytest's default ``prepend`` import mode has put ``tests/``.

A pod sends one dict per round: the values its callers got (or the errors they raised),
how often its loader ran and its stats for the round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator import ReseedCoordinator
from coordinator.lab.pods import Barrier, Event, Link
from coordinator.sources import PostgresSource
from coordinator.stats import Stats

TABLE = "process_spend"
# pg_sleep in FROM runs once per query: the DB delay that makes the pods' reads overlap.
QUERY = f"SELECT s.value FROM {TABLE} s, pg_sleep($2) WHERE s.id = $1"
# Every wait in a pod is bounded, so a broken coordinator fails the test instead of hanging it.
GATE_TIMEOUT = 30.0

Op = Literal["get", "add"]


@dataclass(frozen=True)
class PodSpec:
    """What one pod does. ``ops[r]`` is round r's call: ``get``, or ``add`` (an increment
    by 1 with the loader, the lagging-source path). ``options`` go to ``from_urls``."""

    name: str
    store_url: str
    lock_urls: tuple[str, ...]
    dsn: str
    key: str
    row: str
    callers: int = 1
    ops: tuple[Op, ...] = ("get",)
    db_delay: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Links:
    """The pod's gates. ``ready`` is passed once the pod is set up; ``gates[r]`` releases
    round r. The loader sets ``loading`` after its DB read and then, if ``proceed`` is
    given, holds the value until the parent sets it (a holder stalled mid-rebuild)."""

    ready: Barrier
    gates: tuple[Barrier, ...]
    loading: Event | None = None
    proceed: Event | None = None


async def run(link: Link, spec: PodSpec, links: Links) -> None:
    """The pod's workload."""
    calls = 0

    async with (
        await PostgresSource.connect(spec.dsn, QUERY, max_size=2) as source,
        ReseedCoordinator.from_urls(
            spec.store_url, lock_urls=list(spec.lock_urls), **spec.options
        ) as coordinator,
    ):

        async def load() -> float:
            nonlocal calls
            calls += 1
            value = await source.fetch(spec.row, spec.db_delay)
            if links.loading is not None:
                links.loading.set()
            if links.proceed is not None:
                await asyncio.to_thread(links.proceed.wait, GATE_TIMEOUT)
            return value

        async def call(op: Op) -> float | None:
            if op == "get":
                return await coordinator.get(spec.key, load)
            return await coordinator.increment(spec.key, 1.0, loader=load)

        await _pass(links.ready)
        for round_no, (gate, op) in enumerate(zip(links.gates, spec.ops, strict=True)):
            await _pass(gate)
            calls, before = 0, coordinator.stats
            outcomes = await asyncio.gather(
                *(call(op) for _ in range(spec.callers)), return_exceptions=True
            )
            link.send(
                {
                    "pod": spec.name,
                    "round": round_no,
                    "values": [o for o in outcomes if not isinstance(o, BaseException)],
                    "errors": [repr(o) for o in outcomes if isinstance(o, BaseException)],
                    "loader_calls": calls,
                    "stats": _delta(coordinator.stats, before),
                }
            )


async def _pass(barrier: Barrier) -> None:
    await asyncio.to_thread(barrier.wait, GATE_TIMEOUT)


def _delta(after: Stats, before: Stats) -> dict[str, int]:
    old = before.as_dict()
    return {name: count - old[name] for name, count in after.as_dict().items()}
