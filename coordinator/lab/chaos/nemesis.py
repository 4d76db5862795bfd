"""The random chaos's nemesis: a fault schedule drawn from a seed alone, and its execution.

:func:`schedule` draws ``(offset, kind, target, duration)`` faults up front from
``random.Random(seed)``: the same seed replays the same schedule, whatever the machine does.
Faults of different targets overlap freely (a paused pod while a lock master is down and
the store link stalls); two faults never hold the same target at once, and every fault
is healed before the run's end. :class:`Nemesis` runs each fault on its own thread at its
offset: inject, hold for its duration, heal.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import asyncpg
from redis import Redis
from redis.exceptions import RedisError

from ..cliargs import describe
from ..servers import Deployment, Need
from .tcp_proxy import TcpProxy


@dataclass(frozen=True)
class Kind:
    """A kind of fault: the ``group`` of targets it breaks (one fault per target at a
    time), its duration range in seconds (``(0, 0)``: instant) and the embedded server it
    needs a handle on."""

    group: str
    durations: tuple[float, float]
    needs: Need | None = None


KINDS: dict[str, Kind] = {
    "pod-pause": Kind("pod", (0.5, 3.0)),  # SIGSTOP, SIGCONT
    "pod-kill": Kind("pod", (0.5, 2.0)),  # SIGKILL; the replacement starts after the duration
    "master-pause": Kind("master", (0.5, 3.0), "masters"),
    "master-kill": Kind("master", (0.5, 3.0), "masters"),  # down for the duration
    "master-restart": Kind("master", (0.0, 0.0), "masters"),  # back at once, its locks lost
    "store-restart": Kind("store", (0.0, 0.0), "store"),  # back at once, empty
    "counter-expire": Kind("counter", (0.0, 0.0)),  # one entity's counter deleted
    "link-stall": Kind("link", (0.3, 2.0)),  # the pods' link to the store holds every byte
    "db-stop": Kind("postgres", (0.5, 2.0), "postgres"),  # fast shutdown, then start
    "db-lock": Kind("postgres", (0.5, 3.0), "postgres"),  # spend table locked: every query waits
}
MEAN_GAP = 0.8  # seconds between two faults, on average
HEAL_BY = 1.0  # every fault ends this long before the run does
SPACING = 0.5  # rest between two faults on one target


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start of the run
    kind: str
    target: int  # pod slot, lock master or entity index (0 for the single servers)
    duration: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule(seed: int, seconds: float, pods: int, entities: int) -> list[Fault]:
    """The faults of a run, from ``seed`` alone."""
    rng = random.Random(seed)
    targets = {"pod": pods, "master": 3, "counter": entities}
    busy: dict[tuple[str, int], float] = {}
    faults: list[Fault] = []
    at = rng.uniform(0.5, 1.5)
    kinds = sorted(KINDS)
    while at < seconds - HEAL_BY:
        name = rng.choice(kinds)
        kind = KINDS[name]
        target = rng.randrange(targets.get(kind.group, 1))
        duration = round(rng.uniform(*kind.durations), 2)
        slot = (kind.group, target)
        if busy.get(slot, 0.0) <= at and at + duration <= seconds - HEAL_BY:
            faults.append(Fault(round(at, 2), name, target, duration))
            busy[slot] = at + duration + SPACING
        at += rng.expovariate(1 / MEAN_GAP)
    return faults


class PodSlots(Protocol):
    """The pods, by slot, as the nemesis faults them."""

    def pause(self, slot: int) -> None: ...

    def resume(self, slot: int) -> None: ...

    def kill(self, slot: int) -> None: ...

    def replace(self, slot: int) -> None: ...


@dataclass(frozen=True)
class Done:
    """A fault as it ran: when it began (seconds from the start) and how it failed, if."""

    fault: Fault
    began: float
    error: str | None


class Nemesis:
    """Runs a schedule against the servers, the pods and the store link."""

    def __init__(
        self,
        faults: Sequence[Fault],
        env: Deployment,
        slots: PodSlots,
        proxy: TcpProxy,
        counters: Sequence[str],
    ) -> None:
        self.faults = list(faults)
        self.env, self.slots, self.proxy, self.counters = env, slots, proxy, counters
        self.done: list[Done] = []
        self.skipped: Counter[str] = Counter()  # faults on servers given by URL
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._start = 0.0
        self.started = 0.0  # wall clock: the pods' logs and samples are on it
        self._cancel = threading.Event()

    def start(self) -> None:
        self._start, self.started = time.monotonic(), time.time()
        for fault in self.faults:
            needs = KINDS[fault.kind].needs
            if needs is not None and not self.env.controls(needs):
                self.skipped[fault.kind] += 1
                continue
            thread = threading.Thread(target=self._run, args=(fault,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> None:
        """Wait for every fault to be healed (cut short: the run is being abandoned)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def cancel(self) -> None:
        """Start no more faults; those running heal at once."""
        self._cancel.set()

    def counts(self) -> Counter[str]:
        """Faults injected, by kind."""
        return Counter(done.fault.kind for done in self.done if done.error is None)

    def _run(self, fault: Fault) -> None:
        if self._cancel.wait(max(0.0, self._start + fault.at - time.monotonic())):
            return
        began = time.monotonic() - self._start
        error = None
        try:
            self._inject(fault)
        except Exception as exc:
            error = describe(exc)
        with self._lock:
            self.done.append(Done(fault, round(began, 3), error))

    def _hold(self, fault: Fault) -> None:
        self._cancel.wait(fault.duration)

    def _inject(self, fault: Fault) -> None:
        kind, target = fault.kind, fault.target
        if kind.startswith("pod-"):
            self._pod(fault)
        elif kind.startswith("master-"):
            master = self.env.masters[target]
            if kind == "master-restart":
                master.restart()
            elif kind == "master-pause":
                self._around(fault, master.pause, master.resume)
            else:
                self._around(fault, master.kill, master.start)
        elif kind == "store-restart":
            assert self.env.store is not None
            self.env.store.restart()
        elif kind == "counter-expire":
            self._expire(self.counters[target])
        elif kind == "link-stall":
            self._around(fault, self.proxy.stall, self.proxy.heal)
        elif kind == "db-stop":
            assert self.env.postgres is not None
            self._around(fault, self.env.postgres.stop, self.env.postgres.start)
        elif kind == "db-lock":
            asyncio.run(_lock_spend(self.env.servers.pg_dsn, fault.duration))
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    def _expire(self, key: str) -> None:
        """Delete the counter, as its expiry would; the store may be restarting right now
        (another fault), so try for a few seconds."""
        deadline = time.monotonic() + 5.0
        with Redis.from_url(self.env.servers.redis_url, socket_timeout=5.0) as client:
            while True:
                try:
                    client.delete(key)
                    return
                except RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def _pod(self, fault: Fault) -> None:
        if fault.kind == "pod-pause":
            self._around(
                fault,
                lambda: self.slots.pause(fault.target),
                lambda: self.slots.resume(fault.target),
            )
        else:
            self._around(
                fault,
                lambda: self.slots.kill(fault.target),
                lambda: self.slots.replace(fault.target),
            )

    def _around(self, fault: Fault, inject: Callable[[], None], heal: Callable[[], None]) -> None:
        inject()
        try:
            self._hold(fault)
        finally:
            heal()


async def _lock_spend(dsn: str, seconds: float) -> None:
    """Hold the spend table's strongest lock: every read and write of spend waits."""
    conn = await asyncpg.connect(dsn, timeout=5.0)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE budget_entity IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(seconds)
    finally:
        await conn.close()
