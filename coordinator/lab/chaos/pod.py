"""The chaos pod's workload: in a spawned pod (:mod:`coordinator.lab.pods`), its own
coordinators, Redis clients and PostgreSQL pool, running the batches the parent sends."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

from ...coordinator import Loader, ReseedCoordinator
from ...errors import ReseedError
from ...keys import fence_key
from ...sources import PostgresSource
from ..cliargs import describe
from ..pods import Failed, Link, sleep_until
from .common import HANG, QUERY, Op
from .messages import (
    AskStats,
    Counters,
    Done,
    Loaded,
    Outcome,
    Prepare,
    Prepared,
    Profile,
    Release,
    Report,
    Start,
    Work,
)

STALL_LIMIT = 60.0  # a stalled loader gives up by itself if the parent never releases it
POD_POOL = 4  # PostgreSQL connections per pod


async def chaos_pod(link: Link, dsn: str) -> None:
    """A chaos pod (spawned): ready once connected, then the parent's commands until stopped."""
    await _Pod(link, dsn).serve()


class _Pod:
    source: PostgresSource

    def __init__(self, link: Link, dsn: str) -> None:
        self.name = link.name
        self.dsn = dsn
        self.link = link
        self.coordinators: dict[Profile, ReseedCoordinator] = {}
        self.releases: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        source = await PostgresSource.connect(self.dsn, QUERY, max_size=POD_POOL)
        self.source = source
        try:
            self.link.ready()
            while (command := await self.link.next()) is not None:
                if isinstance(command, Prepare):
                    self._spawn(self._prepare(command))
                elif isinstance(command, Start):
                    self._spawn(self._run(command))
                elif isinstance(command, Release):
                    self._release(command.ticket).set()
                elif isinstance(command, AskStats):
                    self._spawn(self._stats(command))
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for coordinator in self.coordinators.values():
                await coordinator.aclose()
            await source.aclose()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _release(self, ticket: int) -> asyncio.Event:
        return self.releases.setdefault(ticket, asyncio.Event())

    async def _coordinator(self, profile: Profile) -> ReseedCoordinator:
        coordinator = self.coordinators.get(profile)
        if coordinator is None:
            coordinator = ReseedCoordinator.from_urls(
                profile.store_url, lock_urls=list(profile.lock_urls), **dict(profile.options)
            )
            self.coordinators[profile] = coordinator
            # Connects to the store, every lock master and PostgreSQL and loads the scripts,
            # so that a scenario measures the protocol, not connection setup.
            warm = f"chaos:warm:{self.name}:{uuid.uuid4().hex[:8]}"

            async def zero() -> float:
                return 0.0

            await coordinator.get(warm, zero)
            await coordinator.increment(warm, 0.0)
            await coordinator.store.delete(warm, fence_key(warm))
            await self.source.pool.fetchval("SELECT 1")
        return coordinator

    async def _prepare(self, command: Prepare) -> None:
        try:
            await self._coordinator(command.profile)
        except Exception as exc:
            self.link.send(Failed(self.name, f"prepare: {describe(exc)}"))
            return
        self.link.send(Prepared(command.ticket))

    async def _stats(self, command: AskStats) -> None:
        coordinator = await self._coordinator(command.profile)
        self.link.send(Counters(command.ticket, coordinator.stats.as_dict()))

    async def _run(self, command: Start) -> None:
        work = command.work
        try:
            coordinator = await self._coordinator(work.profile)
        except Exception as exc:
            self.link.send(Failed(self.name, f"run: {describe(exc)}"))
            return
        loads: Counter[str] = Counter()
        before = coordinator.stats.as_dict()
        if work.start_at is not None:
            await sleep_until(work.start_at)
        callers = await asyncio.gather(
            *(
                self._caller(coordinator, command.ticket, work, i, loads)
                for i in range(work.callers)
            )
        )
        after = coordinator.stats.as_dict()
        report = Report(
            pod=self.name,
            ticket=command.ticket,
            outcomes=tuple(outcome for outcomes in callers for outcome in outcomes),
            loads=dict(loads),
            stats={name: after[name] - before[name] for name in after},
        )
        self.link.send(Done(command.ticket, report))

    async def _caller(
        self,
        coordinator: ReseedCoordinator,
        ticket: int,
        work: Work,
        index: int,
        loads: Counter[str],
    ) -> list[Outcome]:
        key = work.keys[index % len(work.keys)]
        loader = self._loader(ticket, key, work, loads)
        outcomes: list[Outcome] = []
        end = time.monotonic() + work.duration
        turn = index
        while True:
            op = work.ops[turn % len(work.ops)]
            turn += 1
            outcomes.append(await self._call(coordinator, op, key, loader, work))
            if work.duration <= 0:
                if turn - index == len(work.ops):
                    return outcomes
            elif time.monotonic() >= end:
                return outcomes
            if work.pace:
                await asyncio.sleep(work.pace)

    def _loader(self, ticket: int, key: str, work: Work, loads: Counter[str]) -> Loader:
        async def load() -> float:
            loads[key] += 1
            try:
                value = await self.source.fetch(key, work.db_delay)
            except asyncio.CancelledError:
                await asyncio.sleep(work.cancel_delay)
                raise
            if work.stall:
                self.link.send(Loaded(ticket, self.name, key, value))
                await asyncio.wait_for(self._release(ticket).wait(), STALL_LIMIT)
            return value

        return load

    async def _call(
        self, coordinator: ReseedCoordinator, op: Op, key: str, loader: Loader, work: Work
    ) -> Outcome:
        began = time.monotonic()
        value: float | None = None
        error: str | None = None
        typed = False
        try:
            value = await asyncio.wait_for(self._op(coordinator, op, key, loader, work), work.bound)
        except ReseedError as exc:
            error, typed = type(exc).__name__, True
        except asyncio.TimeoutError:
            error = HANG
        except Exception as exc:
            error = type(exc).__name__
        return Outcome(op, key, value, error, typed, time.monotonic() - began)

    @staticmethod
    async def _op(
        coordinator: ReseedCoordinator, op: Op, key: str, loader: Loader, work: Work
    ) -> float | None:
        if op == "get":
            return await coordinator.get(key, loader, wait=work.wait)
        if op == "add":
            return await coordinator.increment(key, work.amount, loader=loader, wait=work.wait)
        if op == "incr":
            return await coordinator.increment(key, work.amount)
        await coordinator.reset(key)
        return None
