"""``python -m coordinator chaos --random``: random combined faults, then a checker.

Pods (:mod:`.workload`) run a ledger-mode budget workload on a few entities (keys, teams,
users, an org) through a TCP proxy to the counter store, while the nemesis
(:mod:`.nemesis`) runs a fault schedule drawn from the seed: pods paused and killed (and
replaced), lock masters paused, killed and restarted, the store restarted empty, counters
deleted, the store link stalled, PostgreSQL stopped or locked. Then quiescence: every fault
healed, the pods stopped, the outbox drained once its rows are stale; and the checker
(:mod:`.checker`) judges the calls, the samples and what the servers hold.

Every key and row of a run is named after its tag (``chaos:r<hex>`` keys, ``r<hex>-`` ids)
and removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from ...budget import PostgresSpendSource, spend_key
from .. import pods
from ..pods import Failed, Pod, PodError, Ready
from ..servers import Deployment
from .checker import (
    Final,
    LedgerRow,
    Verdict,
    judge_calls,
    judge_final,
    judge_ledger,
    judge_samples,
    reset_windows,
)
from .common import ChaosError
from .nemesis import Fault, Nemesis, schedule
from .tcp_proxy import TcpProxy
from .workload import (
    BROKEN_FENCE_RESETS,
    BUDGET,
    RESETS,
    Batch,
    Call,
    Plan,
    ResetBegun,
    Sample,
    ledger_guard,
    random_pod,
)

READY_TIMEOUT = 90.0  # every pod spawned, imported and connected, on a busy machine
STOP_TIMEOUT = 60.0  # every pod's last batch after it is told to stop
POLL = 0.02

#: The entities: (scope, name, reset now and then?). Teams and the org are never reset, so
#: their spend must equal their ledger rows exactly.
ENTITIES = (
    ("key", "k0", True),
    ("key", "k1", True),
    ("key", "k2", True),
    ("team", "t0", False),
    ("team", "t1", False),
    ("user", "u0", True),
    ("user", "u1", True),
    ("org", "o0", False),
)


@dataclass(frozen=True)
class Options:
    seconds: float = 60.0
    seed: int = 1
    pods: int = 4
    callers: int = 3
    resets: bool = True  # reset a key's or a user's spend now and then
    #: A deliberate bug for the checker to catch (:data:`.workload.SABOTAGES`).
    sabotage: str | None = None


@dataclass
class _Log:
    """Everything the pods said."""

    calls: list[Call] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    begun: list[ResetBegun] = field(default_factory=list)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # latest, by pod
    finished: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def take(self, message: Any, killed: set[str]) -> None:
        if isinstance(message, Batch):
            self.calls += message.calls
            self.samples += message.samples
            self.stats[message.pod] = message.stats
            if message.final:
                self.finished.add(message.pod)
        elif isinstance(message, ResetBegun):
            self.begun.append(message)
        elif isinstance(message, Failed):
            if message.pod not in killed:
                self.failures.append(f"{message.pod}: {message.error}")
        elif not isinstance(message, Ready):
            self.failures.append(f"unexpected message {message!r}")


class Slots:
    """The pods by slot: faulted by the nemesis's threads, read and replaced by the main
    thread (a killed pod's queues are drained before its replacement closes them)."""

    def __init__(self, fleet: pods.Fleet, plan: Plan, count: int) -> None:
        self._fleet = fleet
        self._lock = threading.Lock()
        self.pods = [fleet.spawn(random_pod, plan) for _ in range(count)]
        self.started = count
        self.deaths: dict[str, float] = {}  # pods we killed: when
        self._wanted: set[int] = set()

    def pause(self, slot: int) -> None:
        with self._lock:
            self.pods[slot].pause()

    def resume(self, slot: int) -> None:
        with self._lock:
            self.pods[slot].resume()

    def kill(self, slot: int) -> None:
        with self._lock:
            pod = self.pods[slot]
            self.deaths[pod.name] = time.time()
            pod.kill()

    def replace(self, slot: int) -> None:
        with self._lock:
            self._wanted.add(slot)

    def collect(self, log: _Log, seconds: float) -> None:
        """Take the pods' messages for about ``seconds``; start the replacements asked for."""
        end = time.monotonic() + seconds
        while True:
            with self._lock:
                current = list(self.pods)
                killed = set(self.deaths)
            for pod in current:
                _drain(pod, log, killed, 0.0)
            self._replace(log)
            if time.monotonic() >= end:
                return
            time.sleep(POLL)

    def _replace(self, log: _Log) -> None:
        with self._lock:
            wanted, self._wanted = self._wanted, set()
            killed = set(self.deaths)
            for slot in sorted(wanted):
                _drain(self.pods[slot], log, killed, 0.2)
                self.pods[slot] = self._fleet.replace(self.pods[slot])
                self.started += 1

    def stop(self, log: _Log) -> None:
        """Tell every live pod to stop and take its messages up to its last batch."""
        with self._lock:
            live = [pod for pod in self.pods if pod.name not in self.deaths]
        for pod in live:
            pod.send(None)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(pod.name not in log.finished for pod in live):
            if time.monotonic() > deadline:
                late = [pod.name for pod in live if pod.name not in log.finished]
                log.failures.append(f"no last batch from {late} within {STOP_TIMEOUT:g}s")
                return
            for pod in live:
                _drain(pod, log, set(self.deaths), POLL)


def _drain(pod: Pod, log: _Log, killed: set[str], wait: float) -> None:
    """Every message ``pod`` has queued (waiting up to ``wait`` for the first)."""
    while (message := pod.take(wait)) is not None:
        log.take(message, killed)
        wait = 0.0
        if isinstance(message, Failed):
            return


def run_random(env: Deployment, options: Options) -> Verdict:
    """One random run on ``env``; its keys and rows are removed at the end."""
    tag = f"r{uuid.uuid4().hex[:8]}"
    entities = tuple((scope, f"{tag}-{name}") for scope, name, _ in ENTITIES)
    faults = schedule(options.seed, options.seconds, options.pods, len(entities))
    with TcpProxy.to(env.servers.redis_url) as proxy:
        plan = Plan(
            dsn=env.servers.pg_dsn,
            store_url=proxy.url,
            sample_url=env.servers.redis_url,
            lock_urls=env.servers.lock_urls,
            namespace=f"chaos:{tag}",
            tag=tag,
            entities=entities,
            resettable=tuple(i for i, (_, _, resets) in enumerate(ENTITIES) if resets),
            callers=options.callers,
            resets=_reset_share(options),
            sabotage=options.sabotage,
        )
        try:
            asyncio.run(_setup(plan))
            log, nemesis, slots = _run(env, plan, proxy, faults, options)
            final = asyncio.run(_settle(env, plan))
        finally:
            env.restore()
            _cleanup(env, plan)
    steady = [ref for ref, (_, _, resets) in zip(plan.refs, ENTITIES, strict=True) if not resets]
    windows = reset_windows(log.calls, log.begun, slots.deaths)
    sampled, lag = judge_samples(log.samples, plan.refs, windows, nemesis.started)
    stats = Counter[str]()
    for each in log.stats.values():
        stats.update(each)
    return Verdict(
        seed=options.seed,
        seconds=options.seconds,
        pods=options.pods,
        entities=plan.refs,
        schedule=[fault.as_dict() for fault in faults],
        faults=dict(nemesis.counts()),
        fault_errors=[f"{d.fault.kind}: {d.error}" for d in nemesis.done if d.error],
        skipped=dict(nemesis.skipped),
        pods_started=slots.started,
        calls=dict(Counter(call.op for call in log.calls)),
        errors=dict(Counter(str(call.error) for call in log.calls if call.error)),
        lag=lag,
        loader_calls=stats["loader_calls"],
        misses=stats["misses"],
        checks=[
            judge_calls(log.calls, log.failures),
            judge_final(final),
            judge_ledger(log.calls, final, steady),
            sampled,
        ],
    )


def _reset_share(options: Options) -> float:
    """The share of requests followed by a reset: more of them under ``broken-fence``, whose
    stale seeds need resets to land on."""
    if not options.resets:
        return 0.0
    return BROKEN_FENCE_RESETS if options.sabotage == "broken-fence" else RESETS


def _run(
    env: Deployment, plan: Plan, proxy: TcpProxy, faults: list[Fault], options: Options
) -> tuple[_Log, Nemesis, Slots]:
    log = _Log()
    with pods.Fleet("rpod", quiet=True) as fleet:
        slots = Slots(fleet, plan, options.pods)
        try:
            fleet.answers(slots.pods, READY_TIMEOUT)
        except PodError as exc:
            raise ChaosError(f"the pods did not start: {exc}") from exc
        counters = [
            spend_key(scope, entity_id, plan.namespace) for scope, entity_id in plan.entities
        ]
        nemesis = Nemesis(faults, env, slots, proxy, counters)
        nemesis.start()
        try:
            slots.collect(log, options.seconds)
        except BaseException:
            nemesis.cancel()
            raise
        finally:
            nemesis.join(timeout=60.0)
            env.restore()
            proxy.heal()
        slots.collect(log, 0.0)
        slots.stop(log)
    return log, nemesis, slots


async def _setup(plan: Plan) -> None:
    source = await PostgresSpendSource.connect(plan.dsn, max_size=1)
    try:
        await source.install_schema()
        for scope, entity_id in plan.entities:
            await source.set_budget(scope, entity_id, BUDGET)  # type: ignore[arg-type]
    finally:
        await source.aclose()


async def _settle(env: Deployment, plan: Plan) -> Final:
    """Drain what is left once it is stale, then read the counters, the DB and the ledger."""
    source = await PostgresSpendSource.connect(plan.dsn, max_size=2)
    coordinator, guard = ledger_guard(plan, env.servers.redis_url, source, None)
    refs = plan.refs
    try:
        drained = 0
        for _ in range(10):
            await asyncio.sleep(plan.drain_after + plan.drain_interval)
            drained += await guard.drain()
            left = await source.pool.fetchval(
                "SELECT count(*) FROM spend_outbox WHERE entity = ANY($1::text[])", refs
            )
            if not left:
                break
        keys = [guard.key(scope, entity_id) for scope, entity_id in plan.entities]
        raw = await coordinator.store.mget(keys)
        spends = [await source.fetch(scope, entity_id) for scope, entity_id in plan.entities]  # type: ignore[arg-type]
        rebuilt = await guard.check([(*entity, BUDGET) for entity in plan.entities])
        rows = await source.pool.fetch(
            "SELECT request_id, cost, entities FROM spend_ledger WHERE request_id LIKE $1",
            f"{plan.tag}-%",
        )
        return Final(
            counters={
                ref: None if v is None else float(v) for ref, v in zip(refs, raw, strict=True)
            },
            spends=dict(zip(refs, spends, strict=True)),
            rebuilt={ref: float(v) for ref, v in zip(refs, rebuilt, strict=True) if v is not None},
            outbox_left=int(left),
            drained=drained,
            ledger=[
                LedgerRow(row["request_id"], float(row["cost"]), tuple(row["entities"]))
                for row in rows
            ],
        )
    finally:
        await coordinator.aclose()
        await source.aclose()


def _cleanup(env: Deployment, plan: Plan) -> None:
    async def rows() -> None:
        conn = await asyncpg.connect(plan.dsn, timeout=10.0)
        try:
            ids = [entity_id for _, entity_id in plan.entities]
            await conn.execute("DELETE FROM budget_entity WHERE entity_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM spend_outbox WHERE entity = ANY($1::text[])", plan.refs)
            await conn.execute("DELETE FROM spend_ledger WHERE request_id LIKE $1", f"{plan.tag}-%")
        finally:
            await conn.close()

    with contextlib.suppress(RedisError, OSError, asyncpg.PostgresError):
        env.remove(plan.namespace)
        asyncio.run(rows())
