"""The fault table of DESIGN.md section 4, as runnable scenarios: ``python -m coordinator chaos``.

Every scenario drives *pods*: spawned OS processes, each with its own coordinators, Redis
clients and a :class:`~coordinator.sources.PostgresSource` pool reading a real PostgreSQL row
(``pg_sleep`` in the query makes a slow read hold a real connection). The parent process
injects the fault (SIGKILL or SIGSTOP of a pod, a killed, paused or restarted redis-server,
a stopped PostgreSQL, a TCP proxy that stalls a link or drops a reply) and judges what the
pods report. Each scenario returns a :class:`Row`: what was expected, what was observed, the
DB reads, the fenced writes, the slowest call, and the failed checks. The tests in
``tests/faults`` assert on these rows, so the command and the tests cannot drift apart.

Every call a pod makes is bounded: it ends with a value or an error within its deadline plus
:data:`SLACK`, or it is reported as a hang. Every scenario checks that every call ended with a
value or a *typed* error (:class:`~coordinator.errors.ReseedError`) in time, and that no value
returned was above the DB value plus the increments applied.

Given ``--redis-url``/``--lock-url``/``--pg-dsn`` (a staging deployment), the scenarios that
must kill, pause or restart a server run only on the embedded servers started for whatever
was not given; the others are reported as skipped ("needs embedded ...").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import statistics
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis import Redis
from redis.exceptions import RedisError

from .cliargs import CommandError, add_server_flags, print_json
from .coordinator import Loader, ReseedCoordinator
from .embedded import EmbeddedServerError, EmbeddedServers, PostgresServer, RedisServer
from .errors import ReseedError
from .keys import fence_key
from .race import Servers, _describe
from .sources import PostgresSource

TABLE = "reseed_chaos"
# pg_sleep in FROM runs once per query: the DB delay holds a real connection.
QUERY = f"SELECT spend FROM {TABLE}, pg_sleep($2) WHERE id = $1"

#: Headroom on every "did not hang" bound, for a busy 2-core machine. Never a speed claim.
SLACK = 2.0
#: The short lease of the lease-expiry scenarios.
LEASE = 1.0
READY_TIMEOUT = 60.0  # spawn, import, connect of a pod on a busy machine
STALL_LIMIT = 60.0  # a stalled loader gives up by itself if the parent never releases it
POD_POOL = 4  # PostgreSQL connections per pod
HANG = "Hang"  # the error name of a call that outlived its bound

Op = Literal["get", "add", "incr", "reset"]
Status = Literal["pass", "FAIL", "skip"]
Need = Literal["store", "masters", "postgres"]


class ChaosError(CommandError):
    """The table could not be run: a server is unreachable, or a pod failed as a whole."""


# -- what the parent asks of a pod, and what a pod answers -----------------------------------


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
class _Prepare:
    ticket: int
    profile: Profile


@dataclass(frozen=True)
class _Run:
    ticket: int
    work: Work


@dataclass(frozen=True)
class _Release:
    ticket: int


@dataclass(frozen=True)
class _Stats:
    ticket: int
    profile: Profile


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Ready:
    pod: str


@dataclass(frozen=True)
class _Prepared:
    ticket: int


@dataclass(frozen=True)
class _Counters:
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
class _Done:
    ticket: int
    report: Report


@dataclass(frozen=True)
class _Failed:
    pod: str
    error: str


# -- the pod process ---------------------------------------------------------------------


def _pod_main(name: str, dsn: str, commands: Queue[Any], events: Queue[Any]) -> None:
    """Entry point of a spawned pod."""
    # The parent reports; a pod's own logs (pottery, asyncpg reconnects) would only be noise.
    logging.getLogger().addHandler(logging.NullHandler())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_Pod(name, dsn, commands, events).serve())
    except BaseException as exc:
        events.put(_Failed(name, _describe(exc)))


class _Pod:
    source: PostgresSource

    def __init__(self, name: str, dsn: str, commands: Queue[Any], events: Queue[Any]) -> None:
        self.name = name
        self.dsn = dsn
        self.commands = commands
        self.events = events
        self.coordinators: dict[Profile, ReseedCoordinator] = {}
        self.releases: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        parent = multiprocessing.parent_process()
        self.parent_alive: Callable[[], bool] = parent.is_alive if parent else lambda: True

    async def serve(self) -> None:
        source = await PostgresSource.connect(self.dsn, QUERY, max_size=POD_POOL)
        self.source = source
        try:
            self.events.put(_Ready(self.name))
            while True:
                command = await asyncio.to_thread(self._next)
                if isinstance(command, _Stop) or not self.parent_alive():
                    break
                if isinstance(command, _Prepare):
                    self._spawn(self._prepare(command))
                elif isinstance(command, _Run):
                    self._spawn(self._run(command))
                elif isinstance(command, _Release):
                    self._release(command.ticket).set()
                elif isinstance(command, _Stats):
                    self._spawn(self._stats(command))
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for coordinator in self.coordinators.values():
                await coordinator.aclose()
            await source.aclose()

    def _next(self) -> Any:
        try:
            return self.commands.get(timeout=0.5)
        except queue.Empty:
            return None

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

    async def _prepare(self, command: _Prepare) -> None:
        try:
            await self._coordinator(command.profile)
        except Exception as exc:
            self.events.put(_Failed(self.name, f"prepare: {_describe(exc)}"))
            return
        self.events.put(_Prepared(command.ticket))

    async def _stats(self, command: _Stats) -> None:
        coordinator = await self._coordinator(command.profile)
        self.events.put(_Counters(command.ticket, coordinator.stats.as_dict()))

    async def _run(self, command: _Run) -> None:
        work = command.work
        try:
            coordinator = await self._coordinator(work.profile)
        except Exception as exc:
            self.events.put(_Failed(self.name, f"run: {_describe(exc)}"))
            return
        loads: Counter[str] = Counter()
        before = coordinator.stats.as_dict()
        if work.start_at is not None:
            await asyncio.sleep(max(0.0, work.start_at - time.time()))
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
        self.events.put(_Done(command.ticket, report))

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
                self.events.put(Loaded(ticket, self.name, key, value))
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


# -- the parent's side of a pod ---------------------------------------------------------

E = TypeVar("E")


class Pod:
    """A spawned pod: send it work, wait for its events, kill or pause it."""

    def __init__(self, context: Any, name: str, dsn: str) -> None:
        self.name = name
        self._commands: Queue[Any] = context.Queue()
        self._events: Queue[Any] = context.Queue()
        self._early: list[Any] = []
        self.process: SpawnProcess = context.Process(
            target=_pod_main, args=(name, dsn, self._commands, self._events), name=name, daemon=True
        )
        self.process.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, command: Any) -> None:
        self._commands.put(command)

    def expect(self, kind: type[E], ticket: int | None, timeout: float) -> E:
        """The pod's next event of ``kind`` (for ``ticket``); others are kept for later."""
        for event in self._early:
            if isinstance(event, kind) and getattr(event, "ticket", None) in (ticket, None):
                self._early.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChaosError(f"pod {self.name}: no {kind.__name__} within {timeout:g}s")
            try:
                event = self._events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.alive:
                    raise ChaosError(
                        f"pod {self.name} exited ({self.process.exitcode}) before {kind.__name__}"
                    ) from None
                continue
            if isinstance(event, _Failed):
                raise ChaosError(f"pod {event.pod} failed: {event.error}")
            if isinstance(event, kind) and getattr(event, "ticket", None) in (ticket, None):
                return event
            self._early.append(event)

    def kill(self) -> None:
        """SIGKILL: the pod dies wherever it is, holding whatever it holds."""
        os.kill(self._pid(), signal.SIGKILL)
        self.process.join(10.0)

    def pause(self) -> None:
        os.kill(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def _pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise ChaosError(f"pod {self.name} has no process")
        return pid

    def close(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.resume()
            self.send(_Stop())
            self.process.join(10.0)
        if self.alive:
            self.process.kill()
            self.process.join(10.0)
        # A dead reader never drains the command pipe: do not wait to flush into it.
        self._commands.cancel_join_thread()
        self._commands.close()
        self._events.close()


@dataclass(frozen=True)
class Ticket:
    """A batch sent to a pod; ``timeout`` bounds the wait for its report."""

    pod: Pod
    id: int
    timeout: float


class Fleet:
    """Pods, spawned on demand and reused across scenarios; a killed pod is replaced the
    next time pods are asked for."""

    def __init__(self, dsn: str) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._dsn = dsn
        self._pods: list[Pod] = []
        self._spawned = 0
        self._tickets = 0

    def pods(self, count: int) -> list[Pod]:
        """The first ``count`` pods, all alive and ready."""
        fresh: list[Pod] = []
        for index in range(count):
            if index < len(self._pods) and self._pods[index].alive:
                continue
            if index < len(self._pods):
                self._pods[index].close()
            self._spawned += 1
            pod = Pod(self._context, f"pod{self._spawned}", self._dsn)
            fresh.append(pod)
            if index < len(self._pods):
                self._pods[index] = pod
            else:
                self._pods.append(pod)
        for pod in fresh:
            pod.expect(_Ready, None, READY_TIMEOUT)
        return self._pods[:count]

    def prepare(self, pods: Sequence[Pod], profile: Profile) -> None:
        """Build (and warm) each pod's coordinator for ``profile``."""
        tickets = []
        for pod in pods:
            self._tickets += 1
            pod.send(_Prepare(self._tickets, profile))
            tickets.append((pod, self._tickets))
        for pod, ticket in tickets:
            pod.expect(_Prepared, ticket, READY_TIMEOUT)

    def start(self, pod: Pod, work: Work) -> Ticket:
        self._tickets += 1
        pod.send(_Run(self._tickets, work))
        lead = 0.0 if work.start_at is None else max(0.0, work.start_at - time.time())
        return Ticket(pod, self._tickets, lead + work.duration + work.bound + SLACK)

    def start_together(self, pods: Sequence[Pod], work: Work) -> list[Ticket]:
        """The same work on every pod, released at one instant (each pod sleeps to it)."""
        start_at = time.time() + 0.1 + 0.02 * len(pods)
        return [self.start(pod, replace(work, start_at=start_at)) for pod in pods]

    def loaded(self, ticket: Ticket, timeout: float = 30.0) -> Loaded:
        """Wait until the stalled loader of ``ticket`` has read the DB."""
        return ticket.pod.expect(Loaded, ticket.id, timeout)

    def release(self, ticket: Ticket) -> None:
        ticket.pod.send(_Release(ticket.id))

    def stats(self, pod: Pod, profile: Profile) -> dict[str, int]:
        """The pod's coordinator counters for ``profile``, now (its calls still running)."""
        self._tickets += 1
        pod.send(_Stats(self._tickets, profile))
        return pod.expect(_Counters, self._tickets, READY_TIMEOUT).stats

    def until(self, pod: Pod, profile: Profile, name: str, count: int, timeout: float) -> None:
        """Wait until the pod's counter ``name`` for ``profile`` reaches ``count``."""
        deadline = time.monotonic() + timeout
        while self.stats(pod, profile)[name] < count:
            if time.monotonic() > deadline:
                raise ChaosError(f"pod {pod.name}: {name} did not reach {count} in {timeout:g}s")
            time.sleep(0.01)

    def finish(self, tickets: Sequence[Ticket]) -> list[Report]:
        return [ticket.pod.expect(_Done, ticket.id, ticket.timeout).report for ticket in tickets]

    def close(self) -> None:
        for pod in self._pods:
            pod.close()
        self._pods.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading reports ----------------------------------------------------------------------


def outcomes(reports: Sequence[Report], op: Op | None = None) -> list[Outcome]:
    return [o for report in reports for o in report.outcomes if op is None or o.op == op]


def values(reports: Sequence[Report], op: Op | None = None) -> list[float]:
    return [o.value for o in outcomes(reports, op) if o.value is not None]


def errors(reports: Sequence[Report]) -> list[str]:
    return [o.error for o in outcomes(reports) if o.error is not None]


def loads(reports: Sequence[Report], key: str | None = None) -> int:
    return sum(n for report in reports for k, n in report.loads.items() if key in (None, k))


def stat(reports: Sequence[Report], name: str) -> int:
    return sum(report.stats[name] for report in reports)


def max_wait(reports: Sequence[Report]) -> float:
    return max((o.seconds for o in outcomes(reports)), default=0.0)


# -- servers, the database and the store, seen from the parent ---------------------------


@dataclass
class ChaosEnv:
    """The servers a table runs on, and handles on those it may kill, pause or restart
    (the embedded ones). ``namespace`` prefixes every key and row the run creates."""

    servers: Servers
    store: RedisServer | None = None
    masters: tuple[RedisServer, ...] = ()
    postgres: PostgresServer | None = None
    namespace: str = field(default_factory=lambda: f"chaos:{uuid.uuid4().hex[:10]}")

    @classmethod
    def embedded(cls, running: EmbeddedServers) -> ChaosEnv:
        """redis[0] the store, redis[1:4] the lock masters, and the bundle's PostgreSQL."""
        assert running.postgres is not None, "the chaos table needs PostgreSQL"
        return cls(
            Servers(
                running.redis[0].url,
                tuple(server.url for server in running.redis[1:4]),
                running.postgres.dsn,
            ),
            running.redis[0],
            tuple(running.redis[1:4]),
            running.postgres,
        )

    def controls(self, need: Need) -> bool:
        if need == "store":
            return self.store is not None
        if need == "masters":
            return len(self.masters) >= 3
        return self.postgres is not None and not self.postgres.external

    def restore(self) -> None:
        """Bring back whatever a scenario killed, paused or stopped."""
        for server in [*([self.store] if self.store else []), *self.masters]:
            if server.running:
                server.resume()
            else:
                server.start()
        if self.postgres is not None and not self.postgres.external:
            self.postgres.start()

    def client(self, url: str | None = None) -> Redis:
        return Redis.from_url(url or self.servers.redis_url, socket_timeout=5.0)

    def counter(self, key: str) -> float | None:
        with self.client() as client:
            raw = client.get(key)
        return None if raw is None else float(raw)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[list[float | None]]:
        """Every value the counter holds while the block runs, polled every 10 ms."""
        seen: list[float | None] = []
        done = threading.Event()

        def poll() -> None:
            with self.client() as client:
                while not done.is_set():
                    raw = client.get(key)
                    seen.append(None if raw is None else float(raw))
                    done.wait(0.01)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield seen
        finally:
            done.set()
            thread.join(10.0)

    def cleanup(self) -> None:
        """Remove every counter and fence hash of this run from the store."""
        with self.client() as client:
            doomed = list(client.scan_iter(match=f"{self.namespace}:*", count=1000))
            if doomed:
                client.delete(*doomed)


class Database:
    """The source of truth: one row per counter key in :data:`TABLE`."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def setup(self) -> None:
        self._execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} "
            "(id text PRIMARY KEY, spend double precision NOT NULL)"
        )

    def put(self, key: str, value: float) -> None:
        self._execute(
            f"INSERT INTO {TABLE} (id, spend) VALUES ($1, $2) "
            "ON CONFLICT (id) DO UPDATE SET spend = EXCLUDED.spend",
            key,
            value,
        )

    def cleanup(self, namespace: str) -> None:
        self._execute(f"DELETE FROM {TABLE} WHERE id LIKE $1", f"{namespace}:%")

    def loaders_running(self) -> int:
        """Loader queries (:data:`QUERY`) running in PostgreSQL right now."""
        count = self._execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE state = 'active' AND query = $1 AND pid <> pg_backend_pid()",
            QUERY,
        )
        return int(count)

    def _execute(self, sql: str, *args: object) -> Any:
        async def execute() -> Any:
            conn = await asyncpg.connect(self.dsn, timeout=10.0)
            try:
                return await conn.fetchval(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(execute())


# -- a TCP proxy for link faults ------------------------------------------------------------


class TcpProxy:
    """A TCP proxy to ``host:port`` on its own thread and event loop.

    ``stall()`` stops forwarding in both directions (bytes are held, connections stay
    open: a link that silently stops), ``heal()`` forwards again; ``drop_replies(n, to)``
    forwards the next ``n`` requests containing ``to`` and then closes their connections
    *instead of* forwarding the reply: the server has executed the command, the client
    never learns the result.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._drops = 0
        self._marker = b""
        self.dropped = 0
        self._links: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._call(self._open())
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        """A proxy to the Redis server at ``url``; the proxy's ``url`` keeps the scheme,
        credentials and database of ``url``."""
        parts = urlsplit(url)
        proxy = cls(parts.hostname or "127.0.0.1", parts.port or 6379)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{credentials}@127.0.0.1:{proxy.port}" if credentials else f"127.0.0.1:{proxy.port}"
        )
        proxy.url = urlunsplit(parts._replace(netloc=netloc))
        return proxy

    def stall(self) -> None:
        """Hold every byte from now on (in force when this returns)."""
        self._call(self._set(flowing=False))

    def heal(self) -> None:
        self._call(self._set(flowing=True))

    def drop_replies(self, count: int, to: bytes) -> None:
        self._call(self._set(drops=count, marker=to))

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10.0)

    async def _set(
        self, *, flowing: bool | None = None, drops: int = 0, marker: bytes = b""
    ) -> None:
        if flowing is not None:
            (self._flowing.set if flowing else self._flowing.clear)()
        if marker:
            self._drops, self._marker = drops, marker

    async def _open(self) -> asyncio.Server:
        self._flowing.set()
        return await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _close(self) -> None:
        self._server.close()
        for task in self._links:
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._link(reader, writer))
        self._links.add(task)
        task.add_done_callback(self._links.discard)

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.transport.abort()
            return
        writers = (client_w, server_w)
        doomed_reply = asyncio.Event()  # this link's next reply is to be dropped
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, writers, doomed_reply, replies=False),
                self._pump(server_r, client_w, writers, doomed_reply, replies=True),
            )
        finally:
            for writer in writers:
                writer.transport.abort()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, ...],
        doomed_reply: asyncio.Event,
        *,
        replies: bool,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if replies and doomed_reply.is_set():
                    self.dropped += 1
                    for each in writers:
                        each.transport.abort()
                    return
                if not replies and self._drops > 0 and self._marker in data:
                    self._drops -= 1
                    doomed_reply.set()
                writer.write(data)
                await writer.drain()
        writer.transport.abort()


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Row:
    """One fault: what was expected, what was observed, and the checks that failed.
    ``facts`` holds the scenario's own numbers (DB values, final counter, ...)."""

    name: str
    fault: str
    expected: str
    status: Status = "pass"
    observed: str = ""
    db_reads: int | None = None
    fenced_writes: int | None = None
    max_wait: float | None = None
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Run:
    """What a scenario works with: servers, pods, the DB, and its row to fill in."""

    def __init__(self, env: ChaosEnv, fleet: Fleet, db: Database, row: Row) -> None:
        self.env = env
        self.fleet = fleet
        self.db = db
        self.row = row
        self._keys = 0

    def key(self, value: float | None = None) -> str:
        """A fresh counter key of this run, and its DB row holding ``value``."""
        self._keys += 1
        key = f"{self.env.namespace}:{self.row.name}:{self._keys}:{uuid.uuid4().hex[:6]}"
        if value is not None:
            self.db.put(key, value)
        return key

    def profile(
        self,
        *,
        store_url: str | None = None,
        lock_urls: Sequence[str] | None = None,
        **options: Any,
    ) -> Profile:
        return Profile(
            store_url or self.env.servers.redis_url,
            tuple(self.env.servers.lock_urls if lock_urls is None else lock_urls),
            tuple(sorted(options.items())),
        )

    def pods(self, count: int, profile: Profile) -> list[Pod]:
        pods = self.fleet.pods(count)
        self.fleet.prepare(pods, profile)
        return pods

    def work(self, profile: Profile, *keys: str, **fields: Any) -> Work:
        """Work on ``keys`` whose calls are abandoned as hangs past the deadline + SLACK."""
        wait = fields.get("wait") or profile.wait
        return Work(profile, keys, bound=wait + SLACK, **fields)

    def check(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.row.failures.append(failure)
        return ok

    def judge(
        self,
        reports: Sequence[Report],
        *,
        ceiling: float,
        deadline: float,
        allowed: Collection[str] = (),
    ) -> None:
        """The checks every fault scenario makes on every call: it ended in time with a
        value or a typed error (one of ``allowed``), never above ``ceiling``."""
        calls = outcomes(reports)
        hung = [o for o in calls if o.error == HANG]
        untyped = [o.error for o in calls if o.error not in (None, HANG) and not o.typed]
        unexpected = [f"{o.op}: {o.error}" for o in calls if o.typed and o.error not in allowed]
        late = [o.seconds for o in calls if o.seconds > deadline + SLACK]
        # A timeout means the caller's own deadline passed; half of it is a loose lower bound.
        early = [
            o.seconds for o in calls if o.error == "ReseedTimeoutError" and o.seconds < deadline / 2
        ]
        high = [o.value for o in calls if o.value is not None and o.value > ceiling]
        self.check(not hung, f"{len(hung)} call(s) hung")
        self.check(not untyped, f"untyped errors: {sorted(set(untyped))}")
        self.check(not unexpected, f"unexpected errors: {dict(Counter(unexpected))}")
        self.check(not late, f"calls past the {deadline:g}s deadline: {max(late, default=0):.2f}s")
        self.check(
            not early,
            f"{len(early)} timeout(s) after {min(early, default=0):.3f}s, long before the "
            f"{deadline:g}s deadline",
        )
        self.check(not high, f"values above the ceiling {ceiling:g}: {sorted(set(high))[:5]}")
        slowest = max_wait(reports)
        self.row.max_wait = max(self.row.max_wait or 0.0, slowest)

    def observe(self, text: str) -> None:
        self.row.observed = text


ScenarioFn = Callable[[Run], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str
    expected: str
    fn: ScenarioFn
    needs: tuple[Need, ...] = ()


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, *, fault: str, expected: str, needs: tuple[Need, ...] = ()
) -> Callable[[ScenarioFn], ScenarioFn]:
    def register_scenario(fn: ScenarioFn) -> ScenarioFn:
        SCENARIOS[name] = Scenario(name, fault, expected, fn, needs)
        return fn

    return register_scenario


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.15g}"


def _same(got: Sequence[float], want: float) -> str:
    counts = Counter(got)
    return f"{len(got)} callers got {want:g}" if set(counts) == {want} else f"values {dict(counts)}"


@scenario(
    "holder-killed",
    fault="lease holder SIGKILLed mid-rebuild",
    expected="another pod rebuilds after the lease: 1 extra DB read, every caller the DB value",
)
def _holder_killed(run: Run) -> None:
    db_value, wait = 42.5, 10.0
    key = run.key(db_value)
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    holder, *others = run.pods(3, profile)
    doomed = run.fleet.start(holder, run.work(profile, key, stall=True))
    run.fleet.loaded(doomed)
    waiting = [run.fleet.start(pod, run.work(profile, key, callers=4)) for pod in others]
    # Let the others meet the live lease, so that they must wait out a dead holder.
    time.sleep(LEASE / 2)
    holder.kill()
    reports = run.fleet.finish(waiting)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, extra, final = values(reports), loads(reports), run.env.counter(key)
    run.check(got == [db_value] * 8, f"callers got {got}, not 8 x {db_value}")
    run.check(extra == 1, f"{extra} DB reads after the holder died, not 1")
    run.check(final == db_value, f"counter {final}, not {db_value}")
    run.row.db_reads = 1 + extra
    run.row.fenced_writes = stat(reports, "fenced_writes")
    run.row.facts.update(
        db_value=db_value, final=final, extra_reads=extra, leases_lost=stat(reports, "leases_lost")
    )
    run.observe(f"{_same(got, db_value)}; {extra} extra DB read; counter {_num(final)}")


@scenario(
    "holder-paused",
    fault="holder SIGSTOPped past its lease, SIGCONT after a newer rebuild took its token",
    expected="its write fenced out (the key still absent, so only the fence stops it); "
    "the counter keeps the newer value",
)
def _holder_paused(run: Run) -> None:
    old, new, wait = 10.0, 250.0, 30.0
    key = run.key(old)
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    paused, newer = run.pods(2, profile)
    stale = run.fleet.start(paused, run.work(profile, key, stall=True))
    run.fleet.loaded(stale)
    # Frozen, its lease keeper stops extending: the lease lapses within LEASE.
    paused.pause()
    try:
        run.db.put(key, new)
        # The newer rebuild wins the lapsed lease, takes a newer token, reads, and holds:
        # when the paused holder seeds, the key is absent and its token is not the newest.
        fresh = run.fleet.start(newer, run.work(profile, key, stall=True))
        run.fleet.loaded(fresh, timeout=LEASE + 15.0)
    finally:
        paused.resume()
    run.fleet.release(stale)
    (late,) = run.fleet.finish([stale])
    written = run.env.counter(key)
    run.fleet.release(fresh)
    (won,) = run.fleet.finish([fresh])
    reports = [late, won]
    run.judge(reports, ceiling=new, deadline=wait)
    final = run.env.counter(key)
    run.check(late.stats["fenced_writes"] == 1, f"paused holder: stats {late.stats}")
    run.check(late.stats["seeds_won"] == 0, "the paused holder's stale write landed")
    run.check(written is None, f"the paused holder wrote {written}")
    run.check(values([won]) == [new], f"the newer rebuild returned {values([won])}")
    run.check(won.stats["seeds_won"] == 1, f"newer rebuild: stats {won.stats}")
    run.check(final == new, f"counter {final}, not the newer {new}")
    run.row.db_reads = loads(reports)
    run.row.fenced_writes = stat(reports, "fenced_writes")
    run.row.facts.update(
        old=old, new=new, final=final, stale_returned=values([late]), written_by_stale=written
    )
    run.observe(
        f"stale write fenced ({late.stats['fenced_writes']}), counter {_num(final)} "
        f"(stale read {old:g}, newer {new:g})"
    )


def _slow_loader(run: Run, *, pods: int, extensions: int, lease: float, delay: float) -> None:
    db_value, wait = 7.25, 15.0
    key = run.key(db_value)
    profile = run.profile(lease=lease, lease_extensions=extensions, wait=wait)
    fleet = run.pods(pods, profile)
    tickets = run.fleet.start_together(fleet, run.work(profile, key, callers=4, db_delay=delay))
    reports = run.fleet.finish(tickets)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, reads, final = values(reports), loads(reports), run.env.counter(key)
    won, present, fenced = (stat(reports, s) for s in ("seeds_won", "seeds_lost", "fenced_writes"))
    run.check(got == [db_value] * (4 * pods), f"callers got {dict(Counter(got))}")
    run.check(1 <= reads <= pods, f"{reads} DB reads, bound 1..{pods} (one per pod flight)")
    run.check(won == 1, f"{won} seeds won, not 1")
    run.check(won + present + fenced == reads, f"reads {reads} != won+present+fenced")
    run.check(final == db_value, f"counter {final}, not {db_value}")
    run.row.db_reads, run.row.fenced_writes = reads, fenced
    run.row.facts.update(db_value=db_value, final=final, pods=pods)
    run.observe(f"{_same(got, db_value)}; {reads} DB reads for {pods} pods; counter {_num(final)}")


@scenario(
    "slow-loader",
    fault=f"loader slower than the lease and its extensions ({LEASE / 2:g}s x 2 < 1.5s)",
    expected="bounded extra DB reads (<= 1 per pod), every caller the DB value, one seed",
)
def _slow_loader_few(run: Run) -> None:
    _slow_loader(run, pods=3, extensions=1, lease=LEASE / 2, delay=1.5)


@scenario(
    "slow-loader-many-pods",
    fault="loader slower than the lease (0.4s < 1s), 6 pods x 4 callers",
    expected="no livelock: <= 1 DB read per pod, every caller the DB value, one seed",
)
def _slow_loader_many(run: Run) -> None:
    _slow_loader(run, pods=6, extensions=0, lease=0.4, delay=1.0)


def _cold_race(run: Run, profile: Profile, pods: Sequence[Pod], db_value: float) -> list[Report]:
    key = run.key(db_value)
    work = run.work(profile, key, callers=4, db_delay=0.2)
    return run.fleet.finish(run.fleet.start_together(pods, work))


def _one_read_race(run: Run, label: str, reports: Sequence[Report], db_value: float) -> None:
    got, reads = values(reports), loads(reports)
    run.check(got == [db_value] * len(outcomes(reports)), f"{label}: got {dict(Counter(got))}")
    run.check(reads == 1, f"{label}: {reads} DB reads, not 1")
    run.check(stat(reports, "lock_degraded") == 0, f"{label}: the lock degraded")


def _median_wait(reports: Sequence[Report]) -> float:
    return statistics.median(o.seconds for o in outcomes(reports))


@scenario(
    "master-killed",
    fault="1 of 3 lock masters killed",
    expected="still 1 DB read per miss; median wait within 2x the healthy run's",
    needs=("masters",),
)
def _master_killed(run: Run) -> None:
    db_value, wait = 55.0, 10.0
    profile = run.profile(wait=wait)
    pods = run.pods(4, profile)
    healthy = _cold_race(run, profile, pods, db_value)
    run.env.masters[0].kill()
    degraded = _cold_race(run, profile, pods, db_value)
    for label, reports in (("healthy", healthy), ("1 master down", degraded)):
        run.judge(reports, ceiling=db_value, deadline=wait)
        _one_read_race(run, label, reports, db_value)
    before, after = _median_wait(healthy), _median_wait(degraded)
    # 2x, plus room for one scheduling hiccup of a busy machine on a ~0.2s race.
    run.check(after <= 2 * before + 0.1, f"median wait {after:.3f}s vs healthy {before:.3f}s")
    run.row.db_reads = loads(degraded)
    run.row.fenced_writes = stat(degraded, "fenced_writes")
    run.row.max_wait = max_wait(degraded)
    run.row.facts.update(healthy_median=before, degraded_median=after)
    run.observe(f"1 DB read; median wait {after:.3f}s vs healthy {before:.3f}s")


def _stalled_master(
    run: Run, stall: Callable[[], None], heal: Callable[[], None], profile: Profile
) -> None:
    db_value, wait = 61.0, profile.wait
    pods = run.pods(3, profile)
    healthy = _cold_race(run, profile, pods, db_value)
    stall()
    try:
        stalled = _cold_race(run, profile, pods, db_value)
    finally:
        heal()
    for label, reports in (("healthy", healthy), ("stalled master", stalled)):
        run.judge(reports, ceiling=db_value, deadline=wait)
        _one_read_race(run, label, reports, db_value)
    slowest = max_wait(stalled)
    run.row.db_reads = loads(stalled)
    run.row.fenced_writes = stat(stalled, "fenced_writes")
    run.row.max_wait = slowest
    run.row.facts.update(healthy_max=max_wait(healthy), stalled_max=slowest)
    run.observe(
        f"1 DB read; slowest call {slowest:.2f}s (healthy {max_wait(healthy):.2f}s, "
        f"lock timeout {dict(profile.options)['lock_timeout']:g}s)"
    )


@scenario(
    "master-paused",
    fault="1 of 3 lock masters paused (SIGSTOP)",
    expected="costs lock socket timeouts, not a hang: 1 DB read, every call within its deadline",
    needs=("masters",),
)
def _master_paused(run: Run) -> None:
    master = run.env.masters[0]
    _stalled_master(run, master.pause, master.resume, run.profile(wait=5.0, lock_timeout=0.3))


@scenario(
    "master-link-stalled",
    fault="link to 1 of 3 lock masters stalls (TCP proxy holds every byte)",
    expected="costs lock socket timeouts, not a hang: 1 DB read, every call within its deadline",
)
def _master_link_stalled(run: Run) -> None:
    first, *rest = run.env.servers.lock_urls
    with TcpProxy.to(first) as proxy:
        profile = run.profile(lock_urls=[proxy.url, *rest], wait=5.0, lock_timeout=0.3)
        _stalled_master(run, proxy.stall, proxy.heal, profile)


@scenario(
    "majority-killed",
    fault="2 of 3 lock masters killed",
    expected="degraded per-pod reads (<= 1 per pod) within the deadline, still fenced: one seed",
    needs=("masters",),
)
def _majority_killed(run: Run) -> None:
    db_value, wait, pods = 13.5, 5.0, 4
    profile = run.profile(wait=wait)
    fleet = run.pods(pods, profile)
    run.env.masters[0].kill()
    run.env.masters[1].kill()
    reports = _cold_race(run, profile, fleet, db_value)
    run.judge(reports, ceiling=db_value, deadline=wait)
    got, reads = values(reports), loads(reports)
    won, present, fenced = (stat(reports, s) for s in ("seeds_won", "seeds_lost", "fenced_writes"))
    run.check(got == [db_value] * (4 * pods), f"callers got {dict(Counter(got))}")
    run.check(stat(reports, "lock_degraded") >= 1, "the lock never degraded")
    run.check(1 <= reads <= pods, f"{reads} DB reads, bound 1..{pods}")
    run.check(won == 1, f"{won} seeds won, not 1")
    run.check(won + present + fenced == reads, f"reads {reads} != won+present+fenced")
    run.row.db_reads, run.row.fenced_writes = reads, fenced
    run.row.facts.update(db_value=db_value, seeds_won=won, seeds_present=present)
    run.observe(
        f"{_same(got, db_value)}; {reads} DB reads ({won} seeded, {present} found it, "
        f"{fenced} fenced)"
    )


@scenario(
    "store-restarted",
    fault="counter store killed and restarted empty mid-traffic",
    expected="typed StoreErrors during the outage; 1 rebuild after it; every increment "
    "after the rebuild counted once; no inflation",
    needs=("store",),
)
def _store_restarted(run: Run) -> None:
    # Far apart, so that a value tells which counter (before or after the restart) it was.
    first, second, wait, pods = 1000.0, 1e6, 5.0, 4
    key = run.key(first)
    profile = run.profile(wait=wait, lease=5.0)
    fleet = run.pods(pods, profile)
    run.fleet.finish([run.fleet.start(fleet[0], run.work(profile, key))])
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=2.5, pace=0.01)
    tickets = run.fleet.start_together(fleet, traffic)
    time.sleep(1.0)
    run.db.put(key, second)  # spend flushed to the DB meanwhile
    assert run.env.store is not None
    run.env.store.restart()
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds = values(reports, "add")
    after = sorted(v for v in adds if v > second)
    before = [v for v in adds if v <= second]
    run.judge(reports, ceiling=second + len(after), deadline=wait, allowed={"StoreError"})
    gets = values(reports, "get")
    reads = loads(reports)
    run.check(reads == 1, f"{reads} DB reads after the restart, not 1")
    run.check(
        after == [second + n for n in range(1, len(after) + 1)],
        "increments after the rebuild are not exactly +1 each from the rebuilt value",
    )
    run.check(final == second + len(after), f"counter {final}, not {second} + {len(after)}")
    run.check(len(set(before)) == len(before), "an increment before the restart counted twice")
    run.check(
        all(first <= v <= first + len(before) + len(errors(reports)) or second <= v for v in gets),
        "a read returned a value from neither incarnation",
    )
    run.row.db_reads = 1 + reads
    run.row.fenced_writes = stat(reports, "fenced_writes")
    run.row.facts.update(
        first=first, second=second, final=final, increments_after=len(after),
        store_errors=errors(reports).count("StoreError"),
    )  # fmt: skip
    run.observe(
        f"{errors(reports).count('StoreError')} StoreErrors; {reads} rebuild; counter "
        f"{_num(final)} = {_num(second)} + {len(after)} increments"
    )


def _db_fault(
    run: Run, inject: Callable[[], None], recover: Callable[[], None], db_delay: float, error: str
) -> None:
    db_value, wait, pods = 31.0, 1.5, 2
    key = run.key(db_value)
    profile = run.profile(wait=wait)
    *fleet, spare = run.pods(pods + 1, profile)
    inject()
    try:
        # Paced: a call arriving as a timed-out rebuild winds down is its own scenario.
        work = run.work(profile, key, ops=("get", "add"), callers=4, db_delay=db_delay, pace=0.05)
        reports = run.fleet.finish(run.fleet.start_together(fleet, work))
    finally:
        recover()
    left = _settled(run)
    run.judge(reports, ceiling=db_value, deadline=wait, allowed={error})
    failed = errors(reports)
    reads = loads(reports)
    written = run.env.counter(key)
    run.check(
        failed == [error] * len(outcomes(reports)),
        f"errors {dict(Counter(failed))}, not all {error}",
    )
    # One flight per pod at a time; each caller's second call may start another.
    run.check(reads <= 2 * pods, f"{reads} DB attempts, bound {2 * pods}")
    run.check(written is None, f"the counter was written: {written}")
    run.check(left == 0, f"{left} timed-out DB queries still running")
    healed = run.fleet.finish([run.fleet.start(spare, run.work(profile, key, callers=2))])
    run.judge(healed, ceiling=db_value, deadline=wait)
    run.check(values(healed) == [db_value] * 2, f"after recovery got {values(healed)}")
    run.row.db_reads = reads + loads(healed)
    run.row.fenced_writes = stat(reports, "fenced_writes")
    run.row.max_wait = max_wait(reports)
    run.row.facts.update(errors=dict(Counter(failed)), recovered=values(healed))
    run.observe(
        f"{len(failed)} x {error} in <= {max_wait(reports):.2f}s, nothing written; "
        f"recovered: {values(healed)[0] if values(healed) else None}"
    )


def _settled(run: Run, timeout: float = 5.0) -> int:
    """Wait (``timeout`` at most) until no loader query runs in PostgreSQL: the timed-out
    ones were cancelled, not left running. How many still ran at the end."""
    deadline = time.monotonic() + timeout
    while (running := run.db.loaders_running()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return running


@scenario(
    "rebuild-winding-down",
    fault="a caller arrives while a timed-out rebuild winds down (its loader slow to cancel)",
    expected="the caller gets its own deadline: the DB value (the DB answers again), never "
    "the old rebuild's timeout at once",
)
def _rebuild_winding_down(run: Run) -> None:
    db_value, wait, cancel_delay = 17.0, 1.0, 0.6
    key = run.key(db_value)
    profile = run.profile(wait=wait)
    (pod,) = run.pods(1, profile)
    slow = run.work(profile, key, db_delay=30.0, cancel_delay=cancel_delay)
    timed_out = run.fleet.start(pod, slow)
    # The first call gives up at its deadline; its rebuild then takes cancel_delay to end.
    time.sleep(wait + 0.1)
    late = run.fleet.start(pod, run.work(profile, key, callers=2))
    first, second = run.fleet.finish([timed_out, late])
    run.judge([first], ceiling=db_value, deadline=wait, allowed={"ReseedTimeoutError"})
    run.judge([second], ceiling=db_value, deadline=wait, allowed={"ReseedTimeoutError"})
    left = _settled(run)
    got = [o.value if o.error is None else o.error for o in second.outcomes]
    run.check(errors([first]) == ["ReseedTimeoutError"], f"the slow call: {first.outcomes}")
    run.check(got == [db_value] * 2, f"callers arriving as it wound down got {got}")
    run.check(run.env.counter(key) in (None, db_value), "a wrong value was written")
    run.check(left == 0, f"{left} timed-out DB queries still running")
    run.row.db_reads = loads([first, second])
    run.row.fenced_writes = stat([first, second], "fenced_writes")
    run.row.facts.update(late=got, late_seconds=[round(o.seconds, 3) for o in second.outcomes])
    run.observe(f"callers arriving as it wound down got {got} after {max_wait([second]):.3f}s")


@scenario(
    "db-stopped",
    fault="PostgreSQL stopped",
    expected="a typed SourceError within the deadline, nothing written; then recovery",
    needs=("postgres",),
)
def _db_stopped(run: Run) -> None:
    assert run.env.postgres is not None
    _db_fault(run, run.env.postgres.stop, run.env.postgres.start, 0.0, "SourceError")


@scenario(
    "db-slow",
    fault="PostgreSQL slower than the deadline (pg_sleep 4s, wait 1.5s)",
    expected="a typed ReseedTimeoutError within the deadline, nothing written; then recovery",
)
def _db_slow(run: Run) -> None:
    _db_fault(run, lambda: None, lambda: None, 4.0, "ReseedTimeoutError")


def _doomed_rebuild(run: Run, profile: Profile, spent: float) -> tuple[str, Ticket, Pod, Pod]:
    """A rebuild that read ``spent`` and holds it, then a budget reset by another pod: the
    key, the doomed rebuild's ticket, its pod, and a third pod."""
    key = run.key(spent)
    holder, resetter, other = run.pods(3, profile)
    doomed = run.fleet.start(holder, run.work(profile, key, stall=True))
    run.fleet.loaded(doomed)
    run.db.put(key, 0.0)  # the budget period rolls over: spend back to zero, then the reset
    reset = run.fleet.finish([run.fleet.start(resetter, run.work(profile, key, ops=("reset",)))])
    run.judge(reset, ceiling=0.0, deadline=profile.wait)
    return key, doomed, holder, other


@scenario(
    "reset-during-rebuild",
    fault="budget reset (another pod) while a rebuild holds the pre-reset read",
    expected="the pre-reset read never written (fenced); the counter restarts from the "
    "reset; readers after the reset (other pods) never wait on the doomed lease",
)
def _reset_during_rebuild(run: Run) -> None:
    spent, wait = 500.0, 10.0
    profile = run.profile(lease=LEASE, lease_extensions=3, wait=wait)
    key, doomed, holder, reader = _doomed_rebuild(run, profile, spent)
    with run.env.watch(key) as seen:
        # The readers' rebuild reads the DB while the doomed holder still holds its lease,
        # then holds too: when the doomed write comes, the key is absent and only the fence
        # can stop it.
        after = run.fleet.start(reader, run.work(profile, key, callers=4, stall=True))
        run.fleet.loaded(after, timeout=wait)
        fenced = run.fleet.stats(holder, profile)["fenced_writes"]
        run.fleet.release(doomed)
        run.fleet.until(holder, profile, "fenced_writes", fenced + 1, timeout=wait)
        absent = run.env.counter(key)
        run.fleet.release(after)
        reports = run.fleet.finish([doomed, after])
        stale, fresh = reports
        adds = run.fleet.finish(
            [run.fleet.start(reader, run.work(profile, key, ops=("incr",) * 2))]
        )
    final = run.env.counter(key)
    run.judge([fresh, *adds], ceiling=2.0, deadline=wait)
    run.judge([stale], ceiling=spent, deadline=wait)  # it started before the reset
    run.check(absent is None, f"the key held {absent} when the doomed write was fenced")
    run.check(spent not in seen, f"the pre-reset read {spent:g} was written")
    run.check(values([fresh]) == [0.0] * 4, f"readers after the reset got {values([fresh])}")
    run.check(loads([fresh]) == 1, f"readers after the reset read the DB {loads([fresh])} times")
    run.check(
        fresh.stats["leases_lost"] == 0,
        "readers after the reset lost a lease attempt to the doomed holder",
    )
    run.check(sorted(values(adds)) == [1.0, 2.0], f"increments after the reset: {values(adds)}")
    run.check(final == 2.0, f"counter {final}, not 0 + 2 increments")
    run.row.db_reads = loads(reports)
    run.row.fenced_writes = stat(reports, "fenced_writes")
    run.row.facts.update(final=final, seen=sorted({v for v in seen if v is not None}))
    run.observe(
        f"pre-reset read never written ({stale.stats['fenced_writes']} fenced); readers after "
        f"the reset read 0 while the doomed lease was held, 0 leases lost; counter "
        f"{_num(final)} = 0 + 2"
    )


@scenario(
    "reset-reader-in-holder-pod",
    fault="budget reset (another pod) while a rebuild holds the pre-reset read; a reader in "
    "the rebuilding pod after the reset",
    expected="the reader gets the post-reset value, within the doomed holder's lease",
)
def _reset_reader_in_holder_pod(run: Run) -> None:
    spent, lease, extensions, wait = 500.0, 0.5, 1, 10.0
    profile = run.profile(lease=lease, lease_extensions=extensions, wait=wait)
    key, doomed, holder, _ = _doomed_rebuild(run, profile, spent)
    bound = lease * (extensions + 1)
    late = run.fleet.start(holder, run.work(profile, key, callers=2))
    # The doomed loader outlives its lease and extensions (and SLACK) before it returns.
    time.sleep(bound + SLACK + 0.5)
    run.fleet.release(doomed)
    (stale,) = run.fleet.finish([doomed])
    (reader,) = run.fleet.finish([late])
    run.judge([stale], ceiling=spent, deadline=wait)
    run.judge([reader], ceiling=0.0, deadline=wait)
    got = values([reader])
    run.check(got == [0.0, 0.0], f"readers after the reset got {got}, not the reset value 0")
    run.check(
        max_wait([reader]) <= bound + SLACK,
        f"readers after the reset waited {max_wait([reader]):.2f}s behind the doomed rebuild "
        f"(its lease: {bound:g}s)",
    )
    run.row.db_reads = loads([stale, reader])
    run.row.fenced_writes = stat([stale], "fenced_writes")
    run.row.facts.update(returned=got, joined=reader.stats["joined"])
    run.observe(f"readers got {got} after {max_wait([reader]):.2f}s")


@scenario(
    "store-reply-lost",
    fault="store replies to increments lost after the store ran them (TCP proxy drops the link)",
    expected="each increment applied exactly once; a lost reply surfaces as a typed StoreError",
)
def _store_reply_lost(run: Run) -> None:
    db_value, rounds = 20.0, 5
    key = run.key(db_value)
    with TcpProxy.to(run.env.servers.redis_url) as proxy:
        profile = run.profile(store_url=proxy.url, wait=5.0)
        (pod,) = run.pods(1, profile)
        warm = run.fleet.finish([run.fleet.start(pod, run.work(profile, key, ops=("get", "add")))])
        reports = []
        for _ in range(rounds):
            # Increments are scripts (EVALSHA); the warm counter's reads are plain GETs.
            proxy.drop_replies(1, to=b"EVALSHA")
            incr = run.work(profile, key, ops=("incr",))
            reports += run.fleet.finish([run.fleet.start(pod, incr)])
        dropped = proxy.dropped
    final = run.env.counter(key)
    # Every increment reached the store once through the proxy, which dropped its reply.
    exact = db_value + 1 + rounds
    run.judge(reports, ceiling=exact, deadline=5.0, allowed={"StoreError"})
    run.check(values(warm) == [db_value, db_value + 1], f"warm-up got {values(warm)}")
    run.check(dropped == rounds, f"{dropped} replies dropped, not {rounds}")
    run.check(
        final == exact,
        f"counter {final} after {rounds} increments of 1 from {db_value + 1:g}, not {exact:g}: "
        f"applied {(final or 0) - db_value - 1:g} times",
    )
    run.row.db_reads = loads(warm)
    run.row.fenced_writes = 0
    run.row.facts.update(final=final, exact=exact, returned=values(reports))
    run.observe(
        f"{dropped} replies dropped: {len(values(reports))} increments returned, "
        f"{errors(reports).count('StoreError')} StoreErrors; "
        f"counter {_num(final)} (exactly {_num(exact)})"
    )


# -- the table ---------------------------------------------------------------------------------


class Lab:
    """Servers, pods and the source of truth, for running scenarios: the chaos command and
    the tests both run them through here. Closing it stops the pods and removes the keys
    and rows of the run."""

    def __init__(self, env: ChaosEnv) -> None:
        self.env = env
        self.db = Database(env.servers.pg_dsn)
        _check_reachable(env, self.db)
        self.fleet = Fleet(env.servers.pg_dsn)

    def run(self, name: str) -> Row:
        """Run one scenario; its row (skipped if it needs a server it cannot control)."""
        spec = SCENARIOS[name]
        row = Row(name, spec.fault, spec.expected)
        missing = [need for need in spec.needs if not self.env.controls(need)]
        if missing:
            row.status = "skip"
            row.observed = f"needs embedded servers ({', '.join(missing)}): URLs were given"
            return row
        started = time.monotonic()
        try:
            spec.fn(self.trial(row))
        except Exception as exc:
            row.failures.append(f"scenario failed: {_describe(exc)}")
        finally:
            self.env.restore()
            row.seconds = round(time.monotonic() - started, 2)
        if row.failures:
            row.status = "FAIL"
            row.observed = "; ".join(row.failures)
        if row.max_wait is not None:
            row.max_wait = round(row.max_wait, 3)
        return row

    def trial(self, row: Row | str) -> Run:
        """A :class:`Run` for work outside the table (the contention tests)."""
        return Run(
            self.env, self.fleet, self.db, Row(row, row, "") if isinstance(row, str) else row
        )

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            with contextlib.suppress(RedisError, OSError, asyncpg.PostgresError):
                self.env.cleanup()
                self.db.cleanup(self.env.namespace)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def chaos_env(
    redis_url: str | None = None, lock_urls: Sequence[str] = (), pg_dsn: str | None = None
) -> Iterator[ChaosEnv]:
    """The servers given, plus embedded ones for whatever is missing (kept as handles, so
    that the scenarios can kill them), stopped on exit."""
    redis_count = (0 if redis_url else 1) + (0 if lock_urls else 3)
    try:
        running = EmbeddedServers(redis_count=redis_count, postgres=not pg_dsn)
        running.start()
    except EmbeddedServerError as exc:
        raise ChaosError(f"cannot start the embedded servers: {exc}") from exc
    try:
        spare = iter(running.redis)
        store = None if redis_url else next(spare)
        masters = () if lock_urls else tuple(spare)
        postgres = running.postgres
        servers = Servers(
            redis_url or (store.url if store else ""),
            tuple(lock_urls) or tuple(server.url for server in masters),
            pg_dsn or (postgres.dsn if postgres else ""),
        )
        yield ChaosEnv(servers, store, masters, postgres)
    finally:
        running.close()


def run_table(env: ChaosEnv, names: Sequence[str] | None = None) -> list[Row]:
    """Every scenario (or those named) on ``env``, in table order."""
    with Lab(env) as lab:
        return [lab.run(name) for name in names or list(SCENARIOS)]


def _check_reachable(env: ChaosEnv, db: Database) -> None:
    try:
        db.setup()
    except Exception as exc:
        raise ChaosError(
            f"cannot use PostgreSQL at {env.servers.pg_dsn}: {_describe(exc)}"
        ) from exc
    for role, url in [("counter store", env.servers.redis_url)] + [
        ("lock master", url) for url in env.servers.lock_urls
    ]:
        try:
            with env.client(url) as client:
                client.ping()
        except RedisError as exc:
            raise ChaosError(f"cannot reach the {role} at {url}: {_describe(exc)}") from exc


_COLUMNS = (
    ("fault", 34),
    ("expected", 40),
    ("observed", 46),
    ("DB reads", 8),
    ("fenced", 6),
    ("max wait s", 10),
    ("result", 6),
)


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a text table, text cells wrapped to fixed widths."""

    lines = ["  ".join(name.ljust(width) for name, width in _COLUMNS).rstrip()]
    lines.append("  ".join("-" * width for _, width in _COLUMNS))
    for row in rows:
        cells = (
            row.fault,
            row.expected,
            row.observed,
            _num(row.db_reads),
            _num(row.fenced_writes),
            _num(row.max_wait),
            row.status,
        )
        wrapped = [
            textwrap.wrap(cell, width) or [""]
            for cell, (_, width) in zip(cells, _COLUMNS, strict=True)
        ]
        for line in range(max(len(cell) for cell in wrapped)):
            lines.append(
                "  ".join(
                    (cell[line] if line < len(cell) else "").ljust(width)
                    for cell, (_, width) in zip(wrapped, _COLUMNS, strict=True)
                ).rstrip()
            )
        lines.append("")
    counts = Counter(row.status for row in rows)
    lines.append(", ".join(f"{counts[s]} {s}" for s in ("pass", "FAIL", "skip") if counts[s]))
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "chaos",
        help="run the fault table (DESIGN section 4) against real servers and pods",
        description=(
            "Inject each fault of the survival table into real redis-server and PostgreSQL "
            "processes while pods (spawned processes, each with its own coordinator) read and "
            "increment counters, and print one row per fault. Servers not given by URL are "
            "started embedded; faults that kill, pause or restart a server run only on "
            "embedded ones. Writes rows to the table reseed_chaos and keys under chaos:*, "
            "and removes them at the end. Exit status 1 if any row fails."
        ),
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="FAULT",
        help=f"run only this fault (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_server_flags(parser)
    parser.set_defaults(run=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    with chaos_env(args.redis_url, args.lock_url, args.pg_dsn) as env:
        rows = run_table(env, args.only)
    if args.json:
        print_json([row.as_dict() for row in rows])
    else:
        print(format_table(rows))
    return 1 if any(row.status == "FAIL" for row in rows) else 0
