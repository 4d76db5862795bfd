"""Faults of the counter store: killed and restarted empty mid-traffic."""

from __future__ import annotations

import time

from ..table import number
from .reports import errors, loads, values
from .table import Run, scenario


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
    run.tally(reports, db_reads=1 + reads)
    run.row.facts.update(
        first=first, second=second, final=final, increments_after=len(after),
        store_errors=errors(reports).count("StoreError"),
    )  # fmt: skip
    run.observe(
        f"{errors(reports).count('StoreError')} StoreErrors; {reads} rebuild; counter "
        f"{number(final)} = {number(second)} + {len(after)} increments"
    )
