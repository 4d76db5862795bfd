"""Mass recovery: a fleet serving steady traffic when its counter store restarts empty.

P pods serve calls over K live counters whose authoritative values are PostgreSQL rows.
Every pod's callers alternate between a Zipf-ish draw (popular counters are asked for by
every pod at once) and the next counter of the pod's own sweep over all K (so that every
counter is asked for again, in a different order on each pod). Mid-run the counter store
is killed and started again, empty, on the same port; from the moment it serves again
until every counter is back, per strategy:

* DB reads (the loaders' calls): K for a fleet that reads each counter once, up to P x K;
* errors of the calls that started once the store served again (the calls that started
  while it was down are counted apart: nothing could answer them);
* the time until every counter is back, and the p50/p99 of the calls made meanwhile;
* the commands the counter store and the lock masters ran, and the pods' CPU time, per
  recovered counter.

Each pod also reports when it read the DB, for the plot of DB reads over time.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from redis import Redis

from ...sources import PostgresSource
from ..embedded import RedisServer
from ..pods import SETUP_TIMEOUT, Fleet, Link
from ..race import CONTENDERS, PodSpec, Strategy, percentile
from ..servers import Servers
from ..table import format_table

TABLE = "reseed_recovery"
QUERY = f"SELECT spend FROM {TABLE}, pg_sleep($2) WHERE id = $1"
ZIPF_EXPONENT = 1.0
CPU_SAMPLE = 0.05  # seconds between a pod's CPU-time samples
POLL = 0.05  # seconds between the parent's checks that every counter is back
REPORT_TIMEOUT = 60.0  # for the pods' reports once told to stop


@dataclass(frozen=True)
class RecoveryPlan:
    counters: int  # K
    pods: int  # P
    callers: int  # concurrent callers per pod
    db_delay_ms: float
    steady: float  # seconds of steady traffic before the restart
    cap: float  # seconds after the restart past which a run stops, recovered or not
    strategies: tuple[Strategy, ...] = ("per-process", "coordinated")


FULL_RECOVERY = RecoveryPlan(
    counters=10_000, pods=8, callers=8, db_delay_ms=2.0, steady=1.0, cap=90.0
)
QUICK_RECOVERY = RecoveryPlan(
    counters=500, pods=2, callers=4, db_delay_ms=2.0, steady=0.3, cap=30.0
)


@dataclass(frozen=True)
class _Setup:
    servers: Servers
    strategy: Strategy
    plan: RecoveryPlan
    prefix: str

    def key(self, index: int) -> str:
        return f"{self.prefix}:{index}"

    def spec(self) -> PodSpec:
        return PodSpec(
            strategy=self.strategy,
            callers=self.plan.callers,
            db_delay_ms=self.plan.db_delay_ms,
            servers=self.servers,
            key=self.key(0),
            row_id=self.key(0),
        )


def db_value(index: int) -> float:
    """Counter ``index``'s authoritative value: distinct per counter, exact in binary."""
    return index + 0.25


@dataclass
class RecoveryPodReport:
    pod: int
    started: list[float] = field(default_factory=list)  # each call's wall-clock start
    latencies_ms: list[float] = field(default_factory=list)  # NaN for a failed call
    errors: list[tuple[float, str]] = field(default_factory=list)  # (start, error class)
    wrong: int = 0  # calls that returned a value other than the counter's DB value
    db_reads: list[float] = field(default_factory=list)  # wall-clock time of each DB read
    cpu: list[tuple[float, float]] = field(default_factory=list)  # (wall clock, CPU seconds)


def _keys(plan: RecoveryPlan, rng: random.Random) -> Iterator[int]:
    """Counter indices: a Zipf-ish draw and the next of this pod's sweep, in turn."""
    weights = list(
        itertools.accumulate(1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(plan.counters))
    )
    sweep = list(range(plan.counters))
    rng.shuffle(sweep)
    for swept in itertools.cycle(sweep):
        yield bisect.bisect_left(weights, rng.random() * weights[-1])
        yield swept


async def recovery_pod(link: Link, setup: _Setup, index: int) -> None:
    """A pod (spawned): serve calls from the start message until told to stop; report."""
    plan = setup.plan
    report = RecoveryPodReport(pod=index)
    delay = plan.db_delay_ms / 1000
    async with AsyncExitStack() as stack:
        source = await PostgresSource.connect(setup.servers.pg_dsn, QUERY, max_size=4)
        stack.push_async_callback(source.aclose)
        contender = CONTENDERS[setup.strategy](setup.spec())
        stack.push_async_callback(contender.aclose)
        keys = _keys(plan, random.Random(index))

        def loader(key: str) -> Callable[[], Any]:
            async def load() -> float:
                report.db_reads.append(time.time())
                return await source.fetch(key, delay)

            return load

        stopping = asyncio.Event()

        async def caller() -> None:
            # Each call runs to its end: a query cancelled mid-flight can hold up the
            # source's pool as it closes.
            while not stopping.is_set():
                counter = next(keys)
                key = setup.key(counter)
                started, begun = time.time(), time.perf_counter()
                try:
                    value = await contender.get(key, loader(key))
                except Exception as exc:
                    report.errors.append((started, type(exc).__name__))
                    value = None
                report.started.append(started)
                report.latencies_ms.append(
                    (time.perf_counter() - begun) * 1000 if value is not None else float("nan")
                )
                if value is not None and value != db_value(counter):
                    report.wrong += 1
                # A call can end without ever suspending (a refused connect raises at once):
                # let the loop take the parent's stop message.
                await asyncio.sleep(0)

        async def sample() -> None:
            while True:
                report.cpu.append((time.time(), time.process_time()))
                await asyncio.sleep(CPU_SAMPLE)

        # Warm: every caller's connection, the scripts, the lock masters (all hits).
        await asyncio.gather(
            *(contender.get(setup.key(0), loader(setup.key(0))) for _ in range(plan.callers))
        )
        link.ready()
        await link.next()  # the start
        callers = [asyncio.create_task(caller()) for _ in range(plan.callers)]
        sampler = asyncio.create_task(sample())
        try:
            await link.next()  # the stop
        finally:
            stopping.set()
            await asyncio.gather(*callers, return_exceptions=True)
            sampler.cancel()
        report.cpu.append((time.time(), time.process_time()))
    link.send(report)


# -- the parent ----------------------------------------------------------------------------


async def _prepare(servers: Servers, setup: _Setup) -> None:
    conn = await asyncpg.connect(servers.pg_dsn, timeout=10.0)
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id text PRIMARY KEY, spend double precision NOT NULL)"
        )
        await conn.executemany(
            f"INSERT INTO {TABLE} (id, spend) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET spend = EXCLUDED.spend",
            [(setup.key(i), db_value(i)) for i in range(setup.plan.counters)],
        )
    finally:
        await conn.close()


async def _remove_rows(servers: Servers, prefix: str) -> None:
    conn = await asyncpg.connect(servers.pg_dsn, timeout=10.0)
    try:
        await conn.execute(f"DELETE FROM {TABLE} WHERE id LIKE $1", f"{prefix}:%")
    finally:
        await conn.close()


def _processed(client: Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def _cpu_at(samples: Sequence[tuple[float, float]], at: float) -> float:
    """A pod's CPU seconds at wall-clock ``at`` (the last sample before it)."""
    earlier = [cpu for wall, cpu in samples if wall <= at]
    return earlier[-1] if earlier else samples[0][1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_strategy(
    servers: Servers, store: RedisServer, strategy: Strategy, plan: RecoveryPlan
) -> dict[str, Any]:
    """One strategy's run: warm counters, steady traffic, the restart, the recovery."""
    setup = _Setup(servers, strategy, plan, f"recovery:{uuid.uuid4().hex[:8]}:{strategy}")
    keys = [setup.key(i) for i in range(plan.counters)]
    asyncio.run(_prepare(servers, setup))
    client = Redis.from_url(servers.redis_url, socket_timeout=10.0)
    lock_clients = [
        Redis.from_url(url, socket_timeout=10.0)
        for url in dict.fromkeys(servers.lock_urls)
        if url != servers.redis_url
    ]
    try:
        with client.pipeline(transaction=False) as pipe:
            for i, key in enumerate(keys):
                pipe.set(key, repr(db_value(i)))
            pipe.execute()
        with Fleet("recovery-pod-", quiet=True) as fleet:
            pods = [fleet.spawn(recovery_pod, setup, index) for index in range(plan.pods)]
            fleet.answers(pods, SETUP_TIMEOUT)
            for pod in pods:
                pod.send("start")
            time.sleep(plan.steady)
            locks_before = sum(_processed(lock) for lock in lock_clients)
            down = time.time()
            store.restart()
            back = time.time()  # the store serves again, empty
            polls, recovered_at = 0, None
            while time.time() - back < plan.cap:
                polls += 1
                if client.exists(*keys) == len(keys):
                    recovered_at = time.time()
                    break
                time.sleep(POLL)
            # Our own commands: the EXISTS polls and this INFO.
            store_commands = _processed(client) - polls - 1
            lock_commands = (
                sum(_processed(lock) for lock in lock_clients) - locks_before - len(lock_clients)
            )
            for pod in pods:
                pod.send(None)
            reports: list[RecoveryPodReport] = fleet.answers(pods, REPORT_TIMEOUT)
        end = recovered_at if recovered_at is not None else back + plan.cap
        return _summary(
            strategy, plan, reports, down, back, end, recovered_at, store_commands, lock_commands
        )
    finally:
        client.delete(*keys)  # fences and leases expire on their own
        client.close()
        for lock in lock_clients:
            lock.close()
        asyncio.run(_remove_rows(servers, setup.prefix))


def _summary(
    strategy: Strategy,
    plan: RecoveryPlan,
    reports: Sequence[RecoveryPodReport],
    down: float,
    back: float,
    end: float,
    recovered_at: float | None,
    store_commands: int,
    lock_commands: int,
) -> dict[str, Any]:
    during = sorted(
        ms
        for report in reports
        for started, ms in zip(report.started, report.latencies_ms, strict=True)
        if back <= started <= end and ms == ms  # NaN: failed
    )
    errors = Counter(
        name for report in reports for started, name in report.errors if started >= back
    )
    outage = sum(1 for report in reports for started, _ in report.errors if started < back)
    reads = sorted(at for report in reports for at in report.db_reads if at >= down)
    cpu = sum(_cpu_at(report.cpu, end) - _cpu_at(report.cpu, back) for report in reports)
    k = plan.counters
    return {
        "strategy": strategy,
        "counters": k,
        "pods": plan.pods,
        "callers": plan.callers,
        "db_delay_ms": plan.db_delay_ms,
        "db_reads": len(reads),
        "db_reads_before_restart": sum(1 for r in reports for at in r.db_reads if at < down),
        "errors": sum(errors.values()),
        "error_types": dict(errors),
        "errors_while_down": outage,
        "wrong_values": sum(report.wrong for report in reports),
        "down_s": round(back - down, 3),
        "recovered": recovered_at is not None,
        "recovery_s": None if recovered_at is None else round(recovered_at - back, 2),
        "calls": len(during),
        "p50_ms": _ms(percentile(during, 50)),
        "p99_ms": _ms(percentile(during, 99)),
        "store_commands_per_counter": round(store_commands / k, 2),
        "lock_commands_per_counter": round(lock_commands / k, 2),
        "pods_cpu_ms_per_counter": round(cpu * 1000 / k, 3),
        # DB reads over time, from the restart, for the plot.
        "db_read_offsets_s": [round(at - back, 3) for at in reads],
    }


def mass_recovery(
    servers: Servers, store: RedisServer | None, plan: RecoveryPlan, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Every strategy of ``plan`` in turn; skipped (with why) if the store is not ours."""
    if store is None:
        return {
            "plan": asdict(plan),
            "skipped": "the counter store is given by URL: not ours to restart",
        }
    runs = []
    for strategy in plan.strategies:
        runs.append(run_strategy(servers, store, strategy, plan))
        progress(f"mass recovery: {strategy} done")
    return {"plan": asdict(plan), "runs": runs}


# -- table and plot ------------------------------------------------------------------------


def format_recovery(section: dict[str, Any]) -> list[str]:
    plan = section["plan"]
    lines = [
        "",
        f"Mass recovery: {plan['pods']} pods x {plan['callers']} callers over "
        f"{plan['counters']} live counters (Zipf-ish + a sweep), DB delay "
        f"{plan['db_delay_ms']:g} ms; the counter store restarts empty. From the moment it "
        "serves again until every counter is back:",
    ]
    if "skipped" in section:
        return [*lines, f"  skipped: {section['skipped']}"]
    header = (
        "strategy", "DB reads", "/ K", "errors", "down errs", "wrong", "back s", "calls",
        "p50", "p99", "store/ctr", "lock/ctr", "CPU ms/ctr",
    )  # fmt: skip
    rows = [
        (
            run["strategy"],
            str(run["db_reads"]),
            f"{run['db_reads'] / run['counters']:.2f}",
            str(run["errors"]),
            str(run["errors_while_down"]),
            str(run["wrong_values"]),
            "not back" if run["recovery_s"] is None else f"{run['recovery_s']:g}",
            str(run["calls"]),
            "-" if run["p50_ms"] is None else f"{run['p50_ms']:.1f}",
            "-" if run["p99_ms"] is None else f"{run['p99_ms']:.1f}",
            f"{run['store_commands_per_counter']:.1f}",
            f"{run['lock_commands_per_counter']:.1f}",
            f"{run['pods_cpu_ms_per_counter']:.2f}",
        )
        for run in section["runs"]
    ]
    table = format_table(header, rows, right=list(range(1, len(header))))
    return [*lines, table, "  (down errs: calls that started while the store was down)"]


def plot_recovery(section: dict[str, Any], path: Path) -> str | None:
    """DB reads over time from the restart, per strategy, into ``path``; None, or why not."""
    if "skipped" in section:
        return f"no recovery plot: {section['skipped']}"
    try:
        from matplotlib.figure import Figure  # the optional [bench] extra
    except ImportError:
        return "no recovery plot: matplotlib is not installed"
    plan = section["plan"]
    figure = Figure(figsize=(9, 4.5), layout="constrained")
    axes = figure.subplots()
    for run in section["runs"]:
        offsets = run["db_read_offsets_s"]
        axes.step(offsets, range(1, len(offsets) + 1), where="post", label=run["strategy"])
    axes.axhline(plan["counters"], color="grey", linestyle=":", label="K (one read per counter)")
    axes.set_xlabel("seconds since the store served again")
    axes.set_ylabel("DB reads (cumulative)")
    axes.set_title(
        f"Mass recovery: {plan['pods']} pods, {plan['counters']} counters, store restarted empty"
    )
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=90)
    return None
