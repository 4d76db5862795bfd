"""A warm pool of race pods, so that a sweep of many races spawns its interpreters once.

Each pod of :mod:`coordinator.lab.race` is a fresh interpreter that connects and warms up before
its one race: seconds of setup per race, and 16 pods x dozens of races would not fit a
benchmark's time budget. Here ``size`` pods are spawned once, each holding a warm contender
per variant (its own clients, connection pools, Lua scripts, pub/sub connection) and a
PostgreSQL pool, as long-lived proxy pods do. A round races the first ``pods`` of them on a
fresh cold key: the parent sends each a start instant a little ahead, they sleep to it on
their own timers, and each reports a :class:`~coordinator.race.PodReport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

from redis import Redis

from ...keys import fence_key
from ...values import parse_stored
from ..pods import FAIL_FAST, SETUP_TIMEOUT, Fleet, Link, Pod, Timeouts, sleep_until, start_at
from ..race import (
    CALL_TIMEOUT,
    Contender,
    PodReport,
    PodSpec,
    Strategy,
    open_contender,
    open_source,
    prepare_race,
    remove_row,
    run_round,
)
from ..servers import Servers, commands_processed, store_client

# Ahead of the start, so that every pod has the message and its tasks ready; pods in the
# pool are idle and warm, so this is much shorter than a fresh race's barrier lead.
ROUND_LEAD = 0.05
ROUND_LEAD_PER_POD = 0.005


@dataclass(frozen=True)
class Variant:
    """A contender under a bench name: a race strategy and its options."""

    name: str
    strategy: Strategy
    wake_on_seed: bool = True


@dataclass(frozen=True)
class _Setup:
    """What every pod of the pool needs; pickled to each at spawn."""

    servers: Servers
    variants: tuple[Variant, ...]
    callers: int
    row_id: str
    prefix: str
    timeouts: Timeouts

    def spec(self, variant: Variant, key: str, db_delay_ms: float) -> PodSpec:
        return PodSpec(
            strategy=variant.strategy,
            callers=self.callers,
            db_delay_ms=db_delay_ms,
            servers=self.servers,
            key=key,
            row_id=self.row_id,
            wake_on_seed=variant.wake_on_seed,
            timeouts=self.timeouts,
        )

    def warm_key(self, index: int, variant: Variant) -> str:
        return f"{self.prefix}:warm:{index}:{variant.name}"


@dataclass(frozen=True)
class _Job:
    variant: str
    key: str
    db_delay_ms: float
    at: float  # the wall-clock start


@dataclass
class Round:
    """One race of ``pods`` pods of the pool."""

    variant: str
    pods: int
    db_delay_ms: float
    db_value: float
    reports: list[PodReport]
    final_counter: float | None
    commands: dict[str, int]  # commands the servers ran for the round (scripts' included)


# -- a pod ---------------------------------------------------------------------------------


async def pool_pod(link: Link, setup: _Setup, index: int) -> None:
    """A pooled pod (spawned): ready once warm, then one report per job until stopped."""
    async with AsyncExitStack() as stack:
        source = await open_source(setup.servers, stack)
        contenders: dict[str, Contender] = {}
        for variant in setup.variants:
            spec = setup.spec(variant, setup.warm_key(index, variant), 0.0)
            contenders[variant.name] = await open_contender(spec, source, spec.key, stack)
        link.ready()
        while (job := await link.next()) is not None:
            variant = next(v for v in setup.variants if v.name == job.variant)
            report = await run_round(
                setup.spec(variant, job.key, job.db_delay_ms),
                index,
                contenders[job.variant],
                source,
                functools.partial(sleep_until, job.at),
            )
            link.send(report)


# -- the parent ----------------------------------------------------------------------------


class PodPool:
    """``size`` warm pods racing on ``servers``; use as a context manager."""

    def __init__(
        self,
        servers: Servers,
        variants: Sequence[Variant],
        *,
        size: int,
        callers: int,
        db_value: float = 100.0,
        timeouts: Timeouts = FAIL_FAST,
    ) -> None:
        run_id = uuid.uuid4().hex[:12]
        self.size = size
        self.db_value = db_value
        self._setup = _Setup(
            servers, tuple(variants), callers, f"bench-{run_id}", f"bench:{run_id}", timeouts
        )
        self._fleet = Fleet("bench-pod-")
        self._members: list[Pod] = []
        self._rounds = 0
        self._client = store_client(servers.redis_url, socket_timeout=5.0)
        self._lock_clients = [
            Redis.from_url(url, socket_timeout=5.0)
            for url in dict.fromkeys(servers.lock_urls)
            if url != servers.redis_url
        ]

    def __enter__(self) -> PodPool:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def race(self, variant: str, pods: int, db_delay_ms: float) -> Round:
        """Race the first ``pods`` pods with ``variant`` on a fresh cold key."""
        if not 1 <= pods <= self.size:
            raise ValueError(f"pods must be in 1..{self.size}, got {pods}")
        self._rounds += 1
        key = f"{self._setup.prefix}:spend:{self._rounds}"
        at = start_at(pods, ROUND_LEAD, ROUND_LEAD_PER_POD)
        members = self._members[:pods]
        before = self._commands()
        for member in members:
            member.send(_Job(variant, key, db_delay_ms, at))
        reports = self._fleet.answers(members, at - time.time() + CALL_TIMEOUT + 10.0)
        after = self._commands()
        # Less the INFO of the first snapshot, which the second one counts: one per server.
        commands = {
            "store": after["store"] - before["store"] - after["store_servers"],
            "locks": after["locks"] - before["locks"] - len(self._lock_clients),
        }
        raw = self._client.get(key)
        self._client.delete(key, fence_key(key))
        final = None if raw is None else parse_stored(raw, key)
        return Round(variant, pods, db_delay_ms, self.db_value, reports, final, commands)

    def _commands(self) -> dict[str, int]:
        """Commands processed so far by the counter store and by the lock masters."""

        def processed(client: Redis) -> int:
            return int(client.info("stats")["total_commands_processed"])

        store, servers = commands_processed(self._client)
        return {
            "store": store,
            "store_servers": servers,
            "locks": sum(processed(client) for client in self._lock_clients),
        }

    def close(self) -> None:
        self._fleet.close()
        self._members = []
        with contextlib.suppress(Exception):
            warm = [
                self._setup.warm_key(index, variant)
                for index in range(self.size)
                for variant in self._setup.variants
            ]
            self._client.delete(*warm, *map(fence_key, warm))
            asyncio.run(remove_row(self._setup.servers, self._setup.row_id))
        for client in (self._client, *self._lock_clients):
            client.close()

    def _start(self) -> None:
        asyncio.run(prepare_race(self._setup.servers, self._setup.row_id, self.db_value))
        self._members = [
            self._fleet.spawn(pool_pod, self._setup, index) for index in range(self.size)
        ]
        self._fleet.answers(self._members, SETUP_TIMEOUT)
        # Every contender's first lost race opens what a warm pod keeps open (the pub/sub
        # connection of the seed wake-up, the lock clients' sockets): not part of a cold miss.
        for variant in self._setup.variants:
            self.race(variant.name, self.size, 0.0)
