"""Faults of PostgreSQL: stopped, slower than the deadline, slow to cancel."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from ..pods import PATIENT
from .reports import errors, loads, max_wait, outcomes, values
from .table import Run, scenario


def _db_fault(
    run: Run, inject: Callable[[], None], recover: Callable[[], None], db_delay: float, error: str
) -> None:
    db_value, wait, pods = 31.0, 1.5, 2
    key = run.key(db_value)
    # The fault is the DB's: Redis is healthy, and on a busy machine fail-fast timeouts could
    # declare it dead, a StoreError where the row expects the DB's own error.
    profile = run.profile(wait=wait, **PATIENT.options())
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
    # A failed load is never retried within a call, and errors are not cached: a caller
    # that misses after its pod's flight has failed starts another. So: at most one DB
    # attempt per call (the flights of callers that miss together share theirs).
    calls = len(outcomes(reports))
    run.check(reads <= calls, f"{reads} DB attempts for {calls} calls")
    run.check(written is None, f"the counter was written: {written}")
    run.check(left == 0, f"{left} timed-out DB queries still running")
    healed = run.fleet.finish([run.fleet.start(spare, run.work(profile, key, callers=2))])
    run.judge(healed, ceiling=db_value, deadline=wait)
    run.check(values(healed) == [db_value] * 2, f"after recovery got {values(healed)}")
    run.tally(reports, db_reads=reads + loads(healed))
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
    profile = run.profile(wait=wait, **PATIENT.options())  # Redis is healthy (see _db_fault)
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
    run.tally([first, second])
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
