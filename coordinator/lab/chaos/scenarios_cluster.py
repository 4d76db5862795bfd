"""Faults of a Redis Cluster counter store (``chaos --cluster``): the counter's slot
migrated to another master, and the counter's master killed and its replica promoted."""

from __future__ import annotations

import time

from ..table import number
from .reports import errors, loads, values
from .table import Run, scenario

_WAIT = 5.0


@scenario(
    "cluster-slot-migrated",
    fault="the counter's slot migrated to another master mid-traffic (MIGRATING / "
    "IMPORTING for 0.3 s, the counter moved with its companions)",
    expected="no CROSSSLOT; refusals are typed StoreErrors that applied nothing; counter == "
    "DB value + adds acknowledged; no rebuild",
    needs=("cluster",),
)
def _slot_migrated(run: Run) -> None:
    db_value = 100.0
    key = run.key(db_value)
    profile = run.profile(wait=_WAIT)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=2.5, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    cluster = run.env.cluster
    assert cluster is not None
    source = cluster.master_of(key)
    target = cluster.migrate(key, hold=0.3)
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds, failed = values(reports, "add"), errors(reports)
    crossslot = [error for error in failed if "CROSSSLOT" in error]
    run.judge(reports, ceiling=db_value + len(adds), deadline=_WAIT, allowed={"StoreError"})
    run.check(target is not source, "the slot did not move")
    run.check(not crossslot, f"{len(crossslot)} CROSSSLOT errors")
    run.check(
        final == db_value + len(adds),
        f"counter {final}, not {number(db_value)} + {len(adds)} adds acknowledged",
    )
    run.check(loads(reports) == 0, f"{loads(reports)} rebuilds of a counter that never vanished")
    run.tally(reports)
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed))
    run.observe(
        f"slot moved {source.port} -> {target.port}: {len(adds)} adds, {len(failed)} refused; "
        f"counter {number(final)} = {number(db_value)} + {len(adds)}"
    )


@scenario(
    "cluster-master-killed",
    fault="the counter's master killed (SIGKILL) mid-traffic; its replica promoted",
    expected="typed StoreErrors during the failover, values after it; the counter never "
    "above DB value + adds (the replica may lack the last ones); at most 1 rebuild",
    needs=("cluster",),
)
def _master_killed(run: Run) -> None:
    db_value = 100.0
    key = run.key(db_value)
    profile = run.profile(wait=_WAIT)
    pods = run.pods(4, profile)
    run.fleet.finish([run.fleet.start(pods[0], run.work(profile, key))])
    cluster = run.env.cluster
    assert cluster is not None
    master = cluster.master_of(key)
    replica = cluster.replica_of(master)
    traffic = run.work(profile, key, ops=("get", "add"), callers=4, duration=6.0, pace=0.005)
    tickets = run.fleet.start_together(pods, traffic)
    time.sleep(1.0)
    master.kill()
    promoted = cluster.wait_replaced(master)
    reports = run.fleet.finish(tickets)
    final = run.env.counter(key)
    adds, failed = values(reports, "add"), errors(reports)
    gets = values(reports, "get")
    run.judge(reports, ceiling=db_value + len(adds), deadline=_WAIT, allowed={"StoreError"})
    run.check(promoted is replica, f"{promoted!r} took over, not the replica {replica!r}")
    run.check(bool(failed), "no call failed while the master was down")
    run.check(
        final is not None and db_value <= final <= db_value + len(adds),
        f"counter {final} outside {number(db_value)}..{number(db_value + len(adds))}",
    )
    run.check(loads(reports) <= 1, f"{loads(reports)} rebuilds, at most 1 expected")
    run.tally(reports)
    lost = None if final is None else db_value + len(adds) - final
    run.row.facts.update(final=final, adds=len(adds), errors=len(failed), lost=lost)
    run.observe(
        f"{len(failed)} StoreErrors during the failover, {len(gets)} reads; counter "
        f"{number(final)}, {number(lost)} acknowledged adds lost by the promoted replica"
    )
