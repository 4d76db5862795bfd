"""The multi-process race: P pods with C concurrent callers each, released together onto one
cold counter whose authoritative value is a PostgreSQL row.

Each pod is a fresh interpreter (``spawn``) with its own event loop, clients and pool, as a
pod of a proxy fleet would be. A pod connects and warms everything first (Redis connections,
Lua scripts, lock masters, the asyncpg statement) on a private key, then waits on a
cross-process barrier; latencies run from the common start to each caller's value.
The DB delay is a ``pg_sleep`` inside the query, so a slow read holds a real connection.

Strategies:

* ``coordinated``: :class:`~coordinator.ReseedCoordinator` (Redlock lease, fencing token,
  fenced SET NX). Expected: one DB read fleet-wide, counter == DB value.
* ``per-process``: LiteLLM 1.84.10, the post-fix rebuild. Expected: one DB read per pod,
  counter == DB value.
* ``naive``: LiteLLM 1.83.14, the pre-fix rebuild. Expected: counter == pods x DB value.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, get_args

import asyncpg
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..clients import redact
from ..coordinator import Loader, ReseedCoordinator
from ..keys import fence_key
from ..sources import PostgresSource
from ..values import parse_stored
from .cliargs import (
    CommandError,
    add_cluster_flag,
    add_server_flags,
    describe,
    list_flag,
    non_negative,
    positive,
    positive_int,
    print_json,
)
from .pods import FAIL_FAST, SETUP_TIMEOUT, Fleet, Link, Timeouts
from .servers import Deployment, Servers, async_store_client, started_servers, unreachable
from .table import format_table, number

Strategy = Literal["coordinated", "per-process", "naive"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

TABLE = "reseed_race"
# The delay runs inside PostgreSQL, holding a connection, as a slow production query does.
QUERY = f"SELECT spend FROM {TABLE}, pg_sleep($2) WHERE id = $1"

COUNTER_TTL = 60.0  # LiteLLM's spend counter TTL
WAIT = 15.0  # the coordinator's deadline per call (its default)
CALL_TIMEOUT = WAIT + 5.0  # outer bound on every caller, whatever the strategy
START_LEAD = 0.1  # seconds from the last pod's arrival at the barrier to the start...
START_LEAD_PER_POD = 0.01  # ...plus this per pod


class RaceError(CommandError):
    """The race could not be run: a server is unreachable or a pod failed or vanished."""



@dataclass(frozen=True)
class PodSpec:
    """Everything a pod needs for one race; pickled to each spawned interpreter."""

    strategy: Strategy
    callers: int
    db_delay_ms: float
    servers: Servers
    key: str
    row_id: str
    wake_on_seed: bool = True  # coordinated: losers wake on the seed's pub/sub message
    timeouts: Timeouts = FAIL_FAST


@dataclass
class PodReport:
    pod: int
    db_reads: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # error class names, one per failed call
    stats: dict[str, int] | None = None  # coordinator counters of the race (not the warm-up)
    failure: str | None = None  # the pod itself failed: the race is void
    collateral: bool = False  # it failed only because another pod did
    start_lag_ms: float = 0.0  # how late this pod woke for the common start
    cpu_ms: float = 0.0  # CPU time this pod spent from the start to its last caller's value

    @property
    def loaded(self) -> bool:
        """Whether this pod read the DB (for coordinated: the fleet's one winner)."""
        return self.db_reads > 0


@dataclass
class RaceResult:
    strategy: Strategy
    pods: int
    callers: int
    db_delay_ms: float
    db_value: float
    final_counter: float | None
    db_reads: int
    min_returned: float | None
    max_returned: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    start_lag_ms: float  # the latest pod's lag behind the common start (included in its ms)
    errors: int
    error_types: dict[str, int]
    stats: dict[str, int] | None  # summed coordinator stats (coordinated only)

    @property
    def inflation(self) -> float | None:
        """Final counter over the DB value: 1 is right, ``pods`` is the pre-fix bug."""
        if self.final_counter is None or self.db_value == 0:
            return None
        return round(self.final_counter / self.db_value, 9)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "inflation": self.inflation}


# -- the contenders, one per strategy ------------------------------------------------------


class Contender(Protocol):
    async def get(self, key: str, loader: Loader) -> float: ...

    def stats(self) -> dict[str, int] | None: ...

    async def aclose(self) -> None: ...


class Coordinated:
    """Ours: one DB read per cold miss, fleet-wide."""

    def __init__(self, spec: PodSpec) -> None:
        self.coordinator = ReseedCoordinator.from_urls(
            spec.servers.redis_url,
            lock_urls=list(spec.servers.lock_urls),
            socket_timeout=spec.timeouts.socket_timeout,
            lock_timeout=spec.timeouts.lock_timeout,
            ttl=COUNTER_TTL,
            wait=WAIT,
            wake_on_seed=spec.wake_on_seed,
        )

    async def get(self, key: str, loader: Loader) -> float:
        return await self.coordinator.get(key, loader)

    def stats(self) -> dict[str, int] | None:
        return self.coordinator.stats.as_dict()

    async def aclose(self) -> None:
        await self.coordinator.aclose()


class PerProcess:
    """LiteLLM 1.84.10 (post-fix): an asyncio.Lock per key per process makes one rebuild per
    pod; the rebuild writes with SET NX and a loser reads the winner's value. Nothing spans
    pods, so every pod that misses reads the DB."""

    def __init__(self, spec: PodSpec) -> None:
        self.client = async_store_client(
            spec.servers.redis_url,
            retry=Retry(NoBackoff(), 1),
            socket_timeout=spec.timeouts.socket_timeout,
            socket_connect_timeout=spec.timeouts.socket_timeout,
        )
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def get(self, key: str, loader: Loader) -> float:
        value = await self._read(key)
        if value is not None:
            return value
        async with self._locks[key]:
            # The callers that queued behind this pod's rebuild find its value here.
            value = await self._read(key)
            if value is not None:
                return value
            return await self._write(key, await loader())

    async def _read(self, key: str) -> float | None:
        raw = await self.client.get(key)
        return None if raw is None else parse_stored(raw, key)

    async def _write(self, key: str, loaded: float) -> float:
        if await self.client.set(key, repr(loaded), nx=True, ex=int(COUNTER_TTL)):
            return loaded
        winner = await self._read(key)
        return loaded if winner is None else winner

    def stats(self) -> dict[str, int] | None:
        return None

    async def aclose(self) -> None:
        await self.client.aclose()


class Naive(PerProcess):
    """LiteLLM 1.83.14 (pre-fix): the same per-process lock, but the rebuild *adds* the DB
    value with INCRBYFLOAT, so every pod that misses adds it once more: P x the DB value."""

    async def _write(self, key: str, loaded: float) -> float:
        return float(await self.client.incrbyfloat(key, loaded))


CONTENDERS: dict[Strategy, Callable[[PodSpec], Contender]] = {
    "coordinated": Coordinated,
    "per-process": PerProcess,
    "naive": Naive,
}


# -- one pod -----------------------------------------------------------------------------


async def race_pod(link: Link, spec: PodSpec, index: int) -> None:
    """A pod of the race (spawned): set up and warm up, race from the start line, report."""
    async with AsyncExitStack() as stack:
        source = await open_source(spec.servers, stack)
        contender = await open_contender(spec, source, f"{spec.key}:warm:{index}", stack)
        link.send(await run_round(spec, index, contender, source, link.start))


async def open_source(servers: Servers, stack: AsyncExitStack) -> PostgresSource:
    """The pod's PostgreSQL pool, closed with ``stack``."""
    source = await PostgresSource.connect(servers.pg_dsn, QUERY, max_size=2)
    stack.push_async_callback(source.aclose)
    return source


async def open_contender(
    spec: PodSpec, source: PostgresSource, warm_key: str, stack: AsyncExitStack
) -> Contender:
    """The spec's contender, closed with ``stack``, its connections opened on ``warm_key``."""
    contender = CONTENDERS[spec.strategy](spec)
    stack.push_async_callback(contender.aclose)
    # Opens `callers` store connections, loads the scripts, touches every lock master and
    # prepares the query, so that the race measures the protocol, not connection setup.
    # One call first: a cluster client must read its slot map before many tasks use it.
    await contender.get(warm_key, source.loader(spec.row_id, 0.0))
    warmed = await asyncio.gather(
        *(contender.get(warm_key, source.loader(spec.row_id, 0.0)) for _ in range(spec.callers)),
        return_exceptions=True,  # let every call end before the clients close
    )
    failed = next((out for out in warmed if isinstance(out, BaseException)), None)
    if failed is not None:
        raise failed
    return contender


async def run_round(
    spec: PodSpec,
    index: int,
    contender: Contender,
    source: PostgresSource,
    start_line: Callable[[], Awaitable[float]],
) -> PodReport:
    """This pod's callers race on ``spec.key`` from the instant ``start_line`` returns
    (as ``perf_counter`` time)."""
    report = PodReport(pod=index)
    delay = spec.db_delay_ms / 1000

    async def load() -> float:
        report.db_reads += 1
        return await source.fetch(spec.row_id, delay)

    before = contender.stats()
    go = asyncio.Event()
    start = 0.0

    async def call() -> None:
        await go.wait()
        try:
            value = await contender.get(spec.key, load)
        except Exception as exc:
            report.errors.append(type(exc).__name__)
            return
        report.latencies_ms.append((time.perf_counter() - start) * 1000)
        report.values.append(value)

    # Created ahead so that at the start a pod only sends its GETs: on a small machine,
    # every ms a woken pod spends delays the pods still waiting for a core.
    calls = [asyncio.create_task(call()) for _ in range(spec.callers)]
    try:
        start = await start_line()
        report.start_lag_ms = (time.perf_counter() - start) * 1000
        cpu = time.process_time()
        go.set()
        _, late = await asyncio.wait(calls, timeout=CALL_TIMEOUT)
        report.cpu_ms = (time.process_time() - cpu) * 1000
        report.errors += [TimeoutError.__name__] * len(late)
    finally:
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    after = contender.stats()
    if before is not None and after is not None:
        report.stats = {name: after[name] - before[name] for name in after}
    return report


# -- the parent --------------------------------------------------------------------------


async def prepare_race(servers: Servers, row_id: str, db_value: float) -> None:
    """The row the pods read, and a check that every server answers (a clear setup error)."""
    try:
        conn = await asyncpg.connect(servers.pg_dsn, timeout=10.0)
    except Exception as exc:
        raise RaceError(
            f"cannot connect to PostgreSQL at {redact(servers.pg_dsn)}: {describe(exc)}"
        ) from exc
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id text PRIMARY KEY, spend double precision NOT NULL)"
        )
        await conn.execute(
            f"INSERT INTO {TABLE} (id, spend) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET spend = EXCLUDED.spend",
            row_id,
            db_value,
        )
    except Exception as exc:
        raise RaceError(f"cannot write the race row to {TABLE}: {describe(exc)}") from exc
    finally:
        await conn.close()
    problem = unreachable(servers)
    if problem is not None:
        raise RaceError(problem)


async def _finish(servers: Servers, key: str, pods: int, row_id: str) -> float | None:
    """The final counter; then remove everything the race wrote."""
    client = async_store_client(servers.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        raw = await client.get(key)
        counters = [key, *(f"{key}:warm:{index}" for index in range(pods))]
        # One DEL per key: on a cluster the keys live in different slots.
        await asyncio.gather(*(client.delete(k) for k in [*counters, *map(fence_key, counters)]))
    finally:
        await client.aclose()
    await remove_row(servers, row_id)
    return None if raw is None else parse_stored(raw, key)


async def remove_row(servers: Servers, row_id: str) -> None:
    conn = await asyncpg.connect(servers.pg_dsn, timeout=10.0)
    try:
        await conn.execute(f"DELETE FROM {TABLE} WHERE id = $1", row_id)
    finally:
        await conn.close()


def _run_pods(spec: PodSpec, pods: int) -> list[PodReport]:
    with Fleet("race-pod-") as fleet:
        start = fleet.start_line(pods, START_LEAD + START_LEAD_PER_POD * pods)
        members = [fleet.spawn(race_pod, spec, index, start=start) for index in range(pods)]
        answers = fleet.gather(members, SETUP_TIMEOUT + CALL_TIMEOUT + 10.0)
    return [
        answer
        if isinstance(answer, PodReport)
        else PodReport(pod=index, failure=answer.error, collateral=answer.collateral)
        for index, answer in enumerate(answers)
    ]


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _aggregate(
    spec: PodSpec, pods: int, db_value: float, reports: Sequence[PodReport], final: float | None
) -> RaceResult:
    latencies = sorted(ms for report in reports for ms in report.latencies_ms)
    values = [value for report in reports for value in report.values]
    errors = Counter(name for report in reports for name in report.errors)
    coordinated = [report.stats for report in reports if report.stats is not None]
    stats = (
        {name: sum(counts[name] for counts in coordinated) for name in coordinated[0]}
        if coordinated
        else None
    )
    return RaceResult(
        strategy=spec.strategy,
        pods=pods,
        callers=spec.callers,
        db_delay_ms=spec.db_delay_ms,
        db_value=db_value,
        final_counter=final,
        db_reads=sum(report.db_reads for report in reports),
        min_returned=min(values, default=None),
        max_returned=max(values, default=None),
        p50_ms=_round(percentile(latencies, 50)),
        p99_ms=_round(percentile(latencies, 99)),
        max_ms=_round(latencies[-1] if latencies else None),
        start_lag_ms=round(max(report.start_lag_ms for report in reports), 2),
        errors=sum(errors.values()),
        error_types=dict(errors),
        stats=stats,
    )


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)


def run_race(
    strategy: Strategy,
    servers: Servers,
    *,
    pods: int = 8,
    callers: int = 16,
    db_delay_ms: float = 50.0,
    db_value: float = 100.0,
    timeouts: Timeouts = FAIL_FAST,
) -> RaceResult:
    """Race ``pods`` processes of ``callers`` callers each on one cold counter.

    Raises :class:`RaceError` if a server is unreachable or any pod failed as a whole;
    errors of single calls are counted in the result instead.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if pods < 1 or callers < 1:
        raise ValueError(f"pods and callers must be >= 1, got {pods} and {callers}")
    if not math.isfinite(db_delay_ms) or db_delay_ms < 0:
        raise ValueError(f"db_delay_ms must be a finite number >= 0, got {db_delay_ms}")
    run_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    spec = PodSpec(
        strategy=strategy,
        callers=callers,
        db_delay_ms=db_delay_ms,
        servers=servers,
        key=f"race:spend:key:{run_id}",
        row_id=run_id,
        timeouts=timeouts,
    )
    asyncio.run(prepare_race(servers, run_id, db_value))
    reports = _run_pods(spec, pods)
    failed = sorted((r for r in reports if r.failure), key=lambda r: r.collateral)
    failures = [f"pod {report.pod}: {report.failure}" for report in failed]
    final = None
    try:
        final = asyncio.run(_finish(servers, spec.key, pods, run_id))
    except Exception as exc:
        failures.append(f"reading the final counter: {describe(exc)}")
    if failures:
        raise RaceError(f"{strategy} race failed:\n  " + "\n  ".join(failures))
    return _aggregate(spec, pods, db_value, reports, final)


def format_results(results: Sequence[RaceResult]) -> str:
    """The results side by side, one strategy per row."""
    header = (
        "strategy",
        "pods x callers",
        "db value",
        "final counter",
        "x db",
        "db reads",
        "returned min..max",
        "p50 ms",
        "p99 ms",
        "errors",
    )
    rows = [
        (
            result.strategy,
            f"{result.pods} x {result.callers}",
            number(result.db_value),
            number(result.final_counter),
            number(None if result.inflation is None else round(result.inflation, 3)),
            str(result.db_reads),
            f"{number(result.min_returned)}..{number(result.max_returned)}",
            number(result.p50_ms),
            number(result.p99_ms),
            str(result.errors),
        )
        for result in results
    ]
    table = format_table(header, rows, right=range(2, len(header)))
    delay = ", ".join(f"{ms:g}" for ms in sorted({result.db_delay_ms for result in results}))
    lag = max(result.start_lag_ms for result in results)
    notes = [
        f"DB delay {delay} ms per read (pg_sleep). Latencies run from the common start; "
        f"the latest pod woke {lag:g} ms after it."
    ]
    notes += [
        f"{result.strategy}: the last pod woke {result.start_lag_ms:g} ms after the start, a large "
        "part of the DB delay, so some pods may have missed the race (a busy machine?)"
        for result in results
        if result.strategy != "coordinated" and result.start_lag_ms > result.db_delay_ms / 2
    ]
    notes += [
        f"{result.strategy} errors: {result.error_types}" for result in results if result.errors
    ]
    return "\n".join([table, "", *notes])


# -- command line ------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "race",
        help="race P processes on one cold counter and compare rebuild strategies",
        description=(
            "Race P OS processes (C concurrent callers each), released together by a barrier, "
            "onto one cold counter whose value is a PostgreSQL row. Servers not given by URL "
            "are started embedded (counter store, 3 lock masters, PostgreSQL) and stopped "
            "at the end."
        ),
    )
    list_flag(parser, "--pods", positive_int, default=[8], metavar="N", help="processes racing")
    parser.add_argument(
        "--callers", type=positive_int, default=16, help="concurrent callers per pod"
    )
    parser.add_argument(
        "--strategy",
        choices=[*STRATEGIES, "all"],
        default="all",
        help=(
            "coordinated: ReseedCoordinator; per-process: LiteLLM 1.84.10 (SET NX, "
            "per-process lock); naive: LiteLLM 1.83.14 (INCRBYFLOAT); all: the three in turn"
        ),
    )
    list_flag(
        parser,
        "--db-delay-ms",
        non_negative,
        default=[50.0],
        metavar="MS",
        help="pg_sleep added to every DB read",
    )
    parser.add_argument("--db-value", type=non_negative, default=100.0, help="the row's spend")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print JSON: one object for one race, else a list (each with the redis-server)",
    )
    add_cluster_flag(parser)
    add_timeout_flags(parser)
    add_server_flags(parser)
    parser.set_defaults(run=_race)


def add_timeout_flags(parser: argparse.ArgumentParser) -> None:
    """--socket-timeout and --lock-timeout: the pods' :class:`Timeouts`."""
    clients = {"socket_timeout": "counter store", "lock_timeout": "lock master"}
    for name, default in FAIL_FAST.options().items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=positive,
            default=default,
            metavar="S",
            help=f"the pods' {clients[name]} client timeout in seconds (from_urls's: fail fast)",
        )


def timeouts_given(args: argparse.Namespace) -> Timeouts:
    return Timeouts(args.socket_timeout, args.lock_timeout)


def _race(args: argparse.Namespace) -> int:
    strategies: list[Strategy] = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    with started_servers(
        args.redis_url, args.lock_url, args.pg_dsn, cluster=args.cluster
    ) as deployment:
        results = [
            run_race(
                strategy,
                deployment.servers,
                pods=pods,
                callers=args.callers,
                db_delay_ms=delay,
                db_value=args.db_value,
                timeouts=timeouts_given(args),
            )
            for pods in args.pods
            for delay in args.db_delay_ms
            for strategy in strategies
        ]
    binary = deployment.redis_binary
    if args.json:
        server = None if binary is None else binary.as_dict()
        documents = [{**result.as_dict(), "redis_server": server} for result in results]
        print_json(documents[0] if len(documents) == 1 else documents)
    else:
        print(format_results(results))
        print(legend(deployment))
    return 0


def legend(deployment: Deployment) -> str:
    """What the table's columns and strategies mean, and which servers it ran on."""
    binary = deployment.redis_binary
    runs = f" on {binary.version} ({binary.origin})" if binary else ""
    given = "given by URL"
    store = f"embedded{runs}" if deployment.store else given
    masters = f"{len(deployment.servers.lock_urls)} lock masters " + (
        "embedded" if deployment.masters else given
    )
    embedded_pg = deployment.postgres is not None and not deployment.postgres.external
    postgres = "embedded" if embedded_pg else "given by DSN"
    return (
        "x db = final counter / DB value (1 is right; naive ends at one DB value per pod); "
        "db reads = loader calls fleet-wide.\n"
        "coordinated = this library; per-process = LiteLLM 1.84.10 (SET NX); naive = LiteLLM "
        f"1.83.14 (INCRBYFLOAT). Servers: counter store {store}, {masters}, PostgreSQL "
        f"{postgres}."
    )
