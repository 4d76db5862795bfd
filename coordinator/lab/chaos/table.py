"""The table: a row per fault, what a scenario works with (:class:`Run`), the registry of
scenarios, and running and printing them."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from ...clients import redact
from ..cliargs import describe
from ..pods import Pod
from ..servers import Deployment, Need, unreachable
from ..table import format_table, number
from .common import HANG, SLACK, ChaosError, Status
from .database import Database
from .fleet import Fleet
from .messages import Profile, Report, Work
from .reports import loads, max_wait, outcomes, stat, values


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
    """What a scenario works with: servers, pods, the DB, and its row to fill in. Its keys
    and rows are named under ``namespace``."""

    def __init__(
        self, env: Deployment, fleet: Fleet, db: Database, row: Row, namespace: str
    ) -> None:
        self.env = env
        self.namespace = namespace
        self.fleet = fleet
        self.db = db
        self.row = row
        self._keys = 0

    def key(self, value: float | None = None) -> str:
        """A fresh counter key of this run, and its DB row holding ``value``."""
        self._keys += 1
        key = f"{self.namespace}:{self.row.name}:{self._keys}:{uuid.uuid4().hex[:6]}"
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

    def tally(self, reports: Sequence[Report], *, db_reads: int | None = None) -> None:
        """The row's DB reads (those of ``reports`` unless given) and fenced writes."""
        self.row.db_reads = loads(reports) if db_reads is None else db_reads
        self.row.fenced_writes = stat(reports, "fenced_writes")

    def seeded_once(
        self, reports: Sequence[Report], value: float, pods: int
    ) -> tuple[list[float], int, int, int, int]:
        """The checks of a race in which each of ``pods`` pods may rebuild on its own (its
        lease lapsed, or the lock degraded): every caller got ``value``, one DB read per pod
        flight at most, one seed won, and every read seeded, found the key, or was fenced.
        The values, DB reads, seeds won, seeds that found the key, and fenced writes; the
        row takes the reads and fenced writes."""
        got, reads = values(reports), loads(reports)
        won, present, fenced = (
            stat(reports, s) for s in ("seeds_won", "seeds_lost", "fenced_writes")
        )
        self.check(got == [value] * len(outcomes(reports)), f"callers got {dict(Counter(got))}")
        self.check(1 <= reads <= pods, f"{reads} DB reads, bound 1..{pods} (one per pod flight)")
        self.check(won == 1, f"{won} seeds won, not 1")
        self.check(won + present + fenced == reads, f"reads {reads} != won+present+fenced")
        self.row.db_reads, self.row.fenced_writes = reads, fenced
        return got, reads, won, present, fenced

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


class Lab:
    """Servers, pods and the source of truth, for running scenarios: the chaos command and
    the tests both run them through here. Closing it stops the pods and removes the keys
    and rows of the run."""

    def __init__(self, env: Deployment) -> None:
        self.env = env
        self.namespace = f"chaos:{uuid.uuid4().hex[:10]}"  # every key and row of the run
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
            row.observed = self.env.lacking(missing)
            return row
        started = time.monotonic()
        try:
            spec.fn(self.trial(row))
        except Exception as exc:
            row.failures.append(f"scenario failed: {describe(exc)}")
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
            self.env,
            self.fleet,
            self.db,
            Row(row, row, "") if isinstance(row, str) else row,
            self.namespace,
        )

    def close(self) -> None:
        try:
            self.fleet.close()
        finally:
            with contextlib.suppress(RedisError, OSError, asyncpg.PostgresError):
                self.env.remove(self.namespace)
                self.db.cleanup(self.namespace)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_table(env: Deployment, names: Sequence[str] | None = None) -> list[Row]:
    """Every scenario (or those named) on ``env``, in table order."""
    with Lab(env) as lab:
        return [lab.run(name) for name in names or list(SCENARIOS)]


def _check_reachable(env: Deployment, db: Database) -> None:
    try:
        db.setup()
    except Exception as exc:
        where = redact(env.servers.pg_dsn)
        raise ChaosError(f"cannot use PostgreSQL at {where}: {describe(exc)}") from exc
    problem = unreachable(env.servers)
    if problem is not None:
        raise ChaosError(problem)


_COLUMNS = (
    ("fault", 34),
    ("expected", 40),
    ("observed", 46),
    ("DB reads", 8),
    ("fenced", 6),
    ("max wait s", 10),
    ("result", 6),
)


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as a text table, text cells wrapped to fixed widths."""
    cells = [
        (
            row.fault,
            row.expected,
            row.observed,
            number(row.db_reads),
            number(row.fenced_writes),
            number(row.max_wait),
            row.status,
        )
        for row in rows
    ]
    header, widths = zip(*_COLUMNS, strict=True)
    table = format_table(header, cells, widths=widths, spaced=True)
    counts = Counter(row.status for row in rows)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("pass", "FAIL", "skip") if counts[s])
    return "\n\n".join([table, summary]) if rows else "\n".join([table, summary])
